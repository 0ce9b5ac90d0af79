"""Block-sparse prefill (both lowerings, interpret mode) against dense attention written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax.attention
from pallas_kernels import block_masks as bm
from pallas_kernels.block_sparse_prefill import PrefillConfig, block_sparse_prefill, block_sparse_prefill_reference
from pallas_kernels.lowering import Lowering
from tests.support.mosaic_gpu_interpreter import interpreted

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

IMPLEMENTATIONS = ("tpu", "gpu")


def _masked_softmax_attention(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(D)) v over bool mask[B, H, S, C]; rows with nothing visible are 0."""
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v) / np.where(l > 0, l, 1.0)


def _dense_attention(q, k, v, visible, lengths):
    """float64 numpy attention; visible bool[H, T, T]; zero rows where nothing is visible."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_heads, seq_len, _ = q.shape
    group = num_heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B, H, T, D]
    pos = np.arange(seq_len)
    mask = visible[None] & (pos < lengths[:, None])[:, None, None, :]  # [B, H, T, T]
    out = _masked_softmax_attention(q, k, v, mask)
    return np.where((pos < lengths[:, None])[:, None, :, None], out, 0.0)


def _visible(patterns, seq_len):
    """bool[H, T, T] from per-head (sink, window), written out directly."""
    i, j = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
    return np.stack([(j <= i) & ((j < s) | (i - j < w)) for s, w in patterns])


def _inputs(key, batch, num_heads, num_kv_heads, seq_len, head_dim, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, num_heads, seq_len, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, num_kv_heads, seq_len, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, num_kv_heads, seq_len, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


DENSE = (0, bm.DENSE_WINDOW)
# (batch, H, Hkv, T, D, block_q, block_k, description, per-query-head (sink, window), lengths)
CASES = {
    "dense_mha": (2, 2, 2, 100, 64, 32, 32, bm.DenseCausal(), [DENSE] * 2, [100, 61]),
    "streaming_gqa4": (1, 4, 1, 77, 128, 16, 32, bm.SinkLocal(4, 24), [(4, 24)] * 4, None),
    "duo_per_kv_head_gqa2_d96": (  # D 96 (Phi-3): Triton attends it as 64 + 32 columns
        2,
        4,
        2,
        100,
        96,
        32,
        32,
        bm.PerHead((bm.DenseCausal(), bm.SinkLocal(5, 20))),
        [DENSE] * 2 + [(5, 20)] * 2,
        [100, 37],
    ),
    "duo_per_query_head_gqa8": (
        1,
        8,
        1,
        45,
        64,
        16,
        16,
        bm.PerHead((bm.DenseCausal(), bm.SinkLocal(2, 9)) * 4),
        [DENSE, (2, 9)] * 4,
        [41],
    ),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_matches_dense_attention(case, implementation):
    batch, heads, kv_heads, seq_len, head_dim, bq, bk, desc, patterns, lengths = CASES[case]
    q, k, v = _inputs(jax.random.key(len(case)), batch, heads, kv_heads, seq_len, head_dim, jnp.float32)
    lengths = np.full(batch, seq_len) if lengths is None else np.asarray(lengths)
    expected = _dense_attention(q, k, v, _visible(patterns, seq_len), lengths)
    out = block_sparse_prefill(
        q,
        k,
        v,
        desc,
        lengths=jnp.asarray(lengths, jnp.int32),
        config=PrefillConfig(block_q=bq, block_k=bk),
        implementation=implementation,
        interpret=True,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    reference = block_sparse_prefill_reference(q, k, v, desc, lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_random_table_never_touches_unlisted_blocks(implementation):
    """Blocks no row lists, and blocks past a sequence's length, hold NaN: output stays exact."""
    batch, heads, kv_heads, seq_len, head_dim, block = 2, 2, 1, 110, 64, 16
    num_blocks, lengths = 7, np.array([110, 50])  # T padded to 112; sequence 1 ends in block 3
    rng = np.random.default_rng(0)
    dead = {2, 5}  # never listed, by any head
    live = np.array([b for b in range(num_blocks) if b not in dead])
    kv_blocks = np.zeros((heads, num_blocks, 4), np.int32)
    counts = np.zeros((heads, num_blocks), np.int32)
    for h in range(heads):
        for qi in range(num_blocks):
            chosen = rng.permutation(live)[: rng.integers(0, 5)]  # unordered, may be empty
            counts[h, qi] = len(chosen)
            kv_blocks[h, qi, : len(chosen)] = chosen
            kv_blocks[h, qi, len(chosen) :] = chosen[-1] if len(chosen) else live[0]
    table = bm.prefill_table_from_blocks(kv_blocks, counts, block_q=block, block_k=block)
    q, k, v = _inputs(jax.random.key(1), batch, heads, kv_heads, seq_len, head_dim, jnp.float32)
    listed = np.zeros((heads, num_blocks, num_blocks), bool)
    for h, qi in np.ndindex(heads, num_blocks):
        listed[h, qi, kv_blocks[h, qi, : counts[h, qi]]] = True
    listed = np.kron(listed, np.ones((block, block), bool))[:, :seq_len, :seq_len]
    visible = listed & _visible([DENSE] * heads, seq_len)
    expected = _dense_attention(q, k, v, visible, lengths)

    poison = np.zeros((batch, 1, seq_len, 1), bool)
    for b in dead:
        poison[:, :, b * block : (b + 1) * block] = True
    poison[1, :, 4 * block :] = True  # whole blocks past sequence 1's length
    k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
    config = PrefillConfig(block_q=block, block_k=block)
    out = block_sparse_prefill(
        q,
        k_bad,
        v_bad,
        table,
        lengths=jnp.asarray(lengths),
        config=config,
        implementation=implementation,
        interpret=True,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    reference = block_sparse_prefill_reference(q, k, v, table, lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16(implementation):
    batch, heads, kv_heads, seq_len, head_dim = 2, 8, 1, 150, 128
    desc = bm.PerHead((bm.SinkLocal(16, 40),) + (bm.DenseCausal(),) * 7)
    q, k, v = _inputs(jax.random.key(2), batch, heads, kv_heads, seq_len, head_dim, jnp.bfloat16)
    lengths = np.array([150, 99])
    expected = _dense_attention(q, k, v, _visible([(16, 40)] + [DENSE] * 7, seq_len), lengths)
    out = block_sparse_prefill(
        q,
        k,
        v,
        desc,
        lengths=jnp.asarray(lengths),
        config=PrefillConfig(block_q=64, block_k=32),
        implementation=implementation,
        interpret=True,
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


# (implementation, platform, block_q, what the lowered module calls)
LOWERINGS = [
    ("tpu", "tpu", 128, "tpu_custom_call"),
    ("gpu", "cuda", 128, "triton"),
    ("mosaic_gpu", "cuda", 128, "mosaic_gpu"),
]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("implementation,platform,block_q,call", LOWERINGS)
def test_lowers_for_hardware(implementation, platform, block_q, call, head_dim):
    """The kernel lowers to Mosaic TPU / Triton / Mosaic GPU on this CPU-only machine (not run
    there): per-head DuoAttention patterns, GQA 4, a length that is not a multiple of the blocks."""
    q = jax.ShapeDtypeStruct((1, 8, 1000, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 2, 1000, head_dim), jnp.bfloat16)
    desc = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(64, 256)))

    def run(q, k, v):
        return block_sparse_prefill(
            q, k, v, desc, lengths=jnp.array([900]), config=PrefillConfig(block_q, 128), implementation=implementation
        )

    lowered = jax.jit(run).trace(q, k, k).lower(lowering_platforms=(platform,))
    assert call in lowered.as_text()


def test_mosaic_gpu_names_what_it_cannot_take():
    q = jnp.zeros((1, 2, 64, 64), jnp.bfloat16)
    desc, config = bm.DenseCausal(), PrefillConfig(128, 64)
    cases = [
        ((q.astype(jnp.float32), config), "bfloat16 or float16"),
        ((q[..., :32], config), "head_dim a multiple of 64"),
        ((q, PrefillConfig(64, 64)), "got block_q 64"),
        ((q, PrefillConfig(128, 32)), "block_k 32"),
        (
            (jnp.zeros((1, 2, 64, 512), jnp.bfloat16), PrefillConfig(128, 128)),
            "2 stages of block 128 x head_dim 512 take",
        ),
        ((q, PrefillConfig(128, 64, num_stages=1)), "2 or more K/V stages"),
    ]
    for (x, cfg), message in cases:
        with pytest.raises(ValueError, match=message):
            block_sparse_prefill(x, x, x, desc, config=cfg, implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="cannot run interpreted"):
        block_sparse_prefill(q, q, q, desc, config=config, implementation="mosaic_gpu", interpret=True)


def test_hopper_takes_mosaic_gpu_by_default_only_where_it_fits(monkeypatch):
    """On Hopper an unrequested GPU lowering becomes Mosaic GPU (3.4x Triton's prefill on an H100)
    for inputs it takes; everything else, and any explicit or interpreted choice, stays as picked."""
    import importlib

    prefill_module = importlib.import_module("pallas_kernels.block_sparse_prefill")  # the package
    # exports a function of the same name
    q = jnp.zeros((1, 4, 256, 128), jnp.bfloat16)
    config = PrefillConfig(128, 128)
    choose = prefill_module._default_to_hopper
    gpu, mosaic, gpu_interpret = Lowering("gpu"), Lowering("mosaic_gpu"), Lowering("gpu", True)
    monkeypatch.setattr(prefill_module, "on_hopper", lambda: True)
    assert choose(q, config, "auto", gpu) == mosaic
    assert choose(q.astype(jnp.float16), PrefillConfig(128, 64), "auto", gpu) == mosaic
    for x, cfg in [
        (q.astype(jnp.float32), config),  # wgmma takes 16-bit floats
        (q[..., :96], config),  # Phi-3's head dim: not a multiple of 64
        (q, PrefillConfig(64, 128)),  # one consumer's rows: block_q must be 128
        (q, PrefillConfig(128, 256)),
        (q, PrefillConfig(128, 128, num_stages=1)),
    ]:
        assert choose(x, cfg, "auto", gpu) == gpu
    assert choose(q, config, "gpu", gpu) == gpu  # Triton when asked for
    assert choose(q, config, gpu, gpu) == gpu  # a Lowering is an explicit choice
    assert choose(q, config, "auto", gpu_interpret) == gpu_interpret  # the interpreter runs Triton
    assert choose(q, config, "auto", Lowering("tpu")) == Lowering("tpu")
    monkeypatch.setattr(prefill_module, "on_hopper", lambda: False)
    assert choose(q, config, "auto", gpu) == gpu


def test_default_on_cpu_is_the_reference_and_errors_are_clear():
    q, k, v = _inputs(jax.random.key(3), 1, 2, 1, 20, 64, jnp.float32)
    desc = bm.SinkLocal(2, 5)
    np.testing.assert_array_equal(block_sparse_prefill(q, k, v, desc), block_sparse_prefill_reference(q, k, v, desc))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_sparse_prefill(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1), desc)
    with pytest.raises(ValueError, match="lengths"):
        block_sparse_prefill(q, k, v, desc, lengths=jnp.array([3, 4]))
    with pytest.raises(ValueError, match="implementation"):
        block_sparse_prefill(q, k, v, desc, implementation="cuda")
    table = bm.prefill_block_table(desc, num_heads=2, seq_len=20, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="differ"):
        block_sparse_prefill(q, k, v, table, config=PrefillConfig(32, 32), implementation="gpu", interpret=True)
    with pytest.raises(ValueError, match="covers"):
        block_sparse_prefill(
            q[:, :, :10],
            k[:, :, :10],
            v[:, :, :10],
            table,
            config=PrefillConfig(16, 16),
            implementation="gpu",
            interpret=True,
        )


@pytest.mark.parametrize(
    "q_len,capacity,head_dim,name,blocks",
    [
        (1024, 4096, 128, "gpu", (128, 128)),
        (1024, 4096, 128, "tpu", (512, 512)),  # Mosaic TPU: larger blocks, fewer grid steps
        (512, 4160, 128, "tpu", (512, 64)),  # kvjax rounds capacities to 16: the largest block dividing
        (100, 4160, 96, "gpu", (16, 64)),  # no block divides 100 queries: the smallest, padded; D 96 as 64 + 32
        (512, 4096, 128, "mosaic_gpu", (128, 128)),  # its 128-row query tile
        (64, 192, 64, "mosaic_gpu", (128, 64)),
        (512, 4096, 24, "tpu", (512, 512)),  # Mosaic TPU takes any head dim
        (512, 4096, 24, "gpu", None),  # Triton's smallest column piece is 16
        (512, 4096, 96, "mosaic_gpu", None),  # head dim not a multiple of 64
        (512, 4096, 128, "reference", None),
        (512, 4104, 128, "gpu", None),  # no block of 16 or more divides the capacity
        (512, 96, 128, "mosaic_gpu", None),
    ],
)
def test_config_for_shape_or_none_for_the_reference(q_len, capacity, head_dim, name, blocks):
    config = PrefillConfig.for_shape(q_len, capacity, head_dim, Lowering.parse(name))
    assert config == (None if blocks is None else PrefillConfig(*blocks))
    interpreted = Lowering.parse(name + "-interpret") if name in ("tpu", "gpu") else None
    if interpreted is not None:  # the interpreter takes what the compiled kernel takes
        assert PrefillConfig.for_shape(q_len, capacity, head_dim, interpreted) == config


def test_attend_runs_the_kernel_where_its_config_takes_the_chunk(monkeypatch):
    """kvjax's dispatch: a 32-query chunk over a slot = position cache runs the prefill kernel where
    `PrefillConfig.for_shape` gives a config (zeroed rows past the keys show it), else the reference."""
    batch, chunk, kv_heads, group, capacity = 1, 32, 1, 2, 64
    calls = []
    monkeypatch.setattr(
        kvjax.attention,
        "block_sparse_prefill",
        lambda *args, **kwargs: calls.append(kwargs) or block_sparse_prefill(*args, **kwargs),
    )
    for head_dim, impl, runs_kernel in [
        (32, "gpu-interpret", True),
        (24, "gpu-interpret", False),
        (24, "tpu-interpret", True),
        (32, "reference", False),
    ]:
        keys = jax.random.split(jax.random.key(head_dim), 3)
        q = jax.random.normal(keys[0], (batch, chunk, kv_heads, group, head_dim))
        k, v = (jax.random.normal(x, (batch, kv_heads, capacity, head_dim)) for x in keys[1:])
        q_pos = 16 + jnp.arange(chunk, dtype=jnp.int32)[None]  # the chunk sits at positions [16, 48)
        k_pos = jnp.where(jnp.arange(capacity) < 48, jnp.arange(capacity), -1)[None, None]
        calls.clear()
        out = kvjax.attention.attend(q, k, v, k_pos, q_pos, None, head_dim**-0.5, impl, slot_is_position=True)
        expected = kvjax.attention.reference_attention(q, k, v, k_pos, q_pos, None, head_dim**-0.5)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert [c["implementation"] for c in calls] == ([impl] if runs_kernel else []), (head_dim, impl)
        if runs_kernel:
            assert calls[0]["config"] == PrefillConfig(32, 64)


def test_tables_too_large_for_tpu_smem_are_refused_clearly(monkeypatch):
    """On a TPU, the whole-sequence tables of a 64K dense prefill in 128-token blocks (2 x 512 x 512
    words, 2 MiB) exceed 1 MiB of SMEM: named before Mosaic would fail; 512-token blocks fit."""
    from types import SimpleNamespace

    from jax.experimental.pallas import tpu as pltpu

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(pltpu, "get_tpu_info", lambda: SimpleNamespace(smem_capacity_bytes=1 << 20))
    q = jax.ShapeDtypeStruct((1, 32, 65536, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 8, 65536, 128), jnp.bfloat16)

    def prefill(config):
        return jax.eval_shape(
            lambda q, k, v: block_sparse_prefill(q, k, v, bm.DenseCausal(), config=config, implementation="tpu"),
            q,
            kv,
            kv,
        )

    with pytest.raises(ValueError, match=r"block tables take 2050 KiB .*SMEM \(1024 KiB\)"):
        prefill(PrefillConfig(128, 128))
    assert prefill(PrefillConfig(512, 512)).shape == q.shape  # 2 x 128 x 128 words: 128 KiB

    def unknown_chip():
        raise ValueError("Unsupported TPU device kind: TPU v99")

    monkeypatch.setattr(pltpu, "get_tpu_info", unknown_chip)  # no table for it: Mosaic decides
    assert prefill(PrefillConfig(128, 128)).shape == q.shape


# ----------------------------------------------------------------------------------------
# Chunk mode: queries at absolute positions [q_offset, q_offset + S) over keys at slot = position.
# ----------------------------------------------------------------------------------------


def _dense_chunk_attention(q, k, v, patterns, offsets, lengths):
    """float64 numpy attention of a chunk: query t of sequence b at offsets[b] + t, key slot c at
    position c; per-query-head (sink, window); keys and query rows at or past lengths[b] masked."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_heads, chunk_len, _ = q.shape
    group = num_heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B, H, C, D]
    q_pos = np.asarray(offsets)[:, None] + np.arange(chunk_len)  # [B, S]
    k_pos = np.arange(k.shape[2])  # [C]
    sink = np.array([s for s, _ in patterns])[None, :, None, None]  # [1, H, 1, 1]
    window = np.array([w for _, w in patterns])[None, :, None, None]
    qp, kp = q_pos[:, None, :, None], k_pos[None, None, None, :]
    mask = (kp <= qp) & ((kp < sink) | (qp - kp < window))  # [B, H, S, C]
    mask &= kp < np.asarray(lengths)[:, None, None, None]
    out = _masked_softmax_attention(q, k, v, mask)
    return np.where((q_pos < np.asarray(lengths)[:, None])[:, None, :, None], out, 0.0), mask


def _chunk_inputs(key, batch, num_heads, num_kv_heads, chunk_len, kv_len, head_dim, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, num_heads, chunk_len, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, num_kv_heads, kv_len, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, num_kv_heads, kv_len, head_dim), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


# (batch, H, Hkv, S, C, D, block_q, block_k, description, per-query-head (sink, window),
#  offsets, lengths). Offsets are off the block grid; lengths are ragged, some end inside the
# chunk (right-padded rows), one row's chunk is all padding.
CHUNK_CASES = {
    "dense_gqa2_d64": (3, 2, 1, 40, 112, 64, 16, 16, bm.DenseCausal(), [DENSE] * 2, [37, 0, 50], [77, 30, 41]),
    "dense_mha_d128": (1, 2, 2, 50, 96, 128, 32, 16, bm.DenseCausal(), [DENSE] * 2, [23], [73]),
    "sliding_gqa4_d64": (2, 4, 1, 33, 128, 64, 16, 32, bm.SinkLocal(0, 20), [(0, 20)] * 4, [70, 5], [103, 30]),
    "streaming_mha_d80_bk64": (2, 2, 2, 20, 128, 80, 16, 64, bm.SinkLocal(5, 17), [(5, 17)] * 2, [100, 61], [120, 75]),
    "duo_gqa8_d128": (
        1,
        8,
        1,
        24,
        80,
        128,
        8,
        16,
        bm.PerHead((bm.DenseCausal(), bm.SinkLocal(3, 9)) * 4),
        [DENSE, (3, 9)] * 4,
        [45],
        [69],
    ),
}


# Each case on one lowering, alternating (both share the table and masking code), plus the per-head
# Duo pattern on both: the interpreters are slow, and each lowering still meets every mask kind
# (dense causal, sink + local, per-head).
CHUNK_RUNS = [(case, IMPLEMENTATIONS[i % len(IMPLEMENTATIONS)]) for i, case in enumerate(CHUNK_CASES)]
CHUNK_RUNS += [("duo_gqa8_d128", impl) for impl in IMPLEMENTATIONS if ("duo_gqa8_d128", impl) not in CHUNK_RUNS]


@pytest.mark.parametrize("case,implementation", CHUNK_RUNS)
def test_chunk_mode_matches_dense_attention(case, implementation):
    batch, heads, kv_heads, chunk_len, kv_len, head_dim, bq, bk, desc, patterns, offsets, lengths = CHUNK_CASES[case]
    q, k, v = _chunk_inputs(jax.random.key(len(case)), batch, heads, kv_heads, chunk_len, kv_len, head_dim, jnp.float32)
    expected, _ = _dense_chunk_attention(q, k, v, patterns, offsets, lengths)
    run = jax.jit(
        lambda q, k, v, off, lengths: block_sparse_prefill(  # offsets traced, as in a scan
            q,
            k,
            v,
            desc,
            lengths=lengths,
            q_offset=off,
            config=PrefillConfig(block_q=bq, block_k=bk),
            implementation=implementation,
            interpret=True,
        )
    )
    out = run(q, k, v, jnp.asarray(offsets, jnp.int32), jnp.asarray(lengths, jnp.int32))
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    reference = block_sparse_prefill_reference(
        q, k, v, desc, lengths=jnp.asarray(lengths), q_offset=jnp.asarray(offsets)
    )
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("desc,patterns", [(bm.DenseCausal(), [DENSE] * 2), (bm.SinkLocal(4, 20), [(4, 20)] * 2)])
def test_chunk_mode_never_touches_hidden_blocks(desc, patterns, implementation):
    """Key blocks no query of the chunk sees (the future, the gap between sink and window, whole
    blocks past a sequence's length) hold NaN: the output stays exact, so they were never used."""
    batch, heads, kv_heads, chunk_len, kv_len, head_dim, block = 2, 2, 1, 32, 160, 64, 16
    offsets, lengths = [90, 60], [160, 100]
    q, k, v = _chunk_inputs(jax.random.key(4), batch, heads, kv_heads, chunk_len, kv_len, head_dim, jnp.float32)
    expected, mask = _dense_chunk_attention(q, k, v, patterns, offsets, lengths)  # mask [B, H, S, C]
    seen = mask.any(axis=(1, 2)).reshape(batch, kv_len // block, block).any(-1)  # [B, nk]
    assert (~seen).sum() >= 4  # the test poisons something in every configuration
    poison = np.repeat(~seen, block, axis=1)[:, None, :, None]  # [B, 1, C, 1]
    k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
    out = block_sparse_prefill(
        q,
        k_bad,
        v_bad,
        desc,
        lengths=jnp.asarray(lengths),
        q_offset=jnp.asarray(offsets),
        config=PrefillConfig(block_q=block, block_k=block),
        implementation=implementation,
        interpret=True,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_chunk_mode_offset_zero_is_whole_sequence_mode_and_errors_are_clear():
    q, k, v = _inputs(jax.random.key(5), 2, 2, 1, 48, 64, jnp.float32)
    desc, lengths = bm.SinkLocal(3, 10), jnp.array([48, 29])
    config = PrefillConfig(16, 16)
    whole = block_sparse_prefill(q, k, v, desc, lengths=lengths, config=config, implementation="gpu", interpret=True)
    chunk = block_sparse_prefill(
        q, k, v, desc, lengths=lengths, q_offset=0, config=config, implementation="gpu", interpret=True
    )  # a scalar offset: every row
    np.testing.assert_allclose(chunk, whole, rtol=1e-6, atol=1e-6)
    # Default on CPU: the reference, in chunk mode too.
    np.testing.assert_array_equal(
        block_sparse_prefill(q[:, :, 16:], k, v, desc, q_offset=16, lengths=lengths),
        block_sparse_prefill_reference(q[:, :, 16:], k, v, desc, q_offset=16, lengths=lengths),
    )
    with pytest.raises(ValueError, match="q_offset: chunk mode"):
        block_sparse_prefill(q[:, :, :16], k, v, desc)
    with pytest.raises(ValueError, match="q_offset must be"):
        block_sparse_prefill(q, k, v, desc, q_offset=jnp.array([1, 2, 3]))
    whole_table = bm.prefill_block_table(desc, num_heads=2, seq_len=48, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="needs a description or a chunk table"):
        block_sparse_prefill(q, k, v, whole_table, q_offset=0, config=config, implementation="gpu", interpret=True)
    chunk_table = bm.prefill_chunk_block_table(
        desc, jnp.array([16, 16]), num_heads=2, chunk_len=32, kv_len=48, block_q=16, block_k=16
    )
    with pytest.raises(ValueError, match="carries its own q_offset"):
        block_sparse_prefill(
            q[:, :, 16:], k, v, chunk_table, q_offset=16, config=config, implementation="gpu", interpret=True
        )
    np.testing.assert_allclose(  # a chunk table given directly is the same as its description
        block_sparse_prefill(
            q[:, :, 16:], k, v, chunk_table, lengths=lengths, config=config, implementation="gpu", interpret=True
        ),
        block_sparse_prefill_reference(q[:, :, 16:], k, v, chunk_table, lengths=lengths),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        chunk[:, :, 16:],
        block_sparse_prefill_reference(q[:, :, 16:], k, v, chunk_table, lengths=lengths),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("implementation,platform,block_q,call", LOWERINGS)
def test_chunk_mode_lowers_for_hardware(implementation, platform, block_q, call):
    """A 512-token chunk at a traced offset over a 4160-slot cache (kvjax rounds capacities to 16,
    not to powers of two) lowers to Mosaic TPU / Triton / Mosaic GPU."""
    q = jax.ShapeDtypeStruct((1, 8, 512, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 2, 4160, 128), jnp.bfloat16)
    offset = jax.ShapeDtypeStruct((1,), jnp.int32)

    def run(q, k, v, offset):
        return block_sparse_prefill(
            q, k, v, bm.DenseCausal(), q_offset=offset, config=PrefillConfig(block_q, 64), implementation=implementation
        )

    lowered = jax.jit(run).trace(q, k, k, offset).lower(lowering_platforms=(platform,))
    assert call in lowered.as_text()


# ----------------------------------------------------------------------------------------
# The Hopper kernel (Mosaic GPU), run by JAX's GPU interpreter as extended in
# tests/mosaic_gpu_interpreter.py: TMA copies, barriers and wgmma included.
# ----------------------------------------------------------------------------------------


def test_mosaic_gpu_whole_sequence_on_the_gpu_interpreter():
    """Per-query-head Duo patterns (a dense and a streaming head share the KV head), GQA 2,
    head_dim 64, a length off the block grid; the key block wholly past it holds NaN."""
    batch, heads, kv_heads, seq_len, head_dim, length = 1, 2, 1, 200, 64, 131
    desc = bm.PerHead((bm.DenseCausal(), bm.SinkLocal(8, 40)))
    q, k, v = _inputs(jax.random.key(6), batch, heads, kv_heads, seq_len, head_dim, jnp.bfloat16)
    expected = _dense_attention(q, k, v, _visible([DENSE, (8, 40)], seq_len), np.array([length]))
    past = (np.arange(seq_len) >= 192)[:, None]  # [T, 1]: block 3
    k_bad, v_bad = (jnp.where(past, jnp.nan, x) for x in (k, v))
    run = jax.jit(
        lambda q, k, v: block_sparse_prefill(
            q, k, v, desc, lengths=jnp.array([length]), config=PrefillConfig(128, 64), implementation="mosaic_gpu"
        )
    )
    with interpreted() as found_race:
        out = np.asarray(run(q, k_bad, v_bad), np.float32)
        assert not found_race()
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2)


def test_mosaic_gpu_chunk_mode_on_the_gpu_interpreter():
    """A 100-query chunk at traced offsets over a 512-slot cache, sink + local, head_dim 128,
    block_k 128; key blocks no query of the chunk sees hold NaN."""
    batch, heads, kv_heads, chunk_len, kv_len, head_dim, block_k = 2, 2, 1, 100, 512, 128, 128
    desc, offsets, lengths = bm.SinkLocal(16, 100), [400, 37], [512, 80]
    q, k, v = _chunk_inputs(jax.random.key(7), batch, heads, kv_heads, chunk_len, kv_len, head_dim, jnp.bfloat16)
    expected, mask = _dense_chunk_attention(q, k, v, [(16, 100)] * heads, offsets, lengths)
    seen = mask.any(axis=(1, 2)).reshape(batch, kv_len // block_k, block_k).any(-1)  # [B, nk]
    assert (~seen).sum() == 4  # block 1 of b 0 (between sink and window), 1-3 of b 1
    poison = np.repeat(~seen, block_k, axis=1)[:, None, :, None]  # [B, 1, C, 1]
    k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
    run = jax.jit(
        lambda q, k, v, offsets, lengths: block_sparse_prefill(
            q,
            k,
            v,
            desc,
            lengths=lengths,
            q_offset=offsets,
            config=PrefillConfig(128, block_k),
            implementation="mosaic_gpu",
        )
    )
    with interpreted() as found_race:
        out = np.asarray(
            run(q, k_bad, v_bad, jnp.asarray(offsets, jnp.int32), jnp.asarray(lengths, jnp.int32)), np.float32
        )
        assert not found_race()
    np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2)
