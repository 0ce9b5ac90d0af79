"""Write a chunk's keys and values into a layer's KV segments, then attend over what they hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import attend
from kvjax.kv_state import KVSegment, write_entries


def take_heads(x: jax.Array, heads: tuple[int, ...], axis: int, total: int) -> jax.Array:
    """The given KV heads of x along `axis`: a slice when they are a contiguous range, else a gather."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        if len(heads) == total:
            return x
        return jax.lax.slice_in_dim(x, heads[0], heads[0] + len(heads), axis=axis)
    return jnp.take(x, np.asarray(heads), axis=axis)


def merge_heads(outs: list[jax.Array], segments: tuple[KVSegment, ...], axis: int) -> jax.Array:
    """Reassembles per-segment outputs into the layer's KV-head order."""
    if len(outs) == 1:
        return outs[0]
    order = np.argsort(np.concatenate([np.asarray(s.heads) for s in segments]))
    return jnp.take(jnp.concatenate(outs, axis=axis), order, axis=axis)


def write_in_place_then_attend(
    segments: tuple[KVSegment, ...], q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
    new_pos: jax.Array, window: int | None, scale: float, impl: str = "auto",
) -> tuple[jax.Array, tuple[KVSegment, ...]]:
    """Writes a chunk in the Full layout (slot = position: the chunk lands at slots [q_pos[:, 0],
    + T), padding carrying pos -1) into every segment and attends over each.

    q: [B, T, K, G, D]; k, v: [B, T, K, D]; q_pos, new_pos: int32[B, T]. Returns the output
    [B, T, K, G, D] and the updated segments. Because entries are never moved or evicted, prefill
    chunks may run the block-sparse prefill kernel (`attend(..., slot_is_position=True)`).
    """
    total = q.shape[2]
    outs, written = [], []
    for seg in segments:
        seg = write_entries(
            seg, take_heads(k, seg.heads, 2, total), take_heads(v, seg.heads, 2, total), new_pos, q_pos[:, 0]
        )
        q_seg = take_heads(q, seg.heads, 2, total)  # [B, T, Hs, G, D]
        outs.append(attend(q_seg, seg.k, seg.v, seg.pos, q_pos, window, scale, impl, slot_is_position=True))
        written.append(seg)
    return merge_heads(outs, segments, axis=2), tuple(written)
