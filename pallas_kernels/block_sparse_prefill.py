"""Block-sparse causal flash attention for prefill (streaming heads, DuoAttention).

Each (batch, query head, query block) visits only the KV blocks its row of a
`PrefillBlockTable` lists; skipped blocks are never loaded. Blocks flagged partial (the
diagonal, the edge of a local window, the last block of a short sequence) get the
element-wise mask; fully visible blocks skip it. Online softmax in float32.

Lowerings:
  * "tpu": Mosaic TPU. Grid (B, H, nq, n_max); the table, per-pattern sink/window and the
    per-sequence lengths travel through scalar prefetch and drive the K/V index maps, so the
    pipeline DMAs only listed blocks (padded entries repeat the last block: no copy). Rows
    with fewer than n_max entries idle for their remaining grid steps (no copy, no compute):
    the price of one launch for mixed dense and streaming heads. The prefetched table holds
    2 * P * nq * n_max int32 words: dense heads at long T need large blocks to fit in SMEM.
  * "gpu": a generic Pallas kernel (only `pl` primitives) compiled with the Triton backend.
    Grid (B, H, nq); each program loops over exactly its row's count of blocks, so a
    streaming head costs a few blocks even when dense heads share the launch. The Triton backend
    is chosen explicitly (`pltriton.CompilerParams`): it is deprecated from JAX 0.11 but works.
    Mosaic GPU, JAX's recommended Hopper backend, has no variant here: none could be run on
    a GPU in this project's CPU-only environment.
  * "reference": `block_sparse_prefill_reference`, dense masked attention in jnp.

Neither kernel has run on a TPU or GPU: both are tested in interpret mode on CPU and checked
to lower (to Mosaic TPU MLIR and to Triton IR) with cross-platform lowering.

Layout: q [B, H, T, D], k and v [B, Hkv, T, D] (H = Hkv * g); output [B, H, T, D]. Query
head h reads KV head h // g. Batches are right-padded: sequence b holds tokens [0, lengths[b]).
T need not be a multiple of the blocks: inputs are zero-padded and the padding masked.
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
from pallas_kernels.block_masks import MaskDescription, PrefillBlockTable
from pallas_kernels.lowering import pick_implementation
from pallas_kernels.online_softmax import MASK_VALUE, attend_block, initial_state, masked_attention

_TPU_LANES = 128  # m and l scratch are replicated over the lanes of one vreg row


def _is_power_of_two(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Tuning knobs. Block sizes are powers of two (Triton); on TPU prefer multiples of 128."""

    block_q: int = 128
    block_k: int = 128
    num_warps: int = 4  # GPU only
    num_stages: int = 2  # GPU only

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < 8:
                raise ValueError(f"PrefillConfig.{name} must be a power of two >= 8, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PrefillConfig.{name} must be a positive int, got {value!r}")


# ----------------------------------------------------------------------------------------
# Masking and normalisation shared by both lowerings.
# ----------------------------------------------------------------------------------------


def _block_visible(q_block, kv_block, block_q, block_k, sink, window, length):
    """bool[bq, bk] element mask: causal, sink + window, and keys before the sequence length."""
    q_pos = q_block * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = kv_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    return block_masks.token_visible(q_pos, k_pos, sink, window) & (k_pos < length)


def _finalize(acc, l, q_block, block_q, length):
    """acc / l, with zeros for rows that saw no key and for rows at or past the length."""
    q_pos = q_block * block_q + jax.lax.broadcasted_iota(jnp.int32, l.shape, 0)  # [bq, 1]
    keep = (l > 0.0) & (q_pos < length)
    return jnp.where(keep, acc / jnp.where(keep, l, 1.0), 0.0)  # [bq, D]


# ----------------------------------------------------------------------------------------
# Mosaic TPU lowering.
# ----------------------------------------------------------------------------------------


def _prefill_kernel_tpu(
    # Scalar prefetch (SMEM).
    kv_blocks_ref,  # int32[P * nq * n_max]
    counts_ref,  # int32[P * nq]
    partial_ref,  # int32[P * nq * n_max]
    head_pattern_ref,  # int32[H]
    sink_ref,  # int32[P]
    window_ref,  # int32[P]
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
):
    b, h, q_block, step = (pl.program_id(i) for i in range(4))
    pattern = head_pattern_ref[h]
    row = pattern * num_q_blocks + q_block
    entry = row * max_blocks + step
    kv_block = kv_blocks_ref[entry]
    length = lengths_ref[b]

    @pl.when(step == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        visible = None
        if masked:
            visible = _block_visible(q_block, kv_block, block_q, block_k,
                                     sink_ref[pattern], window_ref[pattern], length)
        m, l, acc = attend_block(q_ref[...], k_ref[...], v_ref[...], m_ref[...][:, :1],
                                  l_ref[...][:, :1], acc_ref[...], visible, sm_scale)
        m_ref[...] = jnp.broadcast_to(m, m_ref.shape)
        l_ref[...] = jnp.broadcast_to(l, l_ref.shape)
        acc_ref[...] = acc

    visit = ((step < counts_ref[row]) & (kv_block * block_k < length)
             & (q_block * block_q < length))
    needs_mask = (partial_ref[entry] != 0) | ((kv_block + 1) * block_k > length)
    pl.when(visit & needs_mask)(lambda: update(masked=True))
    pl.when(visit & jnp.logical_not(needs_mask))(lambda: update(masked=False))

    @pl.when(step == max_blocks - 1)
    def _store():
        out = _finalize(acc_ref[...], l_ref[...][:, :1], q_block, block_q, length)
        o_ref[...] = out.astype(o_ref.dtype)


def _prefill_tpu(q, k, v, table: PrefillBlockTable, lengths, sm_scale, interpret):
    batch, num_heads, seq_len, head_dim = q.shape
    group = num_heads // k.shape[1]
    block_q, block_k = table.block_q, table.block_k
    num_q_blocks, max_blocks = table.num_q_blocks, table.max_blocks

    def q_map(b, h, q_block, step, *_):
        return b, h, q_block, 0

    def kv_map(b, h, q_block, step, kv_blocks, counts, partial, head_pattern, sink, window,
               lengths):
        del counts, partial, sink, window
        entry = (head_pattern[h] * num_q_blocks + q_block) * max_blocks + step
        # Never fetch past the sequence: later entries resolve to the last block with data.
        last_block = jax.lax.div(jnp.maximum(lengths[b] - 1, 0), block_k)
        return b, jax.lax.div(h, group), jnp.minimum(kv_blocks[entry], last_block), 0

    squeezed = pl.Squeezed()
    q_spec = pl.BlockSpec((squeezed, squeezed, block_q, head_dim), q_map)
    kv_spec = pl.BlockSpec((squeezed, squeezed, block_k, head_dim), kv_map)
    kernel = functools.partial(
        _prefill_kernel_tpu, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
        num_q_blocks=num_q_blocks, max_blocks=max_blocks)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7,
        grid=(batch, num_heads, num_q_blocks, max_blocks),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[
            pltpu.VMEM((block_q, _TPU_LANES), jnp.float32),
            pltpu.VMEM((block_q, _TPU_LANES), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="block_sparse_prefill_tpu",
    )(
        jnp.asarray(table.kv_blocks, jnp.int32).reshape(-1),
        jnp.asarray(table.counts, jnp.int32).reshape(-1),
        jnp.asarray(table.partial, jnp.int32).reshape(-1),
        jnp.asarray(table.head_pattern, jnp.int32),
        jnp.asarray(table.sink, jnp.int32),
        jnp.asarray(table.window, jnp.int32),
        lengths,
        q, k, v,
    )


# ----------------------------------------------------------------------------------------
# GPU lowering (generic Pallas, Triton backend).
# ----------------------------------------------------------------------------------------


def _prefill_kernel_gpu(
    kv_blocks_ref,  # int32[P, nq, n_max]
    counts_ref,  # int32[P, nq]
    partial_ref,  # int32[P, nq, n_max]
    head_pattern_ref,  # int32[H]
    sink_ref,  # int32[P]
    window_ref,  # int32[P]
    lengths_ref,  # int32[B]
    q_ref,  # [bq, D]
    k_ref,  # [T, D]  the whole sequence of this (batch, KV head); only listed blocks are read
    v_ref,  # [T, D]
    o_ref,  # [bq, D]
    *,
    sm_scale: float,
    block_q: int,
    block_k: int,
):
    b, h, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pattern = head_pattern_ref[h]
    sink, window, length = sink_ref[pattern], window_ref[pattern], lengths_ref[b]
    q = q_ref[...]  # [bq, D]
    head_dim = q.shape[-1]

    def body(step, carry):
        kv_block = kv_blocks_ref[pattern, q_block, step]
        start = pl.multiple_of(kv_block * block_k, block_k)

        def attend(masked: bool):
            k = k_ref[pl.ds(start, block_k), :]  # [bk, D]
            v = v_ref[pl.ds(start, block_k), :]  # [bk, D]
            visible = None
            if masked:
                visible = _block_visible(q_block, kv_block, block_q, block_k, sink, window, length)
            return attend_block(q, k, v, *carry, visible, sm_scale)

        needs_mask = (partial_ref[pattern, q_block, step] != 0) | (start + block_k > length)
        return jax.lax.cond(
            start < length,
            lambda: jax.lax.cond(needs_mask, lambda: attend(True), lambda: attend(False)),
            lambda: carry)

    init = initial_state(block_q, head_dim)
    count = jnp.where(q_block * block_q < length, counts_ref[pattern, q_block], 0)
    _, l, acc = jax.lax.fori_loop(0, count, body, init)
    o_ref[...] = _finalize(acc, l, q_block, block_q, length).astype(o_ref.dtype)


def _prefill_gpu(q, k, v, table: PrefillBlockTable, lengths, sm_scale, interpret, config):
    batch, num_heads, seq_len, head_dim = q.shape
    group = num_heads // k.shape[1]
    block_q, block_k = table.block_q, table.block_k
    squeezed = pl.Squeezed()
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, i: (0,) * x.ndim)  # noqa: E731
    tables = (jnp.asarray(table.kv_blocks, jnp.int32), jnp.asarray(table.counts, jnp.int32),
              jnp.asarray(table.partial, jnp.int32), jnp.asarray(table.head_pattern, jnp.int32),
              jnp.asarray(table.sink, jnp.int32), jnp.asarray(table.window, jnp.int32), lengths)
    q_spec = pl.BlockSpec((squeezed, squeezed, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((squeezed, squeezed, seq_len, head_dim),
                           lambda b, h, i: (b, jax.lax.div(h, group), 0, 0))
    kernel = functools.partial(_prefill_kernel_gpu, sm_scale=sm_scale, block_q=block_q,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(batch, num_heads, table.num_q_blocks),
        in_specs=[*(whole(x) for x in tables), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        interpret=interpret,
        name="block_sparse_prefill_gpu",
    )(*tables, q, k, v)


# ----------------------------------------------------------------------------------------
# Reference and public entry.
# ----------------------------------------------------------------------------------------


def _check_inputs(q, k, v, lengths):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, H, T, D] and k, v [B, Hkv, T, D], got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    batch, num_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2:] != (seq_len, head_dim):
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch, length or head dim")
    if num_heads % k.shape[1]:
        raise ValueError(f"query heads {num_heads} not a multiple of KV heads {k.shape[1]}")
    if lengths is not None and jnp.shape(lengths) != (batch,):
        raise ValueError(f"lengths must be int32[B={batch}], got shape {jnp.shape(lengths)}")


def _sequence_lengths(lengths, batch: int, seq_len: int) -> jax.Array:
    if lengths is None:
        return jnp.full((batch,), seq_len, jnp.int32)
    return jnp.clip(jnp.asarray(lengths, jnp.int32), 0, seq_len)


def _resolve_table(mask, num_heads, num_kv_heads, seq_len, block_q, block_k):
    """A description becomes a table at (block_q, block_k); a given table must cover seq_len."""
    if isinstance(mask, PrefillBlockTable):
        if mask.seq_len < seq_len or mask.seq_len >= seq_len + np.lcm(mask.block_q, mask.block_k):
            raise ValueError(f"table covers {mask.seq_len} tokens, sequence has {seq_len}")
        if jnp.shape(mask.head_pattern) != (num_heads,):
            raise ValueError(f"table maps {jnp.shape(mask.head_pattern)} heads, q has {num_heads}")
        return mask
    return block_masks.prefill_block_table(
        mask, num_heads=num_heads, num_kv_heads=num_kv_heads, seq_len=seq_len,
        block_q=block_q, block_k=block_k)


def block_sparse_prefill_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskDescription | PrefillBlockTable,
    *,
    lengths: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Dense masked attention with the kernel's semantics (O(T^2) memory; the ground truth).

    q [B, H, T, D], k and v [B, Hkv, T, D] -> [B, H, T, D]. Rows that see no key, and rows
    at or past `lengths[b]`, are zero.
    """
    _check_inputs(q, k, v, lengths)
    batch, num_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    lengths = _sequence_lengths(lengths, batch, seq_len)
    if isinstance(mask, PrefillBlockTable):
        _resolve_table(mask, num_heads, num_kv_heads, seq_len, mask.block_q, mask.block_k)
        visible = block_masks.prefill_table_mask(mask)[:, :seq_len, :seq_len]  # [H, T, T]
    else:
        visible = block_masks.dense_mask(mask, num_heads, num_kv_heads, seq_len)  # [H, T, T]
    pos = jnp.arange(seq_len)
    in_length = pos[None, :] < lengths[:, None]  # [B, T]
    visible = visible[None] & in_length[:, None, None, :]  # [B, H, T, T]
    visible = visible.reshape(batch, num_kv_heads, -1, seq_len, seq_len)  # [B, Hkv, g, T, T]
    qg = q.reshape(batch, num_kv_heads, -1, seq_len, head_dim)  # [B, Hkv, g, T, D]
    o = masked_attention(qg, k, v, visible, sm_scale)  # [B, Hkv, g, T, D]
    o = jnp.where(in_length[:, None, None, :, None], o, 0.0)
    return o.reshape(q.shape).astype(q.dtype)


def block_sparse_prefill(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskDescription | PrefillBlockTable,
    *,
    lengths: jax.Array | None = None,
    sm_scale: float | None = None,
    config: PrefillConfig = PrefillConfig(),
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Block-sparse causal attention: q [B, H, T, D], k, v [B, Hkv, T, D] -> [B, H, T, D].

    mask: a static description (its table is built at config's block sizes) or a
    `PrefillBlockTable` built at config's block sizes. lengths: optional int32[B] for
    right-padded batches; keys at or past lengths[b] are masked and those query rows are
    zero. implementation: "tpu", "gpu", "reference", or None to follow
    `jax.default_backend()` (on CPU: the reference, or the TPU kernel interpreted when
    interpret=True). interpret runs the chosen kernel on CPU.
    """
    _check_inputs(q, k, v, lengths)
    if not isinstance(config, PrefillConfig):
        raise ValueError(f"config must be a PrefillConfig, got {config!r}")
    if isinstance(mask, PrefillBlockTable) and (
            (mask.block_q, mask.block_k) != (config.block_q, config.block_k)):
        raise ValueError(f"table block sizes {(mask.block_q, mask.block_k)} differ from "
                         f"config's {(config.block_q, config.block_k)}")
    implementation = pick_implementation(implementation, interpret)
    if implementation == "reference":
        return block_sparse_prefill_reference(q, k, v, mask, lengths=lengths, sm_scale=sm_scale)
    batch, num_heads, seq_len, head_dim = q.shape
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    table = _resolve_table(mask, num_heads, k.shape[1], seq_len, config.block_q, config.block_k)
    lengths = _sequence_lengths(lengths, batch, seq_len)
    pad = [(0, 0), (0, 0), (0, table.seq_len - seq_len), (0, 0)]
    q_p, k_p, v_p = (jnp.pad(x, pad) for x in (q, k, v))  # [B, *, T_pad, D]
    if implementation == "tpu":
        out = _prefill_tpu(q_p, k_p, v_p, table, lengths, sm_scale, interpret)
    else:
        out = _prefill_gpu(q_p, k_p, v_p, table, lengths, sm_scale, interpret, config)
    return out[:, :, :seq_len]
