"""RazorAttention (Tang et al., 2024): retrieval heads keep everything; every other head keeps a sink
and a recent window plus one compensation token standing for all the tokens it dropped.

The compensation token of a head is (mean of dropped keys, mean of dropped values) and enters the
softmax with weight n_d, the number of tokens it replaces:
    out = (n_d e^{s(q, k_hat)} v_hat + sum_kept e^{s(q, k)} v) / (n_d e^{s(q, k_hat)} + sum_kept e^{s(q, k)})
with s(q, k) = scale * q.k, i.e. one extra logit s(q, k_hat) + log(n_d). It is kept as running sums
(float32) and a count, updated whenever entries are evicted: after each prefill chunk, at the end of
the prompt, and at every decode step. Retrieval heads come from `kvjax.heads.razor_heads`.
Retrieval segments attend through `kvjax.attention.attend` (the Pallas kernels on GPU/TPU). A
compensated segment's decode step runs the block-sparse decode kernel over its held entries, which
returns their log-sum-exp, and the compensation token joins through its logit (`fold_compensation`);
its prefill chunks run the jnp path (`compensated_attention`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import decode_with_lse, visibility_mask
from kvjax.cached_attention import write_in_place_then_attend
from kvjax.config import ModelConfig
from kvjax.kv_state import (
    EvictionSegment,
    KVState,
    count,
    dropped_by_keep_top,
    evict_lowest,
    keep_top,
    lowest_over_budget,
    round_capacity,
    write_entries,
    write_free_slot,
)
from kvjax.layer_step import Decode
from kvjax.policies.base import Layout, Policy
from kvjax.policies.duo_attention.policy import HeadSets, _normalise, sink_recent_priority, split_layout

_MASKED = float(jnp.finfo(jnp.float32).min)


@struct.dataclass(frozen=True)
class CompensatedSegment(EvictionSegment):
    """A sink+recent segment plus, per (sequence, head), the running sums of what it evicted."""

    k_dropped: jax.Array | None = None  # float32[B, Hs, D]: sum of evicted keys
    v_dropped: jax.Array | None = None  # float32[B, Hs, D]: sum of evicted values
    n_dropped: jax.Array | None = None  # float32[B, Hs]: how many were evicted
    keep: jax.Array | None = None  # int32[B]: entries each row keeps (sink + L), set by the first prefill chunk


def compensated(segment: EvictionSegment) -> CompensatedSegment:
    """The segment with empty compensation sums."""
    b, hs, _, d = segment.k.shape
    fields = {f.name: getattr(segment, f.name) for f in dataclasses.fields(EvictionSegment)}
    return CompensatedSegment(
        **fields,
        k_dropped=jnp.zeros((b, hs, d), jnp.float32),
        v_dropped=jnp.zeros((b, hs, d), jnp.float32),
        n_dropped=jnp.zeros((b, hs), jnp.float32),
        keep=jnp.full((b,), segment.budget, jnp.int32),
    )


def absorb(segment: CompensatedSegment, dropped: jax.Array) -> CompensatedSegment:
    """Adds the entries flagged in `dropped` bool[B, Hs, C] (valid ones only) to the running sums."""
    dropped = (dropped & (segment.pos >= 0)).astype(jnp.float32)  # [B, Hs, C]
    return segment.replace(
        k_dropped=segment.k_dropped + jnp.einsum("bhc,bhcd->bhd", dropped, segment.k.astype(jnp.float32)),
        v_dropped=segment.v_dropped + jnp.einsum("bhc,bhcd->bhd", dropped, segment.v.astype(jnp.float32)),
        n_dropped=segment.n_dropped + jnp.sum(dropped, axis=-1),
    )


def compress(segment: CompensatedSegment, priority: jax.Array, keep: int, capacity: int) -> CompensatedSegment:
    """`keep_top` of each row's `segment.keep` entries (at most `keep`), with every entry it discards
    folded into the compensation token first."""
    held = jnp.where(segment.pos >= 0, priority, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-held, axis=-1, stable=True), axis=-1, stable=True)  # [B, Hs, C]
    priority = jnp.where(rank < segment.keep[:, None, None], held, -jnp.inf)  # the row's own buffer
    segment = absorb(segment, dropped_by_keep_top(segment, priority, keep))
    return keep_top(segment, priority, keep, capacity)


def evict_one(segment: CompensatedSegment, priority: jax.Array) -> CompensatedSegment:
    """`evict_lowest` (one entry per row over its `keep`), folding the victim into the compensation."""
    victim = lowest_over_budget(segment, priority, segment.keep[:, None])  # [B, Hs, C]
    return absorb(segment, victim).replace(pos=jnp.where(victim, -1, segment.pos))


def _compensation(segment: CompensatedSegment, q: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """The compensation token's logit scale * q.k_hat + log(n_d), float32[B, T, Hs, G] (-inf while
    nothing is dropped), and its value v_hat float32[B, Hs, D]. q: [B, T, Hs, G, D]."""
    n = segment.n_dropped  # [B, Hs]
    safe_n = jnp.maximum(n, 1.0)
    k_hat = segment.k_dropped / safe_n[..., None]  # [B, Hs, D]
    v_hat = segment.v_dropped / safe_n[..., None]  # [B, Hs, D]
    logit = jnp.einsum("btkgd,bkd->btkg", q.astype(jnp.float32), k_hat) * scale + jnp.log(safe_n)[:, None, :, None]
    return jnp.where((n > 0)[:, None, :, None], logit, -jnp.inf), v_hat


def compensated_attention(
    q: jax.Array,
    segment: CompensatedSegment,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
) -> jax.Array:
    """Softmax attention over the held entries plus the compensation token: [B, T, Hs, G, D].

    q: [B, T, Hs, G, D]. The token's logit is scale * q.k_hat + log(n_d); it is visible to every
    query once n_d > 0 (what it stands for was evicted before these queries' chunk arrived).
    """
    comp, v_hat = _compensation(segment, q, scale)  # [B, T, Hs, G], [B, Hs, D]
    logits = jnp.einsum("btkgd,bkcd->bkgtc", q, segment.k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(visibility_mask(segment.pos, q_pos, window)[:, :, None], logits, _MASKED)  # [B, Hs, G, T, C]
    comp = jnp.maximum(comp.transpose(0, 2, 3, 1), _MASKED)  # [B, Hs, G, T]
    probs = jax.nn.softmax(jnp.concatenate([logits, comp[..., None]], axis=-1), axis=-1)  # [B, Hs, G, T, C + 1]
    out = jnp.einsum("bkgtc,bkcd->btkgd", probs[..., :-1].astype(segment.v.dtype), segment.v)  # [B, T, Hs, G, D]
    out_hat = jnp.einsum("bkgt,bkd->btkgd", probs[..., -1], v_hat)  # [B, T, Hs, G, D]
    return (out.astype(jnp.float32) + out_hat).astype(segment.v.dtype)


def fold_compensation(
    q: jax.Array,
    segment: CompensatedSegment,
    held: jax.Array,
    held_lse: jax.Array,
    scale: float,
) -> jax.Array:
    """`compensated_attention` of one decode token, from attention over the held entries alone: held
    [B, 1, Hs, G, D] with its log-sum-exp held_lse float32[B, 1, Hs, G] (the decode kernel's). The
    token joins the softmax through its logit: the two parts weigh e^lse and e^logit."""
    comp, v_hat = _compensation(segment, q, scale)  # [B, 1, Hs, G], [B, Hs, D]
    top = jnp.maximum(held_lse, comp)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # both -inf: nothing visible, zeros out
    w_held, w_comp = jnp.exp(held_lse - top), jnp.exp(comp - top)  # [B, 1, Hs, G]
    total = w_held + w_comp
    out = w_held[..., None] * held.astype(jnp.float32) + w_comp[..., None] * v_hat[:, None, :, None, :]
    return (out / jnp.where(total > 0, total, 1.0)[..., None]).astype(segment.v.dtype)  # [B, 1, Hs, G, D]


@dataclasses.dataclass(frozen=True)
class RazorAttention(Policy):
    """Retrieval KV heads keep everything; the rest keep `sink` + L recent tokens + one compensation
    token, L = max(buffer_floor, N // buffer_ratio) for an N-token prompt (the paper's), or `recent`."""

    retrieval_heads: HeadSets  # per layer, the KV heads that keep everything
    sink: int = 4  # N0
    recent: int | None = None  # a fixed buffer L; None: the paper's max(S0, N / C)
    compensate: bool = True  # False: plain sink + recent for non-retrieval heads (ablation)
    buffer_floor: int = 4000  # S0
    buffer_ratio: float = 5.0  # C

    def __post_init__(self):
        if self.sink < 0 or (self.recent is not None and self.recent < 1):
            raise ValueError(f"RazorAttention needs sink >= 0 and recent >= 1; got {self.sink}, {self.recent}")
        if self.buffer_floor < 1 or not self.buffer_ratio >= 1:
            raise ValueError(
                f"RazorAttention needs buffer_floor >= 1 and buffer_ratio >= 1; got {self.buffer_floor}, "
                f"{self.buffer_ratio}"
            )
        object.__setattr__(self, "retrieval_heads", _normalise(self.retrieval_heads))

    def with_budget(self, tokens):
        """Streaming heads keep `tokens`: the sink stays, a fixed `recent` takes the rest (retrieval heads keep all)."""
        super().with_budget(tokens)
        if tokens <= self.sink:
            raise ValueError(f"{type(self).__name__}: a budget of {tokens} tokens must exceed the sink ({self.sink})")
        return dataclasses.replace(self, recent=tokens - self.sink)

    def buffer(self, prompt_len):
        """L, the recent tokens a non-retrieval head keeps for a prompt of `prompt_len` tokens (an int or
        int32 array): `recent`, or max(buffer_floor, prompt_len // buffer_ratio)."""
        if self.recent is not None:
            return self.recent if isinstance(prompt_len, int) else jnp.full_like(prompt_len, self.recent)
        if isinstance(prompt_len, int):
            return max(self.buffer_floor, int(prompt_len // self.buffer_ratio))
        scaled = jnp.floor(prompt_len.astype(jnp.float32) / jnp.float32(self.buffer_ratio)).astype(jnp.int32)
        return jnp.maximum(self.buffer_floor, scaled)

    def layout(self, config: ModelConfig, prompt_len, max_new_tokens, chunk) -> Layout:
        keep = self.sink + self.buffer(prompt_len)  # the longest row's (padded) prompt bounds every row's
        return split_layout(config, self.retrieval_heads, keep, prompt_len, max_new_tokens, chunk)

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype) -> KVState:
        state = super().allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        layers = tuple(
            tuple(compensated(s) if isinstance(s, EvictionSegment) else s for s in layer) for layer in state.layers
        )
        return state.replace(layers=layers)

    def _priority(self, segment):
        return sink_recent_priority(segment, self.sink)

    def segment_step(self, ctx, segment, x, phase):
        if not isinstance(segment, EvictionSegment):  # retrieval heads: slot = position, as Full
            return write_in_place_then_attend(ctx, segment, x)
        if isinstance(phase, Decode):  # fill a free slot, attend, evict one
            seg = write_free_slot(segment, x.k, x.v, x.new_pos)
            out = self._attend(ctx, x.q, seg, x.q_pos)
            seg = (
                evict_one(seg, self._priority(seg))
                if self.compensate
                else evict_lowest(seg, self._priority(seg), seg.keep[:, None])
            )
            return out, seg
        keep = jnp.minimum(self.sink + self.buffer(phase.prompt_lengths), segment.budget)  # [B] each row's own
        seg = write_entries(segment.replace(keep=keep), x.k, x.v, x.new_pos, count(segment))  # append, attend, keep
        out = self._attend(ctx, x.q, seg, x.q_pos)  # sink + recent
        if seg.budget < seg.capacity:
            seg = compress(seg, self._priority(seg), seg.budget, seg.capacity)
        return out, seg

    def _attend(self, ctx, q, seg, q_pos):
        if not self.compensate:
            seg = seg.replace(n_dropped=jnp.zeros_like(seg.n_dropped))
        held = decode_with_lse(q, seg.k, seg.v, seg.pos, ctx.window, ctx.scale, ctx.impl)
        if held is None:  # prefill chunks, and wherever no kernel applies
            return compensated_attention(q, seg, q_pos, ctx.window, ctx.scale)
        return fold_compensation(q, seg, *held, ctx.scale)

    def finalize(self, config, state: KVState, prompt_len, max_new_tokens) -> KVState:
        """Non-retrieval buffers shrink to sink + recent + one spare slot; what leaves is compensated."""

        def resize(seg):
            if not isinstance(seg, EvictionSegment):  # retrieval heads
                return seg
            capacity = round_capacity(min(seg.budget, prompt_len + max_new_tokens) + 1)  # as StreamingLLM
            return compress(seg, self._priority(seg), seg.budget, capacity)

        return state.replace(layers=tuple(tuple(resize(s) for s in layer) for layer in state.layers))
