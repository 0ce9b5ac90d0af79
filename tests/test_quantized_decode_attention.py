"""Quantized and plain decode attention (both lowerings, interpret mode) against the jnp
reference and against a dequantize-then-attend written here in numpy from the packed bytes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter  # race detector's state
from jax.experimental.pallas import tpu as pltpu

import kvjax.attention
from pallas_kernels import kv_quant
from pallas_kernels.lowering import Lowering
from pallas_kernels.quantized_decode_attention import (
    QuantizedDecodeConfig,
    decode_attention,
    decode_attention_reference,
    quantized_decode_attention,
    quantized_decode_attention_reference,
)

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

IMPLEMENTATIONS = ("tpu", "gpu")
G = kv_quant.DEFAULT_GROUP_SIZE


# ---- independent numpy ground truth -----------------------------------------------------


def _np_codes(packed, bits):
    """uint8[..., C*b/8, D] -> codes [..., C, D], byte by byte from the documented layout."""
    per, rows = 8 // bits, G // (8 // bits)
    *lead, packed_rows, dim = packed.shape
    codes = np.zeros((*lead, packed_rows * per, dim), np.int64)
    for row in range(packed_rows):
        n, r = divmod(row, rows)
        for i in range(per):
            field = (packed[..., row, :] >> (i * bits)) & (2**bits - 1)  # bits [i*b, (i+1)*b)
            codes[..., n * G + i * rows + r, :] = field
    return codes


def _np_dequantize(cache):
    """(k, v) float64 [B, Hkv, C, D] from a QuantizedKV, one statistic group at a time."""
    k = _np_codes(np.asarray(cache.k_codes), cache.bits).astype(np.float64)
    v = _np_codes(np.asarray(cache.v_codes), cache.bits).astype(np.float64)
    k_scale, k_zero, v_scale, v_zero = (
        np.asarray(x, np.float64) for x in (cache.k_scale, cache.k_zero, cache.v_scale, cache.v_zero)
    )
    for n in range(k.shape[2] // G):  # key group n: tokens [nG, (n+1)G), per channel
        tokens = slice(n * G, (n + 1) * G)
        k[:, :, tokens] = k[:, :, tokens] * k_scale[:, :, n : n + 1] + k_zero[:, :, n : n + 1]
    for j in range(v.shape[3] // G):  # value group j: channels [jG, (j+1)G), per token
        channels = slice(j * G, (j + 1) * G)
        v[..., channels] = v[..., channels] * v_scale[:, :, j, :, None] + v_zero[:, :, j, :, None]
    return k, v


def _np_attention(q, k, v, visible):
    """float64 attention: q [B, T, H, D]; k, v [B, Hkv, S, D]; visible bool[B, T, S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [B, H, S, D]
    mask = visible[:, :, None, :]  # [B, T, 1, S]
    s = np.where(mask, np.einsum("bthd,bhsd->bths", q, k) / np.sqrt(q.shape[-1]), -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(-1, keepdims=True)
    return np.einsum("bths,bhsd->bthd", p, v) / np.where(l > 0, l, 1.0)


def _window_visible(lengths, q_len, capacity):
    """The T queries are the last T valid entries: query t sees < length - (T - 1 - t)."""
    limit = np.asarray(lengths)[:, None, None] - (q_len - 1 - np.arange(q_len))[None, :, None]
    return np.arange(capacity)[None, None, :] < limit  # [B, T, C]


# ---- inputs -------------------------------------------------------------------------------


def _normal(key, shape, dtype=jnp.float32, offset=0.0):
    return (jax.random.normal(key, shape) + offset).astype(dtype)


def _poison_past(x, lengths, block, axis, tokens_per_index=1):
    """NaN in every whole block of `block` tokens past each sequence's last valid block: a
    kernel that reads one returns NaN. `axis` of x indexes tokens, tokens_per_index each."""
    x = np.array(x, np.float32)
    first_unread = -(-np.asarray(lengths) // block) * block // tokens_per_index  # [B]
    for b, start in enumerate(first_unread):
        index = [b] + [slice(None)] * (x.ndim - 1)
        index[axis] = slice(int(start), None)
        x[tuple(index)] = np.nan
    return x


def _quantized_case(seed, batch, kv_heads, group, q_len, capacity, window, head_dim, bits, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 7)
    q = _normal(keys[0], (batch, q_len, kv_heads * group, head_dim), dtype)
    k = _normal(
        keys[1], (batch, kv_heads, capacity, head_dim), offset=2.0 * jax.random.normal(keys[2], (head_dim,))
    )  # outlier channels
    v = _normal(keys[3], (batch, kv_heads, capacity, head_dim))
    k_res = _normal(keys[4], (batch, kv_heads, window, head_dim), dtype)
    v_res = _normal(keys[5], (batch, kv_heads, window, head_dim), dtype)
    return q, kv_quant.quantize_kv(k, v, bits), k_res, v_res


def _np_quantized_decode(q, cache, lengths, k_res, v_res, res_lengths):
    """float64 ground truth: the whole slab below each length, then the window causally."""
    batch, q_len, capacity, window = q.shape[0], q.shape[1], cache.capacity, k_res.shape[2]
    k_hat, v_hat = _np_dequantize(cache)
    visible = np.concatenate(
        [
            np.broadcast_to(np.arange(capacity) < np.asarray(lengths)[:, None, None], (batch, q_len, capacity)),
            _window_visible(res_lengths, q_len, window),
        ],
        axis=-1,
    )
    return _np_attention(q, np.concatenate([k_hat, k_res], 2), np.concatenate([v_hat, v_res], 2), visible)


def _poison_quantized(cache, lengths, block, k_res, v_res, res_lengths):
    """Statistics of slab blocks past each length, and window entries past each window's last
    block, set to NaN: a kernel that attends them returns NaN."""
    window = k_res.shape[2]
    poisoned = cache.replace(
        k_scale=jnp.asarray(_poison_past(cache.k_scale, lengths, block, 2, tokens_per_index=G)),
        v_scale=jnp.asarray(_poison_past(cache.v_scale, lengths, block, 3)),
    )
    block_res = min(block, window)
    return (
        poisoned,
        jnp.asarray(_poison_past(k_res, res_lengths, block_res, 2)),
        jnp.asarray(_poison_past(v_res, res_lengths, block_res, 2)),
    )


# ---- quantized decode -----------------------------------------------------------------------

QUANTIZED_CASES = [
    # (bits, head_dim, kv_heads, group, q_len, lengths, res_lengths)
    pytest.param(4, 64, 2, 4, 1, [77, 128], [9, 32], id="int4-d64-gqa4"),
    pytest.param(2, 128, 1, 8, 1, [33, 0], [32, 5], id="int2-d128-gqa8-empty-slab"),
    pytest.param(4, 128, 2, 1, 3, [100, 64], [3, 17], id="int4-d128-mha-3-queries"),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bits,head_dim,kv_heads,group,q_len,lengths,res_lengths", QUANTIZED_CASES)
def test_quantized_decode(implementation, bits, head_dim, kv_heads, group, q_len, lengths, res_lengths):
    capacity, window, block = 128, 32, 32  # 4 blocks over 2 splits (TPU: stages of 2); lengths cut blocks
    q, cache, k_res, v_res = _quantized_case(
        len(lengths) + bits, 2, kv_heads, group, q_len, capacity, window, head_dim, bits
    )
    lengths, res_lengths = jnp.array(lengths, jnp.int32), jnp.array(res_lengths, jnp.int32)

    expected = _np_quantized_decode(q, cache, lengths, k_res, v_res, res_lengths)
    poisoned, k_res_p, v_res_p = _poison_quantized(cache, lengths, block, k_res, v_res, res_lengths)
    run = functools.partial(
        quantized_decode_attention,
        config=QuantizedDecodeConfig(block_k=block, num_splits=2, tpu_stage_tokens=2 * block),
        implementation=implementation,
        interpret=True,
    )
    out = run(q, poisoned, lengths, k_res_p, v_res_p, res_lengths)
    reference = quantized_decode_attention_reference(q, cache, lengths, k_res, v_res, res_lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_quantized_decode_bf16_single_token_layout(implementation):
    """q [B, H, D] in bfloat16 (the model's dtype), int2, GQA 4."""
    q, cache, k_res, v_res = _quantized_case(7, 2, 2, 4, 1, 64, 32, 64, 2, jnp.bfloat16)
    q = q[:, 0]  # [B, H, D]
    lengths, res_lengths = jnp.array([64, 45]), jnp.array([32, 1])
    out = quantized_decode_attention(
        q,
        cache,
        lengths,
        k_res,
        v_res,
        res_lengths,
        config=QuantizedDecodeConfig(block_k=32),
        implementation=implementation,
        interpret=True,
    )
    expected = quantized_decode_attention_reference(
        q.astype(jnp.float32), cache, lengths, k_res.astype(jnp.float32), v_res.astype(jnp.float32), res_lengths
    )
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "ring,stage_blocks,dma", [(2, 1, "eager"), (3, 2, "eager"), (2, 4, "on_wait"), (3, 16, "on_wait")]
)
def test_tpu_ring_prefetch_has_no_races(ring, stage_blocks, dma):
    """The TPU kernel copies each split's stages of `stage_blocks` blocks by hand into a ring of
    `ring` stages, ring - 1 ahead of the one it attends. Slabs that fill their splits, end inside
    a stage, or are empty; DMAs run when issued (a copy into a stage still in use corrupts it) or
    only when awaited (a read before the wait sees uninitialised NaN); under the interpreter's
    race detector, the result equals the numpy ground truth."""
    capacity, window, block = 512, 64, 32  # 16 slab blocks and 2 window blocks, 2 splits
    q, cache, k_res, v_res = _quantized_case(11, 3, 2, 4, 2, capacity, window, 64, 4)
    lengths, res_lengths = jnp.array([512, 301, 0]), jnp.array([64, 7, 2])
    expected = _np_quantized_decode(q, cache, lengths, k_res, v_res, res_lengths)
    poisoned, k_res_p, v_res_p = _poison_quantized(cache, lengths, block, k_res, v_res, res_lengths)
    config = QuantizedDecodeConfig(block_k=block, num_splits=2, num_stages=ring, tpu_stage_tokens=stage_blocks * block)
    params = pltpu.InterpretParams(dma_execution_mode=dma, detect_races=True)
    out = quantized_decode_attention(
        q, poisoned, lengths, k_res_p, v_res_p, res_lengths, config=config, implementation="tpu", interpret=params
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not tpu_interpreter.races.races_found


# ---- plain (unquantized) decode -------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "dtype,head_dim,group,q_len,tolerance",
    [
        pytest.param(jnp.bfloat16, 128, 4, 1, 2e-2, id="bf16-d128-gqa4"),
        pytest.param(jnp.float32, 64, 8, 2, 1e-5, id="f32-d64-gqa8-2-queries"),
    ],
)
def test_plain_decode(implementation, dtype, head_dim, group, q_len, tolerance):
    capacity, block = 96, 32
    keys = jax.random.split(jax.random.key(3), 3)
    q = _normal(keys[0], (2, q_len, 2 * group, head_dim), dtype)
    k = _normal(keys[1], (2, 2, capacity, head_dim), dtype)
    v = _normal(keys[2], (2, 2, capacity, head_dim), dtype)
    lengths = jnp.array([50, 96])
    expected = _np_attention(
        np.asarray(q, np.float32),
        np.asarray(k, np.float32),
        np.asarray(v, np.float32),
        _window_visible(lengths, q_len, capacity),
    )
    k_p = jnp.asarray(_poison_past(k, lengths, block, 2)).astype(dtype)
    v_p = jnp.asarray(_poison_past(v, lengths, block, 2)).astype(dtype)
    out = decode_attention(
        q,
        k_p,
        v_p,
        lengths,
        config=QuantizedDecodeConfig(block_k=block, num_splits=2),
        implementation=implementation,
        interpret=True,
    )
    reference = decode_attention_reference(q, k, v, lengths)
    assert out.shape == q.shape and out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(np.asarray(reference, np.float32), expected, rtol=tolerance, atol=tolerance)


# ---- lowering, dispatch, errors -------------------------------------------------------------


@pytest.mark.parametrize("implementation,platform", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("bits", [4, 2])
def test_lowers_for_hardware(implementation, platform, bits):
    """Both kernels of a quantized step lower to Mosaic TPU / Triton here (not run there)."""
    batch, kv_heads, capacity, window, head_dim = 2, 8, 1024, 128, 128
    q = jax.ShapeDtypeStruct((batch, 4 * kv_heads, head_dim), jnp.bfloat16)
    cache = jax.eval_shape(lambda: kv_quant.empty_quantized_kv(batch, kv_heads, capacity, head_dim, bits))
    res = jax.ShapeDtypeStruct((batch, kv_heads, window, head_dim), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    run = functools.partial(quantized_decode_attention, implementation=implementation)
    lowered = jax.jit(run).trace(q, cache, lengths, res, res, lengths).lower(lowering_platforms=(platform,))
    assert lowered.as_text().count("tpu_custom_call" if platform == "tpu" else "triton") >= 2


def test_default_block_is_the_lowerings_own():
    """block_k None: 128 on GPU (256 spills in its Triton loop), 256 on TPU; an explicit block wins.
    The GPU default tiles a 384-token slab (3 blocks, which 256 cannot) and matches float64."""
    assert [QuantizedDecodeConfig().block_for(i) for i in ("gpu", "tpu")] == [128, 256]
    assert QuantizedDecodeConfig(block_k=64).block_for("tpu") == 64
    q, cache, k_res, v_res = _quantized_case(5, 1, 2, 2, 1, 384, 16, 64, 4)
    lengths, res_lengths = jnp.array([301]), jnp.array([9])
    out = quantized_decode_attention(q, cache, lengths, k_res, v_res, res_lengths, implementation="gpu", interpret=True)
    expected = _np_quantized_decode(q, cache, lengths, k_res, v_res, res_lengths)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"multiple of block_k \(256\)"):
        quantized_decode_attention(q, cache, lengths, k_res, v_res, res_lengths, implementation="tpu", interpret=True)


@pytest.mark.parametrize(
    "capacity,head_dim,name,block_k",
    [
        (1024, 128, "gpu", 128),
        (1024, 128, "tpu", 256),
        (384, 128, "tpu", 128),  # the lowering's block, halved until it divides the slab
        (512, 96, "tpu", 256),
        (512, 96, "gpu", None),  # Triton unpacks whole power-of-two rows: Phi-3's 96 runs the reference
        (512, 8, "gpu", None),
        (512, 128, "mosaic_gpu", None),  # no Mosaic GPU lowering
        (512, 128, "reference", None),
        (40, 128, "tpu", None),  # no block of 16 or more divides the slab
    ],
)
def test_config_for_shape_or_none_for_the_reference(capacity, head_dim, name, block_k):
    config = QuantizedDecodeConfig.for_shape(capacity, head_dim, Lowering.parse(name))
    assert config == (None if block_k is None else QuantizedDecodeConfig(block_k=block_k))
    if name in ("tpu", "gpu"):  # the interpreter takes what the compiled kernel takes
        assert QuantizedDecodeConfig.for_shape(capacity, head_dim, Lowering.parse(name + "-interpret")) == config


def test_entries_take_the_lowering_names():
    q, cache, k_res, v_res = _quantized_case(2, 1, 2, 2, 1, 64, 32, 64, 4)
    lengths, res_lengths = jnp.array([50]), jnp.array([7])
    run = functools.partial(quantized_decode_attention, config=QuantizedDecodeConfig(block_k=32))
    flag = run(q, cache, lengths, k_res, v_res, res_lengths, implementation="tpu", interpret=True)
    for implementation in ("tpu-interpret", Lowering("tpu", True)):
        np.testing.assert_array_equal(
            run(q, cache, lengths, k_res, v_res, res_lengths, implementation=implementation), flag
        )
    with pytest.raises(
        ValueError,
        match=r"implementation must be one of \('auto', 'reference', 'tpu', 'gpu', "
        r"'tpu-interpret', 'gpu-interpret'\) here, got 'mosaic_gpu'",
    ):
        run(q, cache, lengths, k_res, v_res, res_lengths, implementation="mosaic_gpu")


def test_kvjax_decode_runs_the_kernel_where_its_config_takes_the_slab(monkeypatch):
    """kvjax's `attend_quantized` calls the kernel entry with the name it was given and the config of
    `QuantizedDecodeConfig.for_shape` (the window padded to its block), else with "reference"."""
    calls = []
    monkeypatch.setattr(
        kvjax.attention,
        "quantized_decode_attention",
        lambda *args, **kwargs: calls.append(kwargs) or quantized_decode_attention(*args, **kwargs),
    )
    batch, kv_heads, group, capacity, window = 2, 2, 2, 64, 20
    for head_dim, impl, block_k in [(64, "tpu-interpret", 64), (96, "gpu-interpret", None)]:
        q, cache, k_win, v_win = _quantized_case(head_dim, batch, kv_heads, group, 1, capacity, window, head_dim, 4)
        q = q.reshape(batch, 1, kv_heads, group, head_dim)
        slab_length, win_length = jnp.array([64, 32]), jnp.array([20, 9])
        win_pos = jnp.where(jnp.arange(window) < win_length[:, None], slab_length[:, None] + jnp.arange(window), -1)
        win_pos = jnp.broadcast_to(win_pos[:, None], (batch, kv_heads, window))
        q_pos = (slab_length + win_length - 1)[:, None]
        args = (q, cache, slab_length, k_win, v_win, win_pos, q_pos, None, head_dim**-0.5)
        expected = kvjax.attention.attend_quantized(*args, "reference")
        calls.clear()
        out = kvjax.attention.attend_quantized(*args, impl)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        config = QuantizedDecodeConfig() if block_k is None else QuantizedDecodeConfig(block_k=block_k)
        assert [(c["implementation"], c["config"]) for c in calls] == [(impl if block_k else "reference", config)]


def test_cpu_default_is_the_reference_and_errors_are_clear():
    q, cache, k_res, v_res = _quantized_case(0, 1, 2, 2, 1, 64, 32, 64, 4)  # Hkv 2, H 4
    lengths = jnp.array([40])
    out = quantized_decode_attention(q, cache, lengths, k_res, v_res, lengths // 2)
    np.testing.assert_array_equal(
        out, quantized_decode_attention_reference(q, cache, lengths, k_res, v_res, lengths // 2)
    )
    with pytest.raises(ValueError, match="block_k"):
        QuantizedDecodeConfig(block_k=48)
    with pytest.raises(ValueError, match="num_splits"):
        QuantizedDecodeConfig(num_splits=0)
    with pytest.raises(ValueError, match="group size"):
        quantized_decode_attention(
            q,
            cache,
            lengths,
            k_res,
            v_res,
            lengths,
            config=QuantizedDecodeConfig(block_k=16),
            implementation="tpu",
            interpret=True,
        )
    with pytest.raises(ValueError, match="query tokens"):
        quantized_decode_attention(jnp.repeat(q, 5, axis=1), cache, lengths, k_res, v_res, lengths)
    with pytest.raises(ValueError, match="KV heads"):
        quantized_decode_attention(q[:, :, :3], cache, lengths, k_res, v_res, lengths)
    with pytest.raises(ValueError, match="residual"):
        quantized_decode_attention(q, cache, lengths, k_res[..., :32], v_res[..., :32], lengths)
    with pytest.raises(ValueError, match="implementation"):
        decode_attention(q, k_res, v_res, lengths, implementation="cuda")
    with pytest.raises(ValueError, match="InterpretParams configure the TPU kernel"):
        decode_attention(q, k_res, v_res, lengths, implementation="gpu", interpret=pltpu.InterpretParams())
    with pytest.raises(ValueError, match="capacity"):
        decode_attention(
            q,
            k_res[:, :, :24],
            v_res[:, :, :24],
            lengths,
            config=QuantizedDecodeConfig(block_k=16),
            implementation="gpu",
            interpret=True,
        )
