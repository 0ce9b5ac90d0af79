"""Block tables against brute-force token masks computed independently here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_masks as bm
from pallas_kernels.block_sparse_decode import DecodeConfig
from pallas_kernels.block_sparse_prefill import PrefillConfig


def _token_mask(seq_len, sink, window):
    """bool[T, T]: key j visible from query i, written out directly."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


def _blocks_of(mask, block_q, block_k):
    """(any, all) bool[nq, nk] of a token mask padded with invisible tokens."""
    nq, nk = mask.shape[0] // block_q, mask.shape[1] // block_k
    blocks = mask.reshape(nq, block_q, nk, block_k).transpose(0, 2, 1, 3)
    return blocks.any((2, 3)), blocks.all((2, 3))


@pytest.mark.parametrize(
    "sink,window,block_q,block_k,seq_len",
    [
        (0, bm.DENSE_WINDOW, 16, 16, 100),
        (4, 24, 16, 8, 133),
        (0, 1, 8, 32, 70),
        (40, 16, 32, 16, 257),
        (5, 300, 16, 64, 190),
    ],
)
def test_prefill_table_matches_token_mask(sink, window, block_q, block_k, seq_len):
    desc = bm.DenseCausal() if window == bm.DENSE_WINDOW else bm.SinkLocal(sink, window)
    table = bm.prefill_block_table(desc, num_heads=2, seq_len=seq_len, block_q=block_q, block_k=block_k)
    length = table.seq_len
    assert length % block_q == 0 and length % block_k == 0 and 0 <= length - seq_len < max(block_q, block_k)
    any_vis, all_vis = _blocks_of(_token_mask(length, sink, window), block_q, block_k)
    assert table.kv_blocks.shape[0] == 1  # both heads share one pattern row
    np.testing.assert_array_equal(table.head_pattern, [0, 0])
    for qi in range(length // block_q):
        count = int(table.counts[0, qi])
        listed = table.kv_blocks[0, qi, :count]
        np.testing.assert_array_equal(listed, np.flatnonzero(any_vis[qi]))  # exact and ascending
        np.testing.assert_array_equal(table.partial[0, qi, :count], ~all_vis[qi, listed])
        padding = table.kv_blocks[0, qi, count:]
        np.testing.assert_array_equal(padding, listed[-1] if count else 0)
    # The table's own token mask is exactly the description's.
    np.testing.assert_array_equal(np.asarray(bm.prefill_table_mask(table))[0], _token_mask(length, sink, window))


@pytest.mark.parametrize(
    "sink,window,block_q,block_k,chunk_len,kv_len,offsets",
    [
        (0, bm.DENSE_WINDOW, 16, 16, 32, 96, [0, 37, 64]),  # offsets on and off the block grid
        (4, 24, 16, 8, 40, 136, [1, 90, 96]),
        (0, 7, 8, 32, 24, 128, [100, 13, 0]),  # a sliding window smaller than a key block
        (40, 16, 32, 16, 50, 208, [150, 41, 7]),
    ],
)
def test_chunk_table_matches_token_mask_at_traced_offsets(sink, window, block_q, block_k, chunk_len, kv_len, offsets):
    """A chunk at offset o lists exactly the key blocks its queries o..o+S-1 see, per sequence,
    with offsets traced (as inside kvjax's scan over chunks) and a width that does not depend on them."""
    desc = bm.DenseCausal() if window == bm.DENSE_WINDOW else bm.SinkLocal(sink, window)
    build = jax.jit(
        lambda off: bm.prefill_chunk_block_table(
            desc, off, num_heads=2, chunk_len=chunk_len, kv_len=kv_len, block_q=block_q, block_k=block_k
        )
    )
    table = build(jnp.asarray(offsets, jnp.int32))
    nq, nk = -(-chunk_len // block_q), -(-kv_len // block_k)
    assert (table.seq_len, table.kv_len) == (nq * block_q, nk * block_k)
    assert table.kv_blocks.shape[:3] == (len(offsets), 1, nq)  # both heads share one row per sequence
    if window != bm.DENSE_WINDOW:  # a streaming chunk's width is bounded by sink and window alone
        assert table.max_blocks <= -(-sink // block_k) + -(-(window + block_q - 1) // block_k) + 1
    k_pos = np.arange(nk * block_k)
    for b, offset in enumerate(offsets):
        q_pos = offset + np.arange(nq * block_q)[:, None]  # [Tq, 1]
        real = np.arange(nq * block_q)[:, None] < chunk_len  # padded queries see nothing
        mask = (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < window)) & real  # [Tq, Tk]
        any_vis, _ = _blocks_of(mask, block_q, block_k)
        for qi in range(nq):
            count = int(table.counts[b, 0, qi])
            listed = np.asarray(table.kv_blocks[b, 0, qi, :count])
            np.testing.assert_array_equal(listed, np.flatnonzero(any_vis[qi]))
            real_rows = mask[qi * block_q : (qi + 1) * block_q][real[qi * block_q : (qi + 1) * block_q, 0]]
            full = real_rows.reshape(len(real_rows), nk, block_k).all((0, 2))  # [nk] over real rows
            np.testing.assert_array_equal(np.asarray(table.partial[b, 0, qi, :count]), ~full[listed])
        element = np.asarray(bm.prefill_table_mask(table))[b, 0]  # [Tq, Tk], queries at their offset
        np.testing.assert_array_equal(element[:chunk_len], mask[:chunk_len])


def test_duo_attention_pattern_is_one_table_with_two_rows():
    retrieval, streaming = bm.DenseCausal(), bm.SinkLocal(8, 32)
    desc = bm.PerHead((retrieval, streaming, streaming, retrieval))  # per KV head
    table = bm.prefill_block_table(desc, num_heads=8, num_kv_heads=4, seq_len=200, block_q=32, block_k=32)
    assert table.kv_blocks.shape[0] == 2
    sink, window = bm.head_sink_window(desc, num_heads=8, num_kv_heads=4)
    np.testing.assert_array_equal(sink, [0, 0, 8, 8, 8, 8, 0, 0])
    np.testing.assert_array_equal(window[2:6], [32] * 4)
    expected = np.stack([_token_mask(table.seq_len, s, w) for s, w in zip(sink, window, strict=True)])
    np.testing.assert_array_equal(np.asarray(bm.prefill_table_mask(table)), expected)
    # Streaming rows visit at most sink + window blocks (+1 for the diagonal), not all.
    streaming_row = table.head_pattern[2]
    assert table.counts[streaming_row].max() <= 3
    np.testing.assert_array_equal(np.asarray(bm.dense_mask(desc, 8, 4, 50)), expected[:, :50, :50])


def test_per_head_expansion_and_errors():
    per_query = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(1, 2), bm.SinkLocal(3, 4)))
    sink, window = bm.head_sink_window(per_query, num_heads=3, num_kv_heads=1)
    np.testing.assert_array_equal(sink, [0, 1, 3])
    np.testing.assert_array_equal(window, [bm.DENSE_WINDOW, 2, 4])
    with pytest.raises(ValueError, match="per query head"):
        bm.head_sink_window(per_query, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="window"):
        bm.SinkLocal(4, 0)
    with pytest.raises(ValueError, match="sink"):
        bm.SinkLocal(-1, 8)
    with pytest.raises(ValueError, match="non-empty tuple"):
        bm.PerHead([bm.DenseCausal()])
    with pytest.raises(ValueError, match="DenseCausal or SinkLocal"):
        bm.PerHead((bm.PerHead((bm.DenseCausal(),)),))
    with pytest.raises(ValueError, match="multiple"):
        bm.head_sink_window(bm.DenseCausal(), num_heads=6, num_kv_heads=4)


def test_configs_validate():
    with pytest.raises(ValueError, match="block_q"):
        PrefillConfig(block_q=48)
    with pytest.raises(ValueError, match="block_k"):
        PrefillConfig(block_k=4)
    with pytest.raises(ValueError, match="num_warps"):
        PrefillConfig(num_warps=0)
    with pytest.raises(ValueError, match="num_splits"):
        DecodeConfig(num_splits=0)
    with pytest.raises(ValueError, match="block_size"):
        DecodeConfig(block_size=24)


@pytest.mark.parametrize("num_splits", [1, 3, 8, 33])
def test_split_entries_cover_each_entry_once_evenly(num_splits):
    counts = jnp.array([0, 1, 5, 8, 33, 100, 2047], jnp.int32)
    shares = jax.jit(
        lambda c: jnp.stack(jax.vmap(lambda s: jnp.stack(bm.split_entries(s, c, num_splits)))(jnp.arange(num_splits)))
    )(counts)
    first, last = np.asarray(shares[:, 0]), np.asarray(shares[:, 1])  # [splits, rows]
    np.testing.assert_array_equal(first[0], 0)
    np.testing.assert_array_equal(last[-1], counts)
    np.testing.assert_array_equal(first[1:], last[:-1])  # contiguous, disjoint, in order
    sizes = last - first
    assert (sizes.max(0) - sizes.min(0) <= 1).all()


def test_table_from_blocks_marks_diagonal_partial():
    kv_blocks = np.array([[[0, 2, 1], [1, 0, 0], [2, 0, 1]]], np.int32)  # [1, nq=3, 3]
    counts = np.array([[1, 2, 3]], np.int32)
    table = bm.prefill_table_from_blocks(kv_blocks, counts, block_q=16, block_k=16)
    np.testing.assert_array_equal(table.partial[0, :, 0], [1, 1, 1])  # diagonal blocks
    np.testing.assert_array_equal(table.partial[0, 2], [1, 0, 0])
    visible = np.asarray(bm.prefill_table_mask(table))[0]
    causal = _token_mask(48, 0, bm.DENSE_WINDOW)
    listed = np.zeros((3, 3), bool)
    listed[0, 0] = listed[1, [1, 0]] = listed[2, [2, 0, 1]] = True
    np.testing.assert_array_equal(visible, causal & np.kron(listed, np.ones((16, 16), bool)))


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_table_from_mask_lists_exactly_the_visible_blocks(block_size):
    capacity, lengths = 128, np.array([[128, 1], [37, 0], [64, 9]], np.int32)  # [B=3, Hkv=2]
    desc = bm.PerHead((bm.SinkLocal(5, 20), bm.DenseCausal()))
    table = bm.decode_table_from_mask(
        desc, jnp.asarray(lengths), num_kv_heads=2, capacity=capacity, block_size=block_size
    )
    sink, window = bm.head_sink_window(desc, 2)
    listed = np.asarray(bm.decode_table_mask(table, capacity))  # [B, Hkv, C]
    kv_blocks, counts = np.asarray(table.kv_blocks), np.asarray(table.counts)
    for b in range(3):
        for h in range(2):
            n = lengths[b, h]
            j = np.arange(capacity)
            visible = (j < n) & ((j < sink[h]) | (n - 1 - j < window[h]))
            blocks = visible.reshape(-1, block_size).any(-1)
            np.testing.assert_array_equal(listed[b, h], np.repeat(blocks, block_size))
            count = counts[b, h]
            assert count == blocks.sum()
            np.testing.assert_array_equal(kv_blocks[b, h, :count], np.flatnonzero(blocks))
    with pytest.raises(ValueError, match="multiple of block_size"):
        bm.decode_table_from_mask(desc, lengths, num_kv_heads=2, capacity=100, block_size=32)


def test_table_subset_keeps_the_marked_listed_blocks_in_order():
    rng = np.random.default_rng(0)
    kv_blocks = np.sort(rng.permutation(20)[:6])[None, None].repeat(3, 1)  # int32[1, 3, 6], ascending
    counts = np.array([[6, 4, 0]], np.int32)
    keep = rng.random((1, 3, 6)) < 0.5
    keep[0, 1, :] = True  # entries past a row's count are never kept
    table = bm.DecodeBlockTable(kv_blocks=jnp.asarray(kv_blocks, jnp.int32), counts=jnp.asarray(counts), block_size=16)
    sub = bm.decode_table_subset(table, jnp.asarray(keep))
    for h in range(3):
        want = kv_blocks[0, h, : counts[0, h]][keep[0, h, : counts[0, h]]]
        count = int(sub.counts[0, h])
        assert count == len(want)
        np.testing.assert_array_equal(np.asarray(sub.kv_blocks[0, h, :count]), want)
        if count:
            np.testing.assert_array_equal(np.asarray(sub.kv_blocks[0, h, count:]), want[-1])  # padding: the last
    assert int(sub.counts[0, 1]) == 4 and int(sub.counts[0, 2]) == 0


def test_top_k_pages_match_brute_force_quest_scores():
    batch, num_heads, num_kv_heads, capacity, head_dim, page, top_k = 2, 8, 2, 96, 16, 8, 3
    kq, kk = jax.random.split(jax.random.key(0))
    q = np.asarray(jax.random.normal(kq, (batch, num_heads, head_dim)))
    k = np.asarray(jax.random.normal(kk, (batch, num_kv_heads, capacity, head_dim)))
    lengths = np.array([[96, 20], [13, 5]], np.int32)
    k_min, k_max = bm.page_key_bounds(jnp.asarray(k), jnp.asarray(lengths), block_size=page)
    table = bm.decode_table_top_k_pages(
        jnp.asarray(q), k_min, k_max, jnp.asarray(lengths), top_k=top_k, block_size=page
    )
    kv_blocks, counts, k_max = (np.asarray(x) for x in (table.kv_blocks, table.counts, k_max))
    group = num_heads // num_kv_heads
    for b in range(batch):
        for h in range(num_kv_heads):
            n = lengths[b, h]
            num_pages = -(-n // page)
            scores = []
            for p in range(num_pages):
                keys = k[b, h, p * page : min((p + 1) * page, n)]  # valid keys of the page
                lo, hi = keys.min(0), keys.max(0)
                qs = q[b, h * group : (h + 1) * group]  # [g, D]
                scores.append(np.maximum(qs * hi, qs * lo).sum(-1).mean())
            expected = np.sort(np.argsort(scores)[::-1][:top_k])
            count = counts[b, h]
            assert count == min(top_k, num_pages)
            np.testing.assert_array_equal(kv_blocks[b, h, :count], expected)
            np.testing.assert_array_equal(kv_blocks[b, h, count:], expected[-1])  # padding repeats the last
            np.testing.assert_allclose(k_max[b, h, 0], k[b, h, : min(page, n)].max(0), rtol=1e-6)
