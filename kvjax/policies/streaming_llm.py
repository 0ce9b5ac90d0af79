"""StreamingLLM (Xiao et al., 2023): attention sinks plus a window of the most recent tokens.

With `position_shift` (the default, as the authors' `enable_streaming_llm`, mit-han-lab/streaming-llm
pos_shift/modify_llama.py) the cache stores keys before RoPE and every step rotates them to their
positions *in the cache* (0, 1, ... in token order) and the query to its own, so RoPE never sees a
position beyond the cache's size: the model streams far past its trained context (kvjax's context
check then allows any length: `position_limit`). `position_shift=False` keeps keys rotated at their
original positions (kvpress's StreamingLLMPress, and the streaming heads of DuoAttention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend
from kvjax.config import RopeConfig
from kvjax.kv_state import EvictionSegment, KVState, count, evict_lowest, keep_top, write_entries, write_free_slot
from kvjax.layer_step import Decode
from kvjax.policies.token_eviction import TokenEviction
from kvjax.rope import rotate_at


@struct.dataclass(frozen=True)
class UnrotatedSegment(EvictionSegment):
    """An `EvictionSegment` whose keys are stored before RoPE (`rope` rotates them when attended)."""

    rope: RopeConfig | None = struct.field(pytree_node=False, default=None)


def unrotated(state: KVState, rope: RopeConfig) -> KVState:
    """`state` with each `EvictionSegment` an `UnrotatedSegment` (its keys to be stored before RoPE)."""

    def convert(s: EvictionSegment) -> UnrotatedSegment:
        return UnrotatedSegment(k=s.k, v=s.v, pos=s.pos, heads=s.heads, budget=s.budget, score=s.score, rope=rope)

    return state.replace(layers=tuple(tuple(convert(s) for s in layer) for layer in state.layers))


def cache_positions(pos: jax.Array) -> jax.Array:
    """int32[B, Hs, C]: each held entry's rank in token order within its row (its position in the
    cache, 0 for the oldest), from the original positions pos int32[B, Hs, C] (-1 empty: rank unused)."""
    key = jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(key, axis=-1)
    return jnp.argsort(order, axis=-1).astype(jnp.int32)


def rotate_in_cache(segment: UnrotatedSegment, q_raw: jax.Array, q_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q [B, T, Hs, G, D], k [B, Hs, C, D]) rotated at their positions in the cache: each held key at
    its rank, each query at the number of held entries before it (its own key's rank once written)."""
    b, hs, c, d = segment.k.shape
    t, g = q_raw.shape[1], q_raw.shape[3]
    k_rank = cache_positions(segment.pos)  # [B, Hs, C]
    held = segment.pos >= 0
    q_rank = jnp.sum(held[:, :, None, :] & (segment.pos[:, :, None, :] < q_pos[:, None, :, None]), axis=-1)
    seq_len = jnp.max(jnp.sum(held, axis=-1)) + t  # the rotation's sequence length (LongRoPE's choice)
    rows = lambda x: x.reshape(b * hs, *x.shape[2:])  # noqa: E731  heads as batch rows
    k = rotate_at(segment.rope, d, rows(segment.k)[:, :, None, :], rows(k_rank), seq_len)  # [B*Hs, C, 1, D]
    q = jnp.moveaxis(q_raw, 2, 1).reshape(b * hs, t, g, d)  # [B*Hs, T, G, D]
    q = rotate_at(segment.rope, d, q, rows(q_rank.astype(jnp.int32)), seq_len)
    q = jnp.moveaxis(q.reshape(b, hs, t, g, d), 1, 2)  # [B, T, Hs, G, D]
    return q.astype(q_raw.dtype), k.reshape(b, hs, c, d).astype(segment.k.dtype)


@dataclasses.dataclass(frozen=True)
class StreamingLLM(TokenEviction):
    """Keeps the first `sink` tokens and the most recent `window`; evicts as it prefills and decodes.
    With `position_shift` (the authors'), RoPE positions are positions in the cache."""

    sink: int = 4
    window: int = 1020
    position_shift: bool = True

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"StreamingLLM needs sink >= 0 and window >= 1; got {self.sink}, {self.window}")

    def with_budget(self, tokens):
        """The sink stays; the window takes the rest."""
        super().with_budget(tokens)
        if tokens <= self.sink:
            raise ValueError(f"StreamingLLM: a budget of {tokens} tokens must exceed the sink ({self.sink})")
        return dataclasses.replace(self, window=tokens - self.sink)

    def budget(self, config, layer):
        return self.sink + self.window

    def priority(self, segment):
        recency = segment.pos.astype(jnp.float32)  # newer is better
        return jnp.where(segment.pos < self.sink, jnp.inf, recency)

    def position_limit(self, chunk: int) -> int | None:
        """With `position_shift`, RoPE positions never reach the cache's size, budget + one chunk."""
        return self.sink + self.window + chunk if self.position_shift else None

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype) -> KVState:
        state = super().allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        return unrotated(state, config.rope) if self.position_shift else state

    def segment_step(self, ctx, segment, x, phase):
        """Without `position_shift`, TokenEviction's step. With it: the step's keys are stored before RoPE,
        the held keys and the queries rotated at their positions in the cache, then eviction as usual."""
        if not self.position_shift:
            return super().segment_step(ctx, segment, x, phase)
        decoding = isinstance(phase, Decode)
        if decoding:
            seg = write_free_slot(segment, x.k_raw, x.v, x.new_pos)
        else:
            seg = write_entries(segment, x.k_raw, x.v, x.new_pos, count(segment))
        q, k = rotate_in_cache(seg, x.q_raw, x.q_pos)
        whole = not decoding and phase.whole_prompt  # the prompt in one chunk: cache positions are positions
        out = attend(q, k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl, slot_is_position=whole)
        if decoding:
            seg = evict_lowest(seg, self.priority(seg), seg.budget)
        elif seg.budget < seg.capacity:
            seg = keep_top(seg, self.priority(seg), seg.budget, seg.capacity)
        return out, seg
