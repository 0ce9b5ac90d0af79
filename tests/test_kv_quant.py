"""KIVI quantization format: error bounds, the packed layout, constant groups, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kv_quant
from pallas_kernels.kv_quant import QuantizedKV

G = kv_quant.DEFAULT_GROUP_SIZE


def _kv(seed, shape=(2, 3, 96, 64)):
    """Random keys with per-channel offsets (KIVI's outlier channels) and random values."""
    kk, ko, kv = jax.random.split(jax.random.key(seed), 3)
    offsets = 4.0 * jax.random.normal(ko, (1, 1, 1, shape[-1]))  # [1, 1, 1, D]
    k = jax.random.normal(kk, shape) + offsets
    v = jax.random.normal(kv, shape)
    return k, v


def _expand_key_stat(stat):  # [B, H, C/G, D] -> [B, H, C, D]
    return np.repeat(np.asarray(stat, np.float32), G, axis=-2)


def _expand_value_stat(stat):  # [B, H, D/G, C] -> [B, H, C, D]
    return np.repeat(np.swapaxes(np.asarray(stat, np.float32), -1, -2), G, axis=-1)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_error_within_half_a_step(bits, scale_dtype):
    k, v = _kv(0)
    cache = kv_quant.quantize_kv(k, v, bits, scale_dtype=scale_dtype)
    kv_quant.check_quantized_kv(cache)
    k_hat, v_hat = kv_quant.dequantize_kv(cache)
    for x, x_hat, scale in ((k, k_hat, _expand_key_stat(cache.k_scale)), (v, v_hat, _expand_value_stat(cache.v_scale))):
        err = np.abs(np.asarray(x) - np.asarray(x_hat))
        eps = 4 * np.finfo(np.float32).eps * np.abs(np.asarray(x)).max()
        assert np.all(err <= scale / 2 + eps), float((err - scale / 2).max())
        # The bound is not vacuous: the step is what the bit width implies for the group range.
        assert float(scale.max()) < 2 * float(jnp.max(x) - jnp.min(x)) / (2**bits - 1)
    assert cache.k_scale.dtype == scale_dtype and cache.k_codes.dtype == jnp.uint8


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_layout_and_round_trip(bits):
    per, rows = 8 // bits, G // (8 // bits)
    codes = np.random.default_rng(bits).integers(0, 2**bits, (2, 2 * G, 8)).astype(np.uint8)
    packed = np.asarray(kv_quant.pack(jnp.asarray(codes), bits))
    assert packed.shape == (2, 2 * G * bits // 8, 8) and packed.dtype == np.uint8
    # Byte [n * rows + r, d] holds token n * G + i * rows + r in bits [i * b, (i + 1) * b).
    for n in range(2):
        for r in range(rows):
            expected = sum(codes[:, n * G + i * rows + r].astype(int) << (i * bits) for i in range(per))
            np.testing.assert_array_equal(packed[:, n * rows + r], expected)
    np.testing.assert_array_equal(np.asarray(kv_quant.unpack(jnp.asarray(packed), bits)), codes)


@pytest.mark.parametrize("bits", [4, 2])
def test_constant_groups_are_exact(bits):
    k, v = _kv(1, (1, 2, 64, 64))
    k = k.at[:, 0, :G].set(3.25)  # every channel of key group 0 (head 0) is constant
    k = k.at[:, 1, :, 5].set(0.0)  # one channel of head 1 is zero everywhere
    v = v.at[:, :, 7, :G].set(-1.5)  # value channel group 0 of token 7 is constant
    cache = kv_quant.quantize_kv(k, v, bits)
    k_hat, v_hat = kv_quant.dequantize_kv(cache)
    assert np.all(np.isfinite(k_hat)) and np.all(np.isfinite(v_hat))
    np.testing.assert_array_equal(k_hat[:, 0, :G], 3.25)
    np.testing.assert_array_equal(k_hat[:, 1, :, 5], 0.0)
    np.testing.assert_array_equal(v_hat[:, :, 7, :G], -1.5)


def test_write_quantized_fills_a_window_per_sequence():
    k, v = _kv(2, (2, 2, G, 64))
    slab = kv_quant.empty_quantized_kv(2, 2, 4 * G, 64, bits=4)
    slab = kv_quant.write_quantized(slab, k, v, jnp.array([G, 3 * G]))
    direct = kv_quant.dequantize_kv(kv_quant.quantize_kv(k, v, 4))
    written = kv_quant.dequantize_kv(slab)
    for b, start in enumerate((G, 3 * G)):
        for x_direct, x_slab in zip(direct, written):
            np.testing.assert_array_equal(x_slab[b, :, start : start + G], x_direct[b])
            np.testing.assert_array_equal(np.delete(x_slab[b], np.s_[start : start + G], 1), 0.0)


def test_pytree_bytes_and_static_fields():
    cache = jax.eval_shape(lambda: kv_quant.empty_quantized_kv(1, 8, 1024, 128, bits=4))
    assert len(jax.tree_util.tree_leaves(cache)) == 6 and cache.shape == (1, 8, 1024, 128)
    codes = 2 * 8 * 1024 * 128 // 2  # K and V, half a byte each
    stats = 2 * 2 * 8 * 1024 * 128 // G * 2  # scale and zero of K and V, bfloat16
    assert kv_quant.device_bytes(cache) == codes + stats
    bf16 = 2 * 8 * 1024 * 128 * 2
    assert bf16 / kv_quant.device_bytes(cache) == pytest.approx(3.2)
    # bits and group size are static: jit specialises on them instead of tracing them.
    bits = jax.jit(lambda c: c.bits)(kv_quant.empty_quantized_kv(1, 1, G, G, bits=2))
    assert bits == 2


def test_bad_inputs_raise():
    x = jnp.ones((1, 1, 64, 64))
    with pytest.raises(ValueError, match="bits"):
        kv_quant.quantize_kv(x, x, bits=3)
    with pytest.raises(ValueError, match="bits"):
        kv_quant.pack(jnp.zeros((64, 8), jnp.uint8), bits=8)
    with pytest.raises(ValueError, match="token axis"):
        kv_quant.quantize_keys(jnp.ones((1, 1, 40, 64)), 4)
    with pytest.raises(ValueError, match="head dim"):
        kv_quant.quantize_values(jnp.ones((1, 1, 64, 48)), 4)
    with pytest.raises(ValueError, match="group_size"):
        kv_quant.quantize_kv(x, x, bits=2, group_size=6)
    with pytest.raises(ValueError, match="k and v"):
        kv_quant.quantize_kv(x, x[..., :32], bits=4)
    cache = kv_quant.quantize_kv(x, x, bits=4)
    with pytest.raises(ValueError, match="k_zero"):
        kv_quant.check_quantized_kv(cache.replace(k_zero=cache.k_zero[:, :, :1]))
    with pytest.raises(ValueError, match="v_codes"):
        kv_quant.check_quantized_kv(cache.replace(v_codes=cache.v_codes.astype(jnp.int8)))
    with pytest.raises(ValueError, match="QuantizedKV"):
        kv_quant.check_quantized_kv((x, x))
    assert isinstance(cache, QuantizedKV)
