"""The online-softmax step shared by the block-sparse attention kernels (float32 state)."""

from __future__ import annotations

import functools
import operator

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
    m, l, (acc,) = attend_block_pieces((q,), (k,), (v,), m_prev, l_prev, (acc_prev,), visible, sm_scale)
    return m, l, acc


def attend_block_pieces(qs, ks, vs, m_prev, l_prev, accs, visible, sm_scale):
    """`attend_block` over the head dim cut into column pieces (`column_pieces`): scores sum
    the pieces' products, and each accumulator piece follows its value piece.

    qs, ks: tuples of [M, w], [N, w]; vs: [N, w'] and accs [M, w'] alike. Returns (m, l, accs).
    """
    s = (
        functools.reduce(
            operator.add, (jnp.einsum("md,nd->mn", q, k, preferred_element_type=jnp.float32) for q, k in zip(qs, ks))
        )
        * sm_scale
    )  # [M, N]
    if visible is not None:
        s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [M, 1]
    p = jnp.exp(s - m_new)  # [M, N]
    if visible is not None:
        p = jnp.where(visible, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)  # [M, 1]
    l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)  # [M, 1]
    accs = tuple(
        alpha * acc + jnp.einsum("mn,nd->md", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        for v, acc in zip(vs, accs)
    )  # each [M, w']
    return m_new, l_new, accs


def initial_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m, l, acc) before any block: [rows, 1], [rows, 1], [rows, head_dim] float32."""
    m, l, (acc,) = initial_pieces(rows, (head_dim,))
    return m, l, acc


def initial_pieces(rows: int, widths) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
    """(m, l, accs) before any block, one float32 accumulator [rows, w] per piece width."""
    return (
        jnp.full((rows, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        tuple(jnp.zeros((rows, w), jnp.float32) for w in widths),
    )


def column_pieces(head_dim: int) -> tuple[slice, ...]:
    """Static column slices of power-of-two widths, largest first, that tile the head dim.

    Triton's tensors must have power-of-two sizes, so its kernels attend a head dim of 96
    (Phi-3) as 64 + 32 columns; a power of two is one piece. Each piece must be at least 16
    wide (tl.dot), so head_dim must be a multiple of 16.
    """
    if head_dim % 16:
        raise ValueError(f"the GPU (Triton) kernels need a head dim that is a multiple of 16, got {head_dim}")
    pieces, start = [], 0
    for bit in reversed(range(head_dim.bit_length())):
        if head_dim >> bit & 1:
            pieces.append(slice(start, start + (1 << bit)))
            start += 1 << bit
    return tuple(pieces)


def masked_logsumexp(qg, k, visible, sm_scale):
    """float32 log-sum-exp of the visible scores, -inf for a query row that sees no key.

    qg [B, Hkv, g, Q, D]; k [B, Hkv, C, D]; visible bool broadcastable to [B, Hkv, g, Q, C].
    Returns [B, Hkv, g, Q].
    """
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k, preferred_element_type=jnp.float32) * sm_scale
    return jax.nn.logsumexp(jnp.where(visible, s, -jnp.inf), axis=-1)


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
