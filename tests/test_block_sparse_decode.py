"""Block-sparse decode (both lowerings, interpret mode) against dense attention written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # race detector's state
from jax.experimental.pallas import tpu as pltpu

import kvjax.attention
from pallas_kernels import block_masks as bm
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode, block_sparse_decode_reference
from pallas_kernels.lowering import NAMES, Lowering, resolve
from tests.support.mosaic_gpu_interpreter import interpreted

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

IMPLEMENTATIONS = ("tpu", "gpu")


def _dense_decode(q, k, v, visible):
    """float64 numpy decode attention; visible bool[B, Hkv, C]; zeros where nothing is visible."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B, H, C, D]
    mask = np.repeat(visible, group, axis=1)  # [B, H, C]
    s = np.where(mask, np.einsum("bhd,bhcd->bhc", q, k) / np.sqrt(head_dim), -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(-1, keepdims=True)
    return np.einsum("bhc,bhcd->bhd", p, v) / np.where(l > 0, l, 1.0)


def _dense_lse(q, k, visible):
    """float64 numpy log-sum-exp of each query head's visible scores, [B, H]; -inf where none."""
    q, k = (np.asarray(x, np.float64) for x in (q, k))
    group = q.shape[1] // k.shape[1]
    s = np.einsum("bhd,bhcd->bhc", q, np.repeat(k, group, axis=1)) / np.sqrt(q.shape[-1])
    s = np.where(np.repeat(visible, group, axis=1), s, -np.inf)
    m = s.max(-1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(s - safe[..., None]).sum(-1))


def _inputs(key, batch, num_heads, num_kv_heads, capacity, head_dim, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, num_heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, num_kv_heads, capacity, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, num_kv_heads, capacity, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _listed(kv_blocks, counts, capacity, block_size):
    """bool[B, Hkv, C]: slots of the blocks a table lists."""
    listed = np.zeros(counts.shape + (capacity // block_size,), bool)
    for b, h in np.ndindex(counts.shape):
        listed[b, h, kv_blocks[b, h, : counts[b, h]]] = True
    return np.repeat(listed, block_size, axis=-1)


def _poison_unlisted(k, v, listed):
    """NaN in every slot no table entry lists: a kernel that reads them returns NaN."""
    bad = ~listed[..., None]
    return jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dense_decode_with_short_and_empty_sequences(implementation):
    batch, heads, kv_heads, capacity, head_dim, block = 3, 2, 2, 128, 64, 32  # GQA 1
    q, k, v = _inputs(jax.random.key(0), batch, heads, kv_heads, capacity, head_dim)
    lengths = np.array([128, 45, 0])
    slots = np.arange(capacity)
    visible = np.broadcast_to((slots < lengths[:, None])[:, None], (batch, kv_heads, capacity))
    expected = _dense_decode(q, k, v, visible)
    # Slots past each length are never read, except the tail of the last partial block.
    past = slots >= -(-lengths[:, None, None] // block) * block  # [B, 1, C]
    k_bad, v_bad = _poison_unlisted(k, v, ~past)
    out = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths, jnp.int32),
        config=DecodeConfig(block_size=block),
        implementation=implementation,
        interpret=True,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[2], 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_duo_attention_streaming_heads(implementation):
    """Dense KV head 0, sink+local KV head 1 (GQA 4); blocks outside sink+window are unread."""
    batch, heads, kv_heads, capacity, head_dim, block = 2, 8, 2, 256, 128, 16
    desc = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(4, 40)))
    q, k, v = _inputs(jax.random.key(1), batch, heads, kv_heads, capacity, head_dim)
    lengths = np.array([250, 61])
    slots = np.arange(capacity)
    n = lengths[:, None]
    visible = np.stack([slots < n, (slots < n) & ((slots < 4) | (n - 1 - slots < 40))], axis=1)
    expected = _dense_decode(q, k, v, visible)
    table = bm.decode_table_from_mask(
        desc, jnp.asarray(lengths), num_kv_heads=kv_heads, capacity=capacity, block_size=block
    )
    assert int(table.counts[:, 1].max()) <= 1 + 3 + 1  # sink block + window blocks + 1
    listed = _listed(np.asarray(table.kv_blocks), np.asarray(table.counts), capacity, block)
    k_bad, v_bad = _poison_unlisted(k, v, listed)
    out = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths),
        mask=desc,
        config=DecodeConfig(block_size=block, num_splits=3),
        implementation=implementation,
        interpret=True,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    reference = block_sparse_decode_reference(q, k, v, jnp.asarray(lengths), mask=desc)
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_splits", [1, 3])  # 3: 4 entries split 1 + 1 + 2 on GPU, 2 + 2 + 0 on TPU
def test_random_table_gqa8_per_head_lengths(implementation, num_splits):
    batch, heads, kv_heads, capacity, head_dim, block = 2, 16, 2, 192, 96, 32  # D 96: Triton's 64 + 32
    q, k, v = _inputs(jax.random.key(2), batch, heads, kv_heads, capacity, head_dim)
    lengths = np.array([[192, 100], [33, 170]])  # int32[B, Hkv]
    rng = np.random.default_rng(2)
    kv_blocks = np.zeros((batch, kv_heads, 4), np.int32)
    counts = np.zeros((batch, kv_heads), np.int32)
    for b, h in np.ndindex(batch, kv_heads):
        chosen = rng.permutation(6)[: rng.integers(1, 5)]  # unordered; may list blocks past length
        counts[b, h] = len(chosen)
        kv_blocks[b, h, : len(chosen)] = chosen
        kv_blocks[b, h, len(chosen) :] = chosen[-1]
    table = bm.DecodeBlockTable(jnp.asarray(kv_blocks), jnp.asarray(counts), block_size=block)
    listed = _listed(kv_blocks, counts, capacity, block)
    visible = listed & (np.arange(capacity) < lengths[..., None])
    seen = (kv_blocks * block < lengths[..., None]) & (np.arange(4) < counts[..., None])  # [B, Hkv, 4]
    assert (seen[..., :2].any(-1) & seen[..., 2:].any(-1)).any()  # a row whose two splits both see keys
    expected = _dense_decode(q, k, v, visible)
    k_bad, v_bad = _poison_unlisted(k, v, listed)
    out, lse = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths),
        table,
        config=DecodeConfig(block_size=block, num_splits=num_splits),
        implementation=implementation,
        interpret=True,
        return_lse=True,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, _dense_lse(q, k, visible), rtol=1e-5, atol=1e-5)  # merged over splits
    reference, reference_lse = block_sparse_decode_reference(q, k, v, jnp.asarray(lengths), table, return_lse=True)
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference_lse, _dense_lse(q, k, visible), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "reference"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_a_tail_buffer_of_another_capacity_in_the_same_launch(implementation, num_splits):
    # KV heads 0-1 in a 128-slot buffer (pages of 32), heads 2-3 in a 48-slot tail: its page 1 runs past the end
    # and is read as slots 16..47, the first half of page 0 masked. Slots never read (of unlisted pages, bar
    # those a clamped page reads) hold NaN.
    batch, block, d, g = 2, 32, 32, 2
    q, k, v = _inputs(jax.random.key(5), batch, 4 * g, 2, 128, d)
    _, kt, vt = _inputs(jax.random.key(6), batch, 2 * g, 2, 48, d)
    lengths = np.array([[128, 70, 48, 40], [90, 1, 20, 33]])  # int32[B, Hkv]; the tail's count its own slots
    kv_blocks = np.array([[[0, 3, 3], [1, 2, 2], [0, 1, 1], [1, 1, 1]], [[2, 2, 2], [0, 0, 0], [0, 0, 0], [0, 1, 1]]])
    counts = np.array([[2, 2, 2, 1], [1, 1, 1, 2]])
    listed = _listed(kv_blocks, counts, 128, block)  # [B, 4, 128]
    read_tail = listed[:, 2:, :48] | (listed[:, 2:, 32:64].any(-1, keepdims=True) & (np.arange(48) >= 16))
    k_bad, v_bad = _poison_unlisted(k, v, listed[:, :2])
    kt_bad, vt_bad = _poison_unlisted(kt, vt, read_tail)
    if implementation == "reference":  # dense: it reads every slot
        k_bad, v_bad, kt_bad, vt_bad = k, v, kt, vt
    table = bm.DecodeBlockTable(jnp.asarray(kv_blocks, jnp.int32), jnp.asarray(counts, jnp.int32), block_size=block)
    out = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths),
        table,
        config=DecodeConfig(block_size=block, num_splits=num_splits),
        implementation=implementation,
        interpret=True,
        tail=(kt_bad, vt_bad),
    )
    below = np.arange(128) < lengths[..., None]  # [B, 4, 128]
    for part, (keys, values, heads) in enumerate(((k, v, slice(0, 2)), (kt, vt, slice(2, 4)))):
        capacity = keys.shape[2]
        visible = (listed & below)[:, heads, :capacity]
        expected = _dense_decode(q[:, 2 * g * part : 2 * g * (part + 1)], keys, values, visible)
        np.testing.assert_allclose(out[:, 2 * g * part : 2 * g * (part + 1)], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="below one page"):
        block_sparse_decode(q, k, v, 1, table, config=DecodeConfig(block_size=64), tail=(kt, vt))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_many_splits_over_a_table_wider_than_its_counts(implementation):
    """A cache allocated well past the lengths (32 table entries, 3 and 19 used) in 8 splits:
    on GPU each row's count is cut evenly, so most splits of the short row are empty."""
    batch, heads, kv_heads, capacity, head_dim, block = 2, 4, 1, 512, 64, 16
    q, k, v = _inputs(jax.random.key(7), batch, heads, kv_heads, capacity, head_dim)
    lengths = np.array([40, 300])
    visible = (np.arange(capacity) < lengths[:, None])[:, None]  # [B, 1, C]
    past = np.arange(capacity) >= -(-lengths[:, None, None] // block) * block  # [B, 1, C]
    k_bad, v_bad = _poison_unlisted(k, v, ~past)
    out, lse = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths, jnp.int32),
        config=DecodeConfig(block_size=block, num_splits=8),
        implementation=implementation,
        interpret=True,
        return_lse=True,
    )
    np.testing.assert_allclose(out, _dense_decode(q, k, v, visible), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, _dense_lse(q, k, visible), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_top_k_page_selection_end_to_end_bfloat16(implementation):
    """Quest-style: bounds -> top-k pages -> kernel equals dense attention over those pages."""
    batch, heads, kv_heads, capacity, head_dim, page, top_k = 2, 8, 2, 160, 128, 16, 3
    q, k, v = _inputs(jax.random.key(3), batch, heads, kv_heads, capacity, head_dim, jnp.bfloat16)
    lengths = jnp.array([160, 70], jnp.int32)
    k_min, k_max = bm.page_key_bounds(k, lengths, block_size=page)
    table = bm.decode_table_top_k_pages(q, k_min, k_max, lengths, top_k=top_k, block_size=page)
    np.testing.assert_array_equal(table.counts, top_k)
    listed = _listed(np.asarray(table.kv_blocks), np.asarray(table.counts), capacity, page)
    visible = listed & (np.arange(capacity) < np.asarray(lengths)[:, None, None])
    expected = _dense_decode(q, k, v, visible)
    out = block_sparse_decode(
        q,
        k,
        v,
        lengths,
        table,
        config=DecodeConfig(block_size=page, num_splits=2),
        implementation=implementation,
        interpret=True,
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("implementation,num_splits", [("tpu", 1), ("gpu", 2)])
def test_slot_mask_reads_only_blocks_with_a_visible_slot(implementation, num_splits):
    """A selection finer than a block (Squeezed Attention's clusters): the table lists the blocks
    holding a set slot, unset slots inside them are skipped, unlisted blocks are never read."""
    batch, heads, kv_heads, capacity, head_dim, block = 2, 8, 2, 160, 80, 16  # GQA 4; D 80 = 64 + 16
    q, k, v = _inputs(jax.random.key(5), batch, heads, kv_heads, capacity, head_dim)
    lengths = np.array([150, 97])
    rng = np.random.default_rng(5)
    slot_mask = (rng.random((batch, kv_heads, capacity)) < 0.08) & (np.arange(capacity) < lengths[:, None, None])
    slot_mask[1, 1] = False  # a head that sees nothing outputs zeros
    table = bm.decode_table_from_slots(jnp.asarray(slot_mask), block_size=block)
    counts, kv_blocks = np.asarray(table.counts), np.asarray(table.kv_blocks)
    listed = _listed(kv_blocks, counts, capacity, block)
    holding = slot_mask.reshape(batch, kv_heads, -1, block).any(-1)
    np.testing.assert_array_equal(counts, holding.sum(-1))  # exactly the blocks holding a set slot
    np.testing.assert_array_equal(listed, np.repeat(holding, block, axis=-1))
    assert 0 < counts.sum() < batch * kv_heads * capacity // block
    expected = _dense_decode(q, k, v, slot_mask)
    k_bad, v_bad = _poison_unlisted(k, v, listed)
    k_bad = jnp.where((listed & ~slot_mask)[..., None], 30.0, k_bad)  # would dominate if attended
    config = DecodeConfig(block_size=block, num_splits=num_splits)
    out, lse = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths),
        table,
        config=config,
        implementation=implementation,
        interpret=True,
        slot_mask=jnp.asarray(slot_mask),
        return_lse=True,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    expected_lse = _dense_lse(q, k, slot_mask)
    assert np.isneginf(expected_lse[1, 4:]).all()  # the head that sees nothing
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)
    reference = block_sparse_decode_reference(
        q, k_bad, v, jnp.asarray(lengths), table, slot_mask=jnp.asarray(slot_mask)
    )
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slot_mask must be bool"):
        block_sparse_decode(
            q,
            k,
            v,
            jnp.asarray(lengths),
            table,
            config=config,
            implementation=implementation,
            interpret=True,
            slot_mask=jnp.asarray(slot_mask[0]),
        )


@pytest.mark.parametrize(
    "stages,stage_blocks,dma,slots",
    [(2, 1, "eager", False), (3, 2, "on_wait", True), (2, 3, "eager", True), (2, 16, "on_wait", False)],
)
def test_tpu_ring_prefetch_has_no_races(stages, stage_blocks, dma, slots):
    """The TPU kernel copies the listed blocks by hand into a ring of `stages` stages of
    `stage_blocks` blocks, S - 1 stages ahead of the one it attends. Stages shorter and longer
    than the rows' counts, with DMAs run when issued (a copy into a stage still in use corrupts
    it) or only when awaited (a read before the wait sees uninitialised NaN), under the
    interpreter's race detector, equal dense attention."""
    batch, heads, kv_heads, capacity, head_dim, block = 2, 8, 2, 256, 64, 16  # GQA 4, 16 blocks
    q, k, v = _inputs(jax.random.key(6), batch, heads, kv_heads, capacity, head_dim)
    lengths = np.array([[256, 200], [90, 0]])  # an empty row too
    rng = np.random.default_rng(6)
    kv_blocks = np.zeros((batch, kv_heads, 16), np.int32)
    counts = np.array([[16, 11], [6, 0]], np.int32)  # up to every block, split 2 ways
    for b, h in np.ndindex(batch, kv_heads):
        chosen = rng.permutation(16)[: counts[b, h]]
        kv_blocks[b, h, : len(chosen)] = chosen
    table = bm.DecodeBlockTable(jnp.asarray(kv_blocks), jnp.asarray(counts), block_size=block)
    listed = _listed(kv_blocks, counts, capacity, block)
    slot_mask = rng.random((batch, kv_heads, capacity)) < (0.5 if slots else 1.0)
    expected = _dense_decode(q, k, v, listed & slot_mask & (np.arange(capacity) < lengths[..., None]))
    k_bad, v_bad = _poison_unlisted(k, v, listed)
    params = pltpu.InterpretParams(dma_execution_mode=dma, detect_races=True)
    out = block_sparse_decode(
        q,
        k_bad,
        v_bad,
        jnp.asarray(lengths),
        table,
        config=DecodeConfig(block_size=block, num_splits=2, num_stages=stages, tpu_stage_tokens=stage_blocks * block),
        implementation="tpu",
        interpret=params,
        slot_mask=jnp.asarray(slot_mask) if slots else None,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not tpu_interpreter.races.races_found


@pytest.mark.parametrize("head_dim,block_size,top_k", [(128, 128, False), (64, 64, True)])
@pytest.mark.parametrize(
    "implementation,platform,call",
    [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton"), ("mosaic_gpu", "cuda", "mosaic_gpu")],
)
def test_lowers_for_hardware(implementation, platform, call, head_dim, block_size, top_k):
    """The kernel lowers to Mosaic TPU / Triton / Mosaic GPU on this CPU-only machine (not run
    there): GQA 4 with dense and streaming KV heads, or a traced top-k page table, 4 splits."""
    q = jax.ShapeDtypeStruct((2, 32, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 8, 4096, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    desc = bm.PerHead((bm.DenseCausal(),) * 4 + (bm.SinkLocal(64, 256),) * 4)
    config = DecodeConfig(block_size=block_size, num_splits=4)

    def run(q, k, v, lengths):
        if not top_k:
            return block_sparse_decode(q, k, v, lengths, mask=desc, config=config, implementation=implementation)
        lower, upper = bm.page_key_bounds(k, lengths, block_size=block_size)
        table = bm.decode_table_top_k_pages(q, lower, upper, lengths, top_k=8, block_size=block_size)
        return block_sparse_decode(q, k, v, lengths, table, config=config, implementation=implementation)

    lowered = jax.jit(run).trace(q, k, k, lengths).lower(lowering_platforms=(platform,))
    assert call in lowered.as_text()


@pytest.mark.parametrize("implementation,platform,call", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
def test_slot_mask_lowers_for_hardware(implementation, platform, call):
    """A 16-slot block table built from a traced slot mask, and the mask read per block, lower to
    Mosaic TPU (the row's mask as [nb, bs], full dims) and Triton (not run there)."""
    q = jax.ShapeDtypeStruct((2, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 8, 4096, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    slots = jax.ShapeDtypeStruct((2, 8, 4096), jnp.bool_)

    def run(q, k, v, lengths, slots):
        table = bm.decode_table_from_slots(slots, block_size=16)
        return block_sparse_decode(
            q,
            k,
            v,
            lengths,
            table,
            config=DecodeConfig(block_size=16, num_splits=2),
            implementation=implementation,
            slot_mask=slots,
        )

    lowered = jax.jit(run).trace(q, k, k, lengths, slots).lower(lowering_platforms=(platform,))
    assert call in lowered.as_text()


@pytest.mark.parametrize("implementation,platform,call", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", "triton")])
def test_a_tail_buffer_lowers_for_hardware(implementation, platform, call):
    """LServe's defaults: 4 retrieval KV heads in a 4096-slot cache, 4 streaming heads in a 400-slot tail (not
    whole 64-slot pages), one table, lower to Mosaic TPU and Triton (not run there)."""
    q = jax.ShapeDtypeStruct((2, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 4, 4096, 128), jnp.bfloat16)
    tail = jax.ShapeDtypeStruct((2, 4, 400, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    blocks = jax.ShapeDtypeStruct((2, 8, 65), jnp.int32)
    counts = jax.ShapeDtypeStruct((2, 8), jnp.int32)

    def run(q, k, v, kt, vt, lengths, blocks, counts):
        table = bm.DecodeBlockTable(blocks, counts, block_size=64)
        config = DecodeConfig(block_size=64, num_splits=2)
        return block_sparse_decode(q, k, v, lengths, table, config=config, implementation=implementation, tail=(kt, vt))

    lowered = jax.jit(run).trace(q, k, k, tail, tail, lengths, blocks, counts).lower(lowering_platforms=(platform,))
    assert call in lowered.as_text()


def test_mosaic_gpu_names_what_it_cannot_take():
    q = jnp.zeros((1, 4, 64), jnp.bfloat16)
    k = jnp.zeros((1, 1, 128, 64), jnp.bfloat16)
    lengths, config = jnp.array([100], jnp.int32), DecodeConfig(block_size=64)
    cases = [
        ((q.astype(jnp.float32), k.astype(jnp.float32), config), "bfloat16 or float16"),
        ((q[..., :32], k[..., :32], config), "head_dim a multiple of 64"),
        ((q, k, DecodeConfig(block_size=32)), "block_k 32"),
        ((jnp.zeros((1, 65, 64), jnp.bfloat16), k, config), "groups of at most 64"),
    ]
    for (q_, k_, cfg), message in cases:
        with pytest.raises(ValueError, match=message):
            block_sparse_decode(q_, k_, k_, lengths, config=cfg, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="takes no slot_mask"):
        block_sparse_decode(
            q, k, k, lengths, config=config, implementation="mosaic_gpu", slot_mask=jnp.ones((1, 1, 128), bool)
        )
    with pytest.raises(ValueError, match="cannot run interpreted"):
        block_sparse_decode(q, k, k, lengths, config=config, implementation="mosaic_gpu", interpret=True)


def test_default_on_cpu_is_the_reference_and_errors_are_clear():
    q, k, v = _inputs(jax.random.key(4), 2, 4, 2, 64, 64)
    lengths = jnp.array([64, 10], jnp.int32)
    np.testing.assert_array_equal(
        block_sparse_decode(q, k, v, lengths), block_sparse_decode_reference(q, k, v, lengths)
    )
    with pytest.raises(ValueError, match="multiple of the block size|multiple of block_size"):
        block_sparse_decode(
            q,
            k[:, :, :60],
            v[:, :, :60],
            lengths,
            implementation="gpu",
            config=DecodeConfig(block_size=16),
            interpret=True,
        )
    with pytest.raises(ValueError, match="lengths"):
        block_sparse_decode(q, k, v, jnp.array([1, 2, 3]), implementation="gpu", interpret=True)
    with pytest.raises(ValueError, match="differs"):
        table = bm.decode_table_from_mask(bm.DenseCausal(), lengths, num_kv_heads=2, capacity=64, block_size=16)
        block_sparse_decode(q, k, v, lengths, table, config=DecodeConfig(block_size=32))
    with pytest.raises(ValueError, match="expected q"):
        block_sparse_decode(q[:, None], k, v, lengths)
    with pytest.raises(ValueError, match="InterpretParams configure the TPU kernel"):
        block_sparse_decode(q, k, v, lengths, implementation="gpu", interpret=pltpu.InterpretParams())
    with pytest.raises(ValueError, match="head dim that is a multiple of 16, got 24"):
        block_sparse_decode(
            q[..., :24],
            k[..., :24],
            v[..., :24],
            lengths,
            config=DecodeConfig(block_size=16),
            implementation="gpu",
            interpret=True,
        )


# ----------------------------------------------------------------------------------------
# One vocabulary of lowerings (pallas_kernels.lowering), and kvjax's dispatch by it.
# ----------------------------------------------------------------------------------------


def test_one_vocabulary_names_every_lowering(monkeypatch):
    """The kernels' `implementation` and kvjax's attention_impl read the same names; "auto" follows
    the backend (the reference on CPU, or with interpret=True the TPU kernel interpreted)."""
    assert kvjax.attention.ATTENTION_IMPLS == NAMES
    assert all(Lowering.parse(name).name == name for name in NAMES[1:])
    assert Lowering.parse("gpu-interpret") == Lowering("gpu", interpret=True)
    for backend, platform in [("cpu", "reference"), ("gpu", "gpu"), ("tpu", "tpu")]:
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert Lowering.parse("auto") == Lowering(platform)
        assert resolve("auto", interpret=True) == Lowering("gpu" if backend == "gpu" else "tpu", True)
    monkeypatch.undo()
    errors = [
        (lambda: Lowering.parse("cuda"), r"lowering must be one of \('auto', 'reference', 'tpu', 'gpu'"),
        (lambda: Lowering.parse("mosaic_gpu-interpret"), "cannot run interpreted"),
        (lambda: kvjax.attention.check_impl("triton"), "attention implementation must be one of"),
        (lambda: kvjax.attention.check_impl("mosaic_gpu-interpret"), "cannot run interpreted"),
        (lambda: Lowering("cuda"), "Lowering.platform must be one of"),
        (lambda: Lowering("gpu", 1), "Lowering.interpret must be a bool"),
        (lambda: Lowering("reference", True), "no interpreter"),
    ]
    for make, message in errors:
        with pytest.raises(ValueError, match=message):
            make()

    q, k, v = _inputs(jax.random.key(9), 1, 4, 2, 64, 32)
    lengths = jnp.array([50], jnp.int32)
    config = DecodeConfig(block_size=16)
    flag = block_sparse_decode(q, k, v, lengths, config=config, implementation="gpu", interpret=True)
    for implementation in ("gpu-interpret", Lowering("gpu", True)):
        np.testing.assert_array_equal(
            block_sparse_decode(q, k, v, lengths, config=config, implementation=implementation), flag
        )
    with pytest.raises(ValueError, match="implementation must be one of"):
        block_sparse_decode(q, k, v, lengths, implementation=None)


@pytest.mark.parametrize(
    "capacity,head_dim,name,block_size",
    [
        (4096, 128, "gpu", 128),
        (4160, 128, "tpu", 64),  # kvjax rounds capacities to 16: the largest page dividing
        (48, 96, "gpu", 16),  # D 96: Triton attends 64 + 32 columns
        (256, 24, "tpu", 128),
        (256, 24, "gpu", None),  # Triton's smallest column piece is 16
        (4096, 128, "mosaic_gpu", 128),
        (192, 64, "mosaic_gpu", 64),
        (96, 128, "mosaic_gpu", None),  # pages of 64 or 128 only
        (4096, 96, "mosaic_gpu", None),  # head dim not a multiple of 64
        (4096, 128, "reference", None),
        (40, 128, "gpu", None),  # no page of 16 or more divides the capacity
    ],
)
def test_config_for_shape_or_none_for_the_reference(capacity, head_dim, name, block_size):
    config = DecodeConfig.for_shape(capacity, head_dim, Lowering.parse(name))
    assert config == (None if block_size is None else DecodeConfig(block_size=block_size))
    if name in ("tpu", "gpu"):  # the interpreter takes what the compiled kernel takes
        assert DecodeConfig.for_shape(capacity, head_dim, Lowering.parse(name + "-interpret")) == config


def test_config_for_a_given_page_size():
    """A table fixes the page: any for Triton and TPU, 64 or 128 for Mosaic GPU, which takes no slot mask."""
    gpu, mosaic = Lowering("gpu"), Lowering("mosaic_gpu")
    assert DecodeConfig.for_shape(4096, 128, gpu, block_size=32, slot_mask=True) == DecodeConfig(block_size=32)
    assert DecodeConfig.for_shape(4096, 128, mosaic, block_size=64) == DecodeConfig(block_size=64)
    assert DecodeConfig.for_shape(4096, 128, mosaic, block_size=32) is None
    assert DecodeConfig.for_shape(4096, 128, mosaic, block_size=64, slot_mask=True) is None
    assert DecodeConfig.for_shape(4096, 24, gpu, block_size=32) is None


def test_kvjax_decode_runs_the_kernel_where_its_config_takes_the_cache(monkeypatch):
    """kvjax's decode dispatch (`decode_with_lse`, `attend_pages`) calls the kernel, with the name it
    was given, exactly where `DecodeConfig.for_shape` gives a config; elsewhere the reference."""
    calls = []
    monkeypatch.setattr(
        kvjax.attention,
        "block_sparse_decode",
        lambda *args, **kwargs: calls.append(kwargs) or block_sparse_decode(*args, **kwargs),
    )
    batch, kv_heads, group = 2, 2, 2
    for capacity, head_dim, impl, block_size in [
        (48, 32, "gpu-interpret", 16),
        (48, 24, "gpu-interpret", None),
        (40, 32, "tpu-interpret", None),
        (64, 32, "reference", None),
    ]:
        keys = jax.random.split(jax.random.key(capacity + head_dim), 3)
        q = jax.random.normal(keys[0], (batch, 1, kv_heads, group, head_dim))
        k, v = (jax.random.normal(x, (batch, kv_heads, capacity, head_dim)) for x in keys[1:])
        ends = jnp.array([capacity, capacity - 13])
        k_pos = jnp.where(jnp.arange(capacity) < ends[:, None], jnp.arange(capacity), -1)[:, None]
        k_pos = jnp.broadcast_to(k_pos, (batch, kv_heads, capacity))
        calls.clear()
        decoded = kvjax.attention.decode_with_lse(q, k, v, k_pos, None, head_dim**-0.5, impl)
        assert (decoded is None) == (block_size is None), (capacity, head_dim, impl)
        if decoded is not None:
            expected = kvjax.attention.reference_attention(q, k, v, k_pos, (ends - 1)[:, None], None, head_dim**-0.5)
            np.testing.assert_allclose(decoded[0], expected, rtol=1e-5, atol=1e-5)
            assert [(c["implementation"], c["config"]) for c in calls] == [(impl, DecodeConfig(block_size))]

    # A slot mask keeps Mosaic GPU out of page-selected decode: the reference runs, on any host.
    q = jnp.concatenate([q, q], axis=-1)  # head dim 64, capacity 64: what Mosaic GPU takes otherwise
    k, v = jnp.concatenate([k, k], axis=-1), jnp.concatenate([v, v], axis=-1)
    table = bm.decode_table_from_mask(bm.DenseCausal(), ends, num_kv_heads=kv_heads, capacity=64, block_size=64)
    calls.clear()
    out = kvjax.attention.attend_pages(
        q, k, v, k_pos, (ends - 1)[:, None], table, None, 0.125, "mosaic_gpu", slot_mask=k_pos >= 0
    )
    assert calls == [] and out.shape == q.shape


# ----------------------------------------------------------------------------------------
# The Hopper kernel (Mosaic GPU), run by JAX's GPU interpreter as extended in
# tests/mosaic_gpu_interpreter.py: TMA copies, barriers and wgmma included.
# ----------------------------------------------------------------------------------------


def test_mosaic_gpu_streaming_heads_on_the_gpu_interpreter():
    """Dense KV head 0, sink + local KV head 1, GQA 4, head_dim 128, two splits, a partial
    last block; unlisted blocks hold NaN."""
    batch, heads, kv_heads, capacity, head_dim, block = 2, 8, 2, 320, 128, 64
    desc = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(8, 70)))
    q, k, v = _inputs(jax.random.key(5), batch, heads, kv_heads, capacity, head_dim, jnp.bfloat16)
    lengths = np.array([300, 100])
    slots, n = np.arange(capacity), lengths[:, None]
    visible = np.stack([slots < n, (slots < n) & ((slots < 8) | (n - 1 - slots < 70))], axis=1)
    expected = _dense_decode(q, k, v, visible)
    table = bm.decode_table_from_mask(
        desc, jnp.asarray(lengths), num_kv_heads=kv_heads, capacity=capacity, block_size=block
    )
    listed = _listed(np.asarray(table.kv_blocks), np.asarray(table.counts), capacity, block)
    assert (~listed).sum() >= 4 * block  # something is poisoned in both sequences
    k_bad, v_bad = _poison_unlisted(k, v, listed)
    run = jax.jit(
        lambda q, k, v, lengths: block_sparse_decode(
            q,
            k,
            v,
            lengths,
            mask=desc,
            config=DecodeConfig(block_size=block, num_splits=2),
            implementation="mosaic_gpu",
        )
    )
    with interpreted() as found_race:
        out = np.asarray(run(q, k_bad, v_bad, jnp.asarray(lengths, jnp.int32)), np.float32)
        assert not found_race()
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2)


def test_mosaic_gpu_top_k_pages_on_the_gpu_interpreter():
    """Quest-style top-2 pages per KV head, GQA 8, head_dim 64, one sequence ending inside a
    page; pages not chosen hold NaN."""
    batch, heads, kv_heads, capacity, head_dim, page = 2, 16, 2, 256, 64, 64
    q, k, v = _inputs(jax.random.key(6), batch, heads, kv_heads, capacity, head_dim, jnp.bfloat16)
    lengths = jnp.array([256, 150], jnp.int32)
    lower, upper = bm.page_key_bounds(k, lengths, block_size=page)
    table = bm.decode_table_top_k_pages(q, lower, upper, lengths, top_k=2, block_size=page)
    listed = _listed(np.asarray(table.kv_blocks), np.asarray(table.counts), capacity, page)
    expected = _dense_decode(q, k, v, listed & (np.arange(capacity) < np.asarray(lengths)[:, None, None]))
    k_bad, v_bad = _poison_unlisted(k, v, listed)
    run = jax.jit(
        lambda q, k, v, lengths, table: block_sparse_decode(
            q, k, v, lengths, table, config=DecodeConfig(block_size=page), implementation="mosaic_gpu"
        )
    )
    with interpreted() as found_race:
        out = np.asarray(run(q, k_bad, v_bad, lengths, table), np.float32)
        assert not found_race()
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2)
