"""Quantized pruning ("More tokens, lower precision", Zhang et al., 2024): evict, then quantize what is kept.

At equal memory, keeping ~3-4x more tokens at 4 bits beats fewer tokens at 16 bits. `QuantizedPruning(base,
bits, group, residual)` composes a prompt-compressing `TokenEviction` base (SnapKV, PyramidKV, Knorm) with
KIVI's quantization: prefill runs the base unchanged; finalize keeps the base's n entries and packs the oldest
G * floor(max(n - R, 0) / G) of them into a KIVI slab (keys per channel, values per token, each entry's
original position kept), the rest in a full-precision window; decoding appends to the window and flushes
whole groups of G, evicting nothing. Bases that evict while decoding, or keep head-wise budgets, are refused
at construction. `tokens_for_memory` and `QuantizedPruning.for_memory` turn a memory budget into the
(tokens, bits) trade; the byte formula they solve is in docs/quantized_pruning.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.attention import attend_quantized, reference_attention
from kvjax.config import ModelConfig
from kvjax.kv_state import EvictionSegment, KVState, kv_bytes, round_capacity, write_entries
from kvjax.layer_step import Prefill
from kvjax.policies.base import Layout, Policy
from kvjax.policies.kivi import KIVI
from kvjax.policies.token_eviction import TokenEviction
from kvjax.quantized_segment import QuantizedSegment, empty_quantized_segment, flush_window, grow_window
from pallas_kernels import kv_quant

SCALE_DTYPE = jnp.bfloat16  # the slab's scale/zero dtype (empty_quantized_segment's default)


@dataclasses.dataclass(frozen=True)
class QuantizedPruning(Policy):
    """`base` chooses the kept prompt tokens; they are stored at `bits` bits in KIVI groups of
    `group`, except the last `residual` or so, which stay exact. Decoding appends, never evicts."""

    base: TokenEviction
    bits: int = 4
    group: int = 32
    residual: int = 128

    def __post_init__(self):
        if not isinstance(self.base, TokenEviction) or self.base.evict_while_decoding:
            raise ValueError(
                "QuantizedPruning supports token-eviction bases that compress the prompt once "
                "(TokenEviction with evict_while_decoding=False: SnapKV, PyramidKV, Knorm); got "
                f"{type(self.base).__name__}, which "
                + (
                    "evicts while decoding (entries of packed groups cannot be evicted one by one)"
                    if isinstance(self.base, TokenEviction)
                    else "is not a TokenEviction policy"
                )
            )
        if getattr(self.base, "per_query_head", False):
            raise ValueError(
                "QuantizedPruning quantizes one entry set per KV head; its base cannot select per query head"
            )
        self.kivi()  # validates bits, group and residual exactly as KIVI does

    def with_budget(self, tokens):
        """The base policy's budget."""
        base = self.base.with_budget(tokens)
        return None if base is None else dataclasses.replace(self, base=base)

    def kivi(self) -> KIVI:
        """The KIVI policy whose grouping, residual rule and capacities the kept tokens follow."""
        return KIVI(self.bits, self.group, self.residual)

    # -- prefill: the base, unchanged ----------------------------------------------------------

    @property
    def packed_tail(self):
        """The base's: it prefills alone; the quantization happens in `finalize`."""
        return self.base.packed_tail

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        return self.base.layout(config, prompt_len, max_new_tokens, chunk)

    def scored(self) -> bool:
        return self.base.scored()

    def allocate(
        self, config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, chunk: int, dtype
    ) -> KVState:
        """The base's prefill state (checked early: values are grouped over G channels)."""
        if config.head_dim % self.group:
            raise ValueError(
                f"QuantizedPruning quantizes values in groups of {self.group} channels, which must "
                f"divide the head dim ({config.head_dim}); pick a smaller group"
            )
        return self.base.allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """The base's compressed prompt, its oldest whole groups of G kept entries quantized."""
        state = self.base.finalize(config, state, prompt_len, max_new_tokens)
        layers = tuple(
            tuple(self._quantize_kept(seg, prompt_len, max_new_tokens) for seg in layer) for layer in state.layers
        )
        return state.replace(layers=layers)

    def _quantize_kept(self, seg: EvictionSegment, prompt_len: int, max_new_tokens: int) -> QuantizedSegment:
        """A finalized base segment (kept entries a valid prefix in position order, the same count
        for every head) as a slab of its oldest whole groups beyond the last R, plus the window."""
        kept = min(seg.budget, prompt_len)
        slab_capacity, window_capacity = self.kivi().capacities(kept, max_new_tokens)
        batch, heads, _, head_dim = seg.k.shape
        empty = empty_quantized_segment(
            batch, seg.heads, slab_capacity, 0, head_dim, self.bits, self.group, seg.k.dtype, SCALE_DTYPE
        )
        everything = QuantizedSegment(
            slab=empty.slab,
            slab_length=empty.slab_length,
            window=seg.plain(),  # all kept entries, exact, for now
            slab_pos=jnp.full((batch, heads, slab_capacity), -1, jnp.int32),
        )
        return flush_window(everything, self.residual, window_capacity)

    # -- decode: KIVI's append and flush over the kept tokens ------------------------------------

    def step(self, ctx, segments, x, phase):
        """Prefill chunks go to the base; a decode token joins each segment's window, attends, and flushes."""
        if isinstance(phase, Prefill):
            return self.base.step(ctx, segments, x, phase)
        return super().step(ctx, segments, x, phase)

    def segment_step(self, ctx, segment, x, phase):
        t, capacity = x.q.shape[1], segment.window.capacity
        held_max = min(self.residual + self.group - 1, capacity)  # window tokens between steps
        seg = grow_window(segment, held_max + t - capacity)
        seg = seg.replace(window=write_entries(seg.window, x.k, x.v, x.new_pos, seg.window_length()))
        w = seg.window
        if ctx.window is None:  # every slab entry is in the past: slab_length alone masks it
            out = attend_quantized(x.q, seg.slab, seg.slab_length, w.k, w.v, w.pos, x.q_pos, None, ctx.scale, ctx.impl)
        else:  # sliding-window layers mask by the recorded positions
            out = attend_dequantized(x.q, seg, x.q_pos, ctx.window, ctx.scale)
        return out, flush_window(seg, self.residual, capacity)

    # -- memory -----------------------------------------------------------------------------------

    def decode_state_bytes(
        self, config: ModelConfig, prompt_len: int, max_new_tokens: int = 0, dtype=jnp.bfloat16
    ) -> int:
        """Bytes per sequence of the state decoding starts from (`decode_state_bytes` of this policy)."""
        return decode_state_bytes(self, config, prompt_len, max_new_tokens, dtype)

    @classmethod
    def for_memory(
        cls,
        base: Callable[[int], TokenEviction],
        memory_fraction: float,
        bits: int = 4,
        *,
        config: ModelConfig,
        prompt_len: int,
        max_new_tokens: int = 0,
        dtype=jnp.bfloat16,
        group: int = 32,
        residual: int = 128,
    ) -> QuantizedPruning:
        """The policy over `base(n)` (a class or factory taking the token budget) with the largest n
        whose decode state fits `memory_fraction` of Full's bytes for the same prompt and new tokens.

        n starts from `tokens_for_memory` (uniform budgets) and shrinks, by bisection over the real
        layout's abstract bytes, until the state fits (only bases with non-uniform budgets need it).
        """
        memory = memory_fraction * full_state_bytes(config, prompt_len, max_new_tokens, dtype)
        n = tokens_for_memory(
            config,
            memory,
            bits=bits,
            prompt_len=prompt_len,
            max_new_tokens=max_new_tokens,
            group=group,
            residual=residual,
            dtype=dtype,
        )

        def make(n: int) -> QuantizedPruning:
            try:
                pruned = base(n)
            except ValueError as e:
                raise ValueError(
                    f"{memory_fraction} of Full's memory fits {n} tokens per head at "
                    f"{bits} bits, which the base rejects: {e}"
                ) from e
            return cls(pruned, bits, group, residual)

        def fits(n: int) -> bool:
            return decode_state_bytes(make(n), config, prompt_len, max_new_tokens, dtype) <= memory

        if not fits(n):
            lo, hi = 0, n  # fits(lo) (or lo == 0: nothing fits), not fits(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            if lo == 0:
                raise ValueError(f"{memory_fraction} of Full's memory holds no token per head with {base}")
            n = lo
        return make(n)


def decode_state_bytes(
    policy: Policy, config: ModelConfig, prompt_len: int, max_new_tokens: int = 0, dtype=jnp.bfloat16
) -> int:
    """Bytes per sequence of the state any policy starts decoding from, measured by `kv_bytes` on
    abstract shapes (exact for any layout, e.g. PyramidKV's per-layer budgets; nothing allocated)."""

    def build():
        state = policy.allocate(config, 1, prompt_len, max_new_tokens, prompt_len, dtype)
        return policy.finalize(config, state, prompt_len, max_new_tokens)

    return kv_bytes(jax.eval_shape(build))


def attend_dequantized(
    q: jax.Array, seg: QuantizedSegment, q_pos: jax.Array, window: int | None, scale: float
) -> jax.Array:
    """Exact attention over the dequantized slab (masked by its recorded positions) and the window.

    q: [B, T, Hs, G, D]; returns [B, T, Hs, G, D].
    """
    w = seg.window
    k_slab, v_slab = kv_quant.dequantize_kv(seg.slab, w.k.dtype)  # [B, Hs, Cq, D] each
    k = jnp.concatenate([k_slab, w.k], axis=2)  # [B, Hs, Cq + W, D]
    v = jnp.concatenate([v_slab, w.v], axis=2)  # [B, Hs, Cq + W, D]
    return reference_attention(q, k, v, seg.positions(), q_pos, window, scale)


# -- the (tokens, bits) trade ----------------------------------------------------------------------


def full_state_bytes(config: ModelConfig, prompt_len: int, max_new_tokens: int = 0, dtype=jnp.bfloat16) -> int:
    """Bytes per sequence of Full's state for `prompt_len + max_new_tokens` positions:
    L * K * round16(P + N) * (2 * D * e + 4) + 4 (k, v, positions; `KVState.length`)."""
    slots = round_capacity(prompt_len + max_new_tokens)
    item = np.dtype(dtype).itemsize
    return config.num_layers * config.num_kv_heads * slots * (2 * config.head_dim * item + 4) + 4


def pruned_state_bytes(
    config: ModelConfig,
    budget: int,
    bits: int | None,
    prompt_len: int,
    max_new_tokens: int = 0,
    *,
    group: int = 32,
    residual: int = 128,
    dtype=jnp.bfloat16,
    scored: bool = False,
) -> int:
    """Bytes per sequence of the decode state keeping `budget` prompt tokens per (layer, KV head).

    bits 4 or 2: `QuantizedPruning` (the formula in the module docstring). bits None (or 16): the base
    alone at full precision in `dtype` (a prompt-compressing TokenEviction state: round16(n + N)
    slots of k, v, int32 position, plus a float32 score when the base is `scored`, as SnapKV is).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token per head; got {budget}")
    kept, d, e = min(budget, prompt_len), config.head_dim, np.dtype(dtype).itemsize
    if bits is None or bits == 16:
        per_head = round_capacity(kept + max_new_tokens) * (2 * d * e + 4 + 4 * scored)
        return config.num_layers * config.num_kv_heads * per_head + 4
    slab, window = KIVI(bits, group, residual).capacities(kept, max_new_tokens)
    s = np.dtype(SCALE_DTYPE).itemsize
    per_slab_token = d * bits // 4 + 4 * s * d // group + 4  # codes, scale/zero of k and v, position
    per_head = slab * per_slab_token + window * (2 * d * e + 4)
    return config.num_layers * (config.num_kv_heads * per_head + 4) + 4


def tokens_for_memory(
    config: ModelConfig,
    memory_bytes_per_sequence: float | None = None,
    *,
    ratio_of_full: float | None = None,
    bits: int | None = 4,
    prompt_len: int,
    max_new_tokens: int = 0,
    group: int = 32,
    residual: int = 128,
    dtype=jnp.bfloat16,
    scored: bool = False,
) -> int:
    """The largest token budget per (layer, KV head), at most `prompt_len`, whose decode state
    (`pruned_state_bytes`) fits the memory: bytes per sequence, or a ratio of Full's bytes.

    bits None (or 16) sizes the unquantized base in `dtype` instead (the 16-bit side of the trade).
    """
    if (memory_bytes_per_sequence is None) == (ratio_of_full is None):
        raise ValueError("give exactly one of memory_bytes_per_sequence and ratio_of_full")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1; got {prompt_len}")
    memory = memory_bytes_per_sequence
    if ratio_of_full is not None:
        memory = ratio_of_full * full_state_bytes(config, prompt_len, max_new_tokens, dtype)

    def size(n: int) -> int:
        return pruned_state_bytes(
            config,
            n,
            bits,
            prompt_len,
            max_new_tokens,
            group=group,
            residual=residual,
            dtype=dtype,
            scored=scored,
        )

    if size(1) > memory:
        raise ValueError(
            f"{memory:.0f} bytes per sequence hold no token per head at bits={bits}: "
            f"one token takes {size(1)} (with the full-precision window and new tokens)"
        )
    lo, hi = 1, prompt_len  # size(lo) fits; bytes never decrease with the budget
    if size(hi) <= memory:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= memory else (lo, mid)
    return lo
