"""Block-sparse prefill and decode for Hopper GPUs, lowered with Mosaic GPU (TMA, wgmma).

The same computations as the Triton and Mosaic TPU lowerings in `block_sparse_prefill` and
`block_sparse_decode`: one thread block per (sequence, head, query block) or (sequence, KV
head, split), looping over exactly the KV blocks its table row lists. One warpgroup per thread
block; the next listed K/V block is copied by TMA into the other of two shared-memory slots
while the current one is multiplied, so skipped blocks are never loaded and listed ones load
under the math. S = Q K^T and P V run on the tensor cores (wgmma: bf16/f16 in, float32 out);
the online softmax runs in registers in base 2 (scores pre-scaled by log2 e). Decode puts the
g query heads of a GQA group in the rows of one wgmma (padded to 64), so they share each load.

Constraints (checked): bfloat16 or float16, head_dim a multiple of 64 (the 128-byte swizzle
of a 64-element row); prefill block_q = 64 (one warpgroup's wgmma rows), block_k and the
decode block size 64 or 128; a GQA group of at most 64 heads.

Status: both lower to Mosaic GPU MLIR on CPU, and compute the dense references' numbers on
JAX's GPU interpreter (TMA copies, barriers with race detection, wgmma on the host), which the
tests extend by the transposed and register-operand wgmma it lacks in JAX 0.10
(tests/mosaic_gpu_interpreter.py). They have not been compiled for or timed on a GPU, so they
are opt-in (`implementation="mosaic_gpu"`) until `benchmarks/bench_block_sparse.py
--implementation mosaic_gpu` (which checks against cuDNN and the references before timing)
has run on an H100.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import block_masks
from pallas_kernels.block_masks import DecodeBlockTable, PrefillBlockTable
from pallas_kernels.online_softmax import MASK_VALUE

ROWS = 64  # wgmma rows of one warpgroup: the prefill query block, the padded decode group
BLOCK_K = (64, 128)
_SLOTS = 2  # K/V double buffer: TMA fills one slot while wgmma reads the other
_LOG2E = math.log2(math.e)
_SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def check_supported(dtype, head_dim: int, block_k: int, block_q: int = ROWS,
                    group: int = 1) -> None:
    """Raises ValueError naming the first thing these kernels cannot take."""
    if dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU kernels take bfloat16 or float16 (wgmma), got {dtype}")
    if head_dim % 64:
        raise ValueError(f"the Mosaic GPU kernels need head_dim a multiple of 64, got {head_dim}")
    if block_q != ROWS or block_k not in BLOCK_K:
        raise ValueError(f"the Mosaic GPU kernels need block_q {ROWS} and block_k (decode: "
                         f"block_size) in {BLOCK_K}, got block_q {block_q}, block_k {block_k}")
    if group > ROWS:
        raise ValueError(f"the Mosaic GPU decode takes GQA groups of at most {ROWS}, got {group}")


def _attend_listed_blocks(q_smem, k_smem, v_smem, k_barriers, v_barriers, fetch, first, last,
                          block_visible, needs_mask, sm_scale):
    """Online softmax over table entries [first, last): (acc [rows, D], m, l [rows]), m in
    log2 units. fetch(entry, slot) starts the TMA copies of an entry's K/V block into a slot
    (the caller has started `first`'s); block_visible(entry, shape) -> bool mask of the block;
    needs_mask(entry) -> whether to apply it (fully visible blocks skip the element-wise work),
    or None to mask every block."""
    rows, head_dim = q_smem.shape
    block_k = k_smem.shape[1]
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def softmax_step(s, m, l, visible):
        if visible is not None:
            s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))  # [rows]
        p = jnp.exp2(s - jax.lax.broadcast_in_dim(m_new, s.shape, [0]))  # [rows, bk]
        if visible is not None:
            p = jnp.where(visible, p, 0.0)  # a row that sees nothing keeps l = 0
        alpha = jnp.exp2(m - m_new)  # [rows]
        return p.astype(v_smem.dtype), m_new, l * alpha + p.sum(axis=1), alpha

    def body(entry, carry):
        acc, m, l = carry
        slot = jax.lax.rem(entry - first, _SLOTS)
        pl.when(entry + 1 < last)(lambda: fetch(entry + 1, 1 - slot))
        plgpu.barrier_wait(k_barriers.at[slot])

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((rows, block_k), jnp.float32))
        s = s * (sm_scale * _LOG2E)  # [rows, bk] base-2 scores
        masked = lambda: softmax_step(s, m, l, block_visible(entry, s.shape))  # noqa: E731
        if needs_mask is None:
            p, m, l, alpha = masked()
        else:
            p, m, l, alpha = jax.lax.cond(needs_mask(entry), masked,
                                          lambda: softmax_step(s, m, l, None))
        plgpu.barrier_wait(v_barriers.at[slot])

        def values(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem.at[slot])
            return acc_ref[...]

        pv = pl.run_scoped(values, plgpu.ACC((rows, head_dim), jnp.float32))  # [rows, D]
        return acc * jax.lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m, l

    init = (plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row_layout))
    return jax.lax.fori_loop(first, last, body, init)


def _positions(base, shape, dim, layout=plgpu.Layout.WGMMA):
    """int32 positions base + index along `dim`, in a register layout wgmma results use."""
    return base + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)


def _scratch(rows: int, block_k: int, head_dim: int, dtype) -> list:
    """Query block, K and V slots (128-byte swizzled for wgmma) and their TMA barriers."""
    kv_slots = plgpu.SMEM((_SLOTS, block_k, head_dim), dtype, transforms=_SWIZZLED)
    return [plgpu.SMEM((rows, head_dim), dtype, transforms=_SWIZZLED), kv_slots, kv_slots,
            plgpu.Barrier(), plgpu.Barrier(num_barriers=_SLOTS),
            plgpu.Barrier(num_barriers=_SLOTS)]


# ----------------------------------------------------------------------------------------
# Prefill.
# ----------------------------------------------------------------------------------------


def _prefill_kernel(
    kv_blocks_ref,  # int32[R, nq, n_max]  (GMEM; scalars read by the warpgroup)
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
    q_smem,  # [bq, D]  the query block, then the output block
    k_smem,  # [2, bk, D]
    v_smem,  # [2, bk, D]
    q_barrier,
    k_barriers,  # one per slot
    v_barriers,
    *,
    sm_scale: float,
    group: int,
    batch_stride: int,
):
    b, h, q_block = (jax.lax.axis_index(name) for name in ("batch", "heads", "q_blocks"))
    block_q, block_k = q_smem.shape[0], k_smem.shape[1]
    pattern = head_pattern_ref[h]
    row = b * batch_stride + pattern
    sink, window, length = sink_ref[pattern], window_ref[pattern], lengths_ref[b]
    q_first = q_offset_ref[b] + q_block * block_q
    count = jnp.where(q_first < length, counts_ref[row, q_block], 0)
    kv_head = jax.lax.div(h, jnp.int32(group))

    def fetch(entry, slot):
        keys = (b, kv_head, pl.ds(kv_blocks_ref[row, q_block, entry] * block_k, block_k))
        plgpu.copy_gmem_to_smem(k_gmem.at[keys], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[keys], v_smem.at[slot], v_barriers.at[slot])

    def block_visible(entry, shape):
        k_pos = _positions(kv_blocks_ref[row, q_block, entry] * block_k, shape, 1)
        return (block_masks.token_visible(_positions(q_first, shape, 0), k_pos, sink, window)
                & (k_pos < length))

    def needs_mask(entry):
        end = (kv_blocks_ref[row, q_block, entry] + 1) * block_k
        return (partial_ref[row, q_block, entry] != 0) | (end > length)

    queries = q_gmem.at[b, h, pl.ds(q_block * block_q, block_q)]
    plgpu.copy_gmem_to_smem(queries, q_smem, q_barrier)
    pl.when(count > 0)(lambda: fetch(0, 0))
    plgpu.barrier_wait(q_barrier)
    acc, _, l = _attend_listed_blocks(q_smem, k_smem, v_smem, k_barriers, v_barriers, fetch, 0,
                                      count, block_visible, needs_mask, sm_scale)
    q_pos = _positions(q_first, (block_q,), 0, plgpu.Layout.WGMMA.reduce(1))
    keep = (l > 0.0) & (q_pos < length)  # rows that saw no key, or past the length: zeros
    inverse = jnp.where(keep, 1.0 / jnp.where(keep, l, 1.0), 0.0)
    q_smem[...] = (acc * jax.lax.broadcast_in_dim(inverse, acc.shape, [0])).astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_gmem.at[b, h, pl.ds(q_block * block_q, block_q)])
    plgpu.wait_smem_to_gmem(0)


def prefill_mosaic_gpu(q, k, v, tables, table: PrefillBlockTable, batch_stride: int,
                       sm_scale: float) -> jax.Array:
    """q [B, H, S_pad, D], k, v [B, Hkv, C_pad, D] padded to the table's blocks -> [B, H, S_pad, D].

    tables: the flattened table rows, head patterns, sink, window, query offsets and lengths
    (int32; `block_sparse_prefill._flat_tables` + lengths)."""
    batch, num_heads, _, head_dim = q.shape
    check_supported(q.dtype, head_dim, table.block_k, table.block_q)
    kernel = functools.partial(_prefill_kernel, sm_scale=sm_scale, group=num_heads // k.shape[1],
                               batch_stride=batch_stride)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=_scratch(ROWS, table.block_k, head_dim, q.dtype),
        grid=(batch, num_heads, table.num_q_blocks),
        grid_names=("batch", "heads", "q_blocks"),
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
    o_gmem,  # f32[B, Hkv, splits, 64, D]  this split's normalised output
    lse_gmem,  # f32[B, Hkv, splits, 64]  its natural log-sum-exp (MASK_VALUE: saw nothing)
    q_smem,  # [64, D]
    k_smem,  # [2, bs, D]
    v_smem,  # [2, bs, D]
    q_barrier,
    k_barriers,
    v_barriers,
    o_smem,  # f32[64, D]
    lse_smem,  # f32[64]
    *,
    sm_scale: float,
    per_split: int,
):
    b, h, split = (jax.lax.axis_index(name) for name in ("batch", "kv_heads", "splits"))
    block_size = k_smem.shape[1]
    length, sink, window = lengths_ref[b, h], sink_ref[h], window_ref[h]
    first = split * per_split
    last = jnp.maximum(jnp.minimum(first + per_split, counts_ref[b, h]), first)

    def fetch(entry, slot):
        keys = (b, h, pl.ds(kv_blocks_ref[b, h, entry] * block_size, block_size))
        plgpu.copy_gmem_to_smem(k_gmem.at[keys], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[keys], v_smem.at[slot], v_barriers.at[slot])

    def block_visible(entry, shape):  # the query sits at position length - 1
        k_pos = _positions(kv_blocks_ref[b, h, entry] * block_size, shape, 1)
        return block_masks.token_visible(length - 1, k_pos, sink, window)

    plgpu.copy_gmem_to_smem(q_gmem.at[b, h], q_smem, q_barrier)
    pl.when(first < last)(lambda: fetch(first, 0))
    plgpu.barrier_wait(q_barrier)
    acc, m, l = _attend_listed_blocks(q_smem, k_smem, v_smem, k_barriers, v_barriers, fetch,
                                      first, last, block_visible, None, sm_scale)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_smem[...] = acc * jax.lax.broadcast_in_dim(jnp.where(seen, 1.0 / safe_l, 0.0), acc.shape,
                                                 [0])
    lse_smem[...] = jnp.where(seen, m / _LOG2E + jnp.log(safe_l), MASK_VALUE)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[b, h, split])
    plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[b, h, split])
    plgpu.wait_smem_to_gmem(0)


def decode_mosaic_gpu(qg, k, v, lengths, table: DecodeBlockTable, sink, window,
                      sm_scale: float, num_splits: int) -> tuple[jax.Array, jax.Array]:
    """qg [B, Hkv, g, D], k, v [B, Hkv, C, D] -> per-split (out f32[B, Hkv, splits, g, D],
    lse f32[B, Hkv, splits, g, 1]), merged by `block_sparse_decode.combine_splits`."""
    batch, num_kv_heads, group, head_dim = qg.shape
    check_supported(qg.dtype, head_dim, table.block_size, group=group)
    q = jnp.pad(qg, ((0, 0), (0, 0), (0, ROWS - group), (0, 0)))  # [B, Hkv, 64, D]
    split_shape = (batch, num_kv_heads, num_splits, ROWS)
    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale,
                               per_split=pl.cdiv(table.max_blocks, num_splits))
    out, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(split_shape + (head_dim,), jnp.float32),
                  jax.ShapeDtypeStruct(split_shape, jnp.float32)),
        scratch_types=[*_scratch(ROWS, table.block_size, head_dim, qg.dtype),
                       plgpu.SMEM((ROWS, head_dim), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32)],
        grid=(batch, num_kv_heads, num_splits),
        grid_names=("batch", "kv_heads", "splits"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(table.kv_blocks, table.counts, lengths, jnp.asarray(sink, jnp.int32),
      jnp.asarray(window, jnp.int32), q, k, v)
    return out[:, :, :, :group], lse[:, :, :, :group, None]
