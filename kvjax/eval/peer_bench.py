"""`kvjax bench --against transformers,kvpress`: kvjax against its peers, on one machine in one run.

kvjax Full is timed against Hugging Face transformers' `generate` (torch, same dtype, SDPA attention,
greedy, min_new_tokens = max_new_tokens) on the same weights (the kvjax model copied into a
`LlamaForCausalLM`), and kvjax SnapKV / StreamingLLM against NVIDIA kvpress's SnapKVPress /
StreamingLLMPress keeping the same share of the prompt. In every cell (prompt length x batch) kvjax
runs once to compile and transformers once on a short prompt to warm up, then each side `repeats`
timed runs; the report keeps every repeat, the medians and the kvjax/peer ratios. The machine's
memory bandwidth (a large numpy reduction on one core and on all cores) is measured in the same
run, before it, before each cell and after it (others may share the machine), and each decode is
placed against the roofline: (parameter bytes + KV-state bytes) read per decode step over the
step's time, over the best all-cores bandwidth of the run.

torch and transformers (`pip install -e ".[compare]"`) and kvpress (`.[compare-kvpress]`, in a venv of its own:
it pins transformers<5.3) are optional and imported only here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.eval.harness import parse_length
from kvjax.inference import greedy_decode
from kvjax.kv_state import kv_bytes
from kvjax.language_model import LanguageModel

PEERS = ("transformers", "kvpress")
PRESSES = ("snapkv", "streaming")  # kvjax policies with a kvpress press of the same rule


class MissingPeerError(ValueError):
    """A peer library that is not installed."""


def require(module: str):
    """Imports an optional peer library, or raises MissingPeerError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = (
            'pip install -e ".[compare-kvpress]" in a venv of its own (kvpress pins transformers<5.3)'
            if module == "kvpress"
            else 'pip install -e ".[compare]"'
        )
        raise MissingPeerError(f"--against needs {module} ({err}); install the comparison extra: {extra}") from None


def check_against(against: tuple[str, ...]) -> None:
    """Raises ValueError for an unknown peer and MissingPeerError for a peer library that is not installed."""
    if not against or set(against) - set(PEERS):
        raise ValueError(f"--against takes {', '.join(PEERS)}; got {','.join(against) or 'nothing'}")
    for module in ("torch", "transformers", *(("kvpress",) if "kvpress" in against else ())):
        require(module)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class PeerBenchConfig:
    """What runs: every (length, batch) cell with batch x length <= max_batch_tokens (the others are
    listed as skipped), kvjax Full against transformers and/or the `presses` against kvpress, each
    compressed method keeping `keep` of the prompt (kvpress compression_ratio = 1 - keep)."""

    against: tuple[str, ...] = ("transformers",)
    lengths: tuple[int, ...] = (1024, 4096)
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 32
    repeats: int = 3
    chunk_size: int | None = None  # None: the policy's own (`kvjax.prefill`)
    keep: float = 0.25
    presses: tuple[str, ...] = PRESSES
    hf_cache: str = "static"  # transformers' cache for Full: "static" or "dynamic" (kvpress needs dynamic)
    snapkv_window: int = 64  # kvpress SnapKVPress's defaults, used on both sides
    snapkv_kernel: int = 5
    sink: int = 4  # StreamingLLMPress's n_sink
    scan_layers: bool | None = None  # kvjax's Execution (None: prefill scanned, decode unrolled)
    attention_impl: str = "auto"  # kvjax's Execution: how attention runs ("reference" forces the jnp path)
    other_scan: bool = True  # also time kvjax Full's decode with the layers scanned (unrolled if scan_layers)
    max_batch_tokens: int | None = None
    bandwidth_mb: int = 512
    seed: int = 0

    def __post_init__(self):
        if not self.against or set(self.against) - set(PEERS):
            raise ValueError(f"against takes {', '.join(PEERS)}; got {','.join(self.against) or 'nothing'}")
        if set(self.presses) - set(PRESSES):
            raise ValueError(f"presses must be among {', '.join(PRESSES)}; got {self.presses}")
        if not self.lengths or min(self.lengths) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"need positive lengths and batch sizes; got {self.lengths}, {self.batch_sizes}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 (one prefill token, then decode); got {self.new_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None; got {self.chunk_size}")
        for name in ("repeats", "bandwidth_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.keep < 1:
            raise ValueError(f"keep is the share of the prompt kept, in (0, 1); got {self.keep}")
        if self.hf_cache not in ("static", "dynamic"):
            raise ValueError(f"hf_cache must be static or dynamic; got {self.hf_cache!r}")

    def cells(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(run, skipped): (length, batch) cells, batch-major within each length."""
        both = [(n, b) for n in self.lengths for b in self.batch_sizes]
        cap = self.max_batch_tokens
        return [c for c in both if cap is None or c[0] * c[1] <= cap], [c for c in both if cap and c[0] * c[1] > cap]


def parse_lengths(text: str, context: int, new_tokens: int) -> tuple[int, ...]:
    """'1k,4k,max' -> (1024, 4096, context - new_tokens): 'max' is the longest prompt the model's context
    holds with `new_tokens` generated after it."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        out.append(context - new_tokens if item.lower() == "max" else parse_length(item))
    return tuple(out)


# --- the machine ---------------------------------------------------------------------------------


def memory_bandwidth(megabytes: int = 512, repeats: int = 5, threads: int | None = None) -> dict:
    """Read bandwidth (1e9 bytes/s) of a numpy float32 sum over `megabytes` MiB: on one core, and on
    `threads` (default: every core) summing equal slices at once. The best repeat is the ceiling."""
    threads = threads or os.cpu_count() or 1
    x = np.ones(megabytes * 2**20 // 4, np.float32)  # written, so every page is resident
    parts = np.array_split(x, threads)

    def timed(fn) -> list[float]:
        fn()  # warm
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            out.append(x.nbytes / (time.perf_counter() - start) / 1e9)
        return out

    one = timed(lambda: float(x.sum()))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy's reductions release the GIL
        many = timed(lambda: sum(pool.map(lambda p: float(p.sum()), parts)))
    return {
        "method": "numpy float32 sum",
        "array_bytes": x.nbytes,
        "threads": threads,
        "one_core_gb_s": max(one),
        "all_cores_gb_s": max(many),
        "one_core_repeats_gb_s": one,
        "all_cores_repeats_gb_s": many,
    }


def machine() -> dict:
    """Device, core count, load averages and library versions."""
    return {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": {name: _version(name) for name in ("jax", "jaxlib", "torch", "transformers", "kvpress", "numpy")},
    }


# --- the transformers model ------------------------------------------------------------------------


def hf_model(m: LanguageModel, attn_implementation: str = "sdpa"):
    """A transformers `LlamaForCausalLM` holding kvjax model `m`'s own weights (in m's dtype, eval mode).

    Llama-layout checkpoints only (default rope, no sliding window, all-or-no attention biases)."""
    torch, transformers = require("torch"), require("transformers")
    c = m.config
    if c.family not in ("llama", "mistral", "qwen2") or c.rope.kind != "default" or c.sliding_windows:
        raise ValueError(
            f"the peer comparison copies the weights into a transformers Llama: default rope, no sliding "
            f"window; got family {c.family}, rope {c.rope.kind}, windows {c.sliding_windows}"
        )
    if c.qkv_bias != c.o_bias:
        raise ValueError("a transformers Llama has biases on all of q, k, v, o or on none")
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope.theta,
        tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.qkv_bias,
        mlp_bias=c.mlp_bias,
        hidden_act=c.hidden_act,
        bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids) or None,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else ([*c.eos_token_ids, 0])[0],
        attn_implementation=attn_implementation,
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(m.dtype)]
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    state = model.load_state_dict(_hf_state_dict(m, torch), strict=False)
    if state.unexpected_keys or set(state.missing_keys) - {"lm_head.weight"}:
        raise ValueError(f"weights did not map onto transformers' Llama: {state}")
    return model


def _hf_state_dict(m: LanguageModel, torch) -> dict:
    """Transformers tensor name -> tensor, the inverse of checkpoints_convert.weight_map."""
    from flax import nnx

    p = nnx.to_pure_dict(m.params)
    t = lambda a: torch.from_numpy(np.array(a, copy=True))  # noqa: E731
    out = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"]["weight"])}
    if "lm_head" in p:
        out["lm_head.weight"] = t(np.asarray(p["lm_head"]).T)
    for i, block in p["blocks"].items():
        pre, attn, mlp = f"model.layers.{i}.", block["attn"], block["mlp"]
        out[pre + "input_layernorm.weight"] = t(block["input_norm"]["weight"])
        out[pre + "post_attention_layernorm.weight"] = t(block["post_attention_norm"]["weight"])
        for name in ("q", "k", "v"):
            w = np.asarray(attn[f"{name}_proj"])  # [E, N, D]
            out[pre + f"self_attn.{name}_proj.weight"] = t(w.reshape(w.shape[0], -1).T)
            if f"{name}_bias" in attn:
                out[pre + f"self_attn.{name}_proj.bias"] = t(np.asarray(attn[f"{name}_bias"]).reshape(-1))
        o = np.asarray(attn["o_proj"])  # [H, D, E]
        out[pre + "self_attn.o_proj.weight"] = t(o.reshape(-1, o.shape[-1]).T)
        if "o_bias" in attn:
            out[pre + "self_attn.o_proj.bias"] = t(attn["o_bias"])
        for name in ("gate", "up", "down"):
            out[pre + f"mlp.{name}_proj.weight"] = t(np.asarray(mlp[f"{name}_proj"]).T)
            if f"{name}_bias" in mlp:
                out[pre + f"mlp.{name}_proj.bias"] = t(mlp[f"{name}_bias"])
    return out


def parity(m: LanguageModel, hf, tokens: int = 64, seed: int = 0) -> dict:
    """Max |logit difference| and argmax agreement of kvjax and the transformers copy on random tokens."""
    torch = require("torch")
    ids = np.random.default_rng(seed).integers(0, m.config.vocab_size, (1, tokens)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    ours = np.asarray(kvjax.logits(m, ids), np.float32)
    return {
        "tokens": tokens,
        "max_abs_logit_diff": float(np.abs(ours - ref).max()),
        "argmax_agreement": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
    }


# --- timing each side ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a comparison in one cell: every timed repeat and the KV bytes after the prompt."""

    prefill_s: tuple[float, ...]
    decode_s_per_token: tuple[float, ...]
    kv_bytes: int  # the cache after the prompt (kvjax: its state; transformers: its cache tensors)

    def summary(self, batch: int, length: int, param_bytes: int) -> dict:
        prefill, decode = float(np.median(self.prefill_s)), float(np.median(self.decode_s_per_token))
        read = param_bytes + self.kv_bytes  # each decode step reads every weight and the whole cache
        return {
            "prefill_s_repeats": list(self.prefill_s),
            "decode_s_per_token_repeats": list(self.decode_s_per_token),
            "prefill_s": prefill,
            "decode_ms_per_token": decode * 1e3,
            "prefill_tokens_per_s": batch * length / prefill,
            "decode_tokens_per_s": batch / decode,
            "kv_bytes": self.kv_bytes,
            "decode_bytes_per_step": read,
            "decode_gb_per_s": read / decode / 1e9,
        }


def time_kvjax(m: LanguageModel, policy, prompts: np.ndarray, config: PeerBenchConfig) -> Side:
    """kvjax `prefill` of int32[B, T] prompts, then `new_tokens` greedy steps of generate's decode loop;
    one compiling run, then `repeats` timed ones."""
    run = dict(scan_layers=config.scan_layers, attention_impl=config.attention_impl)
    prefill_s, decode_s, size = [], [], 0
    for repeat in range(config.repeats + 1):
        start = time.perf_counter()
        state = jax.block_until_ready(
            kvjax.prefill(m, prompts, policy, chunk_size=config.chunk_size, max_new_tokens=config.new_tokens, **run)
        )
        prefilled = time.perf_counter()
        size = kv_bytes(state)
        jax.block_until_ready(greedy_decode(m, state, prompts[:, -1], config.new_tokens, policy, **run))
        if repeat:
            prefill_s.append(prefilled - start)
            decode_s.append((time.perf_counter() - prefilled) / config.new_tokens)
    return Side(tuple(prefill_s), tuple(decode_s), size)


def time_kvjax_decode(
    m: LanguageModel, policy, prompts: np.ndarray, config: PeerBenchConfig, scan_layers: bool
) -> dict:
    """Decode only, as `time_kvjax` but under `scan_layers`: one prefill, then a compiling and `repeats`
    timed decodes, each on its own copy of the state (decoding donates it)."""
    run = dict(attention_impl=config.attention_impl)
    state = kvjax.prefill(m, prompts, policy, chunk_size=config.chunk_size, max_new_tokens=config.new_tokens, **run)
    decode_s = []
    for repeat in range(config.repeats + 1):
        copy = jax.block_until_ready(jax.tree.map(jnp.copy, state))
        start = time.perf_counter()
        jax.block_until_ready(
            greedy_decode(m, copy, prompts[:, -1], config.new_tokens, policy, scan_layers=scan_layers, **run)
        )
        if repeat:
            decode_s.append((time.perf_counter() - start) / config.new_tokens)
    return {"scan_layers": scan_layers, "decode_s_per_token_repeats": decode_s, "kv_bytes": kv_bytes(state)}


def time_hf(hf, prompts: np.ndarray, config: PeerBenchConfig, cache: str, press=None) -> Side:
    """transformers `generate` (greedy, exactly `new_tokens` tokens), under a kvpress `press` if given.
    A pass-through logits processor stamps the time after each forward: the first forward is the
    prefill, the rest are decode steps. A warm-up run on the prompts' first 256 tokens, then `repeats`
    timed ones."""
    torch, transformers = require("torch"), require("transformers")

    class Stamps(transformers.LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.from_numpy(prompts.astype(np.int64))
    n = config.new_tokens
    prefill_s, decode_s, size = [], [], 0
    for repeat in range(config.repeats + 1):
        run = ids if repeat else ids[:, : min(ids.shape[1], 256)]  # warm-up on a short prompt: nothing compiles
        stamps = Stamps()
        with torch.inference_mode(), press(hf) if press is not None else _nothing():
            start = time.perf_counter()
            out = hf.generate(
                run,
                attention_mask=torch.ones_like(run),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                cache_implementation="static" if cache == "static" else None,
                logits_processor=transformers.LogitsProcessorList([stamps]),
                return_dict_in_generate=True,
                pad_token_id=hf.config.pad_token_id,
            )
        if len(stamps.times) != n or out.sequences.shape[1] != run.shape[1] + n:
            raise RuntimeError(f"transformers generated {out.sequences.shape[1] - run.shape[1]} tokens, not {n}")
        if repeat:
            cache_out = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.2x
            size = _cache_bytes(cache_out, config.new_tokens)
            prefill_s.append(stamps.times[0] - start)
            decode_s.append((stamps.times[-1] - stamps.times[0]) / (n - 1))
    return Side(tuple(prefill_s), tuple(decode_s), size)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _cache_bytes(cache, appended: int) -> int:
    """Bytes of a transformers cache's key and value tensors as the prompt left them: a dynamic cache
    grew by `appended` - 1 decode entries per row since; a static one is allocated whole (prompt +
    `appended` - 1 slots: the last token is never fed)."""
    total = 0
    for layer in cache.layers:
        for x in (layer.keys, layer.values):
            if x is None or x.numel() == 0:
                continue
            b, h, slots, d = x.shape
            static = type(layer).__name__.startswith("Static")
            total += b * h * (slots if static else slots - (appended - 1)) * d * x.element_size()
    return total


# --- the run -------------------------------------------------------------------------------------


def _methods(config: PeerBenchConfig, length: int) -> list[dict]:
    """Per comparison: the kvjax policy and the peer's name, label and press (None for plain generate)."""
    out = []
    if "transformers" in config.against:
        out.append(dict(method="full", policy=kvjax.policies.Full(), peer="transformers", press=None))
    if "kvpress" in config.against:
        kvpress = require("kvpress")
        ratio = 1 - config.keep
        kept = int(length * (1 - ratio))  # kvpress's compute_n_kept
        for name in config.presses:
            if name == "snapkv":
                policy = kvjax.policies.SnapKV(  # SnapKVPress pools by average (kvjax's default is the authors' max)
                    budget_tokens=kept, window=config.snapkv_window, kernel=config.snapkv_kernel, pooling="avg"
                )
                press = kvpress.SnapKVPress(
                    compression_ratio=ratio, window_size=config.snapkv_window, kernel_size=config.snapkv_kernel
                )
            else:
                policy = kvjax.policies.StreamingLLM(  # StreamingLLMPress keeps the original positions
                    sink=config.sink, window=kept - config.sink, position_shift=False
                )
                press = kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=config.sink)
            out.append(dict(method=name, policy=policy, peer="kvpress", press=press))
    return out


def run_peer_bench(
    m: LanguageModel, config: PeerBenchConfig = PeerBenchConfig(), log: Callable[[str], None] = print
) -> dict:
    """The report: machine, versions, model shapes, config, memory bandwidth, parity of the transformers
    copy, one row per (method, length, batch) with both sides' repeats and medians, and the targets."""
    check_against(config.against)
    torch = require("torch")
    run, skipped = config.cells()
    longest = max(n for n, _ in run) + config.new_tokens if run else 0
    if longest > m.config.max_position_embeddings:
        raise ValueError(
            f"prompt length {longest - config.new_tokens} plus {config.new_tokens} new tokens exceeds the "
            f"model's context of {m.config.max_position_embeddings}"
        )
    report = {"benchmark": "kvjax bench --against", **machine(), "torch_threads": torch.get_num_threads()}
    log(f"memory bandwidth ({config.bandwidth_mb} MiB numpy sum) ...")
    bandwidths = [memory_bandwidth(config.bandwidth_mb)]  # again before each cell: others may share the machine
    peak = bandwidths[0]["all_cores_gb_s"]
    hf = hf_model(m)
    param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(m.params)))
    c = m.config
    report.update(
        model=m.name or None,
        dtype=str(m.dtype),
        shapes=dict(
            layers=c.num_layers,
            heads=c.num_heads,
            kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            context=c.max_position_embeddings,
            param_bytes=param_bytes,
        ),
        config=dataclasses.asdict(config),
        cells_run=[list(x) for x in run],
        cells_skipped=[list(x) for x in skipped],
        parity=parity(m, hf),
        peer_setup={
            "transformers": f"LlamaForCausalLM with kvjax's weights, attn_implementation=sdpa, {config.hf_cache} "
            "cache, generate(do_sample=False, min_new_tokens=max_new_tokens), eager (no torch.compile)",
            "kvpress": "the press as a context manager around the same generate, dynamic cache",
            "kvjax": f"prefill (chunk {config.chunk_size or 'policy default'}) then generate's decode loop, scan_layers={config.scan_layers}",
        },
    )
    rows = []
    rng = np.random.default_rng(config.seed)
    for length, batch in run:
        prompts = rng.integers(0, c.vocab_size, (batch, length)).astype(np.int32)
        bandwidths.append(memory_bandwidth(config.bandwidth_mb, repeats=3))
        peak = max(peak, bandwidths[-1]["all_cores_gb_s"])
        full = None  # kvjax Full at this cell, the baseline of the compressed methods' decode speedup
        for spec in _methods(config, length):
            load_before = os.getloadavg()
            log(f"{length} x {batch} {spec['method']}: kvjax ...")
            ours = time_kvjax(m, spec["policy"], prompts, config)
            log(f"{length} x {batch} {spec['method']}: {spec['peer']} ...")
            cache = config.hf_cache if spec["press"] is None else "dynamic"
            peer = time_hf(hf, prompts, config, cache, spec["press"])
            a = ours.summary(batch, length, param_bytes)
            b = peer.summary(batch, length, param_bytes)
            row = {
                "method": spec["method"],
                "peer": spec["peer"],
                "kvjax_policy": repr(spec["policy"]),
                "peer_method": "generate" if spec["press"] is None else repr(spec["press"]),
                "peer_cache": cache,
                "length": length,
                "batch_size": batch,
                "new_tokens": config.new_tokens,
                "kvjax": a,
                "peer_result": b,
                "prefill_ratio": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"],
                "decode_ratio": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                "cell_bandwidth_gb_s": bandwidths[-1]["all_cores_gb_s"],
                "loadavg_before": list(load_before),
                "loadavg_after": list(os.getloadavg()),
            }
            row["kvjax_execution"] = {"scan_layers": config.scan_layers, "attention_impl": config.attention_impl}
            if spec["method"] == "full":
                full = ours
                if config.other_scan:
                    other = config.scan_layers is not True  # decode's other setting: scanned, or unrolled
                    log(f"{length} x {batch} full: kvjax decode, scan_layers={other} ...")
                    alt = time_kvjax_decode(m, spec["policy"], prompts, config, other)
                    decode = float(np.median(alt["decode_s_per_token_repeats"]))
                    read = param_bytes + alt["kv_bytes"]
                    alt.update(
                        decode_ms_per_token=decode * 1e3,
                        decode_tokens_per_s=batch / decode,
                        decode_bytes_per_step=read,
                        decode_gb_per_s=read / decode / 1e9,
                    )
                    row["kvjax_other_scan"] = alt
            elif full is None:  # no Full row in this run: time kvjax Full for the baseline
                log(f"{length} x {batch} full: kvjax (baseline) ...")
                full = time_kvjax(m, kvjax.policies.Full(), prompts, config)
            if spec["method"] != "full":
                row.update(_speedup(full, ours, param_bytes))
            rows.append(row)
            log(
                f"  prefill {a['prefill_tokens_per_s']:.0f} vs {b['prefill_tokens_per_s']:.0f} tok/s, "
                f"decode {a['decode_tokens_per_s']:.1f} vs {b['decode_tokens_per_s']:.1f} tok/s, "
                f"kvjax decode {a['decode_gb_per_s']:.1f} GB/s (numpy sum: {bandwidths[-1]['all_cores_gb_s']:.1f})"
            )
    bandwidths.append(memory_bandwidth(config.bandwidth_mb))
    one_core = max(b["one_core_gb_s"] for b in bandwidths)
    peak = max(b["all_cores_gb_s"] for b in bandwidths)
    for row in rows:  # against the best the machine read in this run
        for side in (row["kvjax"], row["peer_result"], row.get("kvjax_other_scan")):
            if side is not None:
                side["roofline_fraction"] = side["decode_gb_per_s"] / peak
                side["roofline_fraction_one_core"] = side["decode_gb_per_s"] / one_core
    report.update(
        bandwidth=bandwidths,
        roofline_bandwidth_gb_s=peak,
        one_core_bandwidth_gb_s=one_core,
        rows=rows,
        targets=targets(rows),
    )
    report["loadavg_end"] = list(os.getloadavg())
    return report


def _speedup(full: Side, got: Side, param_bytes: int) -> dict:
    """A compressed kvjax cache's decode speedup over kvjax Full against the speedup its bytes allow."""
    measured = float(np.median(full.decode_s_per_token) / np.median(got.decode_s_per_token))
    allowed = (param_bytes + full.kv_bytes) / (param_bytes + got.kv_bytes)
    return {
        "kvjax_full_kv_bytes": full.kv_bytes,
        "kvjax_full_decode_ms_per_token": float(np.median(full.decode_s_per_token)) * 1e3,
        "decode_speedup_vs_full": measured,
        "decode_speedup_bytes_allow": allowed,
        "decode_speedup_fraction": measured / allowed,  # the target: >= 0.8
        "decode_gain_fraction": (measured - 1) / (allowed - 1) if allowed > 1 else None,  # share of the gain
    }


def targets(rows: list[dict]) -> dict:
    """The issue's three targets, from the rows that measure them (None where the run has none)."""
    full = [r for r in rows if r["method"] == "full"]
    snap = [r for r in rows if r["method"] == "snapkv" and "decode_speedup_fraction" in r]
    snap_4k8 = [r for r in snap if r["length"] == 4096 and r["batch_size"] == 8]
    return {
        "decode_roofline_fraction (target >= 0.8)": {
            f"{r['length']}x{r['batch_size']}": r["kvjax"]["roofline_fraction"] for r in full
        }
        or None,
        "decode_roofline_fraction_other_scan": {
            f"{r['length']}x{r['batch_size']}": r["kvjax_other_scan"]["roofline_fraction"]
            for r in full
            if "kvjax_other_scan" in r
        }
        or None,
        "prefill_ratio_vs_transformers (target >= 1.5)": {
            f"{r['length']}x{r['batch_size']}": r["prefill_ratio"] for r in full
        }
        or None,
        "snapkv_4k_batch8_speedup_fraction (target >= 0.8)": snap_4k8[0]["decode_speedup_fraction"]
        if snap_4k8
        else None,
    }


# --- output ---------------------------------------------------------------------------------------

PEER_COLUMNS = (
    ("method", "method", "{}"),
    ("peer", "peer", "{}"),
    ("length", "length", "{}"),
    ("batch_size", "batch", "{}"),
    ("kvjax.prefill_tokens_per_s", "kvjax prefill tok/s", "{:.0f}"),
    ("peer_result.prefill_tokens_per_s", "peer prefill tok/s", "{:.0f}"),
    ("prefill_ratio", "prefill x", "{:.2f}"),
    ("kvjax.decode_tokens_per_s", "kvjax decode tok/s", "{:.1f}"),
    ("peer_result.decode_tokens_per_s", "peer decode tok/s", "{:.1f}"),
    ("decode_ratio", "decode x", "{:.2f}"),
    ("kvjax.roofline_fraction", "kvjax roofline", "{:.0%}"),
)


def format_peer_table(rows: list[dict]) -> str:
    """A plain-text table of the rows: tokens/s of both sides, kvjax/peer ratios, kvjax's roofline share."""

    def get(row, key):
        for part in key.split("."):
            row = row[part]
        return row

    body = [[fmt.format(get(r, key)) for key, _, fmt in PEER_COLUMNS] for r in rows]
    header = [h for _, h, _ in PEER_COLUMNS]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def plot_peer_bench(report: dict, path: Path) -> Path:
    """Prefill and decode tokens/s against prompt length, one column per batch size: kvjax solid, the peer
    dashed, one colour per method; decode panels also show Full's memory-bandwidth roofline."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    batches = sorted({r["batch_size"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    colors = {"full": "tab:blue", "snapkv": "tab:orange", "streaming": "tab:green"}
    peer_names = {"full": "transformers", "snapkv": "kvpress SnapKV", "streaming": "kvpress StreamingLLM"}
    layers = "scanned" if report["config"].get("scan_layers", True) else "unrolled"
    ours_names = {
        "full": f"kvjax Full, layers {layers}",
        "snapkv": "kvjax SnapKV",
        "streaming": "kvjax StreamingLLM",
    }
    fig, axes = plt.subplots(2, len(batches), figsize=(4.2 * len(batches) + 0.8, 6.6), squeeze=False)
    bw = report["roofline_bandwidth_gb_s"]
    for col, batch in enumerate(batches):
        for row_i, (key, title) in enumerate((("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode"))):
            ax = axes[row_i][col]
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = sorted(
                    (r for r in rows if r["method"] == method and r["batch_size"] == batch), key=lambda r: r["length"]
                )
                if not mine:
                    continue
                xs = [r["length"] for r in mine]
                ax.plot(xs, [r["kvjax"][key] for r in mine], "-o", color=colors[method], label=ours_names[method])
                ax.plot(
                    xs,
                    [r["peer_result"][key] for r in mine],
                    "--s",
                    color=colors[method],
                    mfc="white",
                    label=peer_names[method],
                )
                if key == "decode_tokens_per_s" and method == "full":
                    roof = [batch * bw * 1e9 / r["kvjax"]["decode_bytes_per_step"] for r in mine]
                    ax.plot(xs, roof, ":", color="0.4", label=f"roofline ({bw:.0f} GB/s)")
                    other = [r for r in mine if "kvjax_other_scan" in r]
                    if other:
                        scanned = other[0]["kvjax_other_scan"]["scan_layers"]
                        ax.plot(
                            [r["length"] for r in other],
                            [r["kvjax_other_scan"]["decode_tokens_per_s"] for r in other],
                            "-.^",
                            color="tab:purple",
                            label=f"kvjax Full, layers {'scanned' if scanned else 'unrolled'}",
                        )
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{title}, batch {batch}", fontsize=10)
            if row_i == 1:
                ax.set_xlabel("prompt length (tokens)")
            if col == 0:
                ax.set_ylabel(f"{title} tokens / s")
    handles, labels = axes[1][0].get_legend_handles_labels()
    for ax in axes.flat:  # every label once, whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2 * len(batches)), fontsize=8, frameon=False)
    v = report["versions"]
    fig.suptitle(
        f"{report.get('model') or 'model'} ({report['dtype']}) on {report['cpu_count']}-core {report['device']}\n"
        f"jax {v['jax']}, torch {v['torch']}, transformers {v['transformers']}"
        + (f", kvpress {v['kvpress']}" if v.get("kvpress") else ""),
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07 + 0.03 * (len(labels) > 4), 1, 0.96))
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_peer_bench(report: dict, out_dir: str | Path, name: str = "peer", plots: bool = True) -> list[Path]:
    """<name>.json (the report) and <name>.png (the plot) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json"]
    paths[0].write_text(json.dumps(report, indent=1))
    if plots and report["rows"]:
        paths.append(plot_peer_bench(report, out / f"{name}.png"))
    return paths
