"""MiKV (Yang et al., 2024, "No Token Left Behind"): what eviction would drop is kept at low precision.

`base` (H2O by default: accumulated attention plus a recent window) decides, per (layer, sequence,
KV head), which `budget` entries stay at full precision, exactly as it decides what to keep when it
evicts. The entries it would evict are instead demoted: quantized per token (asymmetric min/max over
groups of `group` channels, `bits` bits, codes packed along channels so each token owns its bytes)
and appended to a low-precision store, where they stay. Attention runs over both in one softmax
(the low-precision entries dequantized); the base's running scores follow its high-precision
entries only, so a demoted token never returns. Every token stays visible: with n tokens seen,
the high buffer holds min(n, budget) and the low store n - min(n, budget).

Attention is the jnp path (dequantize, then exact attention); no Pallas kernel reads this layout.
The paper's optional outlier balancing (keys scaled per channel by sqrt(max|q_c| / max|k_c|)) is not
implemented.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend_with_probs, reference_attention
from kvjax.config import ModelConfig
from kvjax.kv_state import (
    EvictionSegment,
    KVState,
    count,
    dropped_by_keep_top,
    keep_top,
    lowest_over_budget,
    round_capacity,
    write_entries,
    write_free_slot,
)
from kvjax.layer_step import Decode
from kvjax.policies.base import Layout, Policy
from kvjax.policies.h2o import H2O
from kvjax.policies.token_eviction import TokenEviction
from pallas_kernels import kv_quant

SCALE_DTYPE = jnp.bfloat16  # the low-precision entries' scale/zero dtype


@struct.dataclass(frozen=True)
class LowPrecisionEntries:
    """Demoted entries of one layer's KV heads, quantized per token; slots [0, count) in demotion order."""

    k_codes: jax.Array  # uint8[B, Hs, C, D * bits / 8]
    k_scale: jax.Array  # [B, Hs, C, D / G]
    k_zero: jax.Array  # [B, Hs, C, D / G]
    v_codes: jax.Array  # uint8[B, Hs, C, D * bits / 8]
    v_scale: jax.Array  # [B, Hs, C, D / G]
    v_zero: jax.Array  # [B, Hs, C, D / G]
    pos: jax.Array  # int32[B, Hs, C]: original positions (-1 empty)
    bits: int = struct.field(pytree_node=False)
    group: int = struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return self.pos.shape[-1]

    def dequantize(self, dtype) -> tuple[jax.Array, jax.Array]:
        """k, v [B, Hs, C, D] in `dtype`."""
        return (
            kv_quant.dequantize_tokens(self.k_codes, self.k_scale, self.k_zero, self.bits, self.group, dtype),
            kv_quant.dequantize_tokens(self.v_codes, self.v_scale, self.v_zero, self.bits, self.group, dtype),
        )


@struct.dataclass(frozen=True)
class MixedSegment:
    """A layer's entries for a set of KV heads: the base's full-precision buffer and the demoted ones."""

    high: EvictionSegment  # the base's segment (budget, scores), full precision
    low: LowPrecisionEntries

    @property
    def heads(self) -> tuple[int, ...]:
        return self.high.heads

    def positions(self) -> jax.Array:
        """int32[B, Hs, Ch + Cl]: every entry's position (-1 empty), full-precision ones first."""
        return jnp.concatenate([self.high.pos, self.low.pos], axis=-1)


def empty_low(batch: int, heads: int, capacity: int, head_dim: int, bits: int, group: int) -> LowPrecisionEntries:
    """A low-precision store with every slot empty."""
    codes = jnp.zeros((batch, heads, capacity, head_dim * bits // 8), jnp.uint8)
    stats = jnp.zeros((batch, heads, capacity, head_dim // group), SCALE_DTYPE)
    return LowPrecisionEntries(
        k_codes=codes,
        k_scale=stats,
        k_zero=stats,
        v_codes=codes,
        v_scale=stats,
        v_zero=stats,
        pos=jnp.full((batch, heads, capacity), -1, jnp.int32),
        bits=bits,
        group=group,
    )


def resize_low(low: LowPrecisionEntries, capacity: int) -> LowPrecisionEntries:
    """The same entries (a valid prefix) in `capacity` slots: trimmed or padded with empty slots."""

    def fit(x, fill=0):
        if x.shape[2] >= capacity:
            return x[:, :, :capacity]
        return jnp.pad(x, ((0, 0), (0, 0), (0, capacity - x.shape[2])) + ((0, 0),) * (x.ndim - 3), constant_values=fill)

    return jax.tree.map(fit, low).replace(pos=fit(low.pos, -1))


def demote(low: LowPrecisionEntries, high: EvictionSegment, dropped: jax.Array, most: int) -> LowPrecisionEntries:
    """Quantizes the high entries flagged in `dropped` bool[B, Hs, Ch] (at most `most` per row) and
    appends them, in position order, after each row's low-precision entries."""
    order = jnp.argsort(jnp.where(dropped, high.pos, jnp.iinfo(jnp.int32).max), axis=-1)[..., :most]  # [B, Hs, M]
    moved = jnp.take_along_axis(dropped, order, axis=-1)  # [B, Hs, M]: a prefix of each row

    def gather(x):  # [B, Hs, Ch, ...] -> [B, Hs, M, ...]
        return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=2)

    k = kv_quant.quantize_tokens(gather(high.k), low.bits, low.group, SCALE_DTYPE)
    v = kv_quant.quantize_tokens(gather(high.v), low.bits, low.group, SCALE_DTYPE)
    new = dict(zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"), k + v))
    new["pos"] = jnp.where(moved, gather(high.pos), -1)
    start = count(low)  # [B, Hs]: the capacity leaves room for `most` more (see MiKV.low_capacity)

    def one(row, add, s):  # one (sequence, head): [C, ...] <- [M, ...] at slot s
        return jax.lax.dynamic_update_slice_in_dim(row, add.astype(row.dtype), s, axis=0)

    return low.replace(**{name: jax.vmap(jax.vmap(one))(getattr(low, name), add, start) for name, add in new.items()})


@dataclasses.dataclass(frozen=True)
class MiKV(Policy):
    """`base` keeps its `budget` entries per KV head at full precision; everything it would evict stays,
    quantized per token to `bits` bits in groups of `group` channels. Nothing is ever dropped."""

    base: TokenEviction = H2O()
    bits: int = 4
    group: int = 32

    def __post_init__(self):
        if not (
            isinstance(self.base, TokenEviction) and self.base.evict_while_prefilling and self.base.evict_while_decoding
        ):
            raise ValueError(
                "MiKV demotes what a token-eviction base evicts while prefilling and decoding (H2O, A2SF, "
                f"VATP, TOVA, StreamingLLM); got {type(self.base).__name__}, which "
                + (
                    "compresses the prompt once"
                    if isinstance(self.base, TokenEviction)
                    else "is not a TokenEviction policy"
                )
            )
        kv_quant.check_bits(self.bits)
        kv_quant.check_group_size(self.group, self.bits)
        if getattr(self.base, "position_shift", False):  # demoted entries keep their own positions
            object.__setattr__(self, "base", dataclasses.replace(self.base, position_shift=False))

    def with_budget(self, tokens):
        """The base policy's budget."""
        base = self.base.with_budget(tokens)
        return None if base is None else dataclasses.replace(self, base=base)

    def low_capacity(self, budget: int, prompt_len: int, max_new_tokens: int, most: int) -> int:
        """Slots for the demoted entries: all tokens beyond the budget, plus room for one more
        demotion of `most` entries (writes never clamp)."""
        return round_capacity(max(prompt_len + max_new_tokens - budget, 0) + most)

    # -- prefill and decode: the base's step, with demotion instead of eviction ---------------------

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        return self.base.layout(config, prompt_len, max_new_tokens, chunk)

    def prefill_chunk(self, config: ModelConfig, prompt_len: int) -> int | None:
        """The base's: demotion follows its eviction."""
        return self.base.prefill_chunk(config, prompt_len)

    def scored(self) -> bool:
        return self.base.scored()

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype) -> KVState:
        """The base's prefill state, each segment beside an empty low-precision store."""
        if config.head_dim % self.group:
            raise ValueError(
                f"MiKV quantizes each token in groups of {self.group} channels, which must divide the head "
                f"dim ({config.head_dim}); pick a smaller group"
            )
        state = self.base.allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)

        def mixed(seg: EvictionSegment) -> MixedSegment:
            most = max(seg.capacity - seg.budget, 0)  # demoted per chunk at most
            capacity = self.low_capacity(seg.budget, prompt_len, 0, most)
            low = empty_low(batch, len(seg.heads), capacity, config.head_dim, self.bits, self.group)
            return MixedSegment(high=seg, low=low)

        return state.replace(layers=tuple(tuple(mixed(s) for s in layer) for layer in state.layers))

    def segment_step(self, ctx, segment, x, phase):
        """Writes the chunk (or token) at full precision, attends over both precisions, then demotes
        what the base would evict: down to the budget after a chunk, one entry per step when decoding."""
        decoding = isinstance(phase, Decode)
        prompt_lengths = None if decoding else phase.prompt_lengths
        high, low = segment.high, segment.low
        if decoding:
            high = write_free_slot(high, x.k, x.v, x.new_pos)
        else:
            high = write_entries(high, x.k, x.v, x.new_pos, count(high))
        k_low, v_low = low.dequantize(high.k.dtype)
        keys = jnp.concatenate([high.k, k_low], axis=2)  # [B, Hs, Ch + Cl, D]
        values = jnp.concatenate([high.v, v_low], axis=2)
        pos = jnp.concatenate([high.pos, low.pos], axis=2)
        if self.base.needs_attention(decoding):
            out, probs = attend_with_probs(x.q, keys, values, pos, x.q_pos, ctx.window, ctx.scale)
            high = high.replace(score=self.base.observe(high, probs[..., : high.capacity], x.new_pos, prompt_lengths))
        else:
            out = reference_attention(x.q, keys, values, pos, x.q_pos, ctx.window, ctx.scale)
        priority = self.base.priority(high)
        if decoding:
            dropped = lowest_over_budget(high, priority, high.budget)
            low = demote(low, high, dropped, 1)
            high = high.replace(pos=jnp.where(dropped, -1, high.pos))
        elif high.budget < high.capacity:
            low = demote(low, high, dropped_by_keep_top(high, priority, high.budget), high.capacity - high.budget)
            high = keep_top(high, priority, high.budget, high.capacity)
        return out, MixedSegment(high=high, low=low)

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """The base's decode-time high buffers (nothing is over budget after prefill, so nothing is
        lost), the low stores resized to hold every later demotion."""
        highs = state.replace(layers=tuple(tuple(s.high for s in layer) for layer in state.layers))
        highs = self.base.finalize(config, highs, prompt_len, max_new_tokens)
        layers = tuple(
            tuple(
                MixedSegment(high=h, low=resize_low(s.low, self.low_capacity(h.budget, prompt_len, max_new_tokens, 1)))
                for h, s in zip(high_layer, layer)
            )
            for high_layer, layer in zip(highs.layers, state.layers)
        )
        return highs.replace(layers=layers)
