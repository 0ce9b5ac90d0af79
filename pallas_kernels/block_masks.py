"""Mask descriptions and compact block tables for block-sparse attention.

A *mask description* (`DenseCausal`, `SinkLocal`, or `PerHead`: one per head, so a DuoAttention
prefill is one kernel launch) says which (query, key) token pairs may attend. A *block table* is
what the kernels consume: per (head pattern, query block) for prefill, per (sequence, KV head) for
decode, the count and indices of the KV blocks to visit, padded to a common length; prefill rows
also flag the blocks that need the element-wise mask. Tables are built with numpy at trace time
from static descriptions, with jnp at traced offsets (`prefill_chunk_block_table`), or given as
arrays (random tables in tests, Quest-style page selection at decode time).

Conventions shared by every kernel and reference in `pallas_kernels/`:
  * token (q, k) is visible iff `k <= q and (k < sink or q - k < window)`; dense causal is
    `sink = 0, window = DENSE_WINDOW`. The window counts the query itself, so `window = 1`
    is "attend to yourself only" (plus the sink).
  * a query row that sees no key outputs zeros (never NaN).
  * padded table entries repeat the row's last valid entry (or 0 for an empty row), so a
    pipelined TPU kernel sees an unchanged block index and issues no copy for them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

# A window so large that it never excludes a key: dense causal attention.
DENSE_WINDOW = 2**30


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class DenseCausal:
    """Every query attends to itself and to all earlier tokens."""

    @property
    def sink_window(self) -> tuple[int, int]:
        return 0, DENSE_WINDOW


@dataclasses.dataclass(frozen=True)
class SinkLocal:
    """Causal attention to the first `sink` tokens plus the last `window` tokens (self included)."""

    sink: int
    window: int

    def __post_init__(self):
        _check_int("SinkLocal.sink", self.sink, 0)
        _check_int("SinkLocal.window", self.window, 1)

    @property
    def sink_window(self) -> tuple[int, int]:
        return int(self.sink), int(self.window)


HeadMask: TypeAlias = DenseCausal | SinkLocal


@dataclasses.dataclass(frozen=True)
class PerHead:
    """One `HeadMask` per query head or per KV head (a GQA group then shares its KV head's)."""

    patterns: tuple[HeadMask, ...]

    def __post_init__(self):
        if not isinstance(self.patterns, tuple) or not self.patterns:
            raise ValueError(f"PerHead.patterns must be a non-empty tuple, got {self.patterns!r}")
        for i, p in enumerate(self.patterns):
            if not isinstance(p, (DenseCausal, SinkLocal)):
                raise ValueError(f"PerHead.patterns[{i}] must be DenseCausal or SinkLocal, got {p!r}")


MaskDescription: TypeAlias = DenseCausal | SinkLocal | PerHead


def head_sink_window(
    mask: MaskDescription, num_heads: int, num_kv_heads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Expands a description to per-query-head (sink int32[H], window int32[H])."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if isinstance(mask, (DenseCausal, SinkLocal)):
        patterns = (mask,) * num_heads
    elif isinstance(mask, PerHead):
        if len(mask.patterns) == num_heads:
            patterns = mask.patterns
        elif len(mask.patterns) == num_kv_heads:
            group = num_heads // num_kv_heads
            patterns = tuple(p for p in mask.patterns for _ in range(group))
        else:
            raise ValueError(
                f"PerHead has {len(mask.patterns)} patterns; expected one per query head "
                f"({num_heads}) or per KV head ({num_kv_heads})"
            )
    else:
        raise ValueError(f"not a mask description: {mask!r}")
    sink_window = np.asarray([p.sink_window for p in patterns], np.int32)  # [H, 2]
    return sink_window[:, 0], sink_window[:, 1]


def token_visible(q_pos, k_pos, sink, window):
    """Element-wise visibility of key position `k_pos` from query position `q_pos` (broadcasts)."""
    return (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < window))


def dense_mask(mask: MaskDescription, num_heads: int, num_kv_heads: int | None, seq_len: int) -> jax.Array:
    """bool[H, T, T] visibility of a description, for references and tests (O(T^2) memory)."""
    sink, window = head_sink_window(mask, num_heads, num_kv_heads)  # int32[H], int32[H]
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    return token_visible(
        pos[None, :, None], pos[None, None, :], sink[:, None, None], window[:, None, None]
    )  # [H, T, T]


# ----------------------------------------------------------------------------------------
# Prefill tables.
# ----------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_blocks", "counts", "partial", "head_pattern", "sink", "window", "q_offset"],
    meta_fields=["block_q", "block_k", "seq_len", "kv_len"],
)
@dataclasses.dataclass(frozen=True)
class PrefillBlockTable:
    """Per (pattern, query block): which KV blocks a block-sparse prefill visits.

    Heads that share a pattern share table rows (`head_pattern`), so a DuoAttention layer
    stores two rows per query block, not one per head.

    Two kinds, one kernel:
      * whole-sequence tables (`q_offset` None): queries and keys both cover [0, seq_len);
        rows are shared by every sequence of the batch and built with numpy at trace time.
      * chunk tables (`prefill_chunk_block_table`): sequence b's queries sit at absolute
        positions [q_offset[b], q_offset[b] + seq_len) over keys [0, kv_len) (key slot =
        position). The offsets may be traced, so the rows are per sequence and traced too.
    """

    kv_blocks: jax.Array  # int32[P, nq, n_max] (chunk tables: [B, P, nq, n_max])  ascending, padded
    counts: jax.Array  # int32[P, nq] (chunk tables: [B, P, nq])  valid entries per row
    partial: jax.Array  # int32 like kv_blocks  1: apply the element-wise mask in this block
    head_pattern: jax.Array  # int32[H]  query head -> pattern row
    sink: jax.Array  # int32[P]
    window: jax.Array  # int32[P]
    block_q: int
    block_k: int
    seq_len: int  # padded query length covered; a multiple of block_q (and of block_k unless kv_len)
    q_offset: jax.Array | None = None  # chunk tables: int32[B] position of each sequence's first query
    kv_len: int | None = None  # chunk tables: padded key length covered, a multiple of block_k

    @property
    def is_chunk(self) -> bool:
        return self.q_offset is not None

    @property
    def num_q_blocks(self) -> int:
        return self.seq_len // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return (self.seq_len if self.kv_len is None else self.kv_len) // self.block_k

    @property
    def num_patterns(self) -> int:
        return self.sink.shape[0]

    @property
    def max_blocks(self) -> int:
        return self.kv_blocks.shape[-1]


def padded_length(seq_len: int, block_q: int, block_k: int) -> int:
    """Smallest length >= seq_len that both block sizes divide."""
    step = np.lcm(block_q, block_k)
    return int(-(-seq_len // step) * step)


def _block_bounds_visibility(xp, q0, q1, k0, k1, sink, window):
    """(any visible, all visible) per block from its first/last query and key positions.

    Closed form, broadcasting, with numpy (static tables) or jnp (tables at traced offsets).
    """
    # Some pair is visible: a causal pair exists and it is in the sink or the closest causal
    # pair is inside the window.
    any_visible = (k0 <= q1) & ((k0 < sink) | (xp.maximum(q0 - k1, 0) < window))
    # Every pair is visible: the block is under the diagonal and the farthest non-sink pair is
    # inside the window.
    all_visible = (k1 <= q0) & ((k1 < sink) | (q1 - xp.maximum(k0, sink) < window))
    return any_visible, all_visible


def _block_visibility(
    sink: int, window: int, block_q: int, block_k: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(any visible, all visible) bool[nq, nk] for one pattern, in closed form per block."""
    q0 = np.arange(0, seq_len, block_q, dtype=np.int64)[:, None]  # [nq, 1] first query
    k0 = np.arange(0, seq_len, block_k, dtype=np.int64)[None, :]  # [1, nk] first key
    return _block_bounds_visibility(np, q0, q0 + block_q - 1, k0, k0 + block_k - 1, sink, window)


def _compact_rows(selected: np.ndarray, n_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """bool[..., n] -> (ascending selected indices int32[..., n_max] padded, counts int32[...])."""
    counts = selected.sum(-1).astype(np.int32)
    n_max = max(int(counts.max(initial=0)), 1) if n_max is None else n_max
    order = np.argsort(~selected, axis=-1, kind="stable")[..., :n_max]  # selected first
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    last = np.where(counts[..., None] > 0, last, 0)
    slot = np.arange(n_max)
    return np.where(slot < counts[..., None], order, last).astype(np.int32), counts


def prefill_block_table(
    mask: MaskDescription,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    seq_len: int,
    block_q: int,
    block_k: int,
) -> PrefillBlockTable:
    """Builds the compact table of a static description (numpy, at trace time)."""
    _check_int("seq_len", seq_len, 1)
    _check_int("block_q", block_q, 1)
    _check_int("block_k", block_k, 1)
    sink, window = head_sink_window(mask, num_heads, num_kv_heads)  # int32[H] each
    pairs, head_pattern = np.unique(np.stack([sink, window], -1), axis=0, return_inverse=True)
    length = padded_length(seq_len, block_q, block_k)
    any_vis, all_vis = zip(
        *(_block_visibility(int(s), int(w), block_q, block_k, length) for s, w in pairs), strict=True
    )
    any_vis, all_vis = np.stack(any_vis), np.stack(all_vis)  # bool[P, nq, nk]
    kv_blocks, counts = _compact_rows(any_vis)  # int32[P, nq, n_max], int32[P, nq]
    partial = ~np.take_along_axis(all_vis, kv_blocks, axis=-1)  # bool[P, nq, n_max]
    return PrefillBlockTable(
        kv_blocks=kv_blocks,
        counts=counts,
        partial=partial.astype(np.int32),
        head_pattern=head_pattern.reshape(-1).astype(np.int32),
        sink=pairs[:, 0].astype(np.int32),
        window=pairs[:, 1].astype(np.int32),
        block_q=block_q,
        block_k=block_k,
        seq_len=length,
    )


def prefill_table_from_blocks(
    kv_blocks: jax.Array, counts: jax.Array, *, block_q: int, block_k: int
) -> PrefillBlockTable:
    """Wraps a given table (one row per query head, causal element mask) for the prefill kernel.

    kv_blocks: int32[H, nq, n_max], entries in [0, nk) (unchecked: they may be traced);
    entries past counts[h, qi] are ignored; counts: int32[H, nq].
    Visited blocks that cross the diagonal are flagged partial so causality still holds.
    """
    if kv_blocks.ndim != 3 or counts.shape != kv_blocks.shape[:2]:
        raise ValueError(
            f"expected kv_blocks [H, nq, n_max] and counts [H, nq], got {kv_blocks.shape} and {counts.shape}"
        )
    num_heads, num_q_blocks, _ = kv_blocks.shape
    seq_len = num_q_blocks * block_q
    if seq_len % block_k:
        raise ValueError(f"nq * block_q = {seq_len} is not a multiple of block_k={block_k}")
    kv_blocks = jnp.asarray(kv_blocks, jnp.int32)
    q_first = jnp.arange(num_q_blocks, dtype=jnp.int32)[None, :, None] * block_q  # [1, nq, 1]
    partial = (kv_blocks + 1) * block_k - 1 > q_first  # [H, nq, n_max]
    return PrefillBlockTable(
        kv_blocks=kv_blocks,
        counts=jnp.asarray(counts, jnp.int32),
        partial=partial.astype(jnp.int32),
        head_pattern=jnp.arange(num_heads, dtype=jnp.int32),
        sink=jnp.zeros((num_heads,), jnp.int32),
        window=jnp.full((num_heads,), DENSE_WINDOW, jnp.int32),
        block_q=block_q,
        block_k=block_k,
        seq_len=seq_len,
    )


def prefill_chunk_block_table(
    mask: MaskDescription,
    q_offset: jax.Array,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    chunk_len: int,
    kv_len: int,
    block_q: int,
    block_k: int,
) -> PrefillBlockTable:
    """The table of a chunk of queries at (possibly traced) offsets over keys where slot = position.

    Sequence b's queries are the tokens at positions [q_offset[b], q_offset[b] + chunk_len);
    the keys are slots [0, kv_len), slot c holding position c (kvjax's Full layout, which
    chunked prefill fills chunk by chunk). q_offset: int32[B], traced or concrete; the rows
    are computed with jnp, per sequence. n_max is a static bound, whatever the offsets: every
    key block when a pattern is dense; otherwise the sink blocks plus the blocks one query
    block's window can reach, so a sink + local (or sliding window) chunk visits a handful of
    blocks even deep into a long prompt.
    """
    for name, value in (("chunk_len", chunk_len), ("kv_len", kv_len), ("block_q", block_q), ("block_k", block_k)):
        _check_int(name, value, 1)
    q_offset = jnp.asarray(q_offset, jnp.int32)
    if q_offset.ndim != 1:
        raise ValueError(f"q_offset must be int32[B], got shape {q_offset.shape}")
    sink, window = head_sink_window(mask, num_heads, num_kv_heads)  # int32[H] each
    pairs, head_pattern = np.unique(np.stack([sink, window], -1), axis=0, return_inverse=True)
    num_q_blocks, num_kv_blocks = -(-chunk_len // block_q), -(-kv_len // block_k)
    reach = max(-(-int(s) // block_k) + -(-(int(w) + block_q - 1) // block_k) + 1 for s, w in pairs)
    n_max = min(num_kv_blocks, reach)

    first = jnp.arange(num_q_blocks, dtype=jnp.int32) * block_q  # [nq] first query of each block
    last = jnp.minimum(first + block_q, chunk_len) - 1  # [nq] last real query (padding excluded)
    offset = q_offset[:, None, None, None]  # [B, 1, 1, 1]
    q0, q1 = offset + first[:, None], offset + last[:, None]  # [B, 1, nq, 1]
    k0 = jnp.arange(num_kv_blocks, dtype=jnp.int32) * block_k  # [nk]
    p_sink = jnp.asarray(pairs[:, 0], jnp.int32)[:, None, None]  # [P, 1, 1]
    p_window = jnp.asarray(pairs[:, 1], jnp.int32)[:, None, None]  # [P, 1, 1]
    any_vis, all_vis = _block_bounds_visibility(
        jnp, q0, q1, k0, k0 + block_k - 1, p_sink, p_window
    )  # bool[B, P, nq, nk] each
    kv_blocks, counts = _compact_rows_jnp(any_vis, n_max)  # int32[B, P, nq, n_max], int32[B, P, nq]
    partial = ~jnp.take_along_axis(all_vis, kv_blocks, axis=-1)  # bool[B, P, nq, n_max]
    return PrefillBlockTable(
        kv_blocks=kv_blocks,
        counts=counts,
        partial=partial.astype(jnp.int32),
        head_pattern=jnp.asarray(head_pattern.reshape(-1), jnp.int32),
        sink=jnp.asarray(pairs[:, 0], jnp.int32),
        window=jnp.asarray(pairs[:, 1], jnp.int32),
        block_q=block_q,
        block_k=block_k,
        seq_len=num_q_blocks * block_q,
        q_offset=q_offset,
        kv_len=num_kv_blocks * block_k,
    )


def prefill_table_mask(table: PrefillBlockTable) -> jax.Array:
    """Token visibility a table encodes (listed blocks AND element mask): bool[H, T, T], or for
    a chunk table bool[B, H, Tq, Tk] with each sequence's queries at their absolute positions."""
    num_k_blocks = table.num_kv_blocks
    slot = jnp.arange(table.max_blocks)
    valid = slot < table.counts[..., None]  # [..., P, nq, n_max]
    hit = (table.kv_blocks[..., None] == jnp.arange(num_k_blocks)) & valid[..., None]
    listed = hit.any(axis=-2)  # [..., P, nq, nk]
    listed = jnp.repeat(jnp.repeat(listed, table.block_q, -2), table.block_k, -1)  # [..., P, Tq, Tk]
    q_pos = jnp.arange(table.seq_len, dtype=jnp.int32)  # [Tq]
    if table.is_chunk:
        q_pos = table.q_offset[:, None, None] + q_pos  # [B, 1, Tq]
    k_pos = jnp.arange(num_k_blocks * table.block_k, dtype=jnp.int32)  # [Tk]
    element = token_visible(
        q_pos[..., :, None], k_pos, table.sink[:, None, None], table.window[:, None, None]
    )  # [..., P, Tq, Tk]
    return jnp.take(listed & element, table.head_pattern, axis=-3)  # [..., H, Tq, Tk]


# ----------------------------------------------------------------------------------------
# Decode tables.
# ----------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_blocks", "counts"],
    meta_fields=["block_size"],
)
@dataclasses.dataclass(frozen=True)
class DecodeBlockTable:
    """Per (sequence, KV head): which cache blocks (pages) one decode step visits.

    Entries must lie in [0, C // block_size); they are traced, so the kernels cannot check.
    """

    kv_blocks: jax.Array  # int32[B, Hkv, n_max]  block indices into the cache, padded
    counts: jax.Array  # int32[B, Hkv]  valid entries
    block_size: int  # tokens per block (page)

    @property
    def max_blocks(self) -> int:
        return self.kv_blocks.shape[-1]


def split_entries(split, count, num_splits: int):
    """Split `split`'s share [first, last) of a row's `count` entries (int32 scalars): the count
    cut evenly, sizes differing by at most one, so every split gets work even where the table is
    wider than its rows' counts (a cache allocated past the length, heads of unequal sparsity)."""
    return tuple(jax.lax.div(s * count, jnp.int32(num_splits)) for s in (split, split + 1))


def _compact_rows_jnp(selected: jax.Array, n_max: int) -> tuple[jax.Array, jax.Array]:
    """Traced `_compact_rows`: bool[..., n] -> (int32[..., n_max] padded, int32[...])."""
    counts = jnp.minimum(selected.sum(-1), n_max).astype(jnp.int32)
    order = jnp.argsort(~selected, axis=-1, stable=True)[..., :n_max].astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    slot = jnp.arange(n_max)
    return jnp.where(slot < counts[..., None], order, last), counts


def decode_lengths(lengths: jax.Array, batch: int, num_kv_heads: int) -> jax.Array:
    """int32[B] or int32[B, Hkv] -> int32[B, Hkv]."""
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape == (batch,):
        return jnp.broadcast_to(lengths[:, None], (batch, num_kv_heads))
    if lengths.shape == (batch, num_kv_heads):
        return lengths
    raise ValueError(f"lengths must be int32[B]={batch} or [B, Hkv]={batch, num_kv_heads}, got shape {lengths.shape}")


def _check_capacity(capacity: int, block_size: int) -> int:
    _check_int("block_size", block_size, 1)
    if capacity % block_size:
        raise ValueError(
            f"cache capacity {capacity} is not a multiple of block_size {block_size}; "
            "allocate the cache in whole blocks"
        )
    return capacity // block_size


def decode_table_from_mask(
    mask: MaskDescription,
    lengths: jax.Array,
    *,
    num_kv_heads: int,
    capacity: int,
    block_size: int,
) -> DecodeBlockTable:
    """Blocks a decode query at position length-1 can see under a per-KV-head description.

    Dense heads visit every block below the length; sink+local (streaming) heads visit only
    the sink blocks and the blocks of the recent window, so n_max stays small when every head
    streams. lengths: int32[B] or int32[B, Hkv].
    """
    num_blocks = _check_capacity(capacity, block_size)
    batch = jnp.shape(lengths)[0]
    lengths = decode_lengths(lengths, batch, num_kv_heads)  # [B, Hkv]
    sink, window = head_sink_window(mask, num_kv_heads)  # int32[Hkv] each
    local_blocks = [-(-int(s) // block_size) + -(-int(w) // block_size) + 1 for s, w in zip(sink, window, strict=True)]
    n_max = min(num_blocks, max(local_blocks))
    start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size  # [nb] first slot per block
    end = start + block_size - 1
    last = lengths[..., None] - 1  # [B, Hkv, 1] query position
    selected = (start <= last) & ((start < sink[:, None]) | (last - end < window[:, None]))  # [B, Hkv, nb]
    kv_blocks, counts = _compact_rows_jnp(selected, n_max)
    return DecodeBlockTable(kv_blocks=kv_blocks, counts=counts, block_size=block_size)


def page_key_bounds(k: jax.Array, lengths: jax.Array, *, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-page channel min and max of the valid keys (Quest metadata).

    k: [B, Hkv, C, D]; lengths int32[B] or [B, Hkv]. Returns (k_min, k_max), each
    float32[B, Hkv, C // block_size, D]; pages with no valid key get (+inf, -inf).
    """
    batch, num_kv_heads, capacity, head_dim = k.shape
    num_blocks = _check_capacity(capacity, block_size)
    lengths = decode_lengths(lengths, batch, num_kv_heads)  # [B, Hkv]
    valid = jnp.arange(capacity)[None, None, :, None] < lengths[..., None, None]  # [B,Hkv,C,1]
    pages = k.astype(jnp.float32).reshape(batch, num_kv_heads, num_blocks, block_size, head_dim)
    valid = valid.reshape(batch, num_kv_heads, num_blocks, block_size, 1)
    k_min = jnp.where(valid, pages, jnp.inf).min(axis=3)  # [B, Hkv, nb, D]
    k_max = jnp.where(valid, pages, -jnp.inf).max(axis=3)  # [B, Hkv, nb, D]
    return k_min, k_max


def page_scores(q: jax.Array, k_min: jax.Array, k_max: jax.Array) -> jax.Array:
    """float32[B, Hkv, nb]: Quest's upper bound on each page's logit, sum over channels of
    max(q * k_max, q * k_min), averaged over the query heads of a GQA group.

    Positive query channels meet the page's maxima and negative ones its minima, so the bound is
    two matmuls. q: [B, H, D]; k_min, k_max: [B, Hkv, nb, D] from `page_key_bounds` (a page with
    no key scores -inf, or NaN where a query channel is exactly 0: callers mask such pages).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_max.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} not a multiple of KV heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    qg = q.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)  # [B, Hkv, g, D]
    upper = jnp.einsum("bkgd,bkpd->bkp", jnp.maximum(qg, 0.0), k_max.astype(jnp.float32)) + jnp.einsum(
        "bkgd,bkpd->bkp", jnp.minimum(qg, 0.0), k_min.astype(jnp.float32)
    )
    return upper / group  # [B, Hkv, nb]


def decode_table_top_k(scores: jax.Array, page_valid: jax.Array, *, top_k: int, block_size: int) -> DecodeBlockTable:
    """The `top_k` highest-scoring valid pages of each row in ascending order (fewer when fewer are
    valid). scores: float32[B, Hkv, nb]; page_valid: bool[B, Hkv, nb]. Only the top_k winners are
    sorted, not every page: this runs on every decode step.
    """
    _check_int("top_k", top_k, 1)
    num_blocks = scores.shape[-1]
    top_k = min(top_k, num_blocks)
    _, best = jax.lax.top_k(jnp.where(page_valid, scores, -jnp.inf), top_k)  # [B, Hkv, top_k]
    won = jnp.take_along_axis(page_valid, best, axis=-1)  # invalid pages fill rows short of valid ones
    counts = jnp.sum(won, axis=-1, dtype=jnp.int32)  # [B, Hkv]
    ordered = jnp.sort(jnp.where(won, best, num_blocks), axis=-1).astype(jnp.int32)  # winners first
    last = jnp.take_along_axis(ordered, jnp.maximum(counts - 1, 0)[..., None], axis=-1)  # [B, Hkv, 1]
    pad = jnp.where(counts[..., None] > 0, last, 0)
    kv_blocks = jnp.where(jnp.arange(top_k) < counts[..., None], ordered, pad)
    return DecodeBlockTable(kv_blocks=kv_blocks, counts=counts, block_size=block_size)


def decode_table_subset(table: DecodeBlockTable, keep: jax.Array) -> DecodeBlockTable:
    """The listed blocks whose `keep` (bool[B, Hkv, n_max], per table entry) is set, in their listed
    order; entries past a row's count are never kept. A row keeping none gets count 0."""
    keep &= jnp.arange(table.max_blocks) < table.counts[..., None]
    order, counts = _compact_rows_jnp(keep, table.max_blocks)  # [B, Hkv, n_max], [B, Hkv]
    kv_blocks = jnp.take_along_axis(table.kv_blocks, order, axis=-1)
    return DecodeBlockTable(kv_blocks=kv_blocks, counts=counts, block_size=table.block_size)


def decode_table_top_k_pages(
    q: jax.Array,
    k_min: jax.Array,
    k_max: jax.Array,
    lengths: jax.Array,
    *,
    top_k: int,
    block_size: int,
) -> DecodeBlockTable:
    """Quest-style page selection: the top_k pages by `page_scores` per KV head, among pages
    below the length. q: [B, H, D]; k_min, k_max from `page_key_bounds`. Selected pages are
    returned in ascending order.
    """
    batch, num_kv_heads, num_blocks, _ = k_max.shape
    lengths = decode_lengths(lengths, batch, num_kv_heads)  # [B, Hkv]
    page_valid = jnp.arange(num_blocks) * block_size < lengths[..., None]  # [B, Hkv, nb]
    return decode_table_top_k(page_scores(q, k_min, k_max), page_valid, top_k=top_k, block_size=block_size)


def decode_table_from_slots(slot_mask: jax.Array, *, block_size: int) -> DecodeBlockTable:
    """Every block holding at least one set slot, ascending: the table for a selection finer than a
    block, which the decode kernel then masks per slot. slot_mask: bool[B, Hkv, C]; n_max = C // bs,
    since the selection's size is known only when traced."""
    batch, num_kv_heads, capacity = slot_mask.shape
    num_blocks = _check_capacity(capacity, block_size)
    held = slot_mask.reshape(batch, num_kv_heads, num_blocks, block_size).any(axis=-1)  # [B, Hkv, nb]
    kv_blocks, counts = _compact_rows_jnp(held, num_blocks)
    return DecodeBlockTable(kv_blocks=kv_blocks, counts=counts, block_size=block_size)


def decode_table_mask(table: DecodeBlockTable, capacity: int) -> jax.Array:
    """bool[B, Hkv, C]: the cache slots a decode table lists (before length masking)."""
    num_blocks = _check_capacity(capacity, table.block_size)
    batch, num_kv_heads, n_max = table.kv_blocks.shape
    valid = jnp.arange(n_max) < table.counts[..., None]  # [B, Hkv, n_max]
    b, h = jnp.arange(batch)[:, None, None], jnp.arange(num_kv_heads)[None, :, None]
    hits = jnp.zeros((batch, num_kv_heads, num_blocks), jnp.int32).at[b, h, table.kv_blocks].add(valid)
    return jnp.repeat(hits > 0, table.block_size, axis=-1)  # [B, Hkv, C]
