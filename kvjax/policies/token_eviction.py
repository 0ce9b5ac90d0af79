"""Token eviction by a per-entry priority: the mechanism StreamingLLM, H2O, SnapKV and kin share.

A subclass says how many tokens a layer keeps (`budget`), how attention updates each entry's
running score (`observe`), and what to keep (`priority`). Budgets are buffer sizes:
- evicting while prefilling: capacity budget + chunk (at most the prompt); after each chunk the top
  `budget` survive;
- compressing at the end of the prompt: capacity = prompt, then the top `budget` survive;
- decoding: capacity budget + 1 (evict one per token) or budget + max_new_tokens (append only),
  rounded up to a multiple of 16 slots so the Pallas decode kernel can tile it.
A budget at least as large as the prompt keeps the whole prompt (the policy then equals Full
until decoding fills the budget); it never raises.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import KEY_BLOCK, attend, attend_with_probs, attention_probs, causal_blocks, causal_votes
from kvjax.config import ModelConfig
from kvjax.kv_state import (
    EvictionSegment,
    KVSegment,
    KVState,
    count,
    evict_lowest,
    keep_top,
    round_capacity,
    write_entries,
    write_free_slot,
)
from kvjax.layer_step import Decode
from kvjax.policies.base import Layout, Policy, SegmentSpec

ONE_CHUNK_BYTES = 1 << 30  # attention weights of one prefill chunk, per layer, that chunk_size=None allows


def query_votes(probs: jax.Array, weights: jax.Array) -> jax.Array:
    """float32[B, K, C]: the attention each entry receives, summed over the step's queries with `weights`
    and averaged over each KV head's query group.

    probs: [B, K, G, T, C]; weights: float32[B, T] (0 for padding and for queries that do not vote). The
    queries are contracted first, as a dot, and the small [B, K, G, C] averaged after: XLA:CPU ran a
    reduction over G of the whole [B, K, G, T, C] ten times slower, a third of SnapKV's 4K prefill.
    """
    return jnp.mean(jnp.einsum("bkgtc,bt->bkgc", probs, weights.astype(probs.dtype)), axis=2)


def newest(segment: KVSegment) -> jax.Array:
    """int32[B, Hs, 1]: the latest position each row holds."""
    return jnp.max(segment.pos, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class TokenEviction(Policy, abc.ABC):
    """Keeps, per (layer, sequence, KV head), the `budget` entries of highest priority. Its segments are
    `EvictionSegment`s, with a score buffer when `scored()`."""

    evict_while_prefilling = True  # False: score the whole prompt, compress once at its end
    evict_while_decoding = True  # False: decoding appends without eviction (prompt compression only)

    @abc.abstractmethod
    def budget(self, config: ModelConfig, layer: int) -> int:
        """Tokens kept per KV head in `layer`."""

    @abc.abstractmethod
    def priority(self, segment: EvictionSegment) -> jax.Array:
        """float32[B, Hs, C]: higher is kept; +inf is never evicted."""

    def observe(
        self, segment: EvictionSegment, probs: jax.Array, new_pos: jax.Array, prompt_lengths
    ) -> jax.Array | None:
        """The segment's new score buffer after a step whose attention weights are `probs` [B, Hs, G, T, C]:
        by default `observe_votes` of the weights summed with `vote_weights` (unchanged without them)."""
        weights = self.vote_weights(new_pos, prompt_lengths)
        if weights is None:
            return segment.score
        return self.observe_votes(segment, query_votes(probs, weights), new_pos, prompt_lengths)

    def vote_weights(self, new_pos: jax.Array, prompt_lengths) -> jax.Array | None:
        """float32[B, T]: how much each query's attention counts in an entry's score, for policies whose score
        takes the attention summed over queries (H2O, SnapKV, A2SF), or None. Such a score needs no
        [T, C] weights: a whole-prompt chunk sums them block by block (`causal_votes`)."""
        return None

    def observe_votes(self, segment: EvictionSegment, votes: jax.Array, new_pos: jax.Array, prompt_lengths):
        """The new score buffer from votes float32[B, Hs, C] (`query_votes` with `vote_weights`): added."""
        return segment.score + votes

    def needs_attention(self, decoding: bool) -> bool:
        """Whether `observe` reads attention weights in this phase (else the plain path runs)."""
        return self.scored()

    def observed_queries(self, q_pos: jax.Array, new_pos: jax.Array, prompt_lengths: jax.Array) -> jax.Array | None:
        """int32[B, W]: the chunk indices of the only prefill queries whose weights `observe` reads (-1:
        none), or None for all of them. Naming them lets the chunk attend by the plain path (a kernel on
        an accelerator) and keeps the weights W x C instead of T x C: SnapKV's window, TOVA's last query."""
        return None

    def prefill_chunk(self, config: ModelConfig, prompt_len: int) -> int | None:
        """For chunk_size=None. A policy that evicts as it prefills sees the whole prompt before it evicts
        in its paper (H2O, A2SF, VATP and TOVA score the prompt's attention, StreamingLLM keeps its window),
        which one chunk reproduces; eviction after every 512-token chunk departs from it (TOVA keeps half
        another set at chunk 128). One chunk costs, for a policy that reads every query's weights, heads x T x
        (budget + T) float32 per sequence and layer (summed votes need far less: `causal_votes`), and the rule
        holds for all: beyond ONE_CHUNK_BYTES the default chunks run instead. Prompt compressors
        (SnapKV, ...) score the same whatever the chunk, so they keep the default."""
        if not self.evict_while_prefilling:
            return None
        budget = max(self.budget(config, layer) for layer in range(config.num_layers))
        weights = 4 * config.num_heads * prompt_len * (min(budget, prompt_len) + prompt_len)
        return prompt_len if weights <= ONE_CHUNK_BYTES else None

    def prefills_as_full(self, config: ModelConfig, prompt_len: int, chunk: int) -> bool:
        """A prompt compressor always (it attends to the whole prompt, then compresses, whatever the chunk);
        a policy that evicts as it prefills only in one chunk holding the prompt, where that is its own
        chunk: it evicts after attending."""
        if not self.evict_while_prefilling:
            return True
        return chunk >= prompt_len and self.prefill_chunk(config, prompt_len) is not None

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        heads = tuple(range(config.num_kv_heads))
        layers = []
        for layer in range(config.num_layers):
            budget = self.budget(config, layer)
            if budget < 1:
                raise ValueError(f"{type(self).__name__}: layer {layer} budget must be >= 1; got {budget}")
            evicting = self.evict_while_prefilling and budget < prompt_len
            layers.append((SegmentSpec(heads, min(budget + chunk, prompt_len) if evicting else prompt_len, budget),))
        return tuple(layers)

    def segment_step(self, ctx, segment, x, phase):
        decoding = isinstance(phase, Decode)
        prompt_lengths = None if decoding else phase.prompt_lengths
        if decoding:
            seg = write_free_slot(segment, x.k, x.v, x.new_pos)
        else:
            seg = write_entries(segment, x.k, x.v, x.new_pos, count(segment))
        evicting = not decoding and self.evict_while_prefilling and seg.budget < seg.capacity
        observing = self.needs_attention(decoding)
        picked = None if decoding or not observing else self.observed_queries(x.q_pos, x.new_pos, prompt_lengths)
        # A prefill that evicts nothing yet, or whose one chunk is the whole prompt, holds the prompt at
        # slot = position while it attends (the kernel's layout).
        in_place = not decoding and (not evicting or phase.whole_prompt)
        weights = None if decoding or picked is not None else self.vote_weights(x.new_pos, prompt_lengths)
        if observing and weights is not None and in_place and ctx.window is None:  # summed block by block
            block = min(KEY_BLOCK, seg.capacity)
            out, lse = causal_blocks(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.scale, block, with_lse=True)
            votes = causal_votes(x.q, seg.k, seg.pos, x.q_pos, lse, weights, ctx.scale, block)
            seg = seg.replace(score=self.observe_votes(seg, votes, x.new_pos, prompt_lengths))
        elif observing and picked is None:  # every query's weights
            out, probs = attend_with_probs(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale)
            seg = seg.replace(score=self.observe(seg, probs, x.new_pos, prompt_lengths))
        else:
            out = attend(
                x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl, slot_is_position=in_place
            )
        if picked is not None:  # the picked queries' weights only
            at = jnp.maximum(picked, 0)  # [B, W]
            q_obs = jnp.take_along_axis(x.q, at[:, :, None, None, None], axis=1)  # [B, W, Hs, G, D]
            pos_obs = jnp.take_along_axis(x.q_pos, at, axis=1)  # [B, W]
            probs = attention_probs(q_obs, seg.k, seg.pos, pos_obs, ctx.window, ctx.scale)  # [B, Hs, G, W, C]
            seen = jnp.where(picked >= 0, jnp.take_along_axis(x.new_pos, at, axis=1), -1)  # [B, W]
            seg = seg.replace(score=self.observe(seg, probs, seen, prompt_lengths))
        if decoding and self.evict_while_decoding:
            seg = evict_lowest(seg, self.priority(seg), seg.budget)
        elif evicting:
            seg = keep_top(seg, self.priority(seg), seg.budget, seg.capacity)
        return out, seg

    def decode_room(self, config: ModelConfig, prompt_len: int, max_new_tokens: int) -> int | None:
        """Unbounded when every layer evicts while decoding into a buffer of budget + 1 slots (`finalize`);
        a budget that covers the prompt and the reserved tokens leaves exactly that reserve."""
        if self.evict_while_decoding and all(
            self.budget(config, layer) < prompt_len + max_new_tokens for layer in range(config.num_layers)
        ):
            return None
        return max_new_tokens

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Compresses the prompt to each segment's budget and resizes buffers for decoding."""

        def resize(seg: EvictionSegment) -> EvictionSegment:
            if self.evict_while_decoding:  # one spare slot for each arriving token
                capacity = min(seg.budget, prompt_len + max_new_tokens) + 1
            else:  # prompt compressed once; decoding appends
                capacity = min(seg.budget, prompt_len) + max_new_tokens
            return keep_top(seg, self.priority(seg), seg.budget, round_capacity(capacity))

        layers = tuple(tuple(resize(seg) for seg in layer) for layer in state.layers)
        return state.replace(layers=layers)
