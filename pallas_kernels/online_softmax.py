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
