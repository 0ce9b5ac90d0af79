"""Block-sparse decode attention: one query token per sequence over a KV cache.

Each (batch, KV head) visits only the cache blocks (pages) its row of a `DecodeBlockTable` lists
(sink + recent blocks, a Quest-style top-k, or every block below the length); the g query heads
of a GQA group share each block's load. A row can be cut into `num_splits` programs whose partial
results merge by log-sum-exp (`combine_splits`; default count: `occupancy.decode_splits`).

Layout: q [B, H, D], k and v [B, Hkv, C, D] (H = Hkv * g, C a multiple of the block size);
lengths int32[B] or [B, Hkv]: slots [0, length) of a row are valid and the query sits at
position length - 1 (what sink/window masks are measured from). Output [B, H, D]. An optional
slot_mask bool[B, Hkv, C] hides single slots inside the listed blocks: selections finer than a
block (Squeezed Attention's clusters) read only the blocks holding a visible slot, exactly. An optional
`tail` cache [B, Ht, Ct, D] of another capacity holds the last Ht KV heads (LServe's streaming heads beside
its retrieval heads): one launch, each program reading its head's buffer.

Lowerings:
  * "tpu": Mosaic TPU, grid (B, Hkv, splits). Each program's share of its table row is pipelined
    into SMEM (the whole table would outgrow SMEM); K/V stay in HBM and the listed blocks are
    copied by hand into a VMEM ring (`dma_ring`), so the work follows the count, not the width.
  * "gpu" (the GPU default): generic Pallas on the Triton backend, chosen explicitly
    (`pltriton.CompilerParams`; deprecated from JAX 0.11). Grid (B, Hkv, splits); each program
    loops over its even share of the row's count (`block_masks.split_entries`). The group is
    padded to 16 query rows, and a head dim that is not a power of two is attended in
    power-of-two column pieces (`online_softmax.column_pieces`).
  * "mosaic_gpu": the Hopper kernel in `block_sparse_mosaic_gpu` (TMA, wgmma), on request.
  * "reference": `block_sparse_decode_reference`, dense masked attention in jnp.
Test status and H100 timings: benchmarks/results/kernel_notes.md (the TPU lowering has never run on a TPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import block_masks
from pallas_kernels.block_masks import DecodeBlockTable, MaskDescription
from pallas_kernels.block_sparse_mosaic_gpu import BLOCK_K as MOSAIC_GPU_BLOCKS
from pallas_kernels.block_sparse_mosaic_gpu import decode_mosaic_gpu
from pallas_kernels.dma_ring import ring_pipeline
from pallas_kernels.lowering import Lowering, pallas_interpret, resolve, tpu_interpret
from pallas_kernels.occupancy import decode_splits, gpu_processors
from pallas_kernels.online_softmax import (
    MASK_VALUE,
    attend_block,
    attend_block_pieces,
    column_pieces,
    initial_pieces,
    initial_state,
    masked_attention,
    masked_logsumexp,
)

_TRITON_MIN_ROWS = 16  # Triton's tl.dot needs at least 16 rows
MIN_SPLIT_BLOCKS = 4  # table entries per split, at least, when the split count is picked
BLOCK_SIZES = (128, 64, 32, 16)  # the pages `DecodeConfig.for_shape` tries, largest first


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tuning knobs. block_size: page size of the tables the kernel builds (a given table's
    block size must equal it)."""

    block_size: int = 128
    num_splits: int | None = None  # None: `occupancy.decode_splits` (GPU: fill it; else 1)
    num_warps: int = 4  # GPU only
    num_stages: int = 2  # Triton: pipeline stages; Mosaic GPU: K/V blocks in flight; TPU: ring stages (>= 2)
    tpu_stage_tokens: int = 512  # TPU only: K/V tokens copied per ring stage (whole blocks, at least one)

    def __post_init__(self):
        if not _positive_int(self.block_size) or self.block_size & (self.block_size - 1):
            raise ValueError(f"DecodeConfig.block_size must be a power of two, got {self.block_size!r}")
        if self.num_splits is not None and not _positive_int(self.num_splits):
            raise ValueError(f"DecodeConfig.num_splits must be a positive int or None, got {self.num_splits!r}")
        for name in ("num_warps", "num_stages", "tpu_stage_tokens"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"DecodeConfig.{name} must be a positive int, got {getattr(self, name)!r}")

    @classmethod
    def for_shape(
        cls, capacity: int, head_dim: int, lowering: Lowering, *, block_size: int | None = None, slot_mask: bool = False
    ) -> DecodeConfig | None:
        """The config that runs a cache of `capacity` slots of `head_dim` under `lowering`, or None
        where the kernel cannot take it (the caller runs the reference): the reference lowering;
        Triton ("gpu") with a head dim not a multiple of 16 (its smallest column piece); Mosaic GPU
        with a head dim not a multiple of 64, a slot mask, or pages other than its `BLOCK_K`; no
        page size dividing the capacity. block_size: the page size a given table fixes (the kernel
        checks that it divides the capacity); None picks the largest of `BLOCK_SIZES` (Mosaic GPU:
        of its `BLOCK_K`) dividing the capacity. slot_mask: whether the call passes one. Mosaic
        GPU's dtype, group and shared-memory limits are the kernel's to check (it raises)."""
        if lowering.platform == "reference" or (lowering.platform == "gpu" and head_dim % 16):
            return None
        sizes = BLOCK_SIZES
        if lowering.platform == "mosaic_gpu":
            if head_dim % 64 or slot_mask:
                return None
            sizes = tuple(sorted(MOSAIC_GPU_BLOCKS, reverse=True))
        if block_size is not None:
            return cls(block_size=block_size) if lowering.platform != "mosaic_gpu" or block_size in sizes else None
        block = next((size for size in sizes if capacity % size == 0), None)
        return None if block is None else cls(block_size=block)


def _page_start(kv_block, block_size, capacity):
    """(first slot read, the page's own first slot) for page `kv_block` of a `capacity`-slot buffer: a
    page running past the end of a buffer that is not whole pages (`tail`) is read ending at its end."""
    first = kv_block * block_size
    if capacity % block_size == 0:
        return pl.multiple_of(first, block_size), first
    return jnp.minimum(first, capacity - block_size), first


def _block_visible(start, first, block_size, rows, sink, window, length):
    """bool[rows, block_size]: slots start + i from the page's first slot `first` on (a clamped last page
    repeats slots of the page before), before the length, in the sink or the recent window."""
    k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_size), 1)
    return block_masks.token_visible(length - 1, k_pos, sink, window) & (k_pos >= first)


def _split_result(acc, l, m):
    """Normalised partial output and its log-sum-exp (MASK_VALUE when the split saw nothing)."""
    seen = l > 0.0
    out = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0)  # [rows, D]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), MASK_VALUE)  # [rows, 1]
    return out, lse


# ----------------------------------------------------------------------------------------
# Mosaic TPU lowering.
# ----------------------------------------------------------------------------------------


def _decode_kernel_tpu(
    # Scalar prefetch (SMEM).
    counts_ref,  # int32[B * Hkv]
    lengths_ref,  # int32[B * Hkv]
    sink_ref,  # int32[Hkv]
    window_ref,  # int32[Hkv]
    kv_blocks_ref,  # int32[1, per_split] (SMEM): this program's share of its table row
    q_ref,  # [g, D] (VMEM)
    k_hbm,  # [B, Hk, C, D] (HBM: blocks are copied by hand)
    v_hbm,  # [B, Hk, C, D]
    *refs,  # (slot_hbm int32[B, Hkv, nb, 1, bs], if given; or kt_hbm, vt_hbm [B, Hkv - Hk, Ct, D], the tail), o_ref,
    # lse_ref, then scratch: k_ring, v_ring [S, P, bs, D], (slot_ring int32[S, P, 1, bs]), sems DMA[2 or 3, S],
    # m, l [g, 1], acc [g, D]
    sm_scale: float,
    block_size: int,
    num_kv_heads: int,
    per_split: int,
    with_slots: bool,
    with_tail: bool,
):
    slot_hbm = slot_ring = None
    tail = ()
    if with_slots:
        slot_hbm, o_ref, lse_ref, k_ring, v_ring, slot_ring, *scratch = refs
    elif with_tail:
        *tail, o_ref, lse_ref, k_ring, v_ring = refs[:6]
        scratch = refs[6:]
    else:
        o_ref, lse_ref, k_ring, v_ring, *scratch = refs
    sems, m_ref, l_ref, acc_ref = scratch
    num_stages, stage_blocks = k_ring.shape[:2]
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # The buffers this head's pages are in: (k, v, its head there, capacity), each under its own condition.
    heads = k_hbm.shape[1]
    buffers = [(h < heads, k_hbm, v_hbm, h, k_hbm.shape[2])]
    if with_tail:
        buffers.append((h >= heads, *tail, h - heads, tail[0].shape[2]))
    row = b * num_kv_heads + h
    length = lengths_ref[row]
    first = split * per_split
    last = jnp.minimum(first + per_split, counts_ref[row])
    num_groups = pl.cdiv(jnp.maximum(last - first, 0), stage_blocks)  # stages this program attends

    def for_each_entry(group, slot, fn):
        """fn(cache block, ring slot, place in the stage) for the group's table entries below `last`."""

        def body(j, carry):
            local = group * stage_blocks + j  # place in this program's share of the row

            @pl.when(first + local < last)
            def _entry():
                fn(kv_blocks_ref[0, local], slot, j)

            return carry

        jax.lax.fori_loop(0, stage_blocks, body, 0)

    def copies(kv_block, slot, j, k_src, v_src, head, capacity):
        """The DMAs that bring cache block `kv_block` of (k_src, v_src) into place j of ring slot `slot`."""
        start, _ = _page_start(kv_block, block_size, capacity)
        pairs = [
            (k_src.at[b, head, pl.ds(start, block_size)], k_ring.at[slot, j]),
            (v_src.at[b, head, pl.ds(start, block_size)], v_ring.at[slot, j]),
        ]
        if with_slots:
            pairs.append((slot_hbm.at[b, h, kv_block], slot_ring.at[slot, j]))
        # A stage's copies share one semaphore per tensor: all are awaited before any is read.
        return [pltpu.make_async_copy(src, dst, sems.at[i, slot]) for i, (src, dst) in enumerate(pairs)]

    def each_copy(method):
        """fn(cache block, ring slot, place) calling `method` ("start" or "wait") on its copies from this
        head's buffer."""

        def fn(kv_block, slot, j):
            for cond, *source in buffers:

                def run(source=source):
                    for c in copies(kv_block, slot, j, *source):
                        getattr(c, method)()

                pl.when(cond)(run) if with_tail else run()

        return fn

    m_ref[...], l_ref[...], acc_ref[...] = initial_state(*acc_ref.shape)
    q = q_ref[...]  # [g, D]

    capacity = buffers[0][4] if not with_tail else jnp.where(h < heads, buffers[0][4], buffers[1][4])

    def attend(kv_block, slot, j):
        @pl.when(kv_block * block_size < length)
        def _attend():
            start = jnp.minimum(kv_block * block_size, capacity - block_size)  # as `_page_start` read it
            visible = _block_visible(
                start, kv_block * block_size, block_size, q.shape[0], sink_ref[h], window_ref[h], length
            )
            if with_slots:
                visible &= slot_ring[slot, j] != 0  # [1, bs] broadcast over the group
            m_ref[...], l_ref[...], acc_ref[...] = attend_block(
                q, k_ring[slot, j], v_ring[slot, j], m_ref[...], l_ref[...], acc_ref[...], visible, sm_scale
            )

    ring_pipeline(
        num_groups,
        num_stages,
        start=lambda group, slot: for_each_entry(group, slot, each_copy("start")),
        wait=lambda group, slot: for_each_entry(group, slot, each_copy("wait")),
        consume=lambda group, slot: for_each_entry(group, slot, attend),
    )
    o_ref[...], lse_ref[...] = _split_result(acc_ref[...], l_ref[...], m_ref[...])


def _decode_tpu(qg, k, v, lengths, table, sink, window, sm_scale, num_splits, interpret, config, slot_mask, tail):
    batch, num_kv_heads, group, head_dim = qg.shape
    block_size, max_blocks = table.block_size, table.max_blocks
    per_split = pl.cdiv(max_blocks, num_splits)
    ring = (max(2, config.num_stages), max(1, config.tpu_stage_tokens // block_size))  # (S, P)
    squeezed = pl.Squeezed()
    row_map = lambda b, h, split, *_: (b, h, 0, 0)  # noqa: E731
    split_map = lambda b, h, split, *_: (b, h, split, 0, 0)  # noqa: E731
    # Each program's share of its row as one [1, per_split] block ((1, n) equals the array's last
    # two dims, which Mosaic requires of blocks that are not (8, 128)-aligned).
    shares = jnp.pad(table.kv_blocks, ((0, 0), (0, 0), (0, num_splits * per_split - max_blocks)))
    shares = shares.reshape(-1, 1, per_split)  # [B * Hkv * splits, 1, per_split]
    share_spec = pl.BlockSpec(
        (squeezed, 1, per_split),
        lambda b, h, split, *_: ((b * num_kv_heads + h) * num_splits + split, 0, 0),
        memory_space=pltpu.SMEM,
    )
    hbm = pl.BlockSpec(memory_space=pl.ANY)  # left in HBM: copied block by block
    slot_inputs, slot_specs, slot_scratch = (), [], []
    if slot_mask is not None:
        # Copied block by block like K and V: a [1, bs] row per block, not the whole row's mask.
        slot_inputs = (slot_mask.astype(jnp.int32).reshape(batch, num_kv_heads, -1, 1, block_size),)
        slot_specs = [hbm]
        slot_scratch = [pltpu.VMEM((*ring, 1, block_size), jnp.int32)]
    tail = tail or ()
    kernel = functools.partial(
        _decode_kernel_tpu,
        sm_scale=sm_scale,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        per_split=per_split,
        with_slots=slot_mask is not None,
        with_tail=bool(tail),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[
            share_spec,
            pl.BlockSpec((squeezed, squeezed, group, head_dim), row_map),
            hbm,
            hbm,
            *slot_specs,
            *(hbm for _ in tail),
        ],
        out_specs=[
            pl.BlockSpec((squeezed, squeezed, squeezed, group, head_dim), split_map),
            pl.BlockSpec((squeezed, squeezed, squeezed, group, 1), split_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((*ring, block_size, head_dim), k.dtype),
            pltpu.VMEM((*ring, block_size, head_dim), v.dtype),
            *slot_scratch,
            pltpu.SemaphoreType.DMA((2 + len(slot_inputs), ring[0])),
            pltpu.VMEM((group, 1), jnp.float32),
            pltpu.VMEM((group, 1), jnp.float32),
            pltpu.VMEM((group, head_dim), jnp.float32),
        ],
    )
    split_shape = (batch, num_kv_heads, num_splits, group)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(split_shape + (head_dim,), jnp.float32),
            jax.ShapeDtypeStruct(split_shape + (1,), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=tpu_interpret(interpret),
        name="block_sparse_decode_tpu",
    )(
        table.counts.reshape(-1),
        lengths.reshape(-1),
        jnp.asarray(sink),
        jnp.asarray(window),
        shares,
        qg,
        k,
        v,
        *slot_inputs,
        *tail,
    )


# ----------------------------------------------------------------------------------------
# GPU lowering (generic Pallas, Triton backend).
# ----------------------------------------------------------------------------------------


def _decode_kernel_gpu(
    kv_blocks_ref,  # int32[B, Hkv, n_max]
    counts_ref,  # int32[B, Hkv]
    lengths_ref,  # int32[B, Hkv]
    sink_ref,  # int32[Hkv]
    window_ref,  # int32[Hkv]
    q_ref,  # [g_pad, D]
    k_ref,  # [C, D]  this (batch, KV head)'s cache; only listed blocks are read
    v_ref,  # [C, D]
    *refs,  # (slot_ref int32[C] this row's slot mask, if given; or kt_ref, vt_ref [Ct, D], the tail's row), o_ref
    # f32[g_pad, D], lse_ref f32[g_pad, 1]
    sm_scale: float,
    block_size: int,
    num_splits: int,
    tail_from: int | None,
):
    *inputs, o_ref, lse_ref = refs
    slot_ref = inputs[0] if len(inputs) == 1 else None
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length, sink, window = lengths_ref[b, h], sink_ref[h], window_ref[h]
    rows, head_dim = q_ref.shape
    pieces = column_pieces(head_dim)  # one piece unless D is not a power of two
    q = tuple(q_ref[:, piece] for piece in pieces)  # [g_pad, w] each

    def body(k_ref, v_ref):
        capacity = k_ref.shape[0]

        def step(entry, carry):
            kv_block = kv_blocks_ref[b, h, entry]
            start, first = _page_start(kv_block, block_size, capacity)

            def attend():
                k = tuple(k_ref[pl.ds(start, block_size), piece] for piece in pieces)  # [bs, w] each
                v = tuple(v_ref[pl.ds(start, block_size), piece] for piece in pieces)
                visible = _block_visible(start, first, block_size, rows, sink, window, length)
                if slot_ref is not None:
                    visible &= (slot_ref[pl.ds(start, block_size)] != 0)[None, :]  # [1, bs]
                return attend_block_pieces(q, k, v, *carry, visible, sm_scale)

            return jax.lax.cond(first < length, attend, lambda: carry)

        return step

    first, last = block_masks.split_entries(split, counts_ref[b, h], num_splits)
    init = initial_pieces(rows, [piece.stop - piece.start for piece in pieces])
    if tail_from is None:
        m, l, accs = jax.lax.fori_loop(first, last, body(k_ref, v_ref), init)
    else:  # a head's pages are in one buffer: the other loop runs no iteration
        in_tail = h >= tail_from
        carry = jax.lax.fori_loop(first, jnp.where(in_tail, first, last), body(k_ref, v_ref), init)
        m, l, accs = jax.lax.fori_loop(first, jnp.where(in_tail, last, first), body(*inputs), carry)
    for piece, acc in zip(pieces, accs):
        o_ref[:, piece], lse = _split_result(acc, l, m)
    lse_ref[...] = lse


def _decode_gpu(qg, k, v, lengths, table, sink, window, sm_scale, num_splits, interpret, config, slot_mask, tail):
    batch, num_kv_heads, group, head_dim = qg.shape
    capacity, heads = k.shape[2], k.shape[1]
    rows = max(_TRITON_MIN_ROWS, pl.next_power_of_2(group))
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))  # [B, Hkv, g_pad, D]
    squeezed = pl.Squeezed()
    scalars = (table.kv_blocks, table.counts, lengths, jnp.asarray(sink), jnp.asarray(window))
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, s: (0,) * x.ndim)  # noqa: E731
    split_map = lambda b, h, s: (b, h, s, 0, 0)  # noqa: E731
    row_map = lambda b, h, s: (b, h, 0, 0)  # noqa: E731
    slot_inputs, slot_specs = (), []
    if slot_mask is not None:
        slot_inputs = (slot_mask.astype(jnp.int32),)
        slot_specs = [pl.BlockSpec((squeezed, squeezed, capacity), lambda b, h, s: (b, h, 0))]
    tail_inputs, tail_specs, row_map_k = (), [], row_map
    if tail is not None:  # each buffer's row of the program's head, clamped into range for the other kind
        tail_inputs = tail
        tail_map = lambda b, h, s: (b, jnp.maximum(h - heads, 0), 0, 0)  # noqa: E731
        tail_specs = [pl.BlockSpec((squeezed, squeezed, tail[0].shape[2], head_dim), tail_map)] * 2
        row_map_k = lambda b, h, s: (b, jnp.minimum(h, heads - 1), 0, 0)  # noqa: E731
    kernel = functools.partial(
        _decode_kernel_gpu,
        sm_scale=sm_scale,
        block_size=table.block_size,
        num_splits=num_splits,
        tail_from=None if tail is None else heads,
    )
    split_shape = (batch, num_kv_heads, num_splits, rows)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[
            *(whole(x) for x in scalars),
            pl.BlockSpec((squeezed, squeezed, rows, head_dim), row_map),
            pl.BlockSpec((squeezed, squeezed, capacity, head_dim), row_map_k),
            pl.BlockSpec((squeezed, squeezed, capacity, head_dim), row_map_k),
            *slot_specs,
            *tail_specs,
        ],
        out_specs=[
            pl.BlockSpec((squeezed, squeezed, squeezed, rows, head_dim), split_map),
            pl.BlockSpec((squeezed, squeezed, squeezed, rows, 1), split_map),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(split_shape + (head_dim,), jnp.float32),
            jax.ShapeDtypeStruct(split_shape + (1,), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="block_sparse_decode_gpu",
    )(*scalars, qg, k, v, *slot_inputs, *tail_inputs)
    return out[:, :, :, :group], lse[:, :, :, :group]


# ----------------------------------------------------------------------------------------
# Combine, reference and public entry.
# ----------------------------------------------------------------------------------------


def combine_splits(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Merges per-split partial results with their log-sum-exps (flash-decoding combine).

    out f32[B, Hkv, S, g, D], lse f32[B, Hkv, S, g, 1] -> (f32[B, Hkv, g, D], the whole row's
    log-sum-exp f32[B, Hkv, g], -inf where no split saw a key).
    """
    top = jnp.max(lse, axis=2, keepdims=True)  # [B, Hkv, 1, g, 1]
    weight = jnp.exp(lse - top)  # [B, Hkv, S, g, 1]
    total = jnp.sum(weight, axis=2)  # [B, Hkv, g, 1]
    seen = top[:, :, 0] > MASK_VALUE / 2  # [B, Hkv, g, 1]: a split saw a key
    lse = jnp.where(seen, top[:, :, 0] + jnp.log(total), -jnp.inf)[..., 0]  # [B, Hkv, g]
    return jnp.sum(weight * out, axis=2) / total, lse


def _check_inputs(q, k, v, tail=None) -> int:
    """The call's KV heads (k's, plus the tail's) after checking the shapes."""
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, H, D] and k, v [B, Hkv, C, D], got q {q.shape}, k {k.shape}, v {v.shape}")
    batch, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch or head dim")
    num_kv_heads = k.shape[1]
    if tail is not None:
        k_tail, v_tail = tail
        if k_tail.ndim != 4 or k_tail.shape != v_tail.shape or k_tail.shape[::3] != k.shape[::3]:
            raise ValueError(
                f"tail k, v must be [B, Ht, Ct, D] matching k {k.shape}; got {k_tail.shape}, {v_tail.shape}"
            )
        num_kv_heads += k_tail.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} not a multiple of KV heads {num_kv_heads}")
    return num_kv_heads


def _check_tail(tail, table, slot_mask, block_size: int) -> None:
    if tail is None:
        return
    if table is None or slot_mask is not None:
        raise ValueError("a tail buffer needs a table and takes no slot_mask")
    if tail[0].shape[2] < block_size:
        raise ValueError(f"the tail's capacity {tail[0].shape[2]} is below one page ({block_size} slots)")


def _check_slot_mask(slot_mask, k):
    if slot_mask is not None and jnp.shape(slot_mask) != k.shape[:3]:
        raise ValueError(f"slot_mask must be bool[B, Hkv, C] = {k.shape[:3]}, got shape {jnp.shape(slot_mask)}")


def _check_table(table: DecodeBlockTable, batch: int, num_kv_heads: int, capacity: int):
    if not isinstance(table, DecodeBlockTable):
        raise ValueError(f"table must be a DecodeBlockTable or None, got {type(table).__name__}")
    if table.kv_blocks.ndim != 3 or table.kv_blocks.shape[:2] != (batch, num_kv_heads):
        raise ValueError(
            f"table.kv_blocks must be int32[B={batch}, Hkv={num_kv_heads}, n_max], got {table.kv_blocks.shape}"
        )
    if table.counts.shape != (batch, num_kv_heads):
        raise ValueError(f"table.counts must be int32[{batch}, {num_kv_heads}], got {table.counts.shape}")
    if capacity % table.block_size:
        raise ValueError(
            f"cache capacity {capacity} is not a multiple of the table's block size "
            f"{table.block_size}; allocate the cache in whole blocks"
        )


def _resolve(k, lengths, table, mask, block_size, tail=None):
    """(lengths int32[B, Hkv], table, sink int32[Hkv], window int32[Hkv]) for a call; Hkv counts the tail's
    heads, whose lengths are clipped to the tail's capacity and whose pages it holds."""
    batch, num_kv_heads, capacity, _ = k.shape
    limit = capacity
    if tail is not None:
        limit = jnp.asarray([capacity] * num_kv_heads + [tail[0].shape[2]] * tail[0].shape[1], jnp.int32)
        num_kv_heads += tail[0].shape[1]
    lengths = jnp.clip(block_masks.decode_lengths(lengths, batch, num_kv_heads), 0, limit)
    mask = block_masks.DenseCausal() if mask is None else mask
    sink, window = block_masks.head_sink_window(mask, num_kv_heads)
    if table is None:
        table = block_masks.decode_table_from_mask(
            mask, lengths, num_kv_heads=num_kv_heads, capacity=capacity, block_size=block_size
        )
    _check_table(table, batch, num_kv_heads, capacity)
    table = DecodeBlockTable(
        kv_blocks=jnp.asarray(table.kv_blocks, jnp.int32),
        counts=jnp.asarray(table.counts, jnp.int32),
        block_size=table.block_size,
    )
    return lengths, table, sink, window


def block_sparse_decode_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    table: DecodeBlockTable | None = None,
    *,
    mask: MaskDescription | None = None,
    sm_scale: float | None = None,
    slot_mask: jax.Array | None = None,
    return_lse: bool = False,
    tail: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dense masked decode attention with the kernel's semantics (the ground truth).

    Visible slots: listed by the table (all blocks when None), below the length, inside the
    per-KV-head mask (dense when None) and set in `slot_mask` (when given). A head that sees
    nothing outputs zeros (and a log-sum-exp of -inf). `tail`: `block_sparse_decode`'s.
    """
    _check_inputs(q, k, v, tail)
    if tail is not None:  # both buffers zero-padded to whole pages of one capacity, the tail's heads last
        _check_tail(tail, table, slot_mask, table.block_size)
        lengths, table, _, _ = _resolve(k, lengths, table, mask, table.block_size, tail)
        capacity = max(k.shape[2], -(-tail[0].shape[2] // table.block_size) * table.block_size)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, capacity - x.shape[2]), (0, 0)))  # noqa: E731
        k, v = (jnp.concatenate([pad(x), pad(t)], axis=1) for x, t in zip((k, v), tail))
        return block_sparse_decode_reference(
            q, k, v, lengths, table, mask=mask, sm_scale=sm_scale, return_lse=return_lse
        )
    _check_slot_mask(slot_mask, k)
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, capacity, _ = k.shape
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    block_size = capacity if table is None else table.block_size
    lengths, table, sink, window = _resolve(k, lengths, table, mask, block_size)
    pos = jnp.arange(capacity, dtype=jnp.int32)
    visible = block_masks.decode_table_mask(table, capacity) & block_masks.token_visible(
        lengths[..., None] - 1, pos, sink[:, None], window[:, None]
    )  # [B, Hkv, C]
    if slot_mask is not None:
        visible &= jnp.asarray(slot_mask, bool)
    qg = q.reshape(batch, num_kv_heads, -1, 1, head_dim)  # [B, Hkv, g, 1, D]
    o = masked_attention(qg, k, v, visible[:, :, None, None], sm_scale)  # [B, Hkv, g, 1, D]
    o = o.reshape(q.shape).astype(q.dtype)
    if not return_lse:
        return o
    return o, masked_logsumexp(qg, k, visible[:, :, None, None], sm_scale).reshape(batch, num_heads)


def block_sparse_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    table: DecodeBlockTable | None = None,
    *,
    mask: MaskDescription | None = None,
    sm_scale: float | None = None,
    config: DecodeConfig = DecodeConfig(),
    implementation: str | Lowering = "auto",
    interpret: bool | pltpu.InterpretParams = False,
    slot_mask: jax.Array | None = None,
    return_lse: bool = False,
    tail: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decode attention over listed cache blocks: q [B, H, D], k, v [B, Hkv, C, D] -> [B, H, D].

    table: blocks to visit per (batch, KV head); None visits what `mask` allows (every block
    below the length when mask is None too), built at config.block_size. mask: optional
    per-KV-head description applied element-wise (e.g. SinkLocal for streaming heads).
    slot_mask: optional bool[B, Hkv, C]; unset slots of a listed block are skipped too (the
    table should list only blocks holding a set slot: `decode_table_from_slots`). Not taken by
    "mosaic_gpu".
    implementation: a name of `lowering.NAMES` ("auto", "reference", "tpu", "gpu" (Triton),
    "mosaic_gpu" (Hopper), "tpu-interpret", "gpu-interpret") or a `Lowering`. interpret: True runs
    the chosen kernel interpreted (under "auto" on CPU: the TPU kernel), or `pltpu.InterpretParams`
    for the TPU kernel's interpreter (e.g. eager DMAs or race detection); see `lowering.resolve`.
    return_lse: also return each query head's log-sum-exp of its visible scores, float32[B, H]
    (-inf where it sees nothing), so a caller can fold in attention over keys kept elsewhere.
    tail: (k_tail, v_tail) [B, Ht, Ct, D], a second cache holding the last Ht of the call's Hkv = Hk + Ht
    KV heads (k, v then hold the first Hk), so heads kept in buffers of two capacities attend in one
    launch (LServe's streaming and retrieval heads): their table rows index pages of the tail, lengths
    count its slots. Ct need not be whole pages (a page running past it is read ending at Ct, the
    slots repeated from the page before masked) but must hold one. Needs a table; takes no slot_mask
    and no "mosaic_gpu".
    """
    _check_inputs(q, k, v, tail)
    _check_tail(tail, table, slot_mask, config.block_size)
    if not isinstance(config, DecodeConfig):
        raise ValueError(f"config must be a DecodeConfig, got {config!r}")
    if table is not None and table.block_size != config.block_size:
        raise ValueError(f"table.block_size {table.block_size} differs from config.block_size {config.block_size}")
    _check_slot_mask(slot_mask, k)
    lowering = resolve(implementation, interpret)
    implementation, interpret = lowering.platform, pallas_interpret(lowering, interpret)
    if implementation == "reference":
        return block_sparse_decode_reference(
            q, k, v, lengths, table, mask=mask, sm_scale=sm_scale, slot_mask=slot_mask, return_lse=return_lse, tail=tail
        )
    if implementation == "mosaic_gpu" and (slot_mask is not None or tail is not None):
        raise ValueError('implementation="mosaic_gpu" takes no slot_mask and no tail; use "gpu" (Triton)')
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1] + (0 if tail is None else tail[0].shape[1])
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    lengths, table, sink, window = _resolve(k, lengths, table, mask, config.block_size, tail)
    num_splits = min(
        config.num_splits
        or decode_splits(batch * num_kv_heads, table.max_blocks, MIN_SPLIT_BLOCKS, gpu_processors(interpret)),
        table.max_blocks,
    )
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, Hkv, g, D]
    if implementation == "tpu":
        out, lse = _decode_tpu(
            qg, k, v, lengths, table, sink, window, sm_scale, num_splits, interpret, config, slot_mask, tail
        )
    elif implementation == "mosaic_gpu":
        out, lse = decode_mosaic_gpu(qg, k, v, lengths, table, sink, window, sm_scale, num_splits, config.num_stages)
    else:
        out, lse = _decode_gpu(
            qg, k, v, lengths, table, sink, window, sm_scale, num_splits, interpret, config, slot_mask, tail
        )
    out, lse = combine_splits(out, lse)  # [B, Hkv, g, D], [B, Hkv, g]
    out = out.reshape(q.shape).astype(q.dtype)  # [B, H, D]
    return (out, lse.reshape(batch, num_heads)) if return_lse else out
