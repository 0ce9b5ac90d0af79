"""The KV state: an explicit, statically shaped pytree that policies shrink for real."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass(frozen=True)
class KVSegment:
    """KV entries of one layer for a set of KV heads that share one capacity.

    A head that keeps 256 tokens lives in a segment of capacity 256: budgets are buffer sizes, not
    masks. `pos` records each slot's original token position (-1 marks an empty slot), which gives
    the attention mask, decoding positions, and what a policy kept.
    """

    k: jax.Array  # [B, Hs, C, D]
    v: jax.Array  # [B, Hs, C, D]
    pos: jax.Array  # int32[B, Hs, C]
    heads: tuple[int, ...] = struct.field(pytree_node=False)  # the layer's KV-head indices stored here

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def valid(self) -> jax.Array:
        return self.pos >= 0  # bool[B, Hs, C]


@struct.dataclass(frozen=True)
class KVState:
    """Per layer, its segments; per sequence, the tokens consumed; per policy, its running statistics."""

    layers: tuple[tuple[KVSegment, ...], ...]
    length: jax.Array  # int32[B]: tokens seen so far, i.e. the position of the next token
    stats: Any = None  # pytree owned by the policy (accumulated attention, scores, ...)

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]


def empty_segment(
    batch: int, heads: tuple[int, ...], capacity: int, head_dim: int, dtype
) -> KVSegment:
    """A segment with every slot empty."""
    shape = (batch, len(heads), capacity, head_dim)
    return KVSegment(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full(shape[:3], -1, jnp.int32),
        heads=heads,
    )


def write_entries(
    segment: KVSegment, k: jax.Array, v: jax.Array, pos: jax.Array, start: jax.Array
) -> KVSegment:
    """Writes T new entries per sequence into consecutive slots [start[b], start[b] + T).

    k, v: [B, T, Hs, D]; pos: int32[B, T] (-1 for padding); start: int32[B].
    """
    def one(seg_k, seg_v, seg_pos, k, v, pos, start):  # one sequence
        k = jnp.swapaxes(k, 0, 1).astype(seg_k.dtype)  # [Hs, T, D]
        v = jnp.swapaxes(v, 0, 1).astype(seg_v.dtype)
        pos = jnp.broadcast_to(pos, (seg_pos.shape[0], pos.shape[0]))  # [Hs, T]
        return (
            jax.lax.dynamic_update_slice(seg_k, k, (0, start, 0)),
            jax.lax.dynamic_update_slice(seg_v, v, (0, start, 0)),
            jax.lax.dynamic_update_slice(seg_pos, pos, (0, start)),
        )

    new_k, new_v, new_pos = jax.vmap(one)(segment.k, segment.v, segment.pos, k, v, pos, start)
    return segment.replace(k=new_k, v=new_v, pos=new_pos)


def kv_bytes(state: Any) -> int:
    """Device bytes held by a KV state (every array leaf: keys, values, positions, statistics).

    Accepts concrete arrays or `jax.ShapeDtypeStruct` leaves, so sizes of large configurations can be
    computed from abstract shapes (`jax.eval_shape`) without allocating them.
    """
    leaves = jax.tree_util.tree_leaves(state)
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))
