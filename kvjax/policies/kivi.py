"""KIVI: keys quantized per channel, values per token, to 4 or 2 bits; the recent tokens stay exact.

Every layer holds one `QuantizedSegment` over all KV heads: a packed slab of the oldest tokens and a
full-precision window of the newest. Which tokens stay full precision is a function of a sequence's
length L alone (the same after chunked prefill, one-shot prefill or decode):

    slab    = positions [0, Q),   Q = G * floor(max(L - R, 0) / G)
    window  = positions [Q, L),   i.e. the last R to R + G - 1 tokens once L >= R (all of them before)

Keys are quantized per channel over each group of G tokens, values per token over each group of G
channels (asymmetric min/max, `pallas_kernels.kv_quant`). Where the paper flushes R keys at once and
lets values leave one by one, this layout moves both in groups of G as soon as G tokens are older
than the last R, so at least R tokens are always exact and both share one slab length.

Attention: a prefill chunk attends to the dequantized slab, the window and itself (its own tokens at
full precision), then its tokens join the window and whole groups flush. By default (`prefill_chunk`)
the whole prompt is one chunk where its attention weights would fit in `ONE_CHUNK_BYTES`, as the
authors prefill (the prompt attends at full precision, then is quantized), so the prefill is Full's and
can share its forward (`prefills_as_full`); longer prompts run 512-token chunks, each attending to the
earlier ones dequantized. A decode token is appended
to the window, attends through the quantized decode kernel entry (slab + window), and a group
flushes when the window reaches R + G. Sliding-window layers are supported by the jnp reference path
(tokens stay stored; the window only masks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import attend, attend_quantized
from kvjax.config import ModelConfig
from kvjax.kv_state import KVState, write_entries
from kvjax.layer_step import Prefill
from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.policies.token_eviction import ONE_CHUNK_BYTES
from kvjax.quantized_segment import QuantizedSegment, empty_quantized_segment, flush_window, grow_window
from pallas_kernels import kv_quant

SLAB_ALIGN = 128  # slab capacity granularity in tokens: whole power-of-two kernel blocks (>= 128)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class KIVI(Policy):
    """Asymmetric `bits`-bit KV quantization in groups of `group`; the last `residual` tokens stay exact."""

    bits: int = 4
    group: int = 32
    residual: int = 128

    def __post_init__(self):
        kv_quant.check_bits(self.bits)
        if not _is_int(self.group) or self.group < 1 or self.group & (self.group - 1):
            raise ValueError(f"KIVI group must be a positive power of two, got {self.group!r}")
        kv_quant.check_group_size(self.group, self.bits)
        if not _is_int(self.residual) or self.residual < 0:
            raise ValueError(f"KIVI residual must be a non-negative int, got {self.residual!r}")

    def capacities(self, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
        """(slab, window) capacities in tokens for `prompt_len + max_new_tokens` positions.

        The slab holds at most G * floor((total - R) / G) tokens, rounded up to whole kernel blocks
        (a multiple of 128 tokens); the window at most R + G (R + G - 1 between steps, one more while
        a decode token waits for its flush), or the total when that is smaller.
        """
        total = prompt_len + max_new_tokens
        quantized = self.group * (max(total - self.residual, 0) // self.group)
        align = max(self.group, SLAB_ALIGN)
        return -(-quantized // align) * align, min(self.residual + self.group, total)

    def prefill_chunk(self, config: ModelConfig, prompt_len: int) -> int | None:
        """The whole prompt while one sequence's attention weights over it, heads x T x T float32 per layer,
        fit in ONE_CHUNK_BYTES (the rule evicting policies follow); else the default chunks."""
        return prompt_len if 4 * config.num_heads * prompt_len * prompt_len <= ONE_CHUNK_BYTES else None

    def prefills_as_full(self, config: ModelConfig, prompt_len: int, chunk: int) -> bool:
        """In one chunk holding the prompt, where that is its own chunk: nothing is quantized before it attends."""
        return chunk >= prompt_len and self.prefill_chunk(config, prompt_len) is not None

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """One segment per layer over all KV heads; its capacity counts slab and window tokens."""
        heads = tuple(range(config.num_kv_heads))
        return ((SegmentSpec(heads, sum(self.capacities(prompt_len, max_new_tokens))),),) * config.num_layers

    def allocate(
        self, config: ModelConfig, batch: int, prompt_len: int, max_new_tokens: int, chunk: int, dtype
    ) -> KVState:
        """An empty state: per layer a zero slab and an empty window (chunks need no extra room)."""
        if config.head_dim % self.group:
            raise ValueError(
                f"KIVI quantizes values in groups of {self.group} channels, which must divide the "
                f"head dim ({config.head_dim}); pick a smaller group"
            )
        slab, window = self.capacities(prompt_len, max_new_tokens)
        heads = tuple(range(config.num_kv_heads))
        layer = empty_quantized_segment(batch, heads, slab, window, config.head_dim, self.bits, self.group, dtype)
        return KVState(layers=((layer,),) * config.num_layers, length=jnp.zeros((batch,), jnp.int32))

    def segment_step(self, ctx, segment: QuantizedSegment, x, phase) -> tuple[jax.Array, QuantizedSegment]:
        """Appends the chunk (or token) to the window, attends over slab + window, flushes groups."""
        t, capacity = x.q.shape[1], segment.window.capacity
        held_max = min(self.residual + self.group - 1, capacity)  # window tokens between steps
        seg = grow_window(segment, held_max + t - capacity)  # room for T more without clamping
        seg = seg.replace(window=write_entries(seg.window, x.k, x.v, x.new_pos, seg.window_length()))
        w = seg.window
        if isinstance(phase, Prefill) and phase.whole_prompt:  # nothing quantized yet: slot = position in the window
            out = attend(x.q, w.k, w.v, w.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl, slot_is_position=True)
        else:
            out = attend_quantized(
                x.q, seg.slab, seg.slab_length, w.k, w.v, w.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl
            )
        return out, flush_window(seg, self.residual, capacity)
