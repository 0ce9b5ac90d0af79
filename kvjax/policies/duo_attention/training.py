"""DuoAttention gate training (Xiao et al., 2024): learn which KV heads need full attention.

One gate alpha in [0, 1] per (layer, KV head), initialised at 1 and clamped after every step; the
model is frozen. Each step runs two forwards layer by layer in one pass: the full-attention model
(no gradient) and the mixed model where every head outputs
`alpha * full_attn + (1 - alpha) * streaming_attn` (streaming = causal, limited to the first `sink`
tokens plus the `recent` most recent ones). Loss = mean squared difference of the final-normed
hidden states at the answer tokens + `reg_weight` x mean |alpha|, on multi-passkey retrieval prompts.

Memory: gradients exist only for the L x Hkv gates; the frozen weights travel in the batch (jit
arguments, never baked-in constants). Each pass is one `lax.scan` over the layers (one compiled block,
its buffers reused layer after layer): the full-attention pass runs first, outside the gradient, and
keeps only its carry; the mixed pass keeps each layer's input [T, E] and nothing else for the backward
pass, which recomputes the layer from it. Attention runs in query chunks, each rematerialised, so no
T x T matrix is ever stored; in the mixed layer one logits matrix per chunk serves both the full and
the streaming softmax. Temporary memory so grows by one [T, E] per layer: for Llama-3-8B at 32K tokens
XLA assigns 25.5 GB of temporaries at 32 layers, 256 MiB more per layer, beside 16 GB of bf16 weights
(benchmarks/duo_gates_memory.py; its peak is the attention chunk's [Hkv, G, chunk, T] f32 scratch).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kvjax.attention import join_query_chunks, split_query_chunks, visibility_mask
from kvjax.eval.haystack import haystack_from_name
from kvjax.language_model import LanguageModel
from kvjax.policies.duo_attention.policy import write_gates_tsv
from kvjax.rope import apply_rope, rope_tables
from kvjax.train.loop import LoopConfig, TrainResult, check_learning_rate, check_prompt_model, train

GATES_TSV = "full_attention_heads.tsv"
RUN_JSON = "duo_gates.json"
# Settings a resumed run may change (each change recorded in RUN_JSON); any other change is refused.
RESUMABLE = frozenset({"lr", "steps", "checkpoint_every", "chunk"})

NATO = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliett",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)
_MASKED = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class DuoGateConfig:
    """DuoAttention's training recipe (defaults = the paper's) plus the data and memory knobs."""

    steps: int = 2000
    lr: float = 0.02
    reg_weight: float = 0.05  # weight of mean |alpha|
    sink: int = 128  # streaming attention during training: sink + recent tokens
    recent: int = 256
    init_gate: float = 1.0
    min_len: int = 1024  # prompt lengths (tokens) drawn uniformly in [min_len, max_len]
    max_len: int = 32_768
    num_passkeys: int = 10
    passkey_words: int = 32  # NATO-alphabet words per passkey
    min_depth: float = 0.05  # passkeys sit at sorted random depths in [min_depth, max_depth]
    max_depth: float = 0.95
    haystack: str = "prose"  # haystack name or folder of .txt files (kvjax.eval.haystack)
    pad_multiple: int = 1024  # sequences are right-padded to a multiple of this (fewer compiled shapes)
    chunk: int = 512  # query chunk of the attention (memory ~ chunk x T logits per head)
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        check_learning_rate(self.lr)
        if self.steps < 1 or not 0 <= self.reg_weight < float("inf"):
            raise ValueError(f"need steps >= 1 and a finite reg_weight >= 0; got {self.steps}, {self.reg_weight}")
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"need sink >= 0 and recent >= 1; got sink {self.sink}, recent {self.recent}")
        if not 0.0 <= self.init_gate <= 1.0:
            raise ValueError(f"init_gate must be in [0, 1]; got {self.init_gate}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len; got {self.min_len}, {self.max_len}")
        if self.num_passkeys < 1 or self.passkey_words < 1:
            raise ValueError(f"need num_passkeys, passkey_words >= 1; got {self.num_passkeys}, {self.passkey_words}")
        if not 0.0 <= self.min_depth <= self.max_depth <= 1.0:
            raise ValueError(f"need 0 <= min_depth <= max_depth <= 1; got {self.min_depth}, {self.max_depth}")
        if self.chunk < 1 or self.pad_multiple < 1 or self.pad_multiple % min(self.chunk, self.pad_multiple):
            raise ValueError(f"chunk {self.chunk} must divide pad_multiple {self.pad_multiple}")


# ------------------------------------------------------------------------------------------------
# Data: multi-passkey retrieval, a pure function of (seed, step).
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """Token ids of one training prompt and the mask of its answer tokens (the only supervised ones)."""

    ids: np.ndarray  # int32[T]
    answer: np.ndarray  # bool[T]
    passkeys: tuple[str, ...]


def passkey_sample(tokenizer, config: DuoGateConfig, seed: int, step: int) -> PasskeySample:
    """Passkeys of NATO words at sorted random depths of a haystack, then one question (with its
    answer, the supervised tokens) per passkey; the haystack is grown to fill the drawn length."""
    rng = np.random.default_rng([seed, step])
    length = int(rng.integers(config.min_len, config.max_len + 1))
    keys = tuple(" ".join(rng.choice(NATO, config.passkey_words)) for _ in range(config.num_passkeys))
    depths = np.sort(rng.uniform(config.min_depth, config.max_depth, config.num_passkeys))
    haystack = haystack_from_name(config.haystack)
    hay_seed = int(rng.integers(2**31))
    header = "A long book: <book>"
    footer = "</book>\nAnswer the questions about the book."
    tail: list[tuple[list[int], bool]] = []  # (ids, supervised), encoded piece by piece
    for i, key in enumerate(keys):
        tail.append(
            (tokenizer.encode(f"\nWhat is passkey {i + 1}? Passkey {i + 1} is:", add_special_tokens=False), False)
        )
        tail.append((tokenizer.encode(f" {key}.", add_special_tokens=False), True))
    tail_len = sum(len(p) for p, _ in tail)

    def context(n: int) -> list[int]:
        units = haystack.units(hay_seed, n)
        slots = np.minimum((depths * n).round().astype(int), n)
        pieces, k = [], 0
        for s in range(n + 1):
            while k < len(keys) and slots[k] == s:
                pieces.append(f"Remember it: passkey {k + 1} is: {keys[k]}.")
                k += 1
            if s < n:
                pieces.append(units[s])
        return tokenizer.encode(header + haystack.joiner.join(pieces) + footer)

    if len(context(0)) + tail_len > length:
        raise ValueError(
            f"prompt length {length} is too short for {config.num_passkeys} passkeys of {config.passkey_words} words "
            f"(they need {len(context(0)) + tail_len} tokens without haystack): raise min_len or lower the passkeys"
        )
    lo, hi = 0, 8  # build(lo) fits; grow hi until it does not
    while len(context(hi)) + tail_len <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(context(mid)) + tail_len <= length else (lo, mid)
    pieces = [(context(lo), False)] + tail
    ids = np.concatenate([np.asarray(p, np.int32) for p, _ in pieces])
    answer = np.concatenate([np.full(len(p), sup, bool) for p, sup in pieces])
    return PasskeySample(ids, answer, keys)


def make_batch(tokenizer, config: DuoGateConfig, pad_id: int, seed: int, step: int) -> dict:
    """Batch of one row, right-padded to a multiple of pad_multiple: tokens int32[1, T], valid bool[1, T],
    answer float32[1, T] (1 on the supervised answer tokens)."""
    sample = passkey_sample(tokenizer, config, seed, step)
    n = len(sample.ids)
    t = -(-n // config.pad_multiple) * config.pad_multiple
    tokens = np.full((1, t), pad_id, np.int32)
    valid, answer = np.zeros((1, t), bool), np.zeros((1, t), np.float32)
    tokens[0, :n], valid[0, :n], answer[0, :n] = sample.ids, True, sample.answer
    return {"tokens": tokens, "valid": valid, "answer": answer}


# ------------------------------------------------------------------------------------------------
# The mixed attention and the two-way forward.
# ------------------------------------------------------------------------------------------------


def streaming_mask(
    k_pos: jax.Array, q_pos: jax.Array, window: int | jax.Array | None, sink: int, recent: int
) -> jax.Array:
    """bool[B, K, T, C]: causal visibility limited to the first `sink` positions and the last `recent`
    (the query's own position included)."""
    kp, qp = k_pos[:, :, None, :], q_pos[:, None, :, None]  # [B, K, 1, C], [B, 1, T, 1]
    return visibility_mask(k_pos, q_pos, window) & ((kp < sink) | (kp > qp - recent))


def _softmax_out(logits: jax.Array, mask: jax.Array, v: jax.Array) -> jax.Array:
    """float32[B, C, K, G, D] attention output of logits [B, K, G, C, L] under mask [B, K, C, L]."""
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], logits, _MASKED), axis=-1)  # [B, K, G, C, L]
    return jnp.einsum("bkgcl,bkld->bckgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def mixed_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    alpha: jax.Array | None,
    *,
    sink: int,
    recent: int,
    window: int | jax.Array | None,
    scale: float,
    chunk: int = 512,
) -> jax.Array:
    """alpha * full + (1 - alpha) * streaming attention per KV head (its whole query group); alpha None:
    full attention only. Queries run in rematerialised chunks, one logits matrix serving both softmaxes.

    q: [B, T, K, G, D]; k, v: [B, K, C, D]; q_pos int32[B, T]; k_pos int32[B, K, C] (-1 empty);
    alpha float[K]; window None, an int or an int32 scalar; returns [B, T, K, G, D] in v's dtype.
    """
    qs, ps = split_query_chunks(chunk, q, q_pos)  # [N, B, C, K, G, D], [N, B, C]

    def one_chunk(args):
        qc, pc = args  # [B, C, K, G, D], [B, C]
        logits = jnp.einsum("bckgd,bkld->bkgcl", qc, k, preferred_element_type=jnp.float32) * scale
        full = _softmax_out(logits, visibility_mask(k_pos, pc, window), v)  # [B, C, K, G, D]
        if alpha is None:
            return full
        stream = _softmax_out(logits, streaming_mask(k_pos, pc, window, sink, recent), v)
        a = alpha.astype(jnp.float32)[None, None, :, None, None]  # [1, 1, K, 1, 1]
        return a * full + (1.0 - a) * stream

    out = jax.lax.map(jax.checkpoint(one_chunk), (qs, ps))  # [N, B, C, K, G, D]
    return join_query_chunks(out).astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static (hashable) settings of the forward."""

    sink: int
    recent: int
    chunk: int


_NO_WINDOW = 2**30  # a sliding window wider than any sequence: the same mask as no window


def _block_forward(graphdef, state, x, alpha, positions, k_pos, rope, window, spec: _Spec):
    """One decoder block with mixed attention (alpha float[K]) or full attention (alpha None); x [B, T, E];
    window None, an int or an int32 scalar (traced under scan)."""
    block = nnx.merge(graphdef, state)
    cfg = block.attn.config
    b, t, _ = x.shape
    q, k, v = block.attn.project(block.input_norm(x))  # [B, T, H, D], [B, T, K, D] x 2
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)  # [B, T, K, G, D]
    out = mixed_attention(
        q,
        k.swapaxes(1, 2),
        v.swapaxes(1, 2),
        positions,
        k_pos,
        alpha,
        sink=spec.sink,
        recent=spec.recent,
        window=window,
        scale=cfg.head_dim**-0.5,
        chunk=spec.chunk,
    )  # [B, T, K, G, D]
    out = jnp.einsum("bthd,hde->bte", out.reshape(b, t, cfg.num_heads, cfg.head_dim), block.attn.o_proj[...])
    if cfg.o_bias:
        out = out + block.attn.o_bias[...]
    x = x + out
    return x + block.mlp(block.post_attention_norm(x))


def duo_forward(graphdef, params, gates: jax.Array, tokens: jax.Array, valid: jax.Array, spec: _Spec):
    """(full, mixed) final-normed hidden states [B, T, E]; gates float[L, K].

    Each pass is one `lax.scan` over the layers, so one compiled block serves them all and its buffers
    are reused from layer to layer. The full pass runs first, outside the gradient (it does not depend
    on the gates), and keeps nothing but its carry; the mixed pass stores only each layer's input for
    the backward pass (_rematerialised_layers). Layer i's weights are picked with `lax.switch` over the
    unstacked parameters (a copy of one layer, where stacking them would copy the whole model);
    per-layer sliding windows enter as data.
    """
    model = nnx.merge(graphdef, params)
    cfg = model.config
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    k_pos = jnp.broadcast_to(jnp.where(valid, positions, -1)[:, None, :], (b, cfg.num_kv_heads, t))
    rope = rope_tables(cfg.rope, cfg.head_dim, positions, jnp.sum(valid, axis=-1).max())
    splits = [nnx.split(block) for block in model.blocks]
    block_def, states = splits[0][0], [state for _, state in splits]
    if any(jax.tree.structure(s) != jax.tree.structure(states[0]) for s in states):
        raise ValueError("DuoAttention gate training needs decoder blocks with identical parameter structure")
    windows = [cfg.sliding_window(layer) for layer in range(cfg.num_layers)]
    if all(w is None for w in windows):
        windows = None  # static: no sliding-window term in the masks
    else:
        windows = jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)  # [L]
    branches = [lambda s=s: s for s in states]

    def layer(x, i, alpha):
        state = jax.lax.switch(i, branches)  # layer i's weights
        window = None if windows is None else windows[i]
        return _block_forward(block_def, state, x, alpha, positions, k_pos, rope, window, spec)

    x = model.embed[...][tokens]  # [B, T, E]
    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    x_full, _ = jax.lax.scan(lambda x, i: (layer(x, i, None), None), x, layers)
    x_mix = _rematerialised_layers(layer, x, gates)
    return model.final_norm(jax.lax.stop_gradient(x_full)), model.final_norm(x_mix)


def _rematerialised_layers(layer, x: jax.Array, gates: jax.Array) -> jax.Array:
    """x through layer(x, i, gates[i]) for i = 0 .. L-1, differentiable in x and gates (float[L, K]).

    What jax.checkpoint under lax.scan does, made explicit: the forward scan keeps only each layer's
    input, and the backward scan (in reverse) recomputes layer i from it and applies its VJP. The inputs
    are kept as their raw bits ([L, B, T, E] unsigned integers of x's width), so no backend widens them
    (XLA's CPU backend turns a bf16 scan residual into an f32 copy, doubling it).
    """
    layers = jnp.arange(gates.shape[0], dtype=jnp.int32)
    dtype, bits = x.dtype, jnp.dtype(f"uint{8 * x.dtype.itemsize}")

    @jax.custom_vjp
    def run(x, gates):
        return run_forward(x, gates)[0]

    def run_forward(x, gates):
        body = lambda x, xs: (layer(x, *xs), jax.lax.bitcast_convert_type(x, bits))  # noqa: E731
        out, inputs = jax.lax.scan(body, x, (layers, gates))  # inputs: uint[L, B, T, E]
        return out, (gates, inputs)

    def run_backward(residuals, g):
        def step(g, xs):
            i, alpha, x_bits = xs
            _, vjp = jax.vjp(lambda x, a: layer(x, i, a), jax.lax.bitcast_convert_type(x_bits, dtype), alpha)
            return vjp(g)  # (cotangent of layer i's input, of its gate row)

        return jax.lax.scan(step, g, (layers, *residuals), reverse=True)  # (d x, d gates)

    run.defvjp(run_forward, run_backward)
    return run(x, gates)


def make_loss_fn(graphdef, config: DuoGateConfig):
    """loss_fn({"gates": float[L, K]}, batch, rng) -> (loss, aux); batch carries the frozen model params
    under "model" so they enter jit as arguments."""
    spec = _Spec(config.sink, config.recent, config.chunk)

    def loss_fn(params, batch, rng):
        del rng
        gates = params["gates"]
        full, mixed = duo_forward(graphdef, batch["model"], gates, batch["tokens"], batch["valid"], spec)
        sq = jnp.mean(jnp.square(mixed.astype(jnp.float32) - full.astype(jnp.float32)), axis=-1)  # [B, T]
        w = batch["answer"]  # [B, T]
        distill = jnp.sum(sq * w) / jnp.maximum(jnp.sum(w), 1.0)
        l1 = jnp.mean(jnp.abs(gates))
        return distill + config.reg_weight * l1, {"distill": distill, "mean_gate": l1}

    return loss_fn


# ------------------------------------------------------------------------------------------------
# Optimizer and the run.
# ------------------------------------------------------------------------------------------------


def lr_multiplier(step, steps: int):
    """DuoAttention's schedule: linear warm-up over the first 20% of steps and decay over the last 20%,
    never below 0.1: min(1, max((s+1)/(N/5), 0.1), max((N-s)/(N/5), 0.1))."""
    fifth = steps / 5
    return jnp.minimum(1.0, jnp.minimum(jnp.maximum((step + 1) / fifth, 0.1), jnp.maximum((steps - step) / fifth, 0.1)))


def clamp_to_unit_interval() -> optax.GradientTransformation:
    """Rewrites the updates so that params + updates lies in [0, 1] (DuoAttention clamps after each step)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("clamp_to_unit_interval needs the params")
        return jax.tree.map(lambda u, p: jnp.clip(p + u, 0.0, 1.0) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW (no weight decay) on DuoAttention's schedule, then the clamp to [0, 1]."""
    return optax.chain(
        optax.adamw(lambda count: lr * lr_multiplier(count, steps), weight_decay=0.0), clamp_to_unit_interval()
    )


def train_duo_gates(
    model: LanguageModel,
    out: str | os.PathLike,
    config: DuoGateConfig = DuoGateConfig(),
    *,
    progress: bool = True,
    plot: bool = True,
) -> tuple[np.ndarray, TrainResult]:
    """Trains the gates of `model` and writes `out/full_attention_heads.tsv` (float[L, Hkv]), the loop's
    orbax checkpoints and loss curve; rerunning with the same `out` resumes the run exactly."""
    check_prompt_model(model, config.max_len, "passkey")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    passkey_sample(model.tokenizer, dataclasses.replace(config, max_len=config.min_len), config.seed, 0)  # fails early
    record = {"method": "duo", "model": model.name, **dataclasses.asdict(config)}
    layers, kv_heads = model.config.num_layers, model.config.num_kv_heads
    gates = {"gates": jnp.full((layers, kv_heads), config.init_gate, jnp.float32)}
    pad = model.tokenizer.padding_id()
    params = model.params

    def batch_fn(seed: int, step: int) -> dict:
        return {**make_batch(model.tokenizer, config, pad, seed, step), "model": params}

    result = train(
        gates,
        make_loss_fn(model.graphdef, config),
        make_optimizer(config.lr, config.steps),
        batch_fn,
        LoopConfig(
            steps=config.steps,
            seed=config.seed,
            checkpoint_every=config.checkpoint_every,
            progress=progress,
            plot=plot,
            description="train-gates duo",
            marks=((config.steps // 5, "end of warm-up"), (config.steps - config.steps // 5, "decay")),
        ),
        out,
        record=record,
        record_file=RUN_JSON,
        fixed=set(record) - RESUMABLE,
    )
    trained = np.asarray(result.params["gates"], np.float64)
    write_gates_tsv(out / GATES_TSV, trained)
    return trained, result
