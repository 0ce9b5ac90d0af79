"""The benchmark behind `kvjax bench`: prefill time, decode time per token and KV bytes of policies,
each against Full measured in the same run at the same shapes.

Prompts are random token ids (speed and memory do not depend on the text). Every measurement runs
once to compile, then `repeats` more times; the report keeps every repeat and their medians. Decode
is generate's jitted `while_loop` with no EOS stop, so each repeat decodes exactly `new_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

import kvjax
from kvjax.eval.harness import PolicyRun, as_runs
from kvjax.inference import greedy_decode
from kvjax.language_model import LanguageModel
from kvjax.policies import Full
from kvjax.sharding import device_kv_bytes


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Shapes and repetitions of a benchmark run."""

    lengths: tuple[int, ...] = (2048, 8192)  # prompt tokens
    batch_size: int = 1
    new_tokens: int = 32  # decode steps timed per repeat
    repeats: int = 3  # timed runs after the compiling one
    chunk_size: int | None = None  # None: the policy's own (`kvjax.prefill`)
    seed: int = 0
    attention_impl: str = "auto"  # how attention runs (kvjax.inference.Execution); "reference" forces the jnp path
    # Prefill packed (`kvjax.packing`). The prompts are all one length, a row each: this times packing's own
    # cost (no Pallas kernel takes its segment ids), not its saving on ragged batches.
    packing: bool = False

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"need at least one positive prompt length; got {self.lengths}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None; got {self.chunk_size}")
        for name in ("batch_size", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One policy at one length: device bytes of the state after the prompt and every timed repeat."""

    kv_bytes: int
    kv_bytes_per_device: int  # the most any one device holds (kv_bytes unless the model is sharded)
    prefill_s: tuple[float, ...]
    decode_s_per_token: tuple[float, ...]


def measure(m: LanguageModel, policy, prompts: np.ndarray, config: BenchConfig) -> Measurement:
    """Times `prefill` and then `new_tokens` decode steps on int32[B, T] `prompts`, `repeats` times after
    a compiling run; the state is rebuilt every repeat (decoding donates it)."""
    first = prompts[:, -1]  # [B] the token fed to the first decode step
    prefill_s, decode_s = [], []
    for repeat in range(config.repeats + 1):
        start = time.perf_counter()
        state = jax.block_until_ready(
            kvjax.prefill(
                m,
                prompts,
                policy,
                chunk_size=config.chunk_size,
                max_new_tokens=config.new_tokens,
                attention_impl=config.attention_impl,
                packing=config.packing,
            )
        )
        prefilled = time.perf_counter()
        kv_bytes, per_device = kvjax.kv_bytes(state), device_kv_bytes(state)
        decode_start = time.perf_counter()
        jax.block_until_ready(
            greedy_decode(m, state, first, config.new_tokens, policy, attention_impl=config.attention_impl)
        )
        if repeat:  # the first run compiles
            prefill_s.append(prefilled - start)
            decode_s.append((time.perf_counter() - decode_start) / config.new_tokens)
    return Measurement(kv_bytes, per_device, tuple(prefill_s), tuple(decode_s))


def _row(run: PolicyRun, length: int, config: BenchConfig, got: Measurement, full: Measurement) -> dict:
    prefill, decode = float(np.median(got.prefill_s)), float(np.median(got.decode_s_per_token))
    return {
        "policy": run.label,
        "policy_name": run.name,
        "budget": run.budget,
        "policy_repr": repr(run.policy),
        "length": length,
        "batch_size": config.batch_size,
        "new_tokens": config.new_tokens,
        "kv_bytes": got.kv_bytes,
        "full_kv_bytes": full.kv_bytes,
        "compression_ratio": full.kv_bytes / got.kv_bytes,
        "kv_bytes_per_device": got.kv_bytes_per_device,
        "prefill_ms": prefill * 1e3,
        "prefill_tokens_per_s": config.batch_size * length / prefill,
        "prefill_speedup": float(np.median(full.prefill_s)) / prefill,
        "decode_ms_per_token": decode * 1e3,
        "decode_tokens_per_s": config.batch_size / decode,
        "decode_speedup": float(np.median(full.decode_s_per_token)) / decode,
        "prefill_s_repeats": list(got.prefill_s),
        "decode_s_per_token_repeats": list(got.decode_s_per_token),
    }


def run_bench(
    m: LanguageModel,
    policies,
    config: BenchConfig = BenchConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """A report (device, model shapes, config, and one row per (length, policy)) of each policy's speed
    and memory against Full; Full is measured first at every length even when not asked for."""
    runs = as_runs(policies)
    if not any(isinstance(r.policy, Full) for r in runs):
        runs.insert(0, PolicyRun("full", "full", None, Full()))
    runs.sort(key=lambda r: not isinstance(r.policy, Full))  # the baseline first
    baseline = runs[0]
    longest = max(config.lengths) + config.new_tokens
    if longest > m.config.max_position_embeddings:
        raise ValueError(
            f"prompt length {max(config.lengths)} plus {config.new_tokens} new tokens exceeds the "
            f"model's context of {m.config.max_position_embeddings}"
        )
    rng = np.random.default_rng(config.seed)
    rows = []
    bar = tqdm(total=len(config.lengths) * len(runs), desc="bench", disable=not progress, dynamic_ncols=True)
    try:
        for length in config.lengths:
            prompts = rng.integers(0, m.config.vocab_size, (config.batch_size, length)).astype(np.int32)
            full = None  # the baseline's measurement at this length: runs[0] comes first
            for run in runs:
                bar.set_description(f"{length} {run.label}")
                try:
                    got = measure(m, run.policy, prompts, config)
                except ValueError as err:  # a policy that cannot run on this model: say so, go on
                    if run is baseline:
                        raise
                    log(f"{run.label} at {length}: skipped; {err}")
                    continue
                finally:
                    bar.update(1)
                full = full or got
                rows.append(_row(run, length, config, got, full))
    finally:
        bar.close()
    c = m.config
    return {
        "benchmark": "kvjax bench",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "model": m.name or None,
        "dtype": str(m.dtype),
        "mesh": None if m.mesh is None else dict(m.mesh.shape),
        "attention_impl": config.attention_impl,
        "shapes": {
            "layers": c.num_layers,
            "heads": c.num_heads,
            "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "hidden": c.hidden_size,
            "vocab": c.vocab_size,
        },
        "config": dataclasses.asdict(config),
        "rows": rows,
    }


def plot_bench(rows: list[dict], path: Path) -> Path:
    """Prefill time, decode time per token and KV bytes against prompt length, one line per policy."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("prefill_ms", "prefill (ms)"),
        ("decode_ms_per_token", "decode (ms / token)"),
        ("kv_bytes", "KV cache (MiB)"),
    )
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for label in dict.fromkeys(r["policy"] for r in rows):
            mine = sorted((r["length"], r[key]) for r in rows if r["policy"] == label)
            scale = 2.0**-20 if key == "kv_bytes" else 1.0
            ax.plot([x for x, _ in mine], [y * scale for _, y in mine], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_bench(report: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """bench.json (the report) and bench.png (the plot) under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    paths = [out / "bench.json"]
    if plots and report["rows"]:
        paths.append(plot_bench(report["rows"], out / "bench.png"))
    return paths


BENCH_COLUMNS = (
    ("length", "length"),
    ("policy", "policy"),
    ("kv_bytes", "kv_bytes"),
    ("compression_ratio", "compression"),
    ("prefill_ms", "prefill_ms"),
    ("prefill_speedup", "prefill_x"),
    ("decode_ms_per_token", "decode_ms/tok"),
    ("decode_speedup", "decode_x"),
)
