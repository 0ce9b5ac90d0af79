"""Token pruning between layers during prefill: what PyramidInfer and LazyLLM share.

Each layer of the prefill forward scores the tokens it computed by the attention a few of the prompt's
last queries (the observation window) pay them, averaged over all query heads; the next layer computes
only the highest-scoring tokens (`Policy.prune`), as many as a static schedule says (`schedule`, per
layer and prompt length). A pruned token is gone from every later layer of the forward and from its
cache, so both the prefill's compute and the cache shrink with depth.

Static shapes: the model computes, per layer, the most tokens any prompt of the padded length keeps
there (`Policy.prefill_tokens`); each row keeps its own length's count and marks the rest invalid.
Tokens are kept in position order, valid ones first, so a layer's entries fill slots [0, count) in
position order and prefill attends causally in slot order (the blocked path / prefill kernel).
The whole prompt is one chunk (the scores compare every token of the prompt); decoding appends
(PyramidInfer's generation stage compresses the generated entries too: `kvjax.policies.pyramidinfer`).
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import attend, attention_probs, join_query_chunks, split_query_chunks
from kvjax.config import ModelConfig
from kvjax.kv_state import round_capacity, write_entries, write_free_slot
from kvjax.layer_step import Decode
from kvjax.policies.base import Layout, Policy, SegmentSpec

QUERY_BLOCK = 512  # prefill queries attended together (Full's default prefill chunk)
SINK_PRIORITY = float(jnp.finfo(jnp.float32).max)  # above every score, below the window's +inf


@struct.dataclass(frozen=True)
class PruneScores:
    """`KVState.shared` while a pruning policy prefills (None once the prompt is in)."""

    score: jax.Array  # float32[B, T]: the first T_l, the scores of the tokens the last layer computed
    tokens: jax.Array  # int32[L, P + 1]: tokens entering each layer for a prompt of each length 0..P
    window: jax.Array  # int32[P + 1]: the observation window (last queries, always kept) per prompt length


@dataclasses.dataclass(frozen=True)
class PrefillPruning(Policy, abc.ABC):
    """Prunes prompt tokens between layers while prefilling, by the attention of the prompt's last
    `window` queries (weights rising linearly from 1 to `distance_weight` over them, averaged over the
    query heads); the window and the first `sinks` positions are always kept. Decoding appends."""

    sinks = 0  # first positions always kept
    distance_weight = 1.0  # weight of the window's last query (its first has 1)

    @abc.abstractmethod
    def layer_tokens(self, num_layers: int, lengths) -> np.ndarray:
        """int[L, N]: tokens entering each layer for prompts of each of the `lengths` int[N] (row 0: them)."""

    @abc.abstractmethod
    def windows(self, lengths) -> np.ndarray:
        """int[N]: the observation window (the last queries, always kept) of prompts of each length."""

    def most_tokens(self, num_layers: int, prompt_len: int) -> tuple[int, ...]:
        """Per layer, the most tokens a prompt of at most `prompt_len` tokens keeps there (the buffers)."""
        return tuple(int(n) for n in self.layer_tokens(num_layers, np.arange(1, prompt_len + 1)).max(axis=1))

    def prefill_chunk(self, config: ModelConfig, prompt_len: int) -> int:
        return prompt_len

    def prefill_tokens(self, config: ModelConfig, prompt_len: int, chunk: int) -> tuple[int, ...]:
        if chunk < prompt_len:
            raise ValueError(
                f"{type(self).__name__} prunes the whole prompt in one forward; chunked prefill (chunk {chunk} < "
                f"prompt {prompt_len}) is not supported: pass chunk_size=None"
            )
        return self.most_tokens(config.num_layers, prompt_len)

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        heads = tuple(range(config.num_kv_heads))
        most = self.most_tokens(config.num_layers, prompt_len)
        return tuple((SegmentSpec(heads, round_capacity(n + max_new_tokens)),) for n in most)

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype):
        state = super().allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        lengths = np.arange(prompt_len + 1)
        shared = PruneScores(
            score=jnp.zeros((batch, prompt_len), jnp.float32),
            tokens=jnp.asarray(self.layer_tokens(config.num_layers, lengths), jnp.int32),
            window=jnp.asarray(self.windows(lengths), jnp.int32),
        )
        return state.replace(shared=shared)

    def finalize(self, config, state, prompt_len, max_new_tokens):
        return state.replace(shared=None)

    def segment_step(self, ctx, segment, x, phase):
        if isinstance(phase, Decode):
            seg = write_free_slot(segment, x.k, x.v, x.new_pos)
            return attend(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl), seg
        seg = write_entries(segment, x.k, x.v, x.new_pos, jnp.zeros(x.k.shape[:1], jnp.int32))  # slots [0, T_l)
        if ctx.window is not None:  # a sliding window is a span of positions, not of slots
            return attend(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale, ctx.impl), seg
        # Kept tokens sit in position order, valid ones first: causal in positions is causal in slots. Blocks
        # of QUERY_BLOCK queries, each over the slots up to its own (the triangle, as chunked prefill reads it).
        b, t = x.q_pos.shape
        slots = jnp.arange(seg.capacity, dtype=jnp.int32)
        k_slot = jnp.where(seg.pos >= 0, slots, -1)  # [B, Hs, C]
        block = min(QUERY_BLOCK, t)
        padded = -(-t // block) * block  # padding queries (zeros) see every entry; their outputs are dropped
        q = jnp.pad(x.q, ((0, 0), (0, padded - t)) + ((0, 0),) * 3)
        q_slot = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (b, padded))
        chunks = split_query_chunks(block, q, q_slot)  # [N, B, block, ...]

        def one(chunk):
            q, q_slot = chunk
            return attend(q, seg.k, seg.v, k_slot, q_slot, None, ctx.scale, ctx.impl, slot_is_position=True)

        return join_query_chunks(jax.lax.map(one, chunks))[:, :t], seg

    def layer_step(self, ctx, segments, shared, x, phase):
        out, segments = self.step(ctx, segments, x, phase)
        if isinstance(phase, Decode):
            return out, segments, shared
        widest = int(self.windows(np.arange(shared.window.shape[0])).max())  # static: over every prompt length
        score = self.scores(ctx, x, shared.window[phase.prompt_lengths], widest)  # [B, T_l]
        return out, segments, shared.replace(score=pad_to(score, shared.score.shape[1]))

    def scores(self, ctx, x, window: jax.Array, widest: int) -> jax.Array:
        """float32[B, T_l]: attention paid to each of the layer's tokens by the last window[b] valid queries
        of row b (int32[B], at most `widest`), averaged over query heads, weighted 1 .. distance_weight from
        the first query to the last, and averaged over the queries."""
        b, t = x.new_pos.shape
        count = jnp.sum(x.new_pos >= 0, axis=1)  # [B]: valid tokens, the first ones
        j = jnp.arange(widest, dtype=jnp.int32)  # [W]
        at = count[:, None] - window[:, None] + j  # [B, W]
        seen = j < window[:, None]  # [B, W]
        at = jnp.where(seen, at, 0)
        q = jnp.take_along_axis(x.q, at[:, :, None, None, None], axis=1)  # [B, W, K, G, D]
        k_pos = jnp.broadcast_to(x.new_pos[:, None, :], (b, x.num_kv_heads, t))  # [B, K, T]
        q_pos = jnp.take_along_axis(x.q_pos, at, axis=1)  # [B, W]
        probs = attention_probs(q, jnp.swapaxes(x.k, 1, 2), k_pos, q_pos, ctx.window, ctx.scale)  # [B, K, G, W, T]
        per_query = jnp.mean(probs, axis=(1, 2))  # [B, W, T]
        ramp = 1.0 + (self.distance_weight - 1.0) * j / jnp.maximum(window[:, None] - 1, 1)  # [B, W]
        weight = jnp.where(seen, ramp, 0.0) / window[:, None]
        return jnp.einsum("bwt,bw->bt", per_query, weight)

    def prune(self, layer, n, positions, valid, shared, phase):
        """The `n` of the T tokens entering `layer` that it and later layers compute: int32[B, n] indices into
        positions int32[B, T] / valid bool[B, T], bool[B, n] which stay valid, and the new `shared`. Per row,
        the tokens[layer, length] highest-priority ones (the window and sinks first, then by score), valid
        ones first in position order."""
        lengths = phase.prompt_lengths  # [B]
        window = shared.window[lengths][:, None]  # [B, 1]
        score = shared.score[:, : positions.shape[1]]
        score = jnp.where(positions < self.sinks, SINK_PRIORITY, score)
        score = jnp.where(positions >= lengths[:, None] - window, jnp.inf, score)  # the window wins every tie
        priority = jnp.where(valid, score, -jnp.inf)  # [B, T_l]
        top, idx = jax.lax.top_k(priority, n)  # [B, n], highest first
        keep = (jnp.arange(n) < shared.tokens[layer, lengths][:, None]) & (top > -jnp.inf)
        picked = jnp.take_along_axis(positions, idx, axis=1)
        order = jnp.argsort(jnp.where(keep, picked, jnp.iinfo(jnp.int32).max), axis=1, stable=True)
        idx, keep = jnp.take_along_axis(idx, order, axis=1), jnp.take_along_axis(keep, order, axis=1)
        return idx, keep, shared  # the scores are the next layer's to write


def pad_to(x: jax.Array, width: int) -> jax.Array:
    """x [B, T] zero-padded to [B, width] (the prefill chunk's length, a fixed carry shape)."""
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
