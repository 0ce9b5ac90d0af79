"""Rotary position embeddings: default, linear, Llama 3 and Phi-3 LongRoPE frequency schedules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import RopeConfig


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    """Number of leading channels that rotate (Phi-style partial rotary keeps the rest as is)."""
    return int(head_dim * rope.partial_rotary_factor)


def _base_theta_powers(rope: RopeConfig, dim: int) -> np.ndarray:
    """theta^(2i/dim) in float32, computed as transformers does so positions far out still agree."""
    return np.float32(rope.theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))


def _llama3_inv_freq(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    """Llama 3.1: slow (long-wavelength) frequencies divided by `factor`, a smooth blend in between."""
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled)


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(short, long, attention_factor): frequency sets for contexts within / beyond the original length.

    Only LongRoPE has two different sets; every other schedule returns the same array twice.
    """
    dim = rotary_dim(rope, head_dim)
    inv_freq = (1.0 / _base_theta_powers(rope, dim)).astype(np.float32)  # [dim/2]
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        inv_freq = _llama3_inv_freq(rope, inv_freq)
    if rope.kind != "longrope":
        return inv_freq.astype(np.float32), inv_freq.astype(np.float32), 1.0
    attention_factor = rope.attention_factor
    if attention_factor is None:
        original = rope.original_max_position_embeddings
        attention_factor = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(original))
    base = _base_theta_powers(rope, dim)
    short = 1.0 / (np.asarray(rope.short_factor, np.float32) * base)
    long = 1.0 / (np.asarray(rope.long_factor, np.float32) * base)
    return short.astype(np.float32), long.astype(np.float32), float(attention_factor)


def rope_tables(
    rope: RopeConfig, head_dim: int, positions: jax.Array, seq_len: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, rotary_dim/2] for int32 positions [B, T].

    LongRoPE switches to its long factors when `seq_len` (the largest real position in the forward
    call, plus one) exceeds the original context, exactly as transformers decides it per call.
    """
    short, long, attention_factor = inverse_frequencies(rope, head_dim)
    inv_freq = jnp.asarray(short)
    if rope.kind == "longrope":
        use_long = seq_len > rope.original_max_position_embeddings
        inv_freq = jnp.where(use_long, jnp.asarray(long), inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dim/2]
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim channels of x [B, T, N, D] (half-split layout, as HF Llama)."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    x1, x2 = rot[..., :half].astype(jnp.float32), rot[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, half]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


def rotate_at(
    rope: RopeConfig, head_dim: int, x: jax.Array, positions: jax.Array, seq_len: jax.Array, inverse: bool = False
) -> jax.Array:
    """x [B, T, N, D] rotated to positions int32[B, T], or with `inverse` rotated back (float32 in and out).

    The inverse undoes `apply_rope` exactly, LongRoPE's attention factor included: a cache that keeps keys
    unrotated (CSKV's and PromptSVD's low-rank features) recovers them from the model's rotated keys and rotates them again
    when it attends, with the same tables both ways.
    """
    cos, sin = rope_tables(rope, head_dim, positions, seq_len)
    if inverse:  # (a R)^-1 = R^T / a, with a^2 = cos^2 + sin^2 (the attention factor, squared)
        gain = cos * cos + sin * sin
        cos, sin = cos / gain, -sin / gain
    return apply_rope(x.astype(jnp.float32), cos, sin)
