"""D2O (Wan et al., 2024): layer budgets from attention density; H2O eviction that merges what it evicts.

Two levels, as in the authors' code (AIoT-MLSys-Lab/D2O, `modeling_llama3_7b_13b_d2o.py` and the
layer split in `modeling_llama3_new.py`):

- Layers. At the end of the prompt, each layer's density is measured from the attention its entries
  received, summed over the prompt's queries, per query head (as the authors, whose code expands GQA's
  KV heads): the variance of these sums over the held entries (ddof 1, torch's `var`), min-max
  normalised across the layer's query heads ((v - min) / (max - min + 1e-6)) and averaged: sigma_l.
  Denser layers (lower variance) keep more:
      share_l = L * softmax_l(-sigma_l),  heavy_l = floor(share_l * heavy),  recent_l = floor(share_l * window),
  so the shares average 1 and the layers split L x (heavy + window) between them, per sequence.
- Tokens. H2O's rule with each layer's own budget: the `recent_l` newest entries and the `sinks` first
  positions are always kept, the rest ranked by accumulated attention (per KV head, averaged over its
  query group, as kvjax's H2O; the authors' expanded cache ranks per query head). Each evicted entry
  e finds its most similar kept entry c by cosine similarity of (post-RoPE) keys, u_e = max_c
  cos(k_e, k_c); a per-sequence threshold tau is the mean of u over the evicted entries at the first
  eviction, then tau <- alpha * tau + beta * mean(u) at each later one; every e with u_e >= tau is
  merged as the authors' code merges (torch `scatter_reduce(..., "mean", include_self=True)` of
  u_e-weighted entries):
      k_c <- (k_c + sum_{e -> c} u_e k_e) / (1 + |{e -> c}|),  and v_c alike with the same weights.

Static shapes. The split is known only once the prompt's attention is, i.e. inside the jitted prefill,
so a layer's buffer cannot be sized by its own share. Each layer gets one static buffer of
max_share x (heavy + window) entries (`budget`), and the share, clipped at max_share, decides per
sequence how many of those slots the layer keeps (`D2OSegment.keep`, `recent`): `kv_bytes` is then
max_share x the average budget, against H2O's 1 x. The alternative, a static per-layer split fixed at
trace time, would save those bytes but cannot follow this prompt's density, which is the method; a
max_share of 1 gives H2O's bytes and clips every denser-than-average layer to the average. With H
query heads sigma_l lies in [0, (H - 1) / H), which bounds a share by L / (1 + (L - 1) e^(-(H - 1) / H))
(2.32 for SmolLM2-135M's 30 layers x 9 heads); its shares on 1k-token needle prompts spanned 0.85-1.18,
so the default 1.5 does not clip there.

Deviations from the authors' code, on purpose: (1) the merge decision is per (KV head, evicted entry),
u_e >= tau; the authors compare the mean over heads of the j-th evicted entry of every head, entries
that are different tokens in different heads; (2) every layer is compressed (their code leaves layers
0, 1 and L - 1 whole); (3) the prompt is compressed at its end rather than at the first decode step
(whose attention their scores include). A chunked prefill evicts (and merges) to the buffer after each
chunk but the last, so its densities then come from the entries the buffer still holds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend_with_probs
from kvjax.kv_state import (
    EvictionSegment,
    KVState,
    count,
    keep_top,
    lowest_over_budget,
    round_capacity,
    write_entries,
    write_free_slot,
)
from kvjax.layer_step import Decode
from kvjax.policies.base import SegmentSpec
from kvjax.policies.token_eviction import TokenEviction, newest

SINK_PRIORITY = float(jnp.finfo(jnp.float32).max)  # above every score, below the recent window's +inf
NORM_EPS = 1e-6  # a zero key's cosine similarity is 0, not NaN
SPREAD_EPS = 1e-6  # the authors' epsilon in the min-max normalisation of head variances


@struct.dataclass(frozen=True)
class D2OSegment(EvictionSegment):
    """An `EvictionSegment` whose row budget is dynamic: `keep` of its `budget` slots, `recent` of them
    the recent window, and the merge threshold's moving average."""

    threshold: jax.Array | None = None  # float32[B, Hs]: tau, equal over a sequence's heads; NaN before any eviction
    keep: jax.Array | None = None  # int32[B, Hs]: entries this layer keeps (heavy_l + recent_l), <= budget
    recent: jax.Array | None = None  # int32[B, Hs]: of them, the newest always kept
    # float32[B, Hs, G, C]: attention received per query head, summed over the prompt (for the layer
    # split), moved with the entries while prefilling; None once the prompt is compressed.
    head_score: jax.Array | None = None


def head_variance(score: jax.Array, held: jax.Array) -> jax.Array:
    """float32[...]: the variance (ddof 1) of each row's held scores; score [..., C], held bool broadcasting."""
    held = jnp.broadcast_to(held, score.shape)
    n = jnp.sum(held, axis=-1)  # [...]
    mean = jnp.sum(jnp.where(held, score, 0.0), axis=-1) / jnp.maximum(n, 1)
    return jnp.sum(jnp.where(held, (score - mean[..., None]) ** 2, 0.0), axis=-1) / jnp.maximum(n - 1, 1)


def layer_density(variance: jax.Array) -> jax.Array:
    """float32[B]: the authors' layer statistic, head variances [B, H] min-max normalised across the
    (query) heads and averaged (lower: attention spread more evenly, a denser layer)."""
    lo = jnp.min(variance, axis=-1, keepdims=True)
    hi = jnp.max(variance, axis=-1, keepdims=True)
    return jnp.mean((variance - lo) / (hi - lo + SPREAD_EPS), axis=-1)


def merge_evicted(
    segment: D2OSegment, evicted: jax.Array, kept: jax.Array, most: int, alpha: float, beta: float
) -> D2OSegment:
    """Merges each evicted entry into its most similar kept one when their keys' cosine similarity
    reaches the row's moving threshold, which this eviction updates; the evicted entries stay in place
    (the caller empties them). evicted, kept: bool[B, Hs, C]; `most`: a static bound on evicted per row."""
    k, v = segment.k, segment.v  # [B, Hs, C, D]
    flag, idx = jax.lax.top_k(evicted.astype(jnp.float32), min(most, segment.capacity))  # [B, Hs, E]
    is_evicted = flag > 0  # [B, Hs, E]: idx names an evicted slot

    def gather(x):  # [B, Hs, C, D] -> float32[B, Hs, E, D]
        return jnp.take_along_axis(x, idx[..., None], axis=2).astype(jnp.float32)

    k_e, v_e = gather(k), gather(v)
    norm = jnp.linalg.norm(k.astype(jnp.float32), axis=-1)  # [B, Hs, C]
    sim = jnp.einsum("bhed,bhcd->bhec", k_e, k.astype(jnp.float32))  # [B, Hs, E, C]
    sim = sim / jnp.maximum(jnp.take_along_axis(norm, idx, axis=-1)[..., None] * norm[:, :, None, :], NORM_EPS)
    sim = jnp.where(kept[:, :, None, :], sim, -jnp.inf)
    target = jnp.argmax(sim, axis=-1)  # [B, Hs, E]: the most similar kept slot
    best = jnp.max(sim, axis=-1)  # [B, Hs, E]

    n = jnp.sum(is_evicted, axis=(1, 2))  # [B]
    mean = jnp.sum(jnp.where(is_evicted, best, 0.0), axis=(1, 2)) / jnp.maximum(n, 1)  # [B]
    tau = segment.threshold  # [B, Hs]
    moved = jnp.where(jnp.isnan(tau), mean[:, None], alpha * tau + beta * mean[:, None])
    tau = jnp.where((n > 0)[:, None], moved, tau)
    merged = is_evicted & (best >= tau[..., None])  # [B, Hs, E]
    weight = jnp.where(merged, best, 0.0)[..., None]  # [B, Hs, E, 1]

    if idx.shape[-1] == 1:  # decode: one slot per row changes, updated in place

        def one(x, x_e):  # [B, Hs, C, D], float32[B, Hs, 1, D]
            x_c = jnp.take_along_axis(x, target[..., None], axis=2).astype(jnp.float32)  # [B, Hs, 1, D]
            new = (x_c + weight * x_e) / (1.0 + merged[..., None])
            put = lambda row, at, val: row.at[at].set(val)  # noqa: E731
            return jax.vmap(jax.vmap(put))(x, target, new.astype(x.dtype))

        return segment.replace(k=one(k, k_e), v=one(v, v_e), threshold=tau)

    def scatter_add(dest, at, rows):  # one (sequence, head): [C, ...] += rows [E, ...] at [E]
        return dest.at[at].add(rows)

    per_row = jax.vmap(jax.vmap(scatter_add))
    added = per_row(jnp.ones(k.shape[:3]), target, merged.astype(jnp.float32))[..., None]  # [B, Hs, C, 1]

    def merge(x, x_e):  # the authors' weighted mean: (x_c + sum_e u_e x_e) / (1 + #merged into c)
        total = x.astype(jnp.float32) + per_row(jnp.zeros(x.shape, jnp.float32), target, weight * x_e)
        return (total / added).astype(x.dtype)

    return segment.replace(k=merge(k, k_e), v=merge(v, v_e), threshold=tau)


def ranks(priority: jax.Array) -> jax.Array:
    """int32[..., C]: 0 for each row's highest priority, 1 for the next, ... (ties by slot)."""
    order = jnp.argsort(-priority, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class D2O(TokenEviction):
    """H2O (accumulated attention, GQA group mean; `sinks` first positions and a recent window kept)
    with per-layer budgets split by the prompt's attention density, and each evicted entry merged into
    its most similar kept entry when the keys' cosine similarity passes a moving threshold. Every layer
    holds a buffer of max_share x (heavy + window) slots; the density share picks how many it keeps."""

    heavy: int = 512  # average heavy hitters per layer (the authors' runs: 10% of the prompt)
    window: int = 512  # average recent window per layer (the authors' runs: 10% of the prompt)
    sinks: int = 4  # first positions never evicted (the authors' code)
    alpha: float = 0.5  # tau <- alpha * tau + beta * mean similarity (the authors' defaults)
    beta: float = 0.5
    max_share: float = 1.5  # a layer's buffer, in average budgets: the most a dense layer can keep

    def __post_init__(self):
        if self.heavy < 0 or self.window < 1 or self.sinks < 0:
            raise ValueError(
                f"D2O needs heavy >= 0, window >= 1 and sinks >= 0; got {self.heavy}, {self.window}, {self.sinks}"
            )
        if not (0 <= self.alpha <= 1 and 0 <= self.beta <= 1):
            raise ValueError(f"D2O's EMA weights alpha and beta must lie in [0, 1]; got {self.alpha}, {self.beta}")
        if not self.max_share >= 1:
            raise ValueError(f"D2O max_share (a layer's buffer in average budgets) must be >= 1; got {self.max_share}")

    def with_budget(self, tokens):
        """`heavy` and `window` split the average budget evenly, as the authors' runs (10% + 10%) do."""
        super().with_budget(tokens)
        return dataclasses.replace(self, heavy=tokens // 2, window=tokens - tokens // 2)

    def scored(self):
        return True

    def caps(self) -> tuple[int, int]:
        """(heavy, recent) of a layer at max_share: its buffer's split."""
        return int(self.max_share * self.heavy), max(1, int(self.max_share * self.window))

    def budget(self, config, layer):
        return sum(self.caps())

    def layer_budgets(self, density: jax.Array) -> tuple[jax.Array, jax.Array]:
        """int32[L, B] heavy and recent entries per layer and sequence from the layers' densities
        float32[L, B]: shares L x softmax(-density) over the layers, clipped at max_share."""
        share = density.shape[0] * jax.nn.softmax(-density, axis=0)
        share = jnp.minimum(share, self.max_share)
        most_heavy, most_recent = self.caps()
        heavy = jnp.minimum(jnp.floor(share * self.heavy), most_heavy).astype(jnp.int32)
        recent = jnp.clip(jnp.floor(share * self.window), 1, most_recent).astype(jnp.int32)
        return heavy, recent

    def vote_weights(self, new_pos, prompt_lengths):
        return (new_pos >= 0).astype(jnp.float32)  # H2O's: every query's attention, summed

    def priority(self, segment):
        recent = segment.pos > newest(segment) - segment.recent[..., None]
        sink = segment.pos < self.sinks
        return jnp.where(recent, jnp.inf, jnp.where(sink, SINK_PRIORITY, segment.score))

    def layout(self, config, prompt_len, max_new_tokens, chunk):
        """One buffer per layer of `budget` slots plus a chunk while prefilling (at most the prompt)."""
        heads, cap = tuple(range(config.num_kv_heads)), self.budget(config, 0)
        capacity = min(cap + chunk, prompt_len) if cap < prompt_len else prompt_len
        return tuple((SegmentSpec(heads, capacity, cap),) for _ in range(config.num_layers))

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype):
        state = super().allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        recent = self.caps()[1]

        def dynamic(seg: EvictionSegment) -> D2OSegment:
            rows = seg.pos.shape[:2]  # [B, Hs]
            return D2OSegment(
                **{f.name: getattr(seg, f.name) for f in dataclasses.fields(seg)},
                threshold=jnp.full(rows, jnp.nan, jnp.float32),
                keep=jnp.full(rows, seg.budget, jnp.int32),
                recent=jnp.full(rows, recent, jnp.int32),
                head_score=jnp.zeros((*rows, config.group_size, seg.capacity), jnp.float32),
            )

        return state.replace(layers=tuple(tuple(dynamic(s) for s in layer) for layer in state.layers))

    def compress(self, segment: D2OSegment, capacity: int, most: int, final: bool) -> D2OSegment:
        """Keeps each row's `keep` highest-priority entries, merging the others (at most `most`, static)
        into them, in a buffer of `capacity` slots; `final`: the prompt's end (the per-query-head sums go)."""
        held = segment.pos >= 0
        priority = jnp.where(held, self.priority(segment), -jnp.inf)
        kept = held & (ranks(priority) < segment.keep[..., None])
        merged = merge_evicted(segment, held & ~kept, kept, most, self.alpha, self.beta)
        keep = min(segment.budget, capacity)
        out = keep_top(merged, jnp.where(kept, priority, -jnp.inf), keep, capacity)
        if final:
            return out.replace(head_score=None)
        # keep_top's order: the kept entries by position (distinct), then empty slots
        order = jnp.argsort(jnp.where(kept, segment.pos, jnp.iinfo(jnp.int32).max), axis=-1)[..., :keep]
        moved = jnp.take_along_axis(segment.head_score, order[:, :, None, :], axis=-1)  # [B, Hs, G, keep]
        moved = jnp.where(jnp.take_along_axis(kept, order, axis=-1)[:, :, None, :], moved, 0.0)
        return out.replace(head_score=jnp.pad(moved, ((0, 0),) * 3 + ((0, capacity - keep),)))

    def segment_step(self, ctx, segment, x, phase):
        decoding = isinstance(phase, Decode)
        if decoding:
            seg = write_free_slot(segment, x.k, x.v, x.new_pos)
        else:
            seg = write_entries(segment, x.k, x.v, x.new_pos, count(segment))
        out, probs = attend_with_probs(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale)
        seg = seg.replace(score=self.observe(seg, probs, x.new_pos, None))
        if decoding:  # one entry over the row's budget: evicted, and merged if similar enough
            victim = lowest_over_budget(seg, self.priority(seg), seg.keep)  # [B, Hs, C]
            seg = merge_evicted(seg, victim, (seg.pos >= 0) & ~victim, 1, self.alpha, self.beta)
            return out, seg.replace(pos=jnp.where(victim, -1, seg.pos))
        real = (x.new_pos >= 0)[:, None, None, :, None]  # per query head, padding queries excluded
        seg = seg.replace(head_score=seg.head_score + jnp.sum(jnp.where(real, probs, 0.0), axis=3))  # [B, Hs, G, C]
        # Make room for the next chunk (none when this one fills the buffer: the whole prompt); after the
        # last chunk `finalize` compresses.
        if seg.budget < seg.capacity and x.q.shape[1] < seg.capacity:
            more = jnp.max(x.q_pos) + 1 < jnp.max(phase.prompt_lengths)
            most = seg.capacity - seg.budget  # a prefill row keeps its whole buffer: `keep` = budget
            seg = jax.lax.cond(more, lambda s: self.compress(s, s.capacity, most, final=False), lambda s: s, seg)
        return out, seg

    def finalize(self, config, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Splits the layers' budgets by their densities, then compresses every layer to its share and
        sizes its buffer for decoding (one spare slot per arriving token). The layers (one layout) are
        stacked and compressed by one `lax.map` body, so compile time does not grow with depth."""
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(layer[0] for layer in state.layers))  # [L, B, Hs, ...]
        variance = head_variance(stacked.head_score, (stacked.pos >= 0)[:, :, :, None, :])  # [L, B, Hs, G]
        density = layer_density(variance.reshape(*variance.shape[:2], -1))  # [L, B]
        heavy, recent = self.layer_budgets(density)  # [L, B]
        rows = stacked.pos.shape[:3]  # [L, B, Hs]
        stacked = stacked.replace(
            keep=jnp.broadcast_to((heavy + recent)[..., None], rows), recent=jnp.broadcast_to(recent[..., None], rows)
        )
        capacity = round_capacity(min(self.budget(config, 0), prompt_len + max_new_tokens) + 1)
        out = jax.lax.map(lambda seg: self.compress(seg, capacity, seg.capacity, final=True), stacked)
        return state.replace(layers=tuple((jax.tree.map(lambda x: x[i], out),) for i in range(len(state.layers))))
