"""Attention over KV entries: the one dispatch point between the jnp reference and Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a row with nothing visible stays NaN-free


def visibility_mask(k_pos: jax.Array, q_pos: jax.Array, window: int | None) -> jax.Array:
    """bool[B, K, T, C]: entry c is visible to query t when present, not in the future, in the window.

    k_pos: int32[B, K, C] (-1 = empty); q_pos: int32[B, T].
    """
    k_pos = k_pos[:, :, None, :]  # [B, K, 1, C]
    q_pos = q_pos[:, None, :, None]  # [B, 1, T, 1]
    mask = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attention_probs(
    q: jax.Array, k: jax.Array, k_pos: jax.Array, q_pos: jax.Array, window: int | None, scale: float
) -> jax.Array:
    """float32[B, K, G, T, C] softmax weights of each query over the visible entries.

    q: [B, T, K, G, D] (G query heads per KV head); k: [B, K, C, D].
    """
    logits = jnp.einsum("btkgd,bkcd->bkgtc", q, k, preferred_element_type=jnp.float32) * scale
    mask = visibility_mask(k_pos, q_pos, window)[:, :, None]  # [B, K, 1, T, C]
    return jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)


def reference_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, k_pos: jax.Array, q_pos: jax.Array,
    window: int | None, scale: float,
) -> jax.Array:
    """Exact softmax attention in plain jnp; the ground truth of every kernel and policy test.

    q: [B, T, K, G, D]; k, v: [B, K, C, D]; returns [B, T, K, G, D].
    """
    probs = attention_probs(q, k, k_pos, q_pos, window, scale)  # [B, K, G, T, C]
    return jnp.einsum("bkgtc,bkcd->btkgd", probs.astype(v.dtype), v)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, k_pos: jax.Array, q_pos: jax.Array,
    window: int | None, scale: float,
) -> jax.Array:
    """Dispatches attention for the given layout; today every backend runs the jnp reference."""
    return reference_attention(q, k, v, k_pos, q_pos, window, scale)


def attend_with_probs(
    q: jax.Array, k: jax.Array, v: jax.Array, k_pos: jax.Array, q_pos: jax.Array,
    window: int | None, scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Attention output [B, T, K, G, D] and the weights [B, K, G, T, C] that scoring policies read."""
    probs = attention_probs(q, k, k_pos, q_pos, window, scale)
    return jnp.einsum("bkgtc,bkcd->btkgd", probs.astype(v.dtype), v), probs
