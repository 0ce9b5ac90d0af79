"""Decode attention that reads packed int4/int2 KV codes directly (KIVI), plus a plain variant.

A decode step attends T <= 4 query tokens per sequence to a quantized slab (`QuantizedKV`, tokens
[0, lengths[b])) and a full-precision residual window (tokens [0, res_lengths[b]) of k_res,
v_res). Each KV block is unpacked and dequantized in registers/VMEM inside the kernel; no
dequantized copy of the cache is ever written to HBM. GQA: one pass over a KV head's cache serves
all g query heads of its group (and the T query tokens) as one [T*g, D] x [D, block] product.
The sequence is cut into `num_splits` ranges computed independently (parallelism at batch 1);
each returns (acc, max, sum) partials that a log-sum-exp combine merges with the residual
window's partials, which come from the plain kernel. The T query tokens' own keys must be the
last T valid entries of the residual window (plain cache: of the cache); they attend causally
among themselves.

Lowerings (`implementation`: a name of `lowering.NAMES` or a `Lowering`, see `lowering.resolve`):
  * "tpu": Mosaic TPU, grid (B, Hkv, split), lengths by scalar prefetch. The cache stays in HBM:
    each program copies its split's stages of `tpu_stage_tokens` tokens into a VMEM ring
    (`dma_ring`) and attends them block by block; stages past the length are never copied.
  * "gpu": generic Pallas on the Triton backend, grid (B, Hkv, split); each program loops over
    exactly the blocks of its split that hold valid tokens. There is no Mosaic GPU variant.
  * "reference": the pure-jnp `*_reference` functions (dequantize, then attend).
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

from pallas_kernels import kv_quant
from pallas_kernels.dma_ring import ring_pipeline
from pallas_kernels.kv_quant import QuantizedKV
from pallas_kernels.lowering import WITHOUT_MOSAIC_GPU, Lowering, pallas_interpret, resolve, tpu_interpret
from pallas_kernels.occupancy import decode_splits, gpu_processors
from pallas_kernels.online_softmax import attend_block, initial_state

MAX_QUERY_TOKENS = 4
# Default KV block per lowering. GPU: the largest whose int4 and int2 Triton loops keep every value
# in registers at 8 warps (benchmarks/results/kernel_notes.md).
BLOCK_K = {"tpu": 256, "gpu": 128}
_MAX_STAGE_BLOCKS = 16  # the TPU kernel unrolls a stage's blocks
# Query rows per KV head are padded to: TPU sublanes (8); Triton's smallest dot M (16).
_ROW_MULTIPLE = {"tpu": 8, "gpu": 16}


def _is_power_of_two(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class QuantizedDecodeConfig:
    """Tuning knobs. block_k: tokens per KV block (power of two, a multiple of the quantization
    group); num_splits: independent sequence ranges merged by log-sum-exp."""

    block_k: int | None = None  # None: the lowering's own, `BLOCK_K`
    num_splits: int | None = None  # None: `occupancy.decode_splits` (GPU: fill it; else 1)
    num_warps: int = 8  # GPU only
    num_stages: int = 2  # GPU: pipeline stages; TPU: DMA ring stages (at least 2)
    tpu_stage_tokens: int = 1024  # TPU only: tokens copied per ring stage (1 to 16 whole blocks)

    def __post_init__(self):
        if self.block_k is not None and (not _is_power_of_two(self.block_k) or self.block_k < 16):
            raise ValueError(f"QuantizedDecodeConfig.block_k must be a power of two >= 16, got {self.block_k!r}")
        names = ("num_warps", "num_stages", "tpu_stage_tokens")
        for name in names if self.num_splits is None else ("num_splits", *names):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QuantizedDecodeConfig.{name} must be a positive int, got {value!r}")

    def block_for(self, implementation: str) -> int:
        """The KV block a lowering ("tpu" or "gpu") uses: block_k, or that lowering's default."""
        return self.block_k or BLOCK_K[implementation]

    @classmethod
    def for_shape(cls, capacity: int, head_dim: int, lowering: Lowering) -> QuantizedDecodeConfig | None:
        """The config that runs a slab of `capacity` tokens of `head_dim` under `lowering`, or None
        where the kernel cannot take it (the caller runs the reference): the reference lowering;
        "mosaic_gpu" (there is no such lowering); Triton ("gpu") with a head dim that is not a power
        of two of at least 16 (it unpacks whole power-of-two rows); no block of at least 16 tokens
        dividing the capacity. block_k: the lowering's `BLOCK_K`, halved until it divides the
        capacity (a residual window must be padded to a multiple of it)."""
        platform = lowering.platform
        if platform not in BLOCK_K or (platform == "gpu" and (head_dim % 16 or not _is_power_of_two(head_dim))):
            return None
        block = BLOCK_K[platform]
        while capacity % block:
            block //= 2
        return cls(block_k=block) if block >= 16 else None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static blocking of one cache: num_blocks blocks of block_k tokens over num_splits splits;
    the TPU kernel copies stage_blocks blocks at a time (a power of two dividing num_blocks and
    blocks_per_split; 1 on GPU)."""

    block_k: int
    num_blocks: int
    num_splits: int
    blocks_per_split: int
    stage_blocks: int


def _plan(
    capacity: int,
    config: QuantizedDecodeConfig,
    implementation: str,
    group_size: int,
    what: str,
    rows: int,
    processors: int | None,
) -> _Plan:
    """rows: (sequence, KV head) programs before splitting; processors: the GPU's SMs, which
    pick the split count where the config leaves it None."""
    block_k = min(config.block_for(implementation), capacity)
    stage_tokens = config.tpu_stage_tokens if implementation == "tpu" else 0
    if capacity % block_k:
        raise ValueError(f"{what} capacity ({capacity}) must be a multiple of block_k ({block_k})")
    if block_k % group_size:
        raise ValueError(f"block_k ({block_k}) must be a multiple of the group size ({group_size})")
    num_blocks = capacity // block_k
    wanted = min(max(1, stage_tokens // block_k), _MAX_STAGE_BLOCKS)
    # Whole stages tile the cache: the largest power of two <= wanted that divides num_blocks.
    stage_blocks = min(1 << (wanted.bit_length() - 1), num_blocks & -num_blocks)
    total_stages = num_blocks // stage_blocks
    num_splits = config.num_splits or decode_splits(rows, total_stages, 1, processors)
    stages_per_split = pl.cdiv(total_stages, min(num_splits, total_stages))
    return _Plan(
        block_k, num_blocks, pl.cdiv(total_stages, stages_per_split), stages_per_split * stage_blocks, stage_blocks
    )


# ----------------------------------------------------------------------------------------
# Cache layouts: which arrays a kernel reads, how each is tiled along tokens, how a tile
# becomes full-precision k and v.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """bits None: a plain cache (k, v). Else a `QuantizedKV` slab of that bit width."""

    bits: int | None
    group_size: int = 1

    def operands(self, cache) -> tuple[jax.Array, ...]:
        if self.bits is None:
            return cache  # (k, v), each [B, Hkv, C, D]
        return (cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero)

    def token_tiling(self) -> tuple[tuple[int, int], ...]:
        """Per operand: (axis of its per-head [X, Y] tile that indexes tokens, tokens per index)."""
        if self.bits is None:
            return ((0, 1), (0, 1))
        per, g = kv_quant.codes_per_byte(self.bits), self.group_size
        return ((0, per), (0, g), (0, g), (0, per), (1, 1), (1, 1))

    def to_kv(self, tiles: tuple[jax.Array, ...], dtype) -> tuple[jax.Array, jax.Array]:
        """One block's tiles -> k, v [block_k, D] in the matmul dtype; quantized tiles are
        dequantized in registers (VMEM on TPU), never written back."""
        if self.bits is None:
            k, v = tiles
        else:
            k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = tiles
            k = kv_quant.dequantize_keys(k_codes, k_scale, k_zero, self.bits, self.group_size)
            v = kv_quant.dequantize_values(v_codes, v_scale, v_zero, self.bits, self.group_size)
        return k.astype(dtype), v.astype(dtype)


# ----------------------------------------------------------------------------------------
# Shared math.
# ----------------------------------------------------------------------------------------


def _blocks_holding(length, block_k: int):
    """Blocks that hold tokens [0, length): a truncating ceil-divide (length >= 0), since
    floor division of signed ints does not lower to Mosaic without a TPU to query."""
    return jax.lax.div(length + block_k - 1, block_k)


def _visible(start, block_k, length, num_rows, q_len, group, causal):
    """bool[R or 1, block_k]: key position < length, minus (T-1-t) for query t when causal."""
    pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # [1, Tk]
    if not causal:
        return pos < length
    row = jax.lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0)  # [R, 1], row = t * g + head
    return pos < length - jnp.maximum(q_len - 1 - jax.lax.div(row, group), 0)  # [R, Tk]


def _combine(partials) -> jax.Array:
    """Log-sum-exp merge of (acc [B,Hkv,S,R,D], m, l [B,Hkv,S,R,1]) partials -> [B,Hkv,R,D]."""
    acc = jnp.concatenate([p[0] for p in partials], axis=2)  # [B, Hkv, S, R, D]
    m = jnp.concatenate([p[1] for p in partials], axis=2)  # [B, Hkv, S, R, 1]
    l = jnp.concatenate([p[2] for p in partials], axis=2)  # [B, Hkv, S, R, 1]
    weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))  # [B, Hkv, S, R, 1]
    total = jnp.sum(weight * l, axis=2)  # [B, Hkv, R, 1]
    out = jnp.sum(weight * acc, axis=2)  # [B, Hkv, R, D]
    return jnp.where(total > 0, out / jnp.where(total > 0, total, 1.0), 0.0)


def _tile_shape(array: jax.Array, axis: int, tokens_per_index: int, tokens: int) -> tuple[int, int]:
    """Shape of the per-head [X, Y] tile of `array` that holds `tokens` tokens."""
    tile = list(array.shape[2:])
    tile[axis] = tokens // tokens_per_index
    return tuple(tile)


def _tile(ref, axis: int, tokens_per_index: int, index, tokens: int):
    """View of tile `index` (of `tokens` tokens each) of a per-head [X, Y] cache ref."""
    size = tokens // tokens_per_index
    start = index * size if isinstance(index, int) else pl.multiple_of(index * size, size)
    return ref.at[pl.ds(start, size), :] if axis == 0 else ref.at[:, pl.ds(start, size)]


# ----------------------------------------------------------------------------------------
# TPU lowering (Mosaic).
# ----------------------------------------------------------------------------------------


def _decode_kernel_tpu(
    lengths_ref,  # SMEM int32[B] (scalar prefetch)
    q_ref,  # [R, D] (VMEM)
    *refs,  # the cache operands, left in HBM [B, Hkv, X, Y]; o [R, D], m, l [R, 1]; then scratch:
    #         a VMEM ring [S, X', Y'] per operand (one stage's tiles), DMA semaphores [operands, S],
    #         m, l [R, 1], acc [R, D]
    layout: _Layout,
    plan: _Plan,
    sm_scale: float,
    q_len: int,
    group: int,
    causal: bool,
):
    tiling = layout.token_tiling()
    n = len(tiling)
    cache_hbm, (o_ref, m_ref, l_ref), rings = refs[:n], refs[n : n + 3], refs[n + 3 : 2 * n + 3]
    sems, m_scratch, l_scratch, acc_scratch = refs[2 * n + 3 :]
    b, h = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    stage_tokens = plan.stage_blocks * plan.block_k
    stages_per_split = plan.blocks_per_split // plan.stage_blocks
    first = pl.program_id(2) * stages_per_split  # this split's first stage
    # Stages holding a token below the length: the ones past it are never copied.
    stages_here = jnp.maximum(jnp.minimum(first + stages_per_split, _blocks_holding(length, stage_tokens)) - first, 0)

    def copies(i, slot):
        """Stage i's DMAs: one per operand, the stage's contiguous tokens into ring slot `slot`."""
        return [
            pltpu.make_async_copy(
                _tile(hbm.at[b, h], axis, tokens, first + i, stage_tokens), ring.at[slot], sems.at[o, slot]
            )
            for o, (hbm, ring, (axis, tokens)) in enumerate(zip(cache_hbm, rings, tiling))
        ]

    m_scratch[...], l_scratch[...], acc_scratch[...] = initial_state(*acc_scratch.shape)
    q = q_ref[...]  # [R, D]

    def attend(i, slot):
        # Unrolled over the stage's blocks: static offsets into the ring's tiled dims (the lane
        # dim too, for value statistics), where dynamic ones may not lower.
        for j in range(plan.stage_blocks):
            block = (first + i) * plan.stage_blocks + j

            @pl.when(block * plan.block_k < length)
            def _update():
                tiles = tuple(
                    _tile(ring.at[slot], axis, tokens, j, plan.block_k)[...]
                    for ring, (axis, tokens) in zip(rings, tiling)
                )
                k, v = layout.to_kv(tiles, q.dtype)  # [Tk, D] each
                visible = _visible(block * plan.block_k, plan.block_k, length, q.shape[0], q_len, group, causal)
                m_scratch[...], l_scratch[...], acc_scratch[...] = attend_block(
                    q, k, v, m_scratch[...], l_scratch[...], acc_scratch[...], visible, sm_scale
                )

    ring_pipeline(
        stages_here,
        rings[0].shape[0],
        start=lambda i, slot: [copy.start() for copy in copies(i, slot)],
        wait=lambda i, slot: [copy.wait() for copy in copies(i, slot)],
        consume=attend,
    )
    o_ref[...], m_ref[...], l_ref[...] = acc_scratch[...], m_scratch[...], l_scratch[...]


def _partials_tpu(q_rows, operands, lengths, layout, plan, sm_scale, q_len, group, causal, interpret, config):
    batch, num_kv_heads, rows, head_dim = q_rows.shape
    ring_depth = max(2, config.num_stages)
    stage_tokens = plan.stage_blocks * plan.block_k
    rings = [
        pltpu.VMEM((ring_depth, *_tile_shape(x, axis, tokens, stage_tokens)), x.dtype)
        for x, (axis, tokens) in zip(operands, layout.token_tiling())
    ]
    row_spec = lambda width: pl.BlockSpec(  # noqa: E731
        (None, None, None, rows, width), lambda b, h, split, lengths_ref: (b, h, split, 0, 0)
    )
    partial_shape = lambda width: jax.ShapeDtypeStruct(  # noqa: E731
        (batch, num_kv_heads, plan.num_splits, rows, width), jnp.float32
    )
    kernel = functools.partial(
        _decode_kernel_tpu, layout=layout, plan=plan, sm_scale=sm_scale, q_len=q_len, group=group, causal=causal
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(batch, num_kv_heads, plan.num_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, split, lengths_ref: (b, h, 0, 0)),
            *(pl.BlockSpec(memory_space=pl.ANY) for _ in operands),  # copied stage by stage
        ],
        out_specs=[row_spec(head_dim), row_spec(1), row_spec(1)],
        scratch_shapes=[
            *rings,
            pltpu.SemaphoreType.DMA((len(operands), ring_depth)),
            pltpu.VMEM((rows, 1), jnp.float32),  # m
            pltpu.VMEM((rows, 1), jnp.float32),  # l
            pltpu.VMEM((rows, head_dim), jnp.float32),  # acc
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[partial_shape(head_dim), partial_shape(1), partial_shape(1)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=tpu_interpret(interpret),
        name="quantized_decode_attention_tpu" if layout.bits else "decode_attention_tpu",
    )(lengths, q_rows, *operands)


# ----------------------------------------------------------------------------------------
# GPU lowering (generic Pallas -> Triton).
# ----------------------------------------------------------------------------------------


def _decode_kernel_gpu(
    lengths_ref,  # int32[1]
    q_ref,  # [R, D]
    *refs,  # whole per-head cache arrays, then o [R, D], m, l [R, 1]
    layout: _Layout,
    plan: _Plan,
    sm_scale: float,
    q_len: int,
    group: int,
    causal: bool,
):
    tiling = layout.token_tiling()
    cache_refs = refs[: len(tiling)]
    o_ref, m_ref, l_ref = refs[len(tiling) :]
    length = lengths_ref[0]
    first = pl.program_id(2) * plan.blocks_per_split
    stop = jnp.minimum(
        jnp.minimum(first + plan.blocks_per_split, plan.num_blocks), _blocks_holding(length, plan.block_k)
    )
    q = q_ref[...]
    rows, head_dim = q.shape

    def body(block, carry):
        tiles = tuple(
            _tile(ref, axis, tokens, block, plan.block_k)[...] for ref, (axis, tokens) in zip(cache_refs, tiling)
        )
        k, v = layout.to_kv(tiles, q.dtype)  # [Tk, D] each
        visible = _visible(block * plan.block_k, plan.block_k, length, rows, q_len, group, causal)
        return attend_block(q, k, v, *carry, visible, sm_scale)

    m, l, acc = jax.lax.fori_loop(first, stop, body, initial_state(rows, head_dim))
    o_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _partials_gpu(q_rows, operands, lengths, layout, plan, sm_scale, q_len, group, causal, interpret, config):
    batch, num_kv_heads, rows, head_dim = q_rows.shape
    whole = (
        lambda x: pl.BlockSpec(  # noqa: E731  (one (batch, head) slab: the loop slices it)
            (None, None, *x.shape[2:]), lambda b, h, split: (b, h, 0, 0)
        )
    )
    row_spec = lambda width: pl.BlockSpec(  # noqa: E731
        (None, None, None, rows, width), lambda b, h, split: (b, h, split, 0, 0)
    )
    partial_shape = lambda width: jax.ShapeDtypeStruct(  # noqa: E731
        (batch, num_kv_heads, plan.num_splits, rows, width), jnp.float32
    )
    kernel = functools.partial(
        _decode_kernel_gpu, layout=layout, plan=plan, sm_scale=sm_scale, q_len=q_len, group=group, causal=causal
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, plan.num_splits),
        in_specs=[pl.BlockSpec((1,), lambda b, h, split: (b,)), whole(q_rows), *(whole(x) for x in operands)],
        out_specs=[row_spec(head_dim), row_spec(1), row_spec(1)],
        out_shape=[partial_shape(head_dim), partial_shape(1), partial_shape(1)],
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="quantized_decode_attention_gpu" if layout.bits else "decode_attention_gpu",
    )(lengths, q_rows, *operands)


# ----------------------------------------------------------------------------------------
# Wrappers.
# ----------------------------------------------------------------------------------------


def _as_4d(q: jax.Array) -> jax.Array:
    """q [B, H, D] (one token) or [B, T, H, D] -> [B, T, H, D]."""
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, H, D] or [B, T, H, D], got shape {q.shape}")
    return q[:, None] if q.ndim == 3 else q


def _check_cache(q4, k, v, lengths, what: str) -> None:
    batch, q_len, num_heads, head_dim = q4.shape
    if q_len > MAX_QUERY_TOKENS:
        raise ValueError(f"at most {MAX_QUERY_TOKENS} query tokens per step, got T={q_len}")
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"{what} k and v must both be [B, Hkv, C, D], got {k.shape} and {v.shape}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"{what} [B, Hkv, C, D] = {k.shape} does not match q [B, T, H, D] = {q4.shape}")
    if num_heads % k.shape[1]:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({k.shape[1]})")
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{what} lengths must be int[{batch}], got {lengths.dtype}{lengths.shape}")


def _query_rows(q4: jax.Array, num_kv_heads: int, multiple: int) -> jax.Array:
    """q [B, T, H, D] -> [B, Hkv, R, D], row t * g + j = query t, head j of the group, padded."""
    batch, q_len, num_heads, head_dim = q4.shape
    group = num_heads // num_kv_heads
    rows = q4.reshape(batch, q_len, num_kv_heads, group, head_dim)  # [B, T, Hkv, g, D]
    rows = jnp.swapaxes(rows, 1, 2).reshape(batch, num_kv_heads, q_len * group, head_dim)
    padded = pl.cdiv(q_len * group, multiple) * multiple
    return jnp.pad(rows, ((0, 0), (0, 0), (0, padded - q_len * group), (0, 0)))  # [B, Hkv, R, D]


def _from_rows(out_rows: jax.Array, q4: jax.Array) -> jax.Array:
    """[B, Hkv, R, D] -> [B, T, H, D] in q's dtype."""
    batch, q_len, num_heads, head_dim = q4.shape
    num_kv_heads = out_rows.shape[1]
    out = out_rows[:, :, : q_len * num_heads // num_kv_heads]  # [B, Hkv, T*g, D]
    out = out.reshape(batch, num_kv_heads, q_len, num_heads // num_kv_heads, head_dim)
    return jnp.swapaxes(out, 1, 2).reshape(q4.shape).astype(q4.dtype)  # [B, T, H, D]


def _partials(q4, layout, cache, capacity, lengths, causal, sm_scale, config, implementation, interpret):
    """(acc, m, l) partials of q over one cache with the chosen kernel."""
    batch, num_kv_heads = layout.operands(cache)[0].shape[:2]
    plan = _plan(
        capacity,
        config,
        implementation,
        layout.group_size,
        "quantized" if layout.bits else "cache",
        batch * num_kv_heads,
        gpu_processors(interpret),
    )
    if implementation == "gpu":
        head_dim = q4.shape[-1]
        if not _is_power_of_two(head_dim) or not _is_power_of_two(plan.block_k):
            raise ValueError(
                f"the GPU (Triton) kernel needs a power-of-two head dim ({head_dim}) and block "
                f"({plan.block_k}; a capacity below block_k is used as the block)"
            )
    q_rows = _query_rows(q4, num_kv_heads, _ROW_MULTIPLE[implementation])
    args = (
        q_rows,
        layout.operands(cache),
        lengths.astype(jnp.int32),
        layout,
        plan,
        sm_scale,
        q4.shape[1],
        q4.shape[2] // num_kv_heads,
        causal,
        interpret,
    )
    return (_partials_tpu if implementation == "tpu" else _partials_gpu)(*args, config)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "implementation", "interpret"))
def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    config: QuantizedDecodeConfig = QuantizedDecodeConfig(),
    implementation: str | Lowering = "auto",
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Plain-cache decode: q [B, H, D] or [B, T, H, D] over k, v [B, Hkv, C, D] -> q's shape.

    lengths int32[B]: valid tokens [0, lengths[b]); the T <= 4 queries are its last T and attend
    causally among themselves. The quantized kernel's residual-window pass run alone (same blocking,
    splits and combine): the bf16 baseline it is measured against, and the one decode here that
    takes several query tokens. One token over a plain cache is `block_sparse_decode`'s (kvjax's).
    """
    q4 = _as_4d(q)
    _check_cache(q4, k, v, lengths, "plain")
    if not isinstance(config, QuantizedDecodeConfig):
        raise ValueError(f"config must be a QuantizedDecodeConfig, got {config!r}")
    lowering = resolve(implementation, interpret, WITHOUT_MOSAIC_GPU)
    implementation, interpret = lowering.platform, pallas_interpret(lowering, interpret)
    if implementation == "reference":
        return decode_attention_reference(q, k, v, lengths, sm_scale=sm_scale)
    sm_scale = q4.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    partials = _partials(
        q4, _Layout(None), (k, v), k.shape[2], lengths, True, sm_scale, config, implementation, interpret
    )
    return _from_rows(_combine([partials]), q4).reshape(q.shape)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "implementation", "interpret"))
def quantized_decode_attention(
    q: jax.Array,
    cache: QuantizedKV,
    lengths: jax.Array,
    k_res: jax.Array,
    v_res: jax.Array,
    res_lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    config: QuantizedDecodeConfig = QuantizedDecodeConfig(),
    implementation: str | Lowering = "auto",
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Decode over a quantized slab (tokens [0, lengths[b])) then a full-precision window.

    q [B, H, D] or [B, T, H, D]; k_res, v_res [B, Hkv, R, D] with res_lengths int32[B] valid;
    the T queries are the window's last T entries (causal). Returns q's shape and dtype.
    """
    q4 = _as_4d(q)
    _check_quantized_inputs(q4, cache, lengths, k_res, v_res, res_lengths)
    if not isinstance(config, QuantizedDecodeConfig):
        raise ValueError(f"config must be a QuantizedDecodeConfig, got {config!r}")
    lowering = resolve(implementation, interpret, WITHOUT_MOSAIC_GPU)
    implementation, interpret = lowering.platform, pallas_interpret(lowering, interpret)
    if implementation == "reference":
        return quantized_decode_attention_reference(q, cache, lengths, k_res, v_res, res_lengths, sm_scale=sm_scale)
    sm_scale = q4.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    partials = []
    if cache.capacity:
        layout = _Layout(cache.bits, cache.group_size)
        partials.append(
            _partials(q4, layout, cache, cache.capacity, lengths, False, sm_scale, config, implementation, interpret)
        )
    if k_res.shape[2]:
        window_config = dataclasses.replace(config, num_splits=1)
        partials.append(
            _partials(
                q4,
                _Layout(None),
                (k_res, v_res),
                k_res.shape[2],
                res_lengths,
                True,
                sm_scale,
                window_config,
                implementation,
                interpret,
            )
        )
    if not partials:
        return jnp.zeros_like(q)
    return _from_rows(_combine(partials), q4).reshape(q.shape)


def _check_quantized_inputs(q4, cache, lengths, k_res, v_res, res_lengths) -> None:
    kv_quant.check_quantized_kv(cache)
    batch, num_kv_heads, _, head_dim = cache.shape
    _check_cache(q4, k_res, v_res, res_lengths, "residual")
    if (batch, num_kv_heads, head_dim) != (k_res.shape[0], k_res.shape[1], k_res.shape[3]):
        raise ValueError(f"quantized slab {cache.shape} and residual window {k_res.shape} disagree on [B, Hkv, ., D]")
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int[{batch}], got {lengths.dtype}{lengths.shape}")


# ----------------------------------------------------------------------------------------
# References (pure jnp): dequantize, then one masked softmax over all visible keys.
# ----------------------------------------------------------------------------------------


def _attention_reference(q4, k, v, visible, sm_scale):
    """q [B, T, H, D]; k, v [B, Hkv, S, D]; visible bool[B, T, S] -> float32[B, T, H, D]."""
    batch, q_len, num_heads, head_dim = q4.shape
    num_kv_heads = k.shape[1]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q5 = q4.astype(jnp.float32).reshape(
        batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim
    )  # [B, T, Hkv, g, D]
    s = (
        jnp.einsum("btkgd,bksd->btkgs", q5, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * sm_scale
    )  # [B, T, Hkv, g, S]
    mask = visible[:, :, None, None, :]  # [B, T, 1, 1, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)  # [B, T, Hkv, g, S]
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum(
        "btkgs,bksd->btkgd", p / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )  # [B, T, Hkv, g, D]
    return o.reshape(q4.shape)


def _causal_visible(lengths, q_len: int, capacity: int) -> jax.Array:
    """bool[B, T, C]: position < lengths[b] - (T - 1 - t)."""
    pos = jnp.arange(capacity)[None, None, :]  # [1, 1, C]
    limit = lengths[:, None, None] - (q_len - 1 - jnp.arange(q_len))[None, :, None]  # [B, T, 1]
    return pos < limit


def decode_attention_reference(q, k, v, lengths, *, sm_scale=None) -> jax.Array:
    """Plain-cache decode attention in jnp (same contract as `decode_attention`)."""
    q4 = _as_4d(q)
    visible = _causal_visible(lengths, q4.shape[1], k.shape[2])  # [B, T, C]
    return _attention_reference(q4, k, v, visible, sm_scale).reshape(q.shape).astype(q.dtype)


def quantized_decode_attention_reference(q, cache, lengths, k_res, v_res, res_lengths, *, sm_scale=None) -> jax.Array:
    """Dequantize the slab, append the window, attend (same contract as the kernel)."""
    q4 = _as_4d(q)
    k_q, v_q = kv_quant.dequantize_kv(cache)  # [B, Hkv, C, D] each
    k = jnp.concatenate([k_q, k_res.astype(jnp.float32)], axis=2)  # [B, Hkv, C + R, D]
    v = jnp.concatenate([v_q, v_res.astype(jnp.float32)], axis=2)
    in_slab = jnp.arange(cache.capacity)[None, None, :] < lengths[:, None, None]  # [B, 1, C]
    in_slab = jnp.broadcast_to(in_slab, (q4.shape[0], q4.shape[1], cache.capacity))
    in_window = _causal_visible(res_lengths, q4.shape[1], k_res.shape[2])  # [B, T, R]
    visible = jnp.concatenate([in_slab, in_window], axis=-1)  # [B, T, C + R]
    return _attention_reference(q4, k, v, visible, sm_scale).reshape(q.shape).astype(q.dtype)
