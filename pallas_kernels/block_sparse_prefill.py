"""Block-sparse causal flash attention for prefill (streaming heads, DuoAttention).

Each (batch, query head, query block) visits only the KV blocks its row of a
`PrefillBlockTable` lists; skipped blocks are never loaded. Blocks flagged partial (the
diagonal, the edge of a local window, the last block of a short sequence) get the
element-wise mask; fully visible blocks skip it. Online softmax in float32.

Layout: q [B, H, T, D], k and v [B, Hkv, T, D] (H = Hkv * g); output [B, H, T, D]. Query
head h reads KV head h // g. Batches are right-padded: sequence b holds tokens [0, lengths[b]).
T need not be a multiple of the blocks: inputs are zero-padded and the padding masked.
Chunk mode (`q_offset`, chunked prefill over a cache where slot = position): q [B, H, S, D]
over k, v [B, Hkv, C, D], masks comparing absolute positions (see `block_sparse_prefill`).

Lowerings:
  * "tpu": Mosaic TPU, grid (B, H, nq, n_max). Table, sink/window and lengths arrive by scalar
    prefetch and drive the K/V index maps, so only listed blocks are copied; rows with fewer
    than n_max entries idle through their remaining steps. The table (2 * P * nq * n_max int32
    words) must fit SMEM: dense heads at long T need large blocks.
  * "gpu": generic Pallas on the Triton backend, chosen explicitly (`pltriton.CompilerParams`;
    deprecated from JAX 0.11). Grid (B, H, nq); each program loops over exactly its row's
    count. A head dim that is not a power of two is attended in power-of-two column pieces.
  * "mosaic_gpu": the Hopper kernel in `block_sparse_mosaic_gpu` (TMA, wgmma). With
    implementation="auto" on a Hopper GPU it replaces Triton wherever the inputs fit it
    (bf16/f16, head dim a multiple of 64, block_q 128, block_k 64 or 128).
  * "reference": `block_sparse_prefill_reference`, dense masked attention in jnp.
Test status and H100 timings: benchmarks/results/kernel_notes.md (the TPU lowering has never run on a TPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import block_masks
from pallas_kernels.block_masks import MaskDescription, PrefillBlockTable, padded_length
from pallas_kernels.block_sparse_mosaic_gpu import BLOCK_K as MOSAIC_GPU_BLOCKS
from pallas_kernels.block_sparse_mosaic_gpu import (
    PREFILL_CONSUMERS,
    ROWS,
    on_hopper,
    prefill_mosaic_gpu,
    prefill_q_bytes,
    unsupported,
)
from pallas_kernels.lowering import Lowering, pallas_interpret, resolve, tpu_interpret
from pallas_kernels.online_softmax import (
    MASK_VALUE,
    attend_block,
    attend_block_pieces,
    column_pieces,
    initial_pieces,
    masked_attention,
)

_TPU_LANES = 128  # m and l scratch are replicated over the lanes of one vreg row
BLOCKS = (128, 64, 32, 16)  # the blocks `PrefillConfig.for_shape` tries, largest first
# Mosaic TPU's fixed cost per grid step favours larger blocks (benchmarks/results/kernel_notes.md);
# 512 is the size MaxText's splash attention is configured with.
TPU_BLOCKS = (512, 256, *BLOCKS)


def _is_power_of_two(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tuning knobs. Block sizes are powers of two (Triton); on TPU prefer 512 where the lengths
    allow, since a grid step's fixed cost exceeds a 128 x 128 block's work (`for_shape` does)."""

    block_q: int = 128
    block_k: int = 128
    num_warps: int = 8  # Triton only: at 4 warps a 128 x 128 block spills registers on sm_90
    num_stages: int = 2  # GPU only (Mosaic GPU: K/V blocks in flight)

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < 8:
                raise ValueError(f"PrefillConfig.{name} must be a power of two >= 8, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PrefillConfig.{name} must be a positive int, got {value!r}")

    @classmethod
    def for_shape(cls, q_len: int, capacity: int, head_dim: int, lowering: Lowering) -> PrefillConfig | None:
        """The config that runs `q_len` queries over `capacity` key slots of `head_dim` under
        `lowering` without copying the keys, or None where the kernel cannot (the caller runs the
        reference): the reference lowering; Triton ("gpu") with a head dim not a multiple of 16 (its
        smallest column piece); Mosaic GPU with a head dim not a multiple of 64; no key block
        dividing the capacity. block_k: the largest of `BLOCKS` (TPU: `TPU_BLOCKS`; Mosaic GPU: its
        `BLOCK_K`) dividing the capacity; block_q: the largest dividing q_len, else the smallest
        (the queries are padded; Mosaic GPU: always its 128-row tile). Mosaic GPU's dtype and
        shared-memory limits are the kernel's to check (it raises)."""
        platform = lowering.platform
        if platform == "reference" or (platform == "gpu" and head_dim % 16):
            return None
        q_blocks = k_blocks = TPU_BLOCKS if platform == "tpu" else BLOCKS
        if platform == "mosaic_gpu":
            if head_dim % 64:
                return None
            q_blocks, k_blocks = (PREFILL_CONSUMERS * ROWS,), tuple(sorted(MOSAIC_GPU_BLOCKS, reverse=True))
        block_k = next((bk for bk in k_blocks if capacity % bk == 0), None)
        if block_k is None:
            return None
        return cls(block_q=next((bq for bq in q_blocks if q_len % bq == 0), q_blocks[-1]), block_k=block_k)


# ----------------------------------------------------------------------------------------
# Masking and normalisation shared by both lowerings.
# ----------------------------------------------------------------------------------------


def _block_visible(q_first, kv_block, block_q, block_k, sink, window, length):
    """bool[bq, bk] element mask: causal, sink + window, and keys before the sequence length.

    q_first: absolute position of the block's first query (its offset in chunk mode)."""
    q_pos = q_first + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = kv_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    return block_masks.token_visible(q_pos, k_pos, sink, window) & (k_pos < length)


def _finalize(acc, l, q_first, length):
    """acc / l, with zeros for rows that saw no key and for rows at or past the length."""
    q_pos = q_first + jax.lax.broadcasted_iota(jnp.int32, l.shape, 0)  # [bq, 1]
    keep = (l > 0.0) & (q_pos < length)
    return jnp.where(keep, acc / jnp.where(keep, l, 1.0), 0.0)  # [bq, D]


def _flat_tables(table: PrefillBlockTable, q_offset: jax.Array):
    """The table as the kernels read it: rows flattened to R = P (shared by the batch) or B * P
    (chunk tables), then head patterns, sink, window, and the per-sequence query offsets."""
    rows = -1, table.num_q_blocks
    return (
        jnp.asarray(table.kv_blocks, jnp.int32).reshape(*rows, table.max_blocks),  # [R, nq, n]
        jnp.asarray(table.counts, jnp.int32).reshape(rows),  # [R, nq]
        jnp.asarray(table.partial, jnp.int32).reshape(*rows, table.max_blocks),  # [R, nq, n]
        jnp.asarray(table.head_pattern, jnp.int32),  # [H]
        jnp.asarray(table.sink, jnp.int32),  # [P]
        jnp.asarray(table.window, jnp.int32),  # [P]
        q_offset,
    )  # [B]


def _batch_stride(table: PrefillBlockTable) -> int:
    """Rows between consecutive sequences: 0 when every sequence shares them."""
    return table.num_patterns if table.is_chunk else 0


# ----------------------------------------------------------------------------------------
# Mosaic TPU lowering.
# ----------------------------------------------------------------------------------------


def _prefill_kernel_tpu(
    # Scalar prefetch (SMEM).
    kv_blocks_ref,  # int32[R * nq * n_max]
    counts_ref,  # int32[R * nq]
    partial_ref,  # int32[R * nq * n_max]
    head_pattern_ref,  # int32[H]
    sink_ref,  # int32[P]
    window_ref,  # int32[P]
    q_offset_ref,  # int32[B]
    lengths_ref,  # int32[B]
    # Blocks (VMEM).
    q_ref,  # [bq, D]
    k_ref,  # [bk, D]
    v_ref,  # [bk, D]
    o_ref,  # [bq, D]
    # Scratch (VMEM), carried over the innermost grid axis.
    m_ref,  # f32[bq, 128]
    l_ref,  # f32[bq, 128]
    acc_ref,  # f32[bq, D]
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    max_blocks: int,
    batch_stride: int,
):
    b, h, q_block, step = (pl.program_id(i) for i in range(4))
    pattern = head_pattern_ref[h]
    row = (b * batch_stride + pattern) * num_q_blocks + q_block
    entry = row * max_blocks + step
    kv_block = kv_blocks_ref[entry]
    length = lengths_ref[b]
    q_first = q_offset_ref[b] + q_block * block_q

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        visible = None
        if masked:
            visible = _block_visible(
                q_first, kv_block, block_q, block_k, sink_ref[pattern], window_ref[pattern], length
            )
        m, l, acc = attend_block(
            q_ref[...], k_ref[...], v_ref[...], m_ref[...][:, :1], l_ref[...][:, :1], acc_ref[...], visible, sm_scale
        )
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
        acc_ref[...] = acc

    visit = (step < counts_ref[row]) & (kv_block * block_k < length) & (q_first < length)
    needs_mask = (partial_ref[entry] != 0) | ((kv_block + 1) * block_k > length)
    pl.when(visit & needs_mask)(lambda: update(masked=True))
    pl.when(visit & jnp.logical_not(needs_mask))(lambda: update(masked=False))

    @pl.when(step == max_blocks - 1)
    def _store():
        out = _finalize(acc_ref[...], l_ref[...][:, :1], q_first, length)
        o_ref[...] = out.astype(o_ref.dtype)


def _check_tables_fit_smem(scalars, interpret) -> None:
    """A clear error, before Mosaic's, when the scalar-prefetched tables outgrow this TPU's SMEM
    (1 MiB from v4 on; 16 KiB on v2/v3). Checked only when compiling for the TPU at hand."""
    if interpret or jax.default_backend() != "tpu":
        return
    try:
        capacity = pltpu.get_tpu_info().smem_capacity_bytes
    except ValueError:  # a chip JAX has no table for: leave the verdict to Mosaic
        return
    needed = 4 * sum(x.size for x in scalars)  # int32 words, before Mosaic's tile padding
    if needed > capacity:
        raise ValueError(
            f"block_sparse_prefill's block tables take {needed / 1024:.0f} KiB of scalar memory, "
            f"more than this TPU's SMEM ({capacity / 1024:.0f} KiB): prefill in chunks (q_offset; "
            "kvjax.prefill does) or use larger blocks, e.g. PrefillConfig(block_q=512, block_k=512)"
        )


def _prefill_tpu(q, k, v, table: PrefillBlockTable, q_offset, lengths, sm_scale, interpret):
    batch, num_heads, _, head_dim = q.shape
    group = num_heads // k.shape[1]
    block_q, block_k = table.block_q, table.block_k
    num_q_blocks, max_blocks = table.num_q_blocks, table.max_blocks
    stride = _batch_stride(table)

    def q_map(b, h, q_block, step, *_):
        return b, h, q_block, 0

    def kv_map(b, h, q_block, step, kv_blocks, counts, partial, head_pattern, sink, window, q_offset, lengths):
        del counts, partial, sink, window, q_offset
        entry = ((b * stride + head_pattern[h]) * num_q_blocks + q_block) * max_blocks + step
        # Never fetch past the sequence: later entries resolve to the last block with data.
        last_block = jax.lax.div(jnp.maximum(lengths[b] - 1, 0), block_k)
        return b, jax.lax.div(h, group), jnp.minimum(kv_blocks[entry], last_block), 0

    squeezed = pl.Squeezed()
    q_spec = pl.BlockSpec((squeezed, squeezed, block_q, head_dim), q_map)
    kv_spec = pl.BlockSpec((squeezed, squeezed, block_k, head_dim), kv_map)
    kernel = functools.partial(
        _prefill_kernel_tpu,
        sm_scale=sm_scale,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
        max_blocks=max_blocks,
        batch_stride=stride,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=8,
        grid=(batch, num_heads, num_q_blocks, max_blocks),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((block_q, _TPU_LANES), jnp.float32),
            pltpu.VMEM((block_q, _TPU_LANES), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
    )
    scalars = [x.reshape(-1) for x in _flat_tables(table, q_offset)] + [lengths]  # SMEM wants flat arrays
    _check_tables_fit_smem(scalars, interpret)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=tpu_interpret(interpret),
        name="block_sparse_prefill_tpu",
    )(*scalars, q, k, v)


# ----------------------------------------------------------------------------------------
# GPU lowering (generic Pallas, Triton backend).
# ----------------------------------------------------------------------------------------


def _prefill_kernel_gpu(
    kv_blocks_ref,  # int32[R, nq, n_max]
    counts_ref,  # int32[R, nq]
    partial_ref,  # int32[R, nq, n_max]
    head_pattern_ref,  # int32[H]
    sink_ref,  # int32[P]
    window_ref,  # int32[P]
    q_offset_ref,  # int32[B]
    lengths_ref,  # int32[B]
    q_ref,  # [bq, D]
    k_ref,  # [C, D]  every key of this (batch, KV head); only listed blocks are read
    v_ref,  # [C, D]
    o_ref,  # [bq, D]
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
    batch_stride: int,
):
    b, h, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pattern = head_pattern_ref[h]
    row = b * batch_stride + pattern
    sink, window, length = sink_ref[pattern], window_ref[pattern], lengths_ref[b]
    q_first = q_offset_ref[b] + q_block * block_q
    pieces = column_pieces(q_ref.shape[-1])  # one piece unless D is not a power of two
    q = tuple(q_ref[:, piece] for piece in pieces)  # [bq, w] each

    def body(step, carry):
        kv_block = kv_blocks_ref[row, q_block, step]
        start = pl.multiple_of(kv_block * block_k, block_k)

        def attend(masked: bool):
            k = tuple(k_ref[pl.ds(start, block_k), piece] for piece in pieces)  # [bk, w] each
            v = tuple(v_ref[pl.ds(start, block_k), piece] for piece in pieces)
            visible = None
            if masked:
                visible = _block_visible(q_first, kv_block, block_q, block_k, sink, window, length)
            return attend_block_pieces(q, k, v, *carry, visible, sm_scale)

        needs_mask = (partial_ref[row, q_block, step] != 0) | (start + block_k > length)
        return jax.lax.cond(
            start < length, lambda: jax.lax.cond(needs_mask, lambda: attend(True), lambda: attend(False)), lambda: carry
        )

    init = initial_pieces(block_q, [piece.stop - piece.start for piece in pieces])
    count = jnp.where(q_first < length, counts_ref[row, q_block], 0)
    _, l, accs = jax.lax.fori_loop(0, count, body, init)
    for piece, acc in zip(pieces, accs):
        o_ref[:, piece] = _finalize(acc, l, q_first, length).astype(o_ref.dtype)


def _prefill_gpu(q, k, v, table: PrefillBlockTable, q_offset, lengths, sm_scale, interpret, config):
    batch, num_heads, _, head_dim = q.shape
    kv_len, group = k.shape[2], num_heads // k.shape[1]
    block_q, block_k = table.block_q, table.block_k
    squeezed = pl.Squeezed()
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, i: (0,) * x.ndim)  # noqa: E731
    tables = (*_flat_tables(table, q_offset), lengths)
    q_spec = pl.BlockSpec((squeezed, squeezed, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((squeezed, squeezed, kv_len, head_dim), lambda b, h, i: (b, jax.lax.div(h, group), 0, 0))
    kernel = functools.partial(
        _prefill_kernel_gpu, sm_scale=sm_scale, block_q=block_q, block_k=block_k, batch_stride=_batch_stride(table)
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, num_heads, table.num_q_blocks),
        in_specs=[*(whole(x) for x in tables), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="block_sparse_prefill_gpu",
    )(*tables, q, k, v)


# ----------------------------------------------------------------------------------------
# Reference and public entry.
# ----------------------------------------------------------------------------------------


def _is_chunk(mask, q_offset) -> bool:
    """Chunk mode: queries at offsets over keys where slot = position (given offsets or table)."""
    return q_offset is not None or (isinstance(mask, PrefillBlockTable) and mask.is_chunk)


def _check_inputs(q, k, v, lengths, chunk: bool):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, H, T, D] and k, v [B, Hkv, T, D], got q {q.shape}, k {k.shape}, v {v.shape}")
    batch, num_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or (not chunk and k.shape[2] != seq_len):
        raise ValueError(
            f"k/v {k.shape} do not match q {q.shape} in batch, length or head dim "
            "(keys of another length need q_offset: chunk mode)"
        )
    if num_heads % k.shape[1]:
        raise ValueError(f"query heads {num_heads} not a multiple of KV heads {k.shape[1]}")
    if lengths is not None and jnp.shape(lengths) != (batch,):
        raise ValueError(f"lengths must be int32[B={batch}], got shape {jnp.shape(lengths)}")


def _sequence_lengths(lengths, batch: int, seq_len: int) -> jax.Array:
    if lengths is None:
        return jnp.full((batch,), seq_len, jnp.int32)
    return jnp.clip(jnp.asarray(lengths, jnp.int32), 0, seq_len)


def _query_offsets(q_offset, batch: int) -> jax.Array:
    """int32[B] from a scalar (every sequence's chunk starts there) or int32[B]."""
    q_offset = jnp.asarray(q_offset, jnp.int32)
    if q_offset.ndim == 0:
        return jnp.broadcast_to(q_offset, (batch,))
    if q_offset.shape != (batch,):
        raise ValueError(f"q_offset must be a scalar or int32[B={batch}], got {q_offset.shape}")
    return q_offset


def _resolve_table(mask, q_offset, num_heads, num_kv_heads, q_len, kv_len, block_q, block_k):
    """A description becomes a table at (block_q, block_k) (a chunk table when q_offset is
    given); a given table must cover the queries (and keys) and match the mode."""
    if isinstance(mask, PrefillBlockTable):
        if jnp.shape(mask.head_pattern) != (num_heads,):
            raise ValueError(f"table maps {jnp.shape(mask.head_pattern)} heads, q has {num_heads}")
        if mask.is_chunk:
            if q_offset is not None:
                raise ValueError("a chunk table carries its own q_offset; do not pass another")
            covered = (mask.seq_len, mask.kv_len)
            needed = (padded_length(q_len, mask.block_q, 1), padded_length(kv_len, mask.block_k, 1))
            if covered != needed:
                raise ValueError(f"chunk table covers (queries, keys) {covered}, inputs pad to {needed}")
            return mask
        if q_offset is not None:
            raise ValueError("q_offset needs a description or a chunk table (block_masks.prefill_chunk_block_table)")
        if mask.seq_len < q_len or mask.seq_len >= q_len + np.lcm(mask.block_q, mask.block_k):
            raise ValueError(f"table covers {mask.seq_len} tokens, sequence has {q_len}")
        return mask
    if q_offset is not None:
        return block_masks.prefill_chunk_block_table(
            mask,
            q_offset,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            chunk_len=q_len,
            kv_len=kv_len,
            block_q=block_q,
            block_k=block_k,
        )
    return block_masks.prefill_block_table(
        mask, num_heads=num_heads, num_kv_heads=num_kv_heads, seq_len=q_len, block_q=block_q, block_k=block_k
    )


def block_sparse_prefill_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskDescription | PrefillBlockTable,
    *,
    lengths: jax.Array | None = None,
    q_offset: jax.Array | int | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Dense masked attention with the kernel's semantics (O(S * C) memory; the ground truth).

    q [B, H, S, D], k and v [B, Hkv, C, D] -> [B, H, S, D]; C = S unless in chunk mode
    (`q_offset`, or a chunk table), where query row t of sequence b sits at position
    q_offset[b] + t and key slot c at position c. Keys at or past `lengths[b]` are masked;
    rows that see no key, and rows at or past `lengths[b]`, are zero.
    """
    chunk = _is_chunk(mask, q_offset)
    _check_inputs(q, k, v, lengths, chunk)
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    lengths = _sequence_lengths(lengths, batch, kv_len)
    offsets = None if q_offset is None else _query_offsets(q_offset, batch)
    if isinstance(mask, PrefillBlockTable):
        _resolve_table(mask, offsets, num_heads, num_kv_heads, q_len, kv_len, mask.block_q, mask.block_k)
        offsets = mask.q_offset if chunk else None
        visible = block_masks.prefill_table_mask(mask)[..., :q_len, :kv_len]  # [(B,) H, S, C]
    elif chunk:
        sink, window = block_masks.head_sink_window(mask, num_heads, num_kv_heads)  # int32[H]
        q_abs = offsets[:, None] + jnp.arange(q_len, dtype=jnp.int32)  # [B, S]
        visible = block_masks.token_visible(
            q_abs[:, None, :, None],
            jnp.arange(kv_len, dtype=jnp.int32),
            sink[None, :, None, None],
            window[None, :, None, None],
        )  # [B, H, S, C]
    else:
        visible = block_masks.dense_mask(mask, num_heads, num_kv_heads, q_len)  # [H, T, T]
    q_pos = jnp.arange(q_len, dtype=jnp.int32)[None]  # [1, S]
    if offsets is not None:
        q_pos = offsets[:, None] + q_pos  # [B, S]
    key_in = jnp.arange(kv_len)[None, :] < lengths[:, None]  # [B, C]
    query_in = q_pos < lengths[:, None]  # [B, S]
    visible = visible & key_in[:, None, None, :]  # [B, H, S, C]
    visible = visible.reshape(batch, num_kv_heads, -1, q_len, kv_len)  # [B, Hkv, g, S, C]
    qg = q.reshape(batch, num_kv_heads, -1, q_len, head_dim)  # [B, Hkv, g, S, D]
    o = masked_attention(qg, k, v, visible, sm_scale)  # [B, Hkv, g, S, D]
    o = jnp.where(query_in[:, None, None, :, None], o, 0.0)
    return o.reshape(q.shape).astype(q.dtype)


def block_sparse_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskDescription | PrefillBlockTable,
    *,
    lengths: jax.Array | None = None,
    q_offset: jax.Array | int | None = None,
    sm_scale: float | None = None,
    config: PrefillConfig = PrefillConfig(),
    implementation: str | Lowering = "auto",
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Block-sparse causal attention: q [B, H, S, D], k, v [B, Hkv, C, D] -> [B, H, S, D].

    Whole-sequence mode (no q_offset): C = S, queries and keys both at positions [0, S).
    Chunk mode (q_offset: an int32 scalar or int32[B], traced or not): query row t of
    sequence b sits at absolute position q_offset[b] + t; key slot c holds position c (a
    cache written at slot = position, as kvjax's Full layout); C may exceed S. The causal,
    sink and window masks compare absolute positions, and the block table is built for the
    offsets at run time (`block_masks.prefill_chunk_block_table`), so blocks no query of a
    block can see are never loaded.

    mask: a static description (its table is built at config's block sizes) or a
    `PrefillBlockTable` built at config's block sizes (a chunk table carries its offsets:
    pass no q_offset with it). lengths: optional int32[B], each sequence's valid keys
    (slots [0, lengths[b])); query rows at or past lengths[b] are zero. implementation: a name
    of `lowering.NAMES` ("auto", "reference", "tpu", "gpu" (Triton), "mosaic_gpu" (Hopper),
    "tpu-interpret", "gpu-interpret") or a `Lowering`; "auto" takes Mosaic GPU over Triton on
    Hopper where it fits. interpret: True runs the chosen kernel interpreted (under "auto" on CPU:
    the TPU kernel; not "mosaic_gpu"), or `pltpu.InterpretParams` for the TPU kernel's
    interpreter; see `lowering.resolve`. S and C need not be multiples of the blocks: inputs are
    zero-padded (pick a block_k dividing C to avoid copying the keys) and the padding masked.
    """
    chunk = _is_chunk(mask, q_offset)
    _check_inputs(q, k, v, lengths, chunk)
    if not isinstance(config, PrefillConfig):
        raise ValueError(f"config must be a PrefillConfig, got {config!r}")
    if isinstance(mask, PrefillBlockTable) and ((mask.block_q, mask.block_k) != (config.block_q, config.block_k)):
        raise ValueError(
            f"table block sizes {(mask.block_q, mask.block_k)} differ from config's {(config.block_q, config.block_k)}"
        )
    lowering = _default_to_hopper(q, config, implementation, resolve(implementation, interpret))
    implementation, interpret = lowering.platform, pallas_interpret(lowering, interpret)
    if implementation == "reference":
        return block_sparse_prefill_reference(q, k, v, mask, lengths=lengths, q_offset=q_offset, sm_scale=sm_scale)
    batch, num_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    offsets = None if q_offset is None else _query_offsets(q_offset, batch)
    table = _resolve_table(mask, offsets, num_heads, k.shape[1], q_len, kv_len, config.block_q, config.block_k)
    if table.is_chunk:
        offsets = table.q_offset
        if jnp.shape(offsets) != (batch,):
            raise ValueError(f"chunk table holds {jnp.shape(offsets)} offsets, batch is {batch}")
    else:
        offsets = jnp.zeros((batch,), jnp.int32)
    lengths = _sequence_lengths(lengths, batch, kv_len)
    kv_padded = table.num_kv_blocks * table.block_k
    q_p = _pad_length(q, table.seq_len)  # [B, H, S_pad, D]
    k_p, v_p = _pad_length(k, kv_padded), _pad_length(v, kv_padded)  # [B, Hkv, C_pad, D]
    if implementation == "tpu":
        out = _prefill_tpu(q_p, k_p, v_p, table, offsets, lengths, sm_scale, interpret)
    elif implementation == "mosaic_gpu":
        tables = (*_flat_tables(table, offsets), lengths)
        out = prefill_mosaic_gpu(q_p, k_p, v_p, tables, table, _batch_stride(table), sm_scale, config.num_stages)
    else:
        out = _prefill_gpu(q_p, k_p, v_p, table, offsets, lengths, sm_scale, interpret, config)
    return out[:, :, :q_len]


def _default_to_hopper(q, config: PrefillConfig, requested: str | Lowering, picked: Lowering) -> Lowering:
    """The lowering picked for `requested`, except that "auto"'s compiled Triton on Hopper becomes
    Mosaic GPU where the inputs fit it: it ran prefill several times faster than Triton on an H100
    (benchmarks/results/kernel_notes.md)."""
    if requested != "auto" or picked != Lowering("gpu") or not on_hopper():
        return picked
    head_dim = q.shape[-1]
    reason = unsupported(
        q.dtype, head_dim, config.block_k, config.num_stages, prefill_q_bytes(head_dim, q.dtype), config.block_q
    )
    return picked if reason else Lowering("mosaic_gpu")


def _pad_length(x: jax.Array, length: int) -> jax.Array:
    """[B, N, T, D] zero-padded along T to `length` (no copy when it already fits)."""
    if x.shape[2] == length:
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)])
