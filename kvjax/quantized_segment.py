"""A layer's quantized KV cache (KIVI): a packed slab of the oldest tokens beside a full-precision window.

Slab slot i holds the token at position i, for i < slab_length[b] (KIVI: the slab stores no
positions, they are implicit), unless `slab_pos` records them (quantized pruning: the kept,
non-contiguous positions in order). The window holds the following tokens in position order as a
valid prefix of its slots (pos -1 after). Tokens move from the window to the slab in whole groups
of G, which then own whole packed bytes and whole key-statistic rows (see `pallas_kernels.kv_quant`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.kv_state import KVSegment
from pallas_kernels import kv_quant
from pallas_kernels.kv_quant import QuantizedKV

# Per slab field: (token axis, tokens per index along it), for [B, Hs, ...] arrays.
_SLAB_TILING = {
    "k_codes": (2, "per"),
    "k_scale": (2, "group"),
    "k_zero": (2, "group"),
    "v_codes": (2, "per"),
    "v_scale": (3, 1),
    "v_zero": (3, 1),
}


@struct.dataclass(frozen=True)
class QuantizedSegment:
    """KV entries of one layer: quantized tokens [0, slab_length) and a full-precision window after."""

    slab: QuantizedKV  # logical [B, Hs, Cq, D]: packed codes + per-group scale and zero
    slab_length: jax.Array  # int32[B]: tokens held by the slab, always a multiple of G
    window: KVSegment  # k, v [B, Hs, W, D] in the model dtype; pos int32[B, Hs, W] (-1 empty)
    slab_pos: jax.Array | None = None  # int32[B, Hs, Cq] (-1 empty) when slot != position; else None

    @property
    def heads(self) -> tuple[int, ...]:
        return self.window.heads

    def window_length(self) -> jax.Array:
        """int32[B]: tokens held at full precision."""
        return jnp.sum(self.window.pos[:, 0] >= 0, axis=-1, dtype=jnp.int32)

    def slab_positions(self) -> jax.Array:
        """int32[B, Hs, Cq]: position of each slab slot (-1 empty), for inspection and masks."""
        if self.slab_pos is not None:
            return self.slab_pos
        batch, heads, capacity, _ = self.slab.shape
        slots = jnp.arange(capacity, dtype=jnp.int32)  # [Cq]
        pos = jnp.where(slots < self.slab_length[:, None], slots, -1)  # [B, Cq]
        return jnp.broadcast_to(pos[:, None], (batch, heads, capacity))

    def positions(self) -> jax.Array:
        """int32[B, Hs, Cq + W]: positions of every kept entry, slab slots first (-1 empty)."""
        return jnp.concatenate([self.slab_positions(), self.window.pos], axis=-1)


def empty_quantized_segment(
    batch: int,
    heads: tuple[int, ...],
    slab_capacity: int,
    window_capacity: int,
    head_dim: int,
    bits: int,
    group: int,
    dtype,
    scale_dtype=jnp.bfloat16,
) -> QuantizedSegment:
    """An empty segment; the slab is built from zeros directly (no full-precision temporary)."""
    h, per = len(heads), kv_quant.codes_per_byte(bits)
    codes = (batch, h, slab_capacity // per, head_dim)
    k_stats, v_stats = (batch, h, slab_capacity // group, head_dim), (batch, h, head_dim // group, slab_capacity)
    slab = QuantizedKV(
        k_codes=jnp.zeros(codes, jnp.uint8),
        k_scale=jnp.zeros(k_stats, scale_dtype),
        k_zero=jnp.zeros(k_stats, scale_dtype),
        v_codes=jnp.zeros(codes, jnp.uint8),
        v_scale=jnp.zeros(v_stats, scale_dtype),
        v_zero=jnp.zeros(v_stats, scale_dtype),
        bits=bits,
        group_size=group,
    )
    shape = (batch, h, window_capacity, head_dim)
    window = KVSegment(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full(shape[:3], -1, jnp.int32),
        heads=heads,
    )
    return QuantizedSegment(slab=slab, slab_length=jnp.zeros((batch,), jnp.int32), window=window)


def grow_window(segment: QuantizedSegment, extra: int) -> QuantizedSegment:
    """The same entries in a window with `extra` more (empty) slots: room for a chunk before a flush."""
    if extra <= 0:
        return segment
    w = segment.window
    pad = ((0, 0), (0, 0), (0, extra))
    return segment.replace(
        window=w.replace(
            k=jnp.pad(w.k, pad + ((0, 0),)),
            v=jnp.pad(w.v, pad + ((0, 0),)),
            pos=jnp.pad(w.pos, pad, constant_values=-1),
        )
    )


def write_slab_groups(slab: QuantizedKV, k: jax.Array, v: jax.Array, start: jax.Array, count: jax.Array) -> QuantizedKV:
    """Quantizes k, v [B, Hs, F, D] (F a multiple of G) and stores their first count[b] tokens at
    slab tokens [start[b], start[b] + count[b]); start, count: int32[B], multiples of G.

    A scatter whose unused rows point past the end (and are dropped), so each sequence writes only
    the groups it flushes and nothing else in the slab changes, whatever start is.
    """
    if k.shape[2] == 0:
        return slab
    chunk = kv_quant.quantize_kv(k, v, slab.bits, slab.group_size, slab.k_scale.dtype)
    tokens_per = {"per": kv_quant.codes_per_byte(slab.bits), "group": slab.group_size}

    def write(dst, src, axis, per_index):  # dst [B, Hs, ...], src [B, Hs, ...] along `axis`
        def one(dst, src, first, n):  # one sequence: axis - 1 indexes tokens
            idx = jnp.arange(src.shape[axis - 1], dtype=jnp.int32)  # [n_src]
            target = jnp.where(idx * per_index < n, first // per_index + idx, dst.shape[axis - 1])
            where = (slice(None),) * (axis - 1) + (target,)
            return dst.at[where].set(src.astype(dst.dtype), mode="drop")

        return jax.vmap(one)(dst, src, start, count)

    return slab.replace(
        **{
            name: write(getattr(slab, name), getattr(chunk, name), axis, tokens_per.get(per, per))
            for name, (axis, per) in _SLAB_TILING.items()
        }
    )


def write_slab_positions(slab_pos: jax.Array, pos: jax.Array, start: jax.Array, count: jax.Array) -> jax.Array:
    """slab_pos int32[B, Hs, Cq] with pos[b, :, :count[b]] (int32[B, Hs, F]) stored at slots
    [start[b], start[b] + count[b]); a dropping scatter like `write_slab_groups`."""
    idx = jnp.arange(pos.shape[-1], dtype=jnp.int32)  # [F]

    def one(dst, src, first, n):  # one sequence: [Hs, Cq] <- [Hs, F]
        target = jnp.where(idx < n, first + idx, dst.shape[-1])  # [F]
        return dst.at[:, target].set(src, mode="drop")

    return jax.vmap(one)(slab_pos, pos, start, count)


def flush_window(segment: QuantizedSegment, residual: int, capacity: int) -> QuantizedSegment:
    """Moves the window's oldest whole groups into the slab until it holds fewer than residual + G
    tokens (but at least `residual` when it had as many); the window returns to `capacity` slots.

    With n window tokens, the oldest G * floor(max(n - residual, 0) / G) move, so a sequence of
    length L keeps exactly its last L - G * floor(max(L - residual, 0) / G) tokens at full precision.
    """
    g, w = segment.slab.group_size, segment.window
    held = segment.window_length()  # [B]
    moved = g * (jnp.maximum(held - residual, 0) // g)  # [B] tokens leaving the window
    span = g * (max(w.capacity - residual, 0) // g)  # static: the most any sequence can move
    slab = write_slab_groups(segment.slab, w.k[:, :, :span], w.v[:, :, :span], segment.slab_length, moved)
    slab_pos = segment.slab_pos
    if slab_pos is not None:  # recorded positions move with their entries
        slab_pos = write_slab_positions(slab_pos, w.pos[:, :, :span], segment.slab_length, moved)
    w = grow_window(segment, span + capacity - w.capacity).window  # slicing below stays in range

    def shift(x):  # [B, Hs, W', ...] -> [B, Hs, capacity, ...] from slot moved[b]
        return jax.vmap(lambda row, m: jax.lax.dynamic_slice_in_dim(row, m, capacity, axis=1))(x, moved)

    window = w.replace(k=shift(w.k), v=shift(w.v), pos=shift(w.pos))
    return segment.replace(slab=slab, slab_length=segment.slab_length + moved, window=window, slab_pos=slab_pos)
