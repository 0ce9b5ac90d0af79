"""PyramidInfer (Yang et al., 2024): layer by layer, the cache keeps the context the recent tokens attend to.

The rules of the authors' code (mutonix/pyramidinfer, `models/modeling_llama_pyramidinfer.py`, defaults from
`configs/llama2_7b.json`), for a prompt of n tokens and L layers, with r(l, d) = (1 - d) (cos(pi l / L) + 1) / 2 + d:

Prefill: R = int(n * recent_ratio); the last 1 + R tokens are the recent window, the rest the context
(c = n - 1 - R); m = min(min_context, c); after layer l (0-based), if c > m and r(l, decay_ratio) < 1 and
int(c r) > m, the next layers keep the int(c r) context tokens of highest score (plus the recent window),
c <- int(c r); otherwise they keep all of them. A context token's score is layer l's attention from the recent
window's queries, averaged over the query heads, weighted linearly 1 .. distance_weight from the first recent
query to the last and averaged over them; the first `sinks` tokens are always kept. Layer l's cache holds the
tokens that entered it, so it shrinks with depth.

Generation: the prompt's entries are never compressed again; the entries from the prompt's last token on are
compressed in blocks of E = gen_interval consecutive positions, [n - 1 + E j, n - 1 + E (j + 1)). With the
sequence at position p (R = int((p + 1) * recent_ratio)), block j is due once p - R reaches its end: the block
then lies just before the recent window, the last 1 + R queries, which are exactly the queries from the block's
end to p. At that step each layer l keeps the max(int(E * gen_compress_ratio * r(l, gen_decay_ratio)), 1)
entries of the block those queries attended to most (the prefill's score: head mean, weights 1 ..
distance_weight, oldest to newest) and drops the rest, so a layer's cache grows by about
recent_ratio + (1 - recent_ratio) * keep / E entries per generated token.

Static shapes: which steps compress depends only on the prompt's length, so each layer's buffer is sized, at
prefill, to the most entries any prompt of the padded length holds there within `max_new_tokens` steps
(`kvjax.kv_bytes` shows the bounded decode cache); each generated entry accumulates its weighted votes in a
score buffer as decoding goes.

Deviations, on purpose: the generation stage's recent window is a share of the sequence's true length (the
authors' code takes layer 0's compressed cache length, which also shifts their RoPE positions); blocks are
counted by positions, as their first implementation counted cache entries (the current one compares a
compressed length with the uncompressed token count, which compresses at every step in deep layers); the
whole prompt is one prefill chunk (chunked prefill is refused).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import attend_with_probs
from kvjax.kv_state import EvictionSegment, round_capacity, write_free_slot
from kvjax.layer_step import Decode
from kvjax.policies.base import SegmentSpec
from kvjax.policies.prefill_pruning import PrefillPruning


@struct.dataclass(frozen=True)
class GenerationSegment(EvictionSegment):
    """A PyramidInfer layer's decode buffer: its entries, each generated entry's accumulated votes from the
    queries that will judge its block (`score`) and how many entries of a block the layer keeps."""

    block_keep: int = struct.field(pytree_node=False, default=1)


@struct.dataclass(frozen=True)
class GenerationBlocks:
    """`KVState.shared` while PyramidInfer decodes with its generation stage."""

    prompt: jax.Array  # int32[B]: each row's prompt length n
    due: jax.Array  # int32[B, J]: the position whose step compresses block j; -1 past the room reserved


@dataclasses.dataclass(frozen=True)
class PyramidInfer(PrefillPruning):
    """Prunes the prefill's context between layers to the tokens its recent window attends to most, by a keep
    ratio that falls from 1 to `decay_ratio` with depth (cosine); later layers compute, and cache, only those.
    While generating, every `gen_interval` tokens past the recent window are cut, per layer, to those the
    recent tokens attend to most (a share falling from `gen_compress_ratio` to about `gen_decay_ratio` times
    it with depth); `gen_interval=0` turns that off (decoding appends)."""

    recent_ratio: float = 0.2  # the authors' defaults (configs/llama2_7b.json, prefill_stage)
    decay_ratio: float = 0.9
    min_context: int = 64
    sinks: int = 4
    distance_weight: float = 1.2
    gen_decay_ratio: float = 0.1  # generation_stage
    gen_compress_ratio: float = 0.9
    gen_interval: int = 16  # exceed_length_to_compress

    def __post_init__(self):
        if not 0 <= self.recent_ratio < 1:
            raise ValueError(f"PyramidInfer recent_ratio must lie in [0, 1); got {self.recent_ratio}")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(
                f"PyramidInfer decay_ratio (the deepest layer's keep ratio) must lie in (0, 1]; got {self.decay_ratio}"
            )
        if self.min_context < 0 or self.sinks < 0 or self.distance_weight <= 0:
            raise ValueError(
                "PyramidInfer needs min_context >= 0, sinks >= 0 and distance_weight > 0; got "
                f"{self.min_context}, {self.sinks}, {self.distance_weight}"
            )
        if not (0 < self.gen_decay_ratio <= 1 and 0 < self.gen_compress_ratio <= 1):
            raise ValueError(
                "PyramidInfer gen_decay_ratio and gen_compress_ratio must lie in (0, 1]; got "
                f"{self.gen_decay_ratio}, {self.gen_compress_ratio}"
            )
        if self.gen_interval < 0:
            raise ValueError(
                f"PyramidInfer gen_interval must be >= 0 (0: no generation stage); got {self.gen_interval}"
            )

    def keep_ratio(self, layer: int, num_layers: int, floor: float | None = None) -> float:
        """r_l: the share of its context that layer `layer` passes on (cosine from 1 down to `floor`,
        by default decay_ratio)."""
        d = self.decay_ratio if floor is None else floor
        return (1.0 - d) * (math.cos(math.pi * layer / num_layers) + 1) / 2 + d

    def windows(self, lengths):
        n = np.asarray(lengths, np.int64)
        return 1 + np.floor(n * self.recent_ratio).astype(np.int64)

    def layer_tokens(self, num_layers, lengths):
        n = np.asarray(lengths, np.int64)
        window = self.windows(n)
        context = n - window
        floor = np.minimum(self.min_context, context)
        rows = [n]
        for layer in range(num_layers - 1):
            ratio = self.keep_ratio(layer, num_layers)
            kept = np.floor(context * ratio).astype(np.int64)
            context = np.where((context > floor) & (ratio < 1.0) & (kept > floor), kept, context)
            rows.append(context + window)
        return np.stack(rows)

    # The generation stage.

    def block_keeps(self, num_layers: int) -> tuple[int, ...]:
        """Per layer, how many entries of a compressed block of `gen_interval` it keeps (the authors' rounding)."""
        return tuple(
            max(
                int(
                    self.gen_interval
                    * self.gen_compress_ratio
                    * self.keep_ratio(layer, num_layers, self.gen_decay_ratio)
                ),
                1,
            )
            for layer in range(num_layers)
        )

    def settled(self, positions) -> np.ndarray:
        """int[...]: p - R at each position p: the entries before it lie outside the recent window (1 + R)."""
        p = np.asarray(positions, np.int64)
        return p + 1 - self.windows(p + 1)

    def generation_due(self, lengths, steps: int) -> np.ndarray:
        """int[N, steps // gen_interval]: for prompts of each of `lengths` int[N], the position of the decode
        step (of the first `steps`) that compresses each block of generated entries; -1 past them."""
        n = np.asarray(lengths, np.int64)[:, None]
        e = self.gen_interval
        table = self.settled(np.arange(int(n.max(initial=0)) + steps))  # non-decreasing
        due = np.searchsorted(table, n - 1 + e * np.arange(1, steps // e + 1))  # first p with p - R >= block end
        return np.where(due < n + steps, due, -1)

    def layout(self, config, prompt_len, max_new_tokens, chunk):
        if not self.gen_interval:
            return super().layout(config, prompt_len, max_new_tokens, chunk)
        heads = tuple(range(config.num_kv_heads))
        peaks = generation_peaks(self, config.num_layers, prompt_len, max_new_tokens)
        return tuple((SegmentSpec(heads, round_capacity(p)),) for p in peaks)

    def finalize(self, config, state, prompt_len, max_new_tokens):
        state = super().finalize(config, state, prompt_len, max_new_tokens)
        if not self.gen_interval:
            return state
        blocks = generation_peaks(self, config.num_layers, prompt_len, max_new_tokens, blocks_only=True)
        table = jnp.asarray(self.settled(np.arange(prompt_len + max_new_tokens)), jnp.int32)
        ends = state.length[:, None] - 1 + self.gen_interval * jnp.arange(1, blocks + 1, dtype=jnp.int32)  # [B, J]
        due = jnp.searchsorted(table, ends).astype(jnp.int32)
        due = jnp.where(due < state.length[:, None] + max_new_tokens, due, -1)

        def scored(seg, keep):
            return GenerationSegment(
                k=seg.k,
                v=seg.v,
                pos=seg.pos,
                heads=seg.heads,
                budget=seg.capacity,
                score=jnp.zeros(seg.pos.shape, jnp.float32),
                block_keep=keep,
            )

        layers = tuple((scored(seg, keep),) for (seg,), keep in zip(state.layers, self.block_keeps(config.num_layers)))
        return state.replace(layers=layers, shared=GenerationBlocks(prompt=state.length, due=due))

    def layer_step(self, ctx, segments, shared, x, phase):
        if not (isinstance(phase, Decode) and self.gen_interval):
            return super().layer_step(ctx, segments, shared, x, phase)
        (seg,) = segments
        seg = write_free_slot(seg, x.k, x.v, x.new_pos)  # the new entry's score starts at 0
        out, probs = attend_with_probs(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale)  # [B, K, G, 1, C]
        attention = jnp.mean(probs[:, :, :, 0], axis=(1, 2))  # [B, C], over every query head of the layer
        return out, (self.compress_block(seg, attention, x.q_pos[:, 0], shared),), shared

    def compress_block(
        self, seg: GenerationSegment, attention: jax.Array, query: jax.Array, blocks: GenerationBlocks
    ) -> GenerationSegment:
        """The segment after a decode query at positions int32[B] paid `attention` float32[B, C]: each
        generated entry's score gains the query's weighted vote if the query belongs to the recent window that
        will judge its block; in rows where this step is a block's due one, the block keeps its
        `block_keep` highest-scoring entries."""
        num_blocks = blocks.due.shape[1]
        if num_blocks == 0:  # no block comes due within the room reserved
            return seg
        e = self.gen_interval
        n = blocks.prompt[:, None, None]  # [B, 1, 1]
        q = query[:, None, None]
        offset = seg.pos - (n - 1)  # [B, Hs, C]: from the prompt's last token
        block = jnp.clip(offset // e, 0, num_blocks - 1)
        due = jnp.take_along_axis(jnp.broadcast_to(blocks.due[:, None, :], block.shape[:2] + (num_blocks,)), block, 2)
        end = n - 1 + e * (block + 1)  # the first position after the entry's block: its window's oldest query
        votes = (offset >= 0) & (offset < e * num_blocks) & (end <= q) & (q <= due)
        weight = 1.0 + (self.distance_weight - 1.0) * (q - end) / jnp.maximum(due - end, 1)  # 1 .. distance_weight
        score = seg.score + jnp.where(votes, weight * attention[:, None, :], 0.0)
        hit = blocks.due == query[:, None]  # [B, J]
        first = blocks.prompt - 1 + e * jnp.argmax(hit, axis=1)  # [B]: the due block's first position
        lo, hi = first[:, None, None], first[:, None, None] + e
        members = (seg.pos >= lo) & (seg.pos < hi) & jnp.any(hit, axis=1)[:, None, None]
        top, idx = jax.lax.top_k(jnp.where(members, score, -jnp.inf), min(e, seg.capacity))  # [B, Hs, E]
        lose = (jnp.arange(top.shape[-1]) >= seg.block_keep) & (top > -jnp.inf)

        def dropped(idx, lose):  # one row: [E], [E] -> bool[C]
            return jnp.zeros(seg.capacity, bool).at[idx].set(lose)

        drop = jax.vmap(jax.vmap(dropped))(idx, lose)
        return seg.replace(pos=jnp.where(drop, -1, seg.pos), score=score)


@functools.lru_cache(maxsize=64)
def generation_peaks(
    policy: PyramidInfer, num_layers: int, prompt_len: int, steps: int, blocks_only: bool = False
) -> tuple[int, ...] | int:
    """Per layer, the most entries a prompt of at most `prompt_len` tokens holds there within `steps` decode
    steps (a step writes its entry, then compresses): the decode buffers. With `blocks_only`, the most blocks
    that come due within the steps, over those prompts."""
    lengths = np.arange(1, prompt_len + 1)
    due = policy.generation_due(lengths, steps)  # [N, J]
    live = due >= 0
    if blocks_only:
        return int(live.sum(axis=1).max(initial=0))
    step = due - lengths[:, None] + 1  # [N, J]: the step (1-based) at which block j is compressed
    before_last = np.sum(live & (step < steps), axis=1)  # [N]
    held = policy.layer_tokens(num_layers, lengths)  # [L, N]
    peaks = []
    for layer, keep in enumerate(policy.block_keeps(num_layers)):
        lost = policy.gen_interval - keep  # entries a compressed block drops
        at_due = np.where(live, step - lost * np.arange(due.shape[1]), 0).max(axis=1, initial=0)
        peaks.append(int((held[layer] + np.maximum(at_due, steps - lost * before_last)).max()))
    return tuple(peaks)
