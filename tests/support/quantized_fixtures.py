"""Shared pieces of the quantized-cache tests: a head-dim-32 model and a teacher-forced run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvjax
from kvjax import ModelConfig
from kvjax.layer_step import Prefill
from kvjax.policies import Full


def head_dim_32_config(**kw) -> ModelConfig:
    """One-layer float32 Llama with head_dim 32: values quantize over groups of G = 32 channels
    (the conftest model has 16); one layer keeps compiles short and its k/v are checked exactly."""
    base = dict(
        family="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
    )
    return ModelConfig(**{**base, **kw})


def llama8b_cache_config() -> ModelConfig:
    """Llama-3.1-8B's cache shapes (32 layers, 8 KV heads, D 128), for byte counts on abstract states."""
    return head_dim_32_config(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096)


def teacher_forced(m, policy, tokens, lengths, new: int, chunk: int):
    """Prefill `lengths`, then `new` decode steps fed the known next tokens:
    (logits [B, new, V], state after prefill, state after decoding)."""
    lengths = np.asarray(lengths, np.int32)
    state = kvjax.prefill(m, tokens[:, : lengths.max()], policy, lengths=lengths, max_new_tokens=new, chunk_size=chunk)
    prefilled = jax.tree.map(jnp.copy, state)  # decode_step donates its input
    steps = []
    for i in range(new):
        logits, state = kvjax.decode_step(m, state, tokens[np.arange(len(lengths)), lengths + i], policy)
        steps.append(np.asarray(logits))
    return np.stack(steps, axis=1), prefilled, state


def assert_generate_is_the_greedy_chain(m, policy, tokens, lengths, new: int, chunk: int, steps: int = 1):
    """generate's jitted decode loop over a ragged batch writes the tokens that decode_step's argmax
    chain gives from the same prefill, for the `steps` steps after the first token."""
    prompts, lengths = tokens[:, : max(lengths)], np.asarray(lengths, np.int32)
    out = np.asarray(kvjax.generate(m, prompts, new, policy, lengths=lengths, eos_token_id=(), chunk_size=chunk))
    state = kvjax.prefill(m, prompts, policy, lengths=lengths, max_new_tokens=new, chunk_size=chunk)
    for i in range(steps):
        logits, state = kvjax.decode_step(m, state, out[:, i], policy)
        np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), out[:, i + 1])


def eager_queries_and_keys(m, tokens, lengths) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, the post-RoPE q [B, T, K, G, D] and k [B, T, K, D] of one eager forward over the
    prompts (T = max(lengths)), recorded by a layer step that otherwise is Full's: a reference
    independent of any policy's bookkeeping. The layers run unrolled, so each records concrete arrays."""
    model = nnx.merge(m.graphdef, m.params)
    b, t = len(lengths), max(lengths)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < jnp.asarray(lengths)[:, None]
    phase = Prefill(jnp.asarray(lengths, jnp.int32))
    seen = []

    def record(ctx, segments, shared, x):
        seen.append((np.asarray(x.q, np.float64), np.asarray(x.k, np.float64)))
        return Full().layer_step(ctx, segments, shared, x, phase)

    cache = Full().allocate(m.config, b, t, 0, t, jnp.float32).layers
    unrolled = model.layer_stack(cache, scan_layers=False)
    model(jnp.asarray(tokens[:, :t]), positions, valid, cache, record, stack=unrolled)
    return seen


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def unrotated(k: np.ndarray, theta: float) -> np.ndarray:
    """float64[B, T, K, D] keys at positions 0..T-1 with RoPE (half-split, default schedule) undone, in numpy."""
    d = k.shape[-1]
    angles = np.arange(k.shape[1])[:, None] * theta ** (-np.arange(0, d, 2) / d)  # [T, D/2]
    c, s = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    y1, y2 = k[..., : d // 2], k[..., d // 2 :]
    return np.concatenate([y1 * c + y2 * s, y2 * c - y1 * s], axis=-1)
