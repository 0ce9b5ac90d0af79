"""Attention over KV entries: the one dispatch point between the jnp reference and Pallas kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from kvjax.sharding import per_device
from pallas_kernels import kv_quant
from pallas_kernels.block_masks import DecodeBlockTable, DenseCausal, SinkLocal, decode_table_mask
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode
from pallas_kernels.block_sparse_prefill import PrefillConfig, block_sparse_prefill
from pallas_kernels.kv_quant import QuantizedKV
from pallas_kernels.lowering import NAMES, Lowering, check_name
from pallas_kernels.quantized_decode_attention import QuantizedDecodeConfig, quantized_decode_attention

# How attention runs: the kernels' one vocabulary (`pallas_kernels.lowering`). "auto": the Pallas
# kernels on GPU and TPU, the jnp reference on CPU and on GPUs below compute capability 8.0 (a T4:
# `lowering.gpu_runs_kernels`); "reference": always jnp; "tpu", "gpu",
# "mosaic_gpu": that lowering of each kernel; "tpu-interpret" / "gpu-interpret": the kernels'
# interpreters on CPU (how tests exercise the kernel paths without an accelerator). Wherever a
# kernel cannot take a call (its config's `for_shape` says None), the reference runs instead.
ATTENTION_IMPLS = NAMES

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a row with nothing visible stays NaN-free


# Segment ids of packed rows (`kvjax.packing`): (q_segments int32[B, T], k_segments int32[B, C]), a query
# seeing only entries of its own segment; None: one sequence per row.
SegmentIds = tuple[jax.Array, jax.Array]


def visibility_mask(
    k_pos: jax.Array, q_pos: jax.Array, window: int | None, segment_ids: SegmentIds | None = None
) -> jax.Array:
    """bool[B, K, T, C]: entry c is visible to query t when present, not in the future, in the window
    (and, with `segment_ids`, of the query's segment: a block-diagonal causal mask over packed rows).

    k_pos: int32[B, K, C] (-1 = empty); q_pos: int32[B, T].
    """
    k_pos = k_pos[:, :, None, :]  # [B, K, 1, C]
    q_pos = q_pos[:, None, :, None]  # [B, 1, T, 1]
    mask = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        mask &= k_pos > q_pos - window
    if segment_ids is not None:
        q_seg, k_seg = segment_ids
        mask &= q_seg[:, None, :, None] == k_seg[:, None, None, :]  # [B, 1, T, C]
    return mask


def attention_probs(
    q: jax.Array,
    k: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
    segment_ids: SegmentIds | None = None,
) -> jax.Array:
    """float32[B, K, G, T, C] softmax weights of each query over the visible entries.

    q: [B, T, K, G, D] (G query heads per KV head); k: [B, K, C, D].
    """
    b, t, kv_heads, group, _ = q.shape
    logits = jnp.einsum("bkqd,bkcd->bkqc", _grouped(q), k, preferred_element_type=jnp.float32) * scale
    return visible_softmax(logits.reshape(b, kv_heads, group, t, -1), k_pos, q_pos, window, segment_ids)


def _grouped(q: jax.Array) -> jax.Array:
    """q [B, T, K, G, D] as [B, K, G * T, D]: each KV head's queries in one matrix, so XLA's CPU dots keep the
    entries' axis minor in the scores (from the 5-D einsum they came out entries-major and were transposed
    twice, costing more than the dots: 2.5x slower prefill chunks, 2x slower decode)."""
    return rearrange(q, "b t k g d -> b k (g t) d")


def visible_softmax(
    logits: jax.Array, k_pos: jax.Array, q_pos: jax.Array, window: int | None, segment_ids: SegmentIds | None = None
) -> jax.Array:
    """float32[B, K, G, T, C]: softmax of logits [B, K, G, T, C] over the entries each query sees."""
    mask = visibility_mask(k_pos, q_pos, window, segment_ids)[:, :, None]  # [B, K, 1, T, C]
    return jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
    segment_ids: SegmentIds | None = None,
) -> jax.Array:
    """Exact softmax attention in plain jnp; the ground truth of every kernel and policy test.

    q: [B, T, K, G, D]; k, v: [B, K, C, D]; returns [B, T, K, G, D]. `segment_ids`: `visibility_mask`.
    """
    return _weighted_values(attention_probs(q, k, k_pos, q_pos, window, scale, segment_ids), v)


def _weighted_values(probs: jax.Array, v: jax.Array) -> jax.Array:
    """Attention output [B, T, K, G, D] from weights [B, K, G, T, C] and values [B, K, C, D] (one matrix per
    KV head, as `_grouped`)."""
    out = jnp.einsum("bkqc,bkcd->bkqd", rearrange(probs.astype(v.dtype), "b k g t c -> b k (g t) c"), v)
    return rearrange(out, "b k (g t) d -> b t k g d", g=probs.shape[2])


def split_query_chunks(chunk: int, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """Each x [B, T, ...] as [N, B, C, ...]: N chunks of C = min(chunk, T) queries, for lax.map/scan
    over query chunks (memory ~ C x keys per head instead of T x keys)."""
    b, t = xs[0].shape[:2]
    c = min(chunk, t)
    if t % c:
        raise ValueError(f"query length {t} is not a multiple of the attention chunk {c}; pad the sequence")
    return tuple(rearrange(x, "b (n c) ... -> n b c ...", c=c) for x in xs)


def join_query_chunks(x: jax.Array) -> jax.Array:
    """[N, B, C, ...] chunks back to [B, N * C, ...]."""
    return rearrange(x, "n b c ... -> b (n c) ...")


def check_impl(impl: str) -> None:
    """Raises ValueError unless `impl` names an attention implementation (`ATTENTION_IMPLS`)."""
    check_name(impl, "attention implementation")


def _lowering(impl: str) -> Lowering:
    return Lowering.parse(impl, "attention implementation")


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
    impl: str = "auto",
    *,
    slot_is_position: bool = False,
    segment_ids: SegmentIds | None = None,
) -> jax.Array:
    """The one dispatch point between the jnp reference and the Pallas kernels.

    Where `impl` (one of `ATTENTION_IMPLS`) gives a kernel whose config takes the shape
    (`PrefillConfig.for_shape`, `DecodeConfig.for_shape`):
      * single-token decode (T = 1, no sliding window) runs the block-sparse decode kernel (GQA
        groups share each block load). It relies on the segment invariant that, when attention
        runs, each row's entries fill slots [0, count): Full writes slot = position, eviction
        policies fill the first hole.
      * a multi-token chunk (T > 1) runs the block-sparse prefill kernel in chunk mode when the
        caller passes `slot_is_position=True`, asserting the Full layout: every entry sits at
        slot = its position, so valid entries are slots [0, count) and the chunk's queries are the
        contiguous positions q_pos[b, 0] + t. The kernel then skips every key block the causal
        mask (or a sliding window, through its local mask) hides. Only the policy knows its
        layout (after eviction a slot says nothing about a position), so the default is False.
    Everything else runs the reference; a slot = position chunk without a kernel runs it over only the
    key blocks up to its last query (`causal_blocks`). The kernel gets `impl` itself, so "auto" keeps
    each kernel's own pick (Mosaic GPU prefill on Hopper where it fits).

    `segment_ids` (packed rows, `kvjax.packing`: q_segments int32[B, T], k_segments int32[B, C]) also hides
    every entry of another segment. No kernel takes segment ids yet, so such a call always runs the jnp
    path, whatever `impl` names: `causal_blocks` for a slot = position chunk without a window (the packed
    row's slot is its column), else the reference.
    """
    lowering = _lowering(impl)
    if segment_ids is not None:
        if q.shape[1] > 1 and slot_is_position and window is None and k.shape[2] > KEY_BLOCK:
            return causal_blocks(q, k, v, k_pos, q_pos, scale, segment_ids=segment_ids)
        return reference_attention(q, k, v, k_pos, q_pos, window, scale, segment_ids)
    if q.shape[1] > 1 and slot_is_position:
        config = PrefillConfig.for_shape(q.shape[1], k.shape[2], q.shape[-1], lowering)
        if config is not None:
            return _prefill_chunk(q, k, v, k_pos, q_pos, window, scale, impl, config)
        if window is None and k.shape[2] > KEY_BLOCK:
            return causal_blocks(q, k, v, k_pos, q_pos, scale)
    decoded = decode_with_lse(q, k, v, k_pos, window, scale, impl)
    return reference_attention(q, k, v, k_pos, q_pos, window, scale) if decoded is None else decoded[0]


KEY_BLOCK = 512  # entries per step of `causal_blocks`


def causal_blocks(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    scale: float,
    block: int = KEY_BLOCK,
    *,
    segment_ids: SegmentIds | None = None,
    with_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`reference_attention` (no window) of a chunk of queries over a slot = position cache, reading only
    the `block`-slot blocks up to each query block's last query, with an online softmax across them.

    q: [B, T, K, G, D]; k, v: [B, K, C, D] holding each entry at slot = its position (C >= block);
    q_pos: int32[B, T]. Returns [B, T, K, G, D], and with `with_lse` the float32[B, T, K, G] log-sum-exp
    of each query's visible logits (`causal_votes` reads it). The blocks after a query block's last
    position hold nothing it sees, so a chunk at the start of a long cache costs one block instead of
    C / block, and a chunk of several `block`-query blocks runs one at a time, each over the key blocks
    up to its own end (a whole prompt costs about half the T x C rectangle); the last block is clamped to
    the cache's end, its slots already read masked out. `segment_ids`: `visibility_mask`'s.
    """
    t = q.shape[1]
    if t <= block or t % block:
        out, lse = _causal_rows(q, k, v, k_pos, q_pos, scale, block, segment_ids)
        return (out, lse) if with_lse else out
    q_seg = () if segment_ids is None else (segment_ids[0],)

    def rows(xs):
        qb, pb, *sb = xs
        return _causal_rows(qb, k, v, k_pos, pb, scale, block, None if segment_ids is None else (sb[0], segment_ids[1]))

    out, lse = jax.lax.map(rows, split_query_chunks(block, q, q_pos, *q_seg))
    out, lse = join_query_chunks(out), join_query_chunks(lse)
    return (out, lse) if with_lse else out


def _causal_rows(q, k, v, k_pos, q_pos, scale, block, segment_ids):
    """`causal_blocks` of one query block: (out [B, T, K, G, D], lse float32[B, T, K, G])."""
    b, t, kv_heads, group, d = q.shape
    capacity = k.shape[2]
    queries = _grouped(q)  # [B, K, G*T, D]
    q_pos = rearrange(jnp.broadcast_to(q_pos[:, None], (b, group, t)), "b g t -> b 1 (g t) 1")  # as `_grouped`
    if segment_ids is not None:
        q_seg = rearrange(jnp.broadcast_to(segment_ids[0][:, None], (b, group, t)), "b g t -> b 1 (g t) 1")

    def step(i, carry):
        m, l, acc = carry  # running max, sum and weighted values: [B, K, G*T], [B, K, G*T], [B, K, G*T, D]
        start = jnp.minimum(i * block, capacity - block)
        kb, vb, pos = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=2) for x in (k, v, k_pos))
        slots = start + jnp.arange(block, dtype=jnp.int32)
        pos = jnp.where(slots >= i * block, pos, -1)[:, :, None, :]  # [B, K, 1, block]: clamped repeats hidden
        logits = jnp.einsum("bkqd,bkcd->bkqc", queries, kb, preferred_element_type=jnp.float32) * scale
        visible = (pos >= 0) & (pos <= q_pos)  # [B, K, G*T, block]
        if segment_ids is not None:
            k_seg = jax.lax.dynamic_slice_in_dim(segment_ids[1], start, block, axis=1)  # [B, block]
            visible &= k_seg[:, None, None, :] == q_seg
        logits = jnp.where(visible, logits, _MASKED)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - m_new[..., None])
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bkqc,bkcd->bkqd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
        )
        return m_new, l * rescale + jnp.sum(p, axis=-1), acc

    rows = (b, kv_heads, group * t)
    init = (jnp.full(rows, _MASKED, jnp.float32), jnp.zeros(rows, jnp.float32), jnp.zeros((*rows, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, jnp.max(q_pos) // block + 1, step, init)
    out = (acc / l[..., None]).astype(v.dtype)
    lse = rearrange(m + jnp.log(l), "b k (g t) -> b t k g", g=group)
    return rearrange(out, "b k (g t) d -> b t k g d", g=group), lse


def causal_votes(
    q: jax.Array,
    k: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    lse: jax.Array,
    weights: jax.Array,
    scale: float,
    block: int = KEY_BLOCK,
) -> jax.Array:
    """float32[B, K, C]: the attention weights each entry of a slot = position cache receives, summed over the
    queries with `weights` float32[B, T] and averaged over each KV head's query group, as
    `query_votes(attention_probs(...), weights)` gives, without the [B, K, G, T, C] weights: each
    `block`-query block recomputes its logits over the key blocks up to its own end and normalizes them by
    `lse` ([B, T, K, G], from `causal_blocks`). q: [B, T, K, G, D]; k: [B, K, C, D] (C >= block)."""
    b, t, kv_heads, group, _ = q.shape
    capacity = k.shape[2]
    rows = block if t > block and t % block == 0 else t

    def query_block(votes, xs):
        qb, pb, lb, wb = xs  # [B, R, K, G, D], [B, R], [B, R, K, G], [B, R]
        queries = _grouped(qb)  # [B, K, G*R, D]
        q_rows = rearrange(jnp.broadcast_to(pb[:, None], (b, group, rows)), "b g t -> b 1 1 (g t)")
        lse_rows = rearrange(lb, "b t k g -> b k (g t)")[:, :, None]  # [B, K, 1, G*R]
        w_rows = rearrange(jnp.broadcast_to(wb[:, None], (b, group, rows)), "b g t -> b (g t)") / group

        def step(i, votes):
            start = jnp.minimum(i * block, capacity - block)
            kb, pos = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=2) for x in (k, k_pos))
            slots = start + jnp.arange(block, dtype=jnp.int32)
            pos = jnp.where(slots >= i * block, pos, -1)[..., None]  # [B, K, block, 1]
            # Entries by queries, queries minor: the sum over queries is then a matrix-vector product.
            logits = jnp.einsum("bkcd,bkqd->bkcq", kb, queries, preferred_element_type=jnp.float32) * scale
            p = jnp.where((pos >= 0) & (pos <= q_rows), jnp.exp(logits - lse_rows), 0.0)  # [B, K, block, G*R]
            added = jnp.einsum("bkcq,bq->bkc", p, w_rows)  # [B, K, block]
            seen = jax.lax.dynamic_slice_in_dim(votes, start, block, axis=2)
            return jax.lax.dynamic_update_slice_in_dim(votes, seen + added, start, axis=2)

        return jax.lax.fori_loop(0, jnp.max(pb) // block + 1, step, votes), None

    init = jnp.zeros((b, kv_heads, capacity), jnp.float32)
    votes, _ = jax.lax.scan(query_block, init, split_query_chunks(rows, q, q_pos, lse, weights.astype(jnp.float32)))
    return votes


def decode_with_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    window: int | None,
    scale: float,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array] | None:
    """`attend`'s decode kernel for one token per sequence, with each query head's log-sum-exp, so a
    caller can fold in keys the segment does not hold (RazorAttention's compensation token).

    q: [B, 1, K, G, D]; k, v: [B, K, C, D] whose entries fill slots [0, count). Returns (out
    [B, 1, K, G, D], lse float32[B, 1, K, G], -inf where nothing is visible), or None where `impl`
    gives no kernel for it (the caller's jnp path applies: the reference, a sliding window, T > 1).
    """
    lowering = _lowering(impl)
    if q.shape[1] != 1 or window is not None:
        return None
    config = DecodeConfig.for_shape(k.shape[2], q.shape[-1], lowering)
    if config is None:
        return None
    b, _, kv_heads, group, d = q.shape
    lengths = jnp.sum(k_pos >= 0, axis=-1, dtype=jnp.int32)  # [B, K]
    decode = functools.partial(
        block_sparse_decode,
        sm_scale=scale,
        config=config,
        implementation=impl,
        return_lse=True,
    )
    out, lse = per_device(decode, b, kv_heads, (1, 1, 1, 1), (1, 1))(
        rearrange(q, "b 1 k g d -> b (k g) d"), k, v, lengths
    )  # [B, H, D], [B, H]
    out = rearrange(out, "b (k g) d -> b 1 k g d", k=kv_heads)
    return out.astype(v.dtype), rearrange(lse, "b (k g) -> b 1 k g", k=kv_heads)


def attend_pages(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    table: DecodeBlockTable,
    window: int | None,
    scale: float,
    impl: str = "auto",
    slot_mask: jax.Array | None = None,
    tail: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """One decode token per sequence over only the cache pages `table` lists (query-aware selection).

    q: [B, 1, K, G, D]; k, v: [B, K, C, D] holding each row's entries at slots [0, count), the
    token's own entry last, table.block_size dividing C. Where `impl` allows a kernel, the
    block-sparse decode kernel reads just the listed pages (a sliding window is its SinkLocal(0,
    window) mask, which measures positions by slot: only for slot = position); the reference
    attends over the same slots by masking the others. slot_mask (bool[B, K, C]) also hides single
    slots of listed pages. Returns [B, 1, K, G, D].

    tail: (k, v, k_pos) of a second buffer [B, Kt, Ct, D] (entries at slots [0, count)) holding the last
    Kt of q's KV heads, k, v and k_pos then the first K - Kt: both buffers attend in one kernel launch
    (`block_sparse_decode`'s tail; under "mosaic_gpu", which takes none, its Triton lowering), the
    tail's table rows listing its pages (Ct at least one page; no window, no slot_mask).
    """
    lowering = _lowering(impl)
    if tail is not None:
        if window is not None or slot_mask is not None:
            raise ValueError("attend_pages with a tail buffer takes no window and no slot_mask")
        impl = "gpu" if lowering.platform == "mosaic_gpu" else impl
        lowering = _lowering(impl)
    config = DecodeConfig.for_shape(
        k.shape[2], q.shape[-1], lowering, block_size=table.block_size, slot_mask=slot_mask is not None
    )
    if config is None:
        return _attend_pages_reference(q, k, v, k_pos, q_pos, table, window, scale, slot_mask, tail)
    b, _, kv_heads, group, d = q.shape
    lengths = jnp.sum(k_pos >= 0, axis=-1, dtype=jnp.int32)  # [B, K - Kt]
    extra, head_axes = (), (1,) * (5 + (slot_mask is not None))
    if tail is not None:  # the buffers' head counts differ: devices split the batch only
        lengths = jnp.concatenate([lengths, jnp.sum(tail[2] >= 0, axis=-1, dtype=jnp.int32)], axis=1)  # [B, K]
        extra, head_axes = tail[:2], (None,) * 7

    def decode(q, k, v, lengths, table, *rest):
        return block_sparse_decode(
            q,
            k,
            v,
            lengths,
            table,
            mask=None if window is None else SinkLocal(0, window),
            sm_scale=scale,
            config=config,
            implementation=impl,
            slot_mask=rest[0] if slot_mask is not None else None,
            tail=tuple(rest) if tail is not None else None,
        )

    masks = () if slot_mask is None else (slot_mask,)
    out = per_device(decode, b, kv_heads, head_axes, head_axes[0])(
        rearrange(q, "b 1 k g d -> b (k g) d"), k, v, lengths, table, *masks, *extra
    )  # [B, H, D]
    return rearrange(out, "b (k g) d -> b 1 k g d", k=kv_heads).astype(v.dtype)


def _attend_pages_reference(q, k, v, k_pos, q_pos, table, window, scale, slot_mask, tail) -> jax.Array:
    """`attend_pages` in jnp: each buffer's listed slots (a tail's last page may run past its end) attended
    by `reference_attention`."""
    outs, start, size = [], 0, table.block_size
    for keys, values, pos in [(k, v, k_pos)] + ([] if tail is None else [tail]):
        n, capacity = keys.shape[1:3]
        rows = DecodeBlockTable(table.kv_blocks[:, start : start + n], table.counts[:, start : start + n], size)
        listed = decode_table_mask(rows, -(-capacity // size) * size)[..., :capacity]  # [B, n, C]
        if slot_mask is not None:
            listed &= slot_mask
        q_part = q[:, :, start : start + n]
        outs.append(reference_attention(q_part, keys, values, jnp.where(listed, pos, -1), q_pos, window, scale))
        start += n
    return jnp.concatenate(outs, axis=2)


def _prefill_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
    impl: str,
    config: PrefillConfig,
) -> jax.Array:
    """A chunk of queries over a slot = position segment through the block-sparse prefill kernel.

    q: [B, T, K, G, D]; k, v: [B, K, C, D] with config.block_k dividing C (no copy of the cache). The
    keys' length is each row's count of valid slots, and the chunk starts at q_pos[:, 0]. A
    sliding window (Mistral) is the kernel's local mask, SinkLocal(0, window): the same rule as
    `visibility_mask`, k > q - window. Query rows past a row's length (right padding) come out
    as zeros where the reference attends them anyway; both are discarded by the caller.
    """
    b, t, kv_heads, group, d = q.shape
    lengths = jnp.sum(k_pos[:, 0] >= 0, axis=-1, dtype=jnp.int32)  # [B]: heads share positions
    mask = DenseCausal() if window is None else SinkLocal(0, window)
    q_heads = rearrange(q, "b t k g d -> b (k g) t d")

    def prefill(q_heads, k, v, lengths, q_offset):
        return block_sparse_prefill(
            q_heads,
            k,
            v,
            mask,
            lengths=lengths,
            q_offset=q_offset,
            sm_scale=scale,
            config=config,
            # The name, not its Lowering: "auto" is the kernel's own pick (Mosaic GPU on Hopper where it fits).
            implementation=impl,
        )

    out = per_device(prefill, b, kv_heads, (1, 1, 1, None, None), 1)(
        q_heads, k, v, lengths, q_pos[:, 0]
    )  # [B, H, T, D]
    return rearrange(out, "b (k g) t d -> b t k g d", k=kv_heads).astype(v.dtype)


def attend_with_probs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pos: jax.Array,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Attention output [B, T, K, G, D] and the weights [B, K, G, T, C] that scoring policies read."""
    probs = attention_probs(q, k, k_pos, q_pos, window, scale)
    return _weighted_values(probs, v), probs


def attend_quantized(
    q: jax.Array,
    slab: QuantizedKV,
    slab_length: jax.Array,
    k_win: jax.Array,
    v_win: jax.Array,
    win_pos: jax.Array,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
    impl: str = "auto",
) -> jax.Array:
    """Attention over a quantized slab (slot i = position i, for i < slab_length[b]) and a window.

    q: [B, T, K, G, D]; slab: logical [B, K, C, D]; slab_length: int32[B]; k_win, v_win: [B, K, W, D]
    with win_pos int32[B, K, W] (-1 empty), valid entries a prefix. A decode token (T = 1, no sliding
    window), whose own entry must be the window's last valid one, goes to the Pallas
    `quantized_decode_attention` entry (its kernel where `impl` gives one that takes the shape, else
    its reference); anything else (prefill chunks, sliding windows) runs exact attention over the
    dequantized slab. An empty slab (C = 0: a layer whose budget holds no whole group) leaves the window.
    """
    if slab.capacity == 0:
        return reference_attention(q, k_win, v_win, win_pos, q_pos, window, scale)
    if q.shape[1] == 1 and window is None:
        return _quantized_decode(q, slab, slab_length, k_win, v_win, win_pos, scale, impl)
    b, _, kh, _, _ = q.shape
    k_slab, v_slab = kv_quant.dequantize_kv(slab, k_win.dtype)  # [B, K, C, D] each
    slots = jnp.arange(slab.capacity, dtype=jnp.int32)  # [C]
    slab_pos = jnp.where(slots < slab_length[:, None], slots, -1)  # [B, C]
    slab_pos = jnp.broadcast_to(slab_pos[:, None], (b, kh, slab.capacity))  # [B, K, C]
    k = jnp.concatenate([k_slab, k_win], axis=2)  # [B, K, C + W, D]
    v = jnp.concatenate([v_slab, v_win], axis=2)  # [B, K, C + W, D]
    k_pos = jnp.concatenate([slab_pos, win_pos], axis=2)  # [B, K, C + W]
    return reference_attention(q, k, v, k_pos, q_pos, window, scale)


def _quantized_decode(q, slab, slab_length, k_win, v_win, win_pos, scale, impl) -> jax.Array:
    """One decode token per sequence through the quantized decode kernel entry; [B, 1, K, G, D]."""
    b, t, kh, g, d = q.shape
    win_length = jnp.sum(win_pos[:, 0] >= 0, axis=-1, dtype=jnp.int32)  # [B]
    config = QuantizedDecodeConfig.for_shape(slab.capacity, d, _lowering(impl))
    if config is None:
        config, impl = QuantizedDecodeConfig(), "reference"
    else:  # the kernels tile the window with the slab's block
        pad = (0, 0), (0, 0), (0, -k_win.shape[2] % config.block_k), (0, 0)
        k_win, v_win = jnp.pad(k_win, pad), jnp.pad(v_win, pad)
    decode = functools.partial(quantized_decode_attention, sm_scale=scale, config=config, implementation=impl)
    out = per_device(decode, b, kh, (2, 1, None, 1, 1, None), 2)(
        rearrange(q, "b t k g d -> b t (k g) d"), slab, slab_length, k_win, v_win, win_length
    )  # [B, 1, H, D]
    return rearrange(out, "b t (k g) d -> b t k g d", k=kh)
