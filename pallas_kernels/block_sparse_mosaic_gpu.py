"""Block-sparse prefill and decode for Hopper GPUs, lowered with Mosaic GPU (TMA, wgmma).

The same computations as the Triton and Mosaic TPU lowerings in `block_sparse_prefill` and
`block_sparse_decode`: one thread block per (sequence, head, query tile) or (sequence, KV
head, split), visiting exactly the KV blocks its table row lists. Warp-specialized like
FlashAttention-3: a producer warpgroup TMA-copies each listed K/V block into a ring of
shared-memory stages; consumer warpgroups of 64 query rows run S = Q K^T and P V with wgmma
(bf16/f16 in, float32 out) and the online softmax in registers, in base 2. Prefill: two
consumers share a 128-row query tile's loads and take turns on the tensor cores; query tiles
launch last first. Decode: one consumer whose 64 rows hold the GQA group (zero-padded).

Constraints (checked): bfloat16 or float16, head_dim a multiple of 64 (the 128-byte swizzle
of a 64-element row), prefill block_q 128 (two consumers of 64 rows), block_k and the decode
block size 64 or 128, a GQA group of at most 64 heads, and two K/V stages fitting in shared
memory beside the query tile (`num_stages` of the configs: 2 by default, the fastest measured).

The prefill is the default on Hopper where it fits (`block_sparse_prefill`); the decode is
opt-in, since it does not beat Triton at every length. Test status and H100 timings:
benchmarks/results/kernel_notes.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import block_masks
from pallas_kernels.block_masks import DecodeBlockTable, PrefillBlockTable
from pallas_kernels.online_softmax import MASK_VALUE

ROWS = 64  # wgmma rows of one consumer warpgroup
PREFILL_CONSUMERS = 2  # prefill query tile = 2 * ROWS rows
BLOCK_K = (64, 128)
SMEM_BYTES = 227 * 1024  # an H100 thread block's shared memory
_LOG2E = math.log2(math.e)
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
_WG = "wg"  # the warpgroup axis: consumers 0 .. n-1, then the producer


def unsupported(
    dtype, head_dim: int, block_k: int, stages: int, other_bytes: int, block_q: int | None = None, group: int = 1
) -> str | None:
    """The first thing these kernels cannot take, or None. other_bytes: the shared memory the
    kernel needs besides its K/V stages; block_q: prefill's query tile."""
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"the Mosaic GPU kernels take bfloat16 or float16 (wgmma), got {dtype}"
    if head_dim % 64:
        return f"the Mosaic GPU kernels need head_dim a multiple of 64, got {head_dim}"
    if block_q not in (None, PREFILL_CONSUMERS * ROWS):
        return (
            f"the Mosaic GPU prefill needs block_q {PREFILL_CONSUMERS * ROWS} "
            f"({PREFILL_CONSUMERS} consumer warpgroups of {ROWS} rows), got block_q {block_q}"
        )
    if block_k not in BLOCK_K:
        return f"the Mosaic GPU kernels need block_k (decode: block_size) in {BLOCK_K}, got block_k {block_k}"
    if group > ROWS:
        return f"the Mosaic GPU decode takes GQA groups of at most {ROWS}, got {group}"
    needed = other_bytes + stages * 2 * block_k * head_dim * jnp.dtype(dtype).itemsize
    if stages < 2 or needed > SMEM_BYTES:
        return (
            f"the Mosaic GPU kernels need 2 or more K/V stages (num_stages) within "
            f"{SMEM_BYTES} bytes of shared memory: {stages} stages of block {block_k} x "
            f"head_dim {head_dim} take {needed}"
        )
    return None


def check_supported(*args, **kwargs) -> None:
    """Raises ValueError naming the first thing these kernels cannot take (`unsupported`'s)."""
    reason = unsupported(*args, **kwargs)
    if reason is not None:
        raise ValueError(reason)


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x: TMA and wgmma)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def prefill_q_bytes(head_dim: int, dtype) -> int:
    """Shared memory of the prefill's query tile, besides its K/V stages."""
    return PREFILL_CONSUMERS * ROWS * head_dim * jnp.dtype(dtype).itemsize


class _Ring(NamedTuple):
    """The K/V stage ring in shared memory and its barriers, one of each per stage. Table
    entries whose block starts at or past the sequence's length are skipped by producer and
    consumers alike, so the i-th live entry sits in stage i mod stages."""

    k: Any  # [stages, bk, D]
    v: Any  # [stages, bk, D]
    k_loaded: Any  # the stage's TMA copy landed
    v_loaded: Any
    k_freed: Any  # every consumer is done with the stage
    v_freed: Any

    @staticmethod
    def scratch(stages: int, block_k: int, head_dim: int, dtype, consumers: int) -> _Ring:
        """Its scratch types (the kernel gets a _Ring of refs), swizzled for wgmma."""
        ring = plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=_SWIZZLED)
        loaded = plgpu.Barrier(num_barriers=stages)
        freed = plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)
        return _Ring(ring, ring, loaded, loaded, freed, freed)


def _live_entries(count, block_start, length, visit, init):
    """fori over table entries [0, count) whose block starts below `length`, calling
    visit(entry, i, carry) with i the entry's rank among the live ones -> (live, carry)."""

    def step(entry, state):
        i, carry = state
        live = block_start(entry) < length
        carry = jax.lax.cond(live, lambda: visit(entry, i, carry), lambda: carry)
        return i + live.astype(jnp.int32), carry

    return jax.lax.fori_loop(0, count, step, (jnp.int32(0), init))


def _produce(ring: _Ring, k_rows, v_rows, count, block_start, length) -> None:
    """Producer: TMA-copy each live entry's K and V block (k_rows, v_rows: [C, D] GMEM refs)
    into its stage, once every consumer has freed that stage's previous block; then wait for
    the last blocks to be freed too, so every phase of every barrier is observed (JAX's GPU
    interpreter checks that; the producer has nothing else to do)."""
    stages, block_k = ring.k.shape[:2]

    def await_freed(i):
        slot = jax.lax.rem(i, stages)
        plgpu.barrier_wait(ring.k_freed.at[slot])
        plgpu.barrier_wait(ring.v_freed.at[slot])

    def load(entry, i, carry):
        slot, keys = jax.lax.rem(i, stages), pl.ds(block_start(entry), block_k)
        pl.when(i >= stages)(functools.partial(await_freed, i - stages))
        plgpu.copy_gmem_to_smem(k_rows.at[keys], ring.k.at[slot], ring.k_loaded.at[slot])
        plgpu.copy_gmem_to_smem(v_rows.at[keys], ring.v.at[slot], ring.v_loaded.at[slot])
        return carry

    live = _live_entries(count, block_start, length, load, ())[0]
    pl.loop(jnp.maximum(live - stages, 0), live)(await_freed)


def _meet(barrier) -> None:
    """Arrive at a barrier and wait for its phase: a rendezvous of its arrivals."""
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _consume(q_smem, ring: _Ring, count, block_start, length, block_visible, needs_mask, sm_scale, schedule):
    """Consumer: online softmax over the live entries as the producer delivers them:
    (acc [rows, D], m, l [rows]), m in log2 units. block_visible(start, shape) -> bool mask
    of the block starting at key slot `start`; needs_mask(entry) -> whether to apply it
    (fully visible blocks skip the element-wise work), or None to mask every block.
    schedule: the barrier two consumers meet at to take turns on the tensor cores, or None."""
    rows, head_dim = q_smem.shape
    stages, block_k = ring.k.shape[:2]
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def softmax_step(s, m, l, visible):
        if visible is not None:
            s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))  # [rows]
        p = jnp.exp2(s - jax.lax.broadcast_in_dim(m_new, s.shape, [0]))  # [rows, bk]
        if visible is not None:
            p = jnp.where(visible, p, 0.0)  # a row that sees nothing keeps l = 0
        alpha = jnp.exp2(m - m_new)  # [rows]
        return p.astype(ring.v.dtype), m_new, l * alpha + p.sum(axis=1), alpha

    def visit(entry, i, carry):
        acc, m, l = carry
        slot = jax.lax.rem(i, stages)
        plgpu.barrier_wait(ring.k_loaded.at[slot])

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(ring.k.at[slot], (1, 0)))
            if schedule is not None:
                _meet(schedule)  # the other consumer's turn while this wgmma runs
            return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((rows, block_k), jnp.float32))
        plgpu.barrier_arrive(ring.k_freed.at[slot])
        s = s * (sm_scale * _LOG2E)  # [rows, bk] base-2 scores
        masked = lambda: softmax_step(  # noqa: E731
            s, m, l, block_visible(block_start(entry), s.shape)
        )
        if needs_mask is None:
            p, m, l, alpha = masked()
        else:
            p, m, l, alpha = jax.lax.cond(needs_mask(entry), masked, lambda: softmax_step(s, m, l, None))
        if schedule is not None:
            plgpu.barrier_arrive(schedule)  # softmax done
        plgpu.barrier_wait(ring.v_loaded.at[slot])
        if schedule is not None:
            plgpu.barrier_wait(schedule)  # the tensor cores are free

        def values(acc_ref):
            plgpu.wgmma(acc_ref, p, ring.v.at[slot])
            return acc_ref[...]

        pv = pl.run_scoped(values, plgpu.ACC((rows, head_dim), jnp.float32))  # [rows, D]
        plgpu.barrier_arrive(ring.v_freed.at[slot])
        return acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m, l

    init = (
        plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
        plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), row_layout),
        plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout),
    )
    return _live_entries(count, block_start, length, visit, init)[1]


def _positions(base, shape, dim, layout=plgpu.Layout.WGMMA):
    """int32 positions base + index along `dim`, in a register layout wgmma results use."""
    return base + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)


# ----------------------------------------------------------------------------------------
# Prefill.
# ----------------------------------------------------------------------------------------


def _prefill_kernel(
    kv_blocks_ref,  # int32[R, nq, n_max]  (GMEM; scalars read by the warpgroups)
    counts_ref,  # int32[R, nq]
    partial_ref,  # int32[R, nq, n_max]
    head_pattern_ref,  # int32[H]
    sink_ref,  # int32[P]
    window_ref,  # int32[P]
    q_offset_ref,  # int32[B]
    lengths_ref,  # int32[B]
    q_gmem,  # [B, H, S, D]
    k_gmem,  # [B, Hkv, C, D]
    v_gmem,  # [B, Hkv, C, D]
    o_gmem,  # [B, H, S, D]
    q_smem,  # [2, 64, D]  each consumer's query rows, then its output rows
    ring: _Ring,  # K/V stages [stages, bk, D] and their barriers
    q_loaded,  # a barrier per consumer
    schedule,  # the consumers' turn-taking barrier
    *,
    sm_scale: float,
    group: int,
    batch_stride: int,
    num_q_tiles: int,
):
    b, h, launch = (jax.lax.axis_index(name) for name in ("batch", "heads", "q_tiles"))
    # q_tiles is the fastest-launched grid axis: the last (causally heaviest) tiles go first,
    # so the final wave holds light tiles rather than leaving SMs idle behind a heavy one.
    q_tile = num_q_tiles - 1 - launch
    wg = jax.lax.axis_index(_WG)
    consumers, rows = q_smem.shape[:2]
    block_k = ring.k.shape[1]
    pattern = head_pattern_ref[h]
    row = b * batch_stride + pattern
    length, tile_first = lengths_ref[b], q_tile * consumers * rows
    count = jnp.where(q_offset_ref[b] + tile_first < length, counts_ref[row, q_tile], 0)

    def block_start(entry):
        return kv_blocks_ref[row, q_tile, entry] * block_k

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = jax.lax.div(h, jnp.int32(group))
        _produce(ring, k_gmem.at[b, kv_head], v_gmem.at[b, kv_head], count, block_start, length)

    @pl.when(wg < consumers)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        sink, window = sink_ref[pattern], window_ref[pattern]
        own_first = tile_first + wg * rows  # this consumer's first query row
        q_first = q_offset_ref[b] + own_first  # ... and its position
        rows_smem = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_gmem.at[b, h, pl.ds(own_first, rows)], rows_smem, q_loaded.at[wg])
        plgpu.barrier_wait(q_loaded.at[wg])

        def block_visible(start, shape):
            k_pos = _positions(start, shape, 1)
            return block_masks.token_visible(_positions(q_first, shape, 0), k_pos, sink, window) & (k_pos < length)

        def needs_mask(entry):  # the tile's flag: conservative for each consumer's half
            return (partial_ref[row, q_tile, entry] != 0) | (block_start(entry) + block_k > length)

        pl.when(wg == 1)(functools.partial(_meet, schedule))  # consumer 1 starts half a turn
        acc, _, l = _consume(rows_smem, ring, count, block_start, length, block_visible, needs_mask, sm_scale, schedule)
        pl.when(wg == 0)(functools.partial(_meet, schedule))  # ... behind: 0 meets once more
        q_pos = _positions(q_first, (rows,), 0, plgpu.Layout.WGMMA.reduce(1))
        keep = (l > 0.0) & (q_pos < length)  # rows that saw no key, or past the length: zeros
        inverse = jnp.where(keep, 1.0 / jnp.where(keep, l, 1.0), 0.0)
        rows_smem[...] = (acc * jax.lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(rows_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(rows_smem, o_gmem.at[b, h, pl.ds(own_first, rows)])
        plgpu.wait_smem_to_gmem(0)


def prefill_mosaic_gpu(
    q, k, v, tables, table: PrefillBlockTable, batch_stride: int, sm_scale: float, stages: int
) -> jax.Array:
    """q [B, H, S_pad, D], k, v [B, Hkv, C_pad, D] padded to the table's blocks -> [B, H, S_pad, D].

    tables: the flattened table rows, head patterns, sink, window, query offsets and lengths
    (int32; `block_sparse_prefill._flat_tables` + lengths)."""
    batch, num_heads, _, head_dim = q.shape
    check_supported(q.dtype, head_dim, table.block_k, stages, prefill_q_bytes(head_dim, q.dtype), table.block_q)
    kernel = functools.partial(
        _prefill_kernel,
        sm_scale=sm_scale,
        group=num_heads // k.shape[1],
        batch_stride=batch_stride,
        num_q_tiles=table.num_q_blocks,
    )
    scratch = [
        plgpu.SMEM((PREFILL_CONSUMERS, ROWS, head_dim), q.dtype, transforms=_SWIZZLED),
        _Ring.scratch(stages, table.block_k, head_dim, q.dtype, PREFILL_CONSUMERS),
        plgpu.Barrier(num_barriers=PREFILL_CONSUMERS),
        plgpu.Barrier(num_arrivals=PREFILL_CONSUMERS),
    ]
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=scratch,
        grid=(batch, num_heads, table.num_q_blocks),
        grid_names=("batch", "heads", "q_tiles"),
        num_threads=PREFILL_CONSUMERS + 1,
        thread_name=_WG,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*tables, q, k, v)


# ----------------------------------------------------------------------------------------
# Decode.
# ----------------------------------------------------------------------------------------


def _decode_kernel(
    kv_blocks_ref,  # int32[B, Hkv, n_max]  (GMEM)
    counts_ref,  # int32[B, Hkv]
    lengths_ref,  # int32[B, Hkv]
    sink_ref,  # int32[Hkv]
    window_ref,  # int32[Hkv]
    q_gmem,  # [B, Hkv, 64, D]  the group's query heads, zero-padded to 64 rows
    k_gmem,  # [B, Hkv, C, D]
    v_gmem,  # [B, Hkv, C, D]
    o_gmem,  # f32[B, Hkv, splits, g, D]  this split's normalised output
    lse_gmem,  # f32[B, Hkv, splits, 64]  its natural log-sum-exp (MASK_VALUE: saw nothing)
    q_smem,  # [64, D]
    ring: _Ring,  # K/V stages [stages, bs, D] and their barriers
    q_loaded,
    o_smem,  # f32[64, D]
    lse_smem,  # f32[64]
    *,
    sm_scale: float,
    num_splits: int,
):
    b, h, split = (jax.lax.axis_index(name) for name in ("batch", "kv_heads", "splits"))
    block_size = ring.k.shape[1]
    first, last = block_masks.split_entries(split, counts_ref[b, h], num_splits)
    count = last - first  # this split's entries: [first, last)
    length = lengths_ref[b, h]

    def block_start(entry):
        return kv_blocks_ref[b, h, first + entry] * block_size

    @pl.when(jax.lax.axis_index(_WG) == 1)
    def _producer():
        _produce(ring, k_gmem.at[b, h], v_gmem.at[b, h], count, block_start, length)

    @pl.when(jax.lax.axis_index(_WG) == 0)
    def _consumer():
        sink, window = sink_ref[h], window_ref[h]
        plgpu.copy_gmem_to_smem(q_gmem.at[b, h], q_smem, q_loaded)
        plgpu.barrier_wait(q_loaded)

        def block_visible(start, shape):  # the query sits at position length - 1
            return block_masks.token_visible(length - 1, _positions(start, shape, 1), sink, window)

        acc, m, l = _consume(q_smem, ring, count, block_start, length, block_visible, None, sm_scale, None)
        seen = l > 0.0
        safe_l = jnp.where(seen, l, 1.0)
        o_smem[...] = acc * jax.lax.broadcast_in_dim(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape, [0])
        lse_smem[...] = jnp.where(seen, m / _LOG2E + jnp.log(safe_l), MASK_VALUE)
        plgpu.commit_smem()
        # Only the group's rows leave: 64 would write up to 16x the bytes at g = 4.
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, o_gmem.shape[-2])], o_gmem.at[b, h, split])
        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, h, split])
        plgpu.wait_smem_to_gmem(0)


def decode_mosaic_gpu(
    qg, k, v, lengths, table: DecodeBlockTable, sink, window, sm_scale: float, num_splits: int, stages: int
) -> tuple[jax.Array, jax.Array]:
    """qg [B, Hkv, g, D], k, v [B, Hkv, C, D] -> per-split (out f32[B, Hkv, splits, g, D],
    lse f32[B, Hkv, splits, g, 1]), merged by `block_sparse_decode.combine_splits`."""
    batch, num_kv_heads, group, head_dim = qg.shape
    other_bytes = ROWS * head_dim * (qg.dtype.itemsize + 4) + ROWS * 4  # q, o, lse
    check_supported(qg.dtype, head_dim, table.block_size, stages, other_bytes, group=group)
    q = jnp.pad(qg, ((0, 0), (0, 0), (0, ROWS - group), (0, 0)))  # [B, Hkv, 64, D]
    split_shape = (batch, num_kv_heads, num_splits)
    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, num_splits=num_splits)
    scratch = [
        plgpu.SMEM((ROWS, head_dim), qg.dtype, transforms=_SWIZZLED),
        _Ring.scratch(stages, table.block_size, head_dim, qg.dtype, 1),
        plgpu.Barrier(),
        plgpu.SMEM((ROWS, head_dim), jnp.float32),
        plgpu.SMEM((ROWS,), jnp.float32),
    ]
    out, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(split_shape + (group, head_dim), jnp.float32),
            # All 64 rows: a TMA copy's rows span 16 bytes, g floats may not.
            jax.ShapeDtypeStruct(split_shape + (ROWS,), jnp.float32),
        ),
        scratch_types=scratch,
        grid=(batch, num_kv_heads, num_splits),
        grid_names=("batch", "kv_heads", "splits"),
        num_threads=2,
        thread_name=_WG,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(table.kv_blocks, table.counts, lengths, jnp.asarray(sink, jnp.int32), jnp.asarray(window, jnp.int32), q, k, v)
    return out, lse[:, :, :, :group, None]
