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


def write_then_attend(
    segments: tuple[KVSegment, ...], q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
    new_pos: jax.Array, start: jax.Array, window: int | None, scale: float, impl: str = "auto",
    *, slot_is_position: bool = False,
) -> tuple[jax.Array, tuple[KVSegment, ...]]:
    """Writes new entries at slots [start, start + T) of every segment and attends over each.

    q: [B, T, K, G, D]; k, v: [B, T, K, D]; q_pos, new_pos: int32[B, T]; start: int32[B].
    Returns the output [B, T, K, G, D] and the updated segments. `slot_is_position=True` is the
    caller's promise that the segments are in the Full layout (every write at start = q_pos[:, 0],
    entries never moved or evicted), which lets prefill chunks run the block-sparse prefill kernel
    (see `attend`).
    """
    total = q.shape[2]
    outs, written = [], []
    for seg in segments:
        seg = write_entries(
            seg, take_heads(k, seg.heads, 2, total), take_heads(v, seg.heads, 2, total), new_pos, start
        )
        q_seg = take_heads(q, seg.heads, 2, total)  # [B, T, Hs, G, D]
        outs.append(attend(q_seg, seg.k, seg.v, seg.pos, q_pos, window, scale, impl,
                           slot_is_position=slot_is_position))
        written.append(seg)
    return merge_heads(outs, segments, axis=2), tuple(written)
