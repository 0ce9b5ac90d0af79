"""The online-softmax step shared by the block-sparse attention kernels (float32 state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity": masked scores never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attend_block(q, k, v, m_prev, l_prev, acc_prev, visible, sm_scale):
    """Folds one KV block into the running (max, sum, accumulator) of a block of queries.

    q [M, D], k and v [N, D], m and l [M, 1], acc [M, D]; visible is bool[M, N] or None when
    every pair is visible (the unmasked fast path). Masked probabilities are forced to zero,
    so a row that sees nothing keeps l = 0.
    """
    s = jnp.einsum("md,nd->mn", q, k, preferred_element_type=jnp.float32) * sm_scale  # [M, N]
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [M, 1]
    p = jnp.exp(s - m_new)  # [M, N]
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)  # [M, 1]
    l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)  # [M, 1]
    pv = jnp.einsum("mn,nd->md", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, alpha * acc_prev + pv  # acc [M, D]


def initial_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, l, acc) before any block: [rows, 1], [rows, 1], [rows, head_dim] float32."""
    return (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def masked_attention(qg, k, v, visible, sm_scale):
    """Dense softmax attention over the visible keys, with the kernels' semantics: a query row that
    sees no key outputs zeros. The ground truth the block-sparse references share.

    qg [B, Hkv, g, Q, D]; k, v [B, Hkv, C, D]; visible bool broadcastable to [B, Hkv, g, Q, C].
    Returns float32 [B, Hkv, g, Q, D].
    """
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(visible, s, -jnp.inf)  # [B, Hkv, g, Q, C]
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)  # [B, Hkv, g, Q, 1]
    o = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.astype(jnp.float32))
    return jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
