"""The KV state: an explicit, statically shaped pytree that policies shrink for real."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SLOT_MULTIPLE = 16  # capacities are rounded up to this so the decode kernel can tile them
POSITION_BLOCK = 128  # the kernels' largest block, in which long slot = position caches are read
LONG_CAPACITY = 16 * POSITION_BLOCK  # from here on a whole block costs at most 1/16 extra slots


def round_capacity(n: int) -> int:
    """`n` slots rounded up to a multiple of SLOT_MULTIPLE (at most 15 extra per head)."""
    return -(-n // SLOT_MULTIPLE) * SLOT_MULTIPLE


def position_capacity(n: int) -> int:
    """Slots for a slot = position cache of n tokens (Full's layout): `round_capacity`, or from
    LONG_CAPACITY on whole POSITION_BLOCK blocks. The chunked prefill and decode kernels take the
    largest block dividing the capacity (Mosaic GPU's prefill needs 64 or 128), and a prompt of
    32768 with room for 32 tokens would otherwise be read 32 slots at a time."""
    if n < LONG_CAPACITY:
        return round_capacity(n)
    return -(-n // POSITION_BLOCK) * POSITION_BLOCK


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

    def plain(self) -> KVSegment:
        """Just the entries (k, v, pos, heads), as a `KVSegment`, whatever else this segment carries."""
        return KVSegment(k=self.k, v=self.v, pos=self.pos, heads=self.heads)


@struct.dataclass(frozen=True)
class EvictionSegment(KVSegment):
    """A segment a policy keeps to `budget` entries per row by a priority (token eviction, and the
    streaming heads of DuoAttention and RazorAttention); a segment that keeps everything it is given
    is a plain `KVSegment`, so `isinstance(seg, EvictionSegment)` tells the two apart.

    `score` is the policy's running per-entry statistic (H2O's accumulated attention, SnapKV's votes,
    Locret's predicted scores), or None for policies that rank entries from what a segment already
    holds (StreamingLLM's positions, Knorm's keys): they carry no buffer, so `kv_bytes` counts none.
    It is optional rather than a further subclass because one code path (`TokenEviction`) serves
    both kinds, which `Policy.scored()` tells apart.
    """

    budget: int = struct.field(pytree_node=False)  # entries kept per (sequence, head)
    score: jax.Array | None = None  # float32[B, Hs, C], written and moved with the entries


@struct.dataclass(frozen=True)
class KVState:
    """Per layer, its segments; per sequence, the tokens consumed; per policy, state shared by layers.

    A layer's entry is a tuple of segments: `KVSegment`s, or a policy's own segment types (quantized
    slabs, paged bounds, ...), each a pytree with a static `heads` field naming its KV heads.
    """

    layers: tuple[tuple[Any, ...], ...]
    length: jax.Array  # int32[B]: tokens seen so far, i.e. the position of the next token
    shared: Any = None  # pytree the policy carries from layer to layer (Policy.layer_step); None for most
    # Static, hashable: which policy and model made the state and how many decode steps it has room for
    # (kvjax.inference.StateOrigin, set by `prefill`), so decoding can refuse what would go silently wrong.
    origin: Any = struct.field(pytree_node=False, default=None)

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]


def empty_segment(
    batch: int,
    heads: tuple[int, ...],
    capacity: int,
    head_dim: int,
    dtype,
    scored: bool = False,
    budget: int | None = None,
) -> KVSegment:
    """A segment with every slot empty: a `KVSegment`, or with a `budget` an `EvictionSegment` (with a
    zeroed score buffer when `scored`)."""
    shape = (batch, len(heads), capacity, head_dim)
    segment = KVSegment(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), pos=jnp.full(shape[:3], -1, jnp.int32), heads=heads
    )
    if budget is None:
        if scored:
            raise ValueError("a score buffer belongs to a segment kept to a budget; got scored=True without one")
        return segment
    score = jnp.zeros(shape[:3], jnp.float32) if scored else None
    return EvictionSegment(k=segment.k, v=segment.v, pos=segment.pos, heads=heads, budget=budget, score=score)


def write_entries(
    segment: KVSegment,
    k: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    start: jax.Array,
    score: jax.Array | None = None,
) -> KVSegment:
    """Writes T new entries per sequence into consecutive slots [start, start + T) of each head.

    k, v: [B, T, Hs, D]; pos: int32[B, T] (-1 for padding); start: int32[B] or int32[B, Hs].
    An `EvictionSegment`'s new entries start with score 0, or with `score` float32[B, T, Hs] (e.g.
    Locret's predicted scores); `score` is ignored for segments without a score buffer.
    """
    b, t, hs, _ = k.shape
    start = jnp.broadcast_to(start[:, None] if start.ndim == 1 else start, (b, hs))  # [B, Hs]

    def one(row, new, s):  # one (sequence, head) row: [C, ...] <- [T, ...] at slot s
        return jax.lax.dynamic_update_slice_in_dim(row, new.astype(row.dtype), s, axis=0)

    per_row = jax.vmap(jax.vmap(one))
    pos = jnp.broadcast_to(pos[:, None, :], (b, hs, t))  # [B, Hs, T]
    written = dict(
        k=per_row(segment.k, k.swapaxes(1, 2), start),
        v=per_row(segment.v, v.swapaxes(1, 2), start),
        pos=per_row(segment.pos, pos, start),
    )
    if _has_score(segment):
        new = jnp.zeros((b, hs, t)) if score is None else score.swapaxes(1, 2)
        written["score"] = per_row(segment.score, new, start)
    return segment.replace(**written)


def write_free_slot(
    segment: KVSegment, k: jax.Array, v: jax.Array, pos: jax.Array, score: jax.Array | None = None
) -> KVSegment:
    """Writes one new entry per (sequence, head) into that row's first empty slot (decode).

    k, v: [B, 1, Hs, D]; pos: int32[B, 1]; score: optional float32[B, 1, Hs] (else 0). The caller
    guarantees a free slot exists.
    """
    slot = jnp.argmax(segment.pos < 0, axis=-1).astype(jnp.int32)  # [B, Hs]
    return write_entries(segment, k, v, pos, slot, score)


def _has_score(segment: KVSegment) -> bool:
    return isinstance(segment, EvictionSegment) and segment.score is not None


def count(segment: KVSegment) -> jax.Array:
    """int32[B, Hs]: entries held per (sequence, head)."""
    return jnp.sum(segment.pos >= 0, axis=-1, dtype=jnp.int32)


def keep_top(segment: KVSegment, priority: jax.Array, keep: int, capacity: int) -> KVSegment:
    """Keeps the `keep` highest-priority entries of each row, in position order, in a buffer of
    `capacity` slots; empty slots never win. priority: float32[B, Hs, C] (finite or +inf)."""
    priority = jnp.where(segment.pos >= 0, priority, -jnp.inf)
    keep = min(keep, segment.capacity)
    top_val, top_idx = jax.lax.top_k(priority, keep)  # [B, Hs, keep]
    top_pos = jnp.where(top_val > -jnp.inf, jnp.take_along_axis(segment.pos, top_idx, axis=-1), -1)
    order = jnp.argsort(jnp.where(top_pos >= 0, top_pos, jnp.iinfo(jnp.int32).max), axis=-1)
    idx = jnp.take_along_axis(top_idx, order, axis=-1)  # [B, Hs, keep], position order
    widths = ((0, 0), (0, 0), (0, capacity - keep))

    def gather(x):  # [B, Hs, C, ...] -> [B, Hs, capacity, ...]
        picked = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)
        return jnp.pad(picked, widths + ((0, 0),) * (x.ndim - 3))

    kept = dict(
        k=gather(segment.k),
        v=gather(segment.v),
        pos=jnp.pad(jnp.take_along_axis(top_pos, order, axis=-1), widths, constant_values=-1),
    )
    if _has_score(segment):
        kept["score"] = gather(segment.score)
    return segment.replace(**kept)


def dropped_by_keep_top(segment: KVSegment, priority: jax.Array, keep: int) -> jax.Array:
    """bool[B, Hs, C]: the held entries `keep_top(segment, priority, keep, ...)` discards."""
    held = segment.pos >= 0
    top_val, top_idx = jax.lax.top_k(jnp.where(held, priority, -jnp.inf), min(keep, segment.capacity))  # [B, Hs, keep]

    def picked(idx, won):  # one row: [keep], [keep] -> bool[C]
        return jnp.zeros(segment.capacity, bool).at[idx].set(won)

    return held & ~jax.vmap(jax.vmap(picked))(top_idx, top_val > -jnp.inf)


def lowest_over_budget(segment: KVSegment, priority: jax.Array, budget: int) -> jax.Array:
    """bool[B, Hs, C]: per row holding more than `budget` entries, its lowest-priority entry."""
    victim = jnp.argmin(jnp.where(segment.pos >= 0, priority, jnp.inf), axis=-1)  # [B, Hs]
    over = count(segment) > budget  # [B, Hs]
    return (jnp.arange(segment.capacity) == victim[..., None]) & over[..., None]  # [B, Hs, C]


def evict_lowest(segment: KVSegment, priority: jax.Array, budget: int) -> KVSegment:
    """Empties the lowest-priority entry of every row holding more than `budget` entries (decode)."""
    return segment.replace(pos=jnp.where(lowest_over_budget(segment, priority, budget), -1, segment.pos))


def kv_bytes(state: Any) -> int:
    """Device bytes held by a KV state (every array leaf: keys, values, positions, statistics).

    Accepts concrete arrays or `jax.ShapeDtypeStruct` leaves, so sizes of large configurations can be
    computed from abstract shapes (`jax.eval_shape`) without allocating them.
    """
    leaves = jax.tree_util.tree_leaves(state)
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))
