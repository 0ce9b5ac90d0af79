"""KIVI-style asymmetric KV quantization to packed int4/int2 codes.

Keys are quantized per channel (min/max over groups of G tokens), values per token (min/max over
groups of G channels): `scale = (max - min) / (2^b - 1)`, `zero = min`,
`code = round((x - zero) / scale)`, `x ~ code * scale + zero`.

Packed layout (keys and values), for one (batch, KV head) slab of C tokens x D channels: codes
are packed along the *token* axis, 8 / b per uint8 byte, inside each group of G tokens. With
`per = 8 // b` and `rows = G // per`, byte `[n * rows + r, d]` holds the codes of tokens
`n * G + i * rows + r` (i = 0 .. per - 1) in bits `[i * b, (i + 1) * b)`, so packed codes are
`uint8[..., C * b // 8, D]`: D stays the minor (lane) axis and unpacking needs no shuffles.

Statistics (scale and zero, `scale_dtype`, bfloat16 by default): keys [..., C / G, D] (per
channel, per group of G tokens); values [..., D / G, C] (per token, per group of G channels;
tokens minor). Zero is rounded down and scale up, and codes are computed from the stored
values, so `|x - dequantize(x)| <= scale / 2` (plus float32 rounding) holds exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BITS = (2, 4)
DEFAULT_GROUP_SIZE = 32


def codes_per_byte(bits: int) -> int:
    """Codes of `bits` bits packed into one uint8."""
    check_bits(bits)
    return 8 // bits


def check_bits(bits: object) -> None:
    """Only 4-bit (two per byte) and 2-bit (four per byte) codes are supported."""
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")


def check_group_size(group_size: object, bits: int) -> None:
    """G must be a positive int holding a whole number of packed bytes per channel."""
    per = codes_per_byte(bits)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if group_size % per:
        raise ValueError(f"group_size ({group_size}) must be a multiple of {per} for {bits}-bit codes")


def _check_divisible(name: str, size: int, group_size: int) -> None:
    if size % group_size:
        raise ValueError(f"{name} ({size}) must be a multiple of group_size ({group_size})")


# ----------------------------------------------------------------------------------------
# Packing. Rank-polymorphic over leading axes: the kernels call these on [rows, D] tiles.
# ----------------------------------------------------------------------------------------


def pack(codes: jax.Array, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> jax.Array:
    """Packs codes [..., C, D] (values < 2^bits) along tokens -> uint8[..., C * bits / 8, D]."""
    check_group_size(group_size, bits)
    *lead, seq, dim = codes.shape
    _check_divisible("the token axis of codes", seq, group_size)
    per, rows = codes_per_byte(bits), group_size // codes_per_byte(bits)
    x = codes.astype(jnp.uint8).reshape(*lead, seq // group_size, per, rows, dim)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape(per, 1, 1)  # [per, 1, 1]
    # Disjoint bit fields: the sum is the bitwise or.
    packed = jnp.sum(x << shifts, axis=-3, dtype=jnp.uint8)  # [..., C / G, rows, D]
    return packed.reshape(*lead, seq // per, dim)


def unpack(packed: jax.Array, bits: int, group_size: int = DEFAULT_GROUP_SIZE, dtype=jnp.uint8) -> jax.Array:
    """Inverse of `pack`: uint8[..., C * bits / 8, D] -> codes [..., C, D] in token order."""
    check_group_size(group_size, bits)
    *lead, packed_rows, dim = packed.shape
    per, rows = codes_per_byte(bits), group_size // codes_per_byte(bits)
    if packed_rows % rows:
        raise ValueError(
            f"packed rows ({packed_rows}) must be a multiple of {rows} (group_size {group_size} at {bits} bits)"
        )
    groups = packed_rows // rows
    x = packed.astype(jnp.int32).reshape(*lead, groups, 1, rows, dim)  # [..., n, 1, rows, D]
    shifts = jax.lax.broadcasted_iota(jnp.int32, (per, 1, 1), 0) * bits  # [per, 1, 1]
    codes = (x >> shifts) & (2**bits - 1)  # [..., n, per, rows, D]
    return codes.reshape(*lead, groups * group_size, dim).astype(dtype)


# ----------------------------------------------------------------------------------------
# Quantization.
# ----------------------------------------------------------------------------------------


def _round_toward(x: jax.Array, dtype, direction: float) -> jax.Array:
    """float32 x rounded to `dtype`, toward -inf or +inf (so the rounded value bounds x)."""
    y = x.astype(dtype)
    overshoot = (y.astype(jnp.float32) - x) * direction < 0
    return jnp.where(overshoot, jnp.nextafter(y, jnp.asarray(direction, dtype)), y)


def _quantize_groups(x: jax.Array, axis: int, bits: int, scale_dtype):
    """Min/max quantization with statistics over `axis` (kept as size 1): codes, scale, zero."""
    levels = 2**bits - 1
    x = x.astype(jnp.float32)
    lo = jnp.min(x, axis=axis, keepdims=True)
    hi = jnp.max(x, axis=axis, keepdims=True)
    zero = _round_toward(lo, scale_dtype, -np.inf)  # zero <= every element
    scale = _round_toward((hi - zero.astype(jnp.float32)) / levels, scale_dtype, np.inf)
    scale_f32 = scale.astype(jnp.float32)
    # A constant group (scale == 0) gets code 0 and dequantizes to zero == x exactly.
    ratio = (x - zero.astype(jnp.float32)) / jnp.where(scale_f32 > 0, scale_f32, 1.0)
    codes = jnp.clip(jnp.round(ratio), 0, levels).astype(jnp.uint8)
    return codes, scale, zero


def quantize_keys(
    k: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype=jnp.bfloat16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel keys [..., C, D] -> (uint8[..., C*b/8, D], scale [..., C/G, D], zero)."""
    check_group_size(group_size, bits)
    *lead, seq, dim = k.shape
    _check_divisible("the key token axis C", seq, group_size)
    grouped = k.reshape(*lead, seq // group_size, group_size, dim)  # [..., C/G, G, D]
    codes, scale, zero = _quantize_groups(grouped, -2, bits, scale_dtype)  # stats [..., C/G, 1, D]
    codes = codes.reshape(*lead, seq, dim)
    return pack(codes, bits, group_size), scale.squeeze(-2), zero.squeeze(-2)


def quantize_values(
    v: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype=jnp.bfloat16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token values [..., C, D] -> (uint8[..., C*b/8, D], scale [..., D/G, C], zero)."""
    check_group_size(group_size, bits)
    *lead, seq, dim = v.shape
    _check_divisible("the value token axis C", seq, group_size)
    _check_divisible("the head dim D", dim, group_size)
    grouped = v.reshape(*lead, seq, dim // group_size, group_size)  # [..., C, D/G, G]
    codes, scale, zero = _quantize_groups(grouped, -1, bits, scale_dtype)  # stats [..., C, D/G, 1]
    codes = codes.reshape(*lead, seq, dim)
    scale = jnp.swapaxes(scale.squeeze(-1), -1, -2)  # [..., D/G, C]
    zero = jnp.swapaxes(zero.squeeze(-1), -1, -2)  # [..., D/G, C]
    return pack(codes, bits, group_size), scale, zero


def dequantize_keys(
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype=jnp.float32,
) -> jax.Array:
    """uint8[..., C*b/8, D] with scale, zero [..., C/G, D] -> keys [..., C, D]."""
    codes = unpack(packed, bits, group_size, jnp.float32)  # [..., C, D]
    *lead, seq, dim = codes.shape
    grouped = codes.reshape(*lead, seq // group_size, group_size, dim)  # [..., C/G, G, D]
    k = grouped * scale.astype(jnp.float32)[..., None, :] + zero.astype(jnp.float32)[..., None, :]
    return k.reshape(*lead, seq, dim).astype(dtype)


def dequantize_values(
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype=jnp.float32,
) -> jax.Array:
    """uint8[..., C*b/8, D] with scale, zero [..., D/G, C] -> values [..., C, D]."""
    codes = unpack(packed, bits, group_size, jnp.float32)  # [..., C, D]
    return _dequantize_channel_groups(codes, jnp.swapaxes(scale, -1, -2), jnp.swapaxes(zero, -1, -2), dtype)


def quantize_tokens(
    x: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype=jnp.bfloat16,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token keys or values [..., T, D] -> (uint8[..., T, D * bits / 8], scale [..., T, D/G], zero).

    Min/max over groups of G channels of each token, codes packed along channels: every token owns
    its bytes and statistics, so single tokens can be written anywhere (MiKV's demoted entries).
    """
    check_group_size(group_size, bits)
    *lead, seq, dim = x.shape
    _check_divisible("the head dim D", dim, group_size)
    grouped = x.reshape(*lead, seq, dim // group_size, group_size)  # [..., T, D/G, G]
    codes, scale, zero = _quantize_groups(grouped, -1, bits, scale_dtype)  # stats [..., T, D/G, 1]
    packed = pack(codes.reshape(*lead, seq, dim).swapaxes(-1, -2), bits, group_size)  # [..., D*b/8, T]
    return packed.swapaxes(-1, -2), scale.squeeze(-1), zero.squeeze(-1)


def unpack_tokens(packed: jax.Array, bits: int, group_size: int = DEFAULT_GROUP_SIZE, dtype=jnp.uint8) -> jax.Array:
    """The codes of `quantize_tokens`' packing: uint8[..., T, D * bits / 8] -> [..., T, D]."""
    return unpack(packed.swapaxes(-1, -2), bits, group_size, dtype).swapaxes(-1, -2)


def dequantize_tokens(
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype=jnp.float32,
) -> jax.Array:
    """Inverse of `quantize_tokens`: uint8[..., T, D * bits / 8] with scale, zero [..., T, D/G] -> [..., T, D]."""
    return _dequantize_channel_groups(unpack_tokens(packed, bits, group_size, jnp.float32), scale, zero, dtype)


def _dequantize_channel_groups(codes: jax.Array, scale: jax.Array, zero: jax.Array, dtype) -> jax.Array:
    """codes [..., T, D] with per-token statistics [..., T, D/G] over groups of G channels -> [..., T, D]."""
    *lead, seq, dim = codes.shape
    grouped = codes.reshape(*lead, seq, scale.shape[-1], -1)  # [..., T, D/G, G]
    x = grouped * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]
    return x.reshape(*lead, seq, dim).astype(dtype)


# ----------------------------------------------------------------------------------------
# The quantized slab.
# ----------------------------------------------------------------------------------------


@struct.dataclass(frozen=True)
class QuantizedKV:
    """Packed keys and values of logical shape [B, Hkv, C, D] with their KIVI statistics."""

    k_codes: jax.Array  # uint8[B, Hkv, C * bits / 8, D]
    k_scale: jax.Array  # [B, Hkv, C / G, D]
    k_zero: jax.Array  # [B, Hkv, C / G, D]
    v_codes: jax.Array  # uint8[B, Hkv, C * bits / 8, D]
    v_scale: jax.Array  # [B, Hkv, D / G, C]
    v_zero: jax.Array  # [B, Hkv, D / G, C]
    bits: int = struct.field(pytree_node=False)
    group_size: int = struct.field(pytree_node=False, default=DEFAULT_GROUP_SIZE)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical (B, Hkv, C, D)."""
        batch, heads, _, capacity = self.v_scale.shape
        return batch, heads, capacity, self.k_codes.shape[-1]

    @property
    def capacity(self) -> int:
        return self.v_scale.shape[-1]


def check_quantized_kv(cache: QuantizedKV) -> None:
    """Raises ValueError if the slab's arrays disagree with its bits, group size and shape."""
    if not isinstance(cache, QuantizedKV):
        raise ValueError(f"expected a QuantizedKV, got {type(cache).__name__}")
    check_group_size(cache.group_size, cache.bits)
    batch, heads, capacity, dim = cache.shape
    g, per = cache.group_size, codes_per_byte(cache.bits)
    _check_divisible("capacity C", capacity, g)
    _check_divisible("head dim D", dim, g)
    expected = {
        "k_codes": ((batch, heads, capacity // per, dim), jnp.uint8),
        "k_scale": ((batch, heads, capacity // g, dim), None),
        "k_zero": ((batch, heads, capacity // g, dim), None),
        "v_codes": ((batch, heads, capacity // per, dim), jnp.uint8),
        "v_scale": ((batch, heads, dim // g, capacity), None),
        "v_zero": ((batch, heads, dim // g, capacity), None),
    }
    for name, (shape, dtype) in expected.items():
        array = getattr(cache, name)
        if tuple(array.shape) != shape:
            raise ValueError(f"QuantizedKV.{name} has shape {tuple(array.shape)}, expected {shape}")
        if dtype is not None and array.dtype != dtype:
            raise ValueError(f"QuantizedKV.{name} has dtype {array.dtype}, expected {np.dtype(dtype)}")


def quantize_kv(
    k: jax.Array,
    v: jax.Array,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype=jnp.bfloat16,
) -> QuantizedKV:
    """Quantizes a full-precision cache k, v [B, Hkv, C, D] (C, D multiples of G)."""
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [B, Hkv, C, D], got {k.shape} and {v.shape}")
    k_codes, k_scale, k_zero = quantize_keys(k, bits, group_size, scale_dtype)
    v_codes, v_scale, v_zero = quantize_values(v, bits, group_size, scale_dtype)
    return QuantizedKV(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, group_size)


def dequantize_kv(cache: QuantizedKV, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The slab back in full precision: (k, v), each [B, Hkv, C, D]."""
    bits, g = cache.bits, cache.group_size
    k = dequantize_keys(cache.k_codes, cache.k_scale, cache.k_zero, bits, g, dtype)
    v = dequantize_values(cache.v_codes, cache.v_scale, cache.v_zero, bits, g, dtype)
    return k, v


def empty_quantized_kv(
    batch: int,
    num_kv_heads: int,
    capacity: int,
    head_dim: int,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype=jnp.bfloat16,
) -> QuantizedKV:
    """An all-zero slab of a static capacity (entries past a sequence's length are ignored)."""
    zeros = jnp.zeros((batch, num_kv_heads, capacity, head_dim), jnp.float32)
    return quantize_kv(zeros, zeros, bits, group_size, scale_dtype)


def write_quantized(cache: QuantizedKV, k: jax.Array, v: jax.Array, start: jax.Array) -> QuantizedKV:
    """Quantizes k, v [B, Hkv, T, D] (T a multiple of G) into tokens [start[b], start[b] + T).

    start: int32[B], each a multiple of G (a traced value, so not checked): a flushed window
    then owns whole packed bytes and whole key groups. Policies call this to move a full
    residual window into the slab.
    """
    chunk = quantize_kv(k, v, cache.bits, cache.group_size, cache.k_scale.dtype)
    per, g = codes_per_byte(cache.bits), cache.group_size

    def one(slab, new, start):  # one sequence: [Hkv, ...] arrays
        offsets = {
            "k_codes": (0, start // per, 0),
            "k_scale": (0, start // g, 0),
            "k_zero": (0, start // g, 0),
            "v_codes": (0, start // per, 0),
            "v_scale": (0, 0, start),
            "v_zero": (0, 0, start),
        }
        return {
            name: jax.lax.dynamic_update_slice(slab[name], new[name].astype(slab[name].dtype), offset)
            for name, offset in offsets.items()
        }

    fields = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    slab = {name: getattr(cache, name) for name in fields}
    new = {name: getattr(chunk, name) for name in fields}
    updated = jax.vmap(one)(slab, new, jnp.asarray(start, jnp.int32))
    return cache.replace(**updated)


def device_bytes(cache: QuantizedKV) -> int:
    """Bytes the slab holds on device (codes and statistics); works on abstract shapes too."""
    leaves = jax.tree_util.tree_leaves(cache)
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in leaves))
