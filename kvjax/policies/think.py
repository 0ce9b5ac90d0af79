"""ThinK (Xu et al., 2024): drop the key channels the prompt's last queries barely use, after token eviction.

Per (layer, sequence, KV head), once `base` has compressed the prompt to its n kept entries:

    score[c] = mean_{t, g} Q_obs[t, g, c]^2  *  mean_{i kept} K[i, c]^2

with Q_obs the last `observe` prompt queries after RoPE (g over the GQA group). The lowest
floor(ratio * D) channels are dropped from the stored keys of the kept entries except the last
`recent`; those, and every token generated later, keep all D channels. Values keep every channel.
The same ranking as the authors' per-channel ||Q_obs[:, c] K[:, c]^T||_F (a product of the two
norms), computed in their `key_pruner_query_driven` on the base's compressed keys.

The thin keys are stored thin (k [B, Hs, C, D - floor(ratio * D)] plus the kept channel indices),
so `kvjax.kv_bytes` shows the saving. A query scores thin keys with the same channels of itself and
full keys with all of them, in one softmax (`attend_thin_keys`).

Bases: `Full` (ThinK alone) or a `TokenEviction` that compresses the prompt once (SnapKV, PyramidKV,
Knorm); decoding appends to the full-key buffer and evicts nothing. Bases that evict while decoding
(H2O, TOVA, StreamingLLM, ...) would have to evict across both buffers; they raise ValueError.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import visible_softmax
from kvjax.config import ModelConfig
from kvjax.kv_state import EvictionSegment, KVSegment, KVState, count, round_capacity, write_free_slot
from kvjax.layer_step import Decode, take_heads
from kvjax.policies.base import Layout, Policy
from kvjax.policies.full import Full
from kvjax.policies.snapkv import SnapKV
from kvjax.policies.token_eviction import TokenEviction


@struct.dataclass(frozen=True)
class QueryEnergy:
    """While prefilling: per (sequence, KV head, channel), the sum of the observation queries' squares."""

    sum_sq: jax.Array  # float32[B, K, D], summed over the observed queries and their GQA group
    heads: tuple[int, ...] = struct.field(pytree_node=False)  # every KV head of the layer


@struct.dataclass(frozen=True)
class ThinKSegment:
    """A layer's decode-time entries for a set of KV heads: thin-key entries and full-key entries."""

    thin: KVSegment  # k [B, Hs, Ct, Dk] (kept channels only), v [B, Hs, Ct, D], pos [B, Hs, Ct]
    channels: jax.Array  # int32[B, Hs, Dk]: the key channels `thin.k` keeps, ascending
    full: KVSegment  # k, v [B, Hs, Cf, D]: the last `recent` kept prompt entries, then generated ones

    @property
    def heads(self) -> tuple[int, ...]:
        return self.thin.heads

    def positions(self) -> jax.Array:
        """int32[B, Hs, Ct + Cf]: every kept entry's position (-1 empty), thin entries first."""
        return jnp.concatenate([self.thin.pos, self.full.pos], axis=-1)


@dataclasses.dataclass(frozen=True)
class ThinK(Policy):
    """`base` picks the kept tokens; their keys lose the `ratio` of channels least used by the last
    `observe` prompt queries, except the last `recent` kept and all generated tokens. Decoding appends."""

    base: TokenEviction | Full = SnapKV()
    ratio: float = 0.4
    observe: int = 32
    recent: int = 32

    def __post_init__(self):
        if not (
            isinstance(self.base, Full) or (isinstance(self.base, TokenEviction) and not self.base.evict_while_decoding)
        ):
            raise ValueError(
                "ThinK stacks on Full or on a token-eviction base that compresses the prompt once "
                f"(SnapKV, PyramidKV, Knorm); got {type(self.base).__name__}, which "
                + (
                    "evicts while decoding (it would have to evict across thin and full keys)"
                    if isinstance(self.base, TokenEviction)
                    else "is neither"
                )
            )
        if getattr(self.base, "per_query_head", False):
            raise ValueError("ThinK thins one entry set per KV head; its base cannot select per query head")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ThinK ratio (the share of key channels dropped) must be in [0, 1); got {self.ratio}")
        if self.observe < 1 or self.recent < 0:
            raise ValueError(f"ThinK needs observe >= 1 and recent >= 0; got {self.observe}, {self.recent}")

    def with_budget(self, tokens):
        """The base policy's budget."""
        base = self.base.with_budget(tokens)
        return None if base is None else dataclasses.replace(self, base=base)

    def kept_channels(self, head_dim: int) -> int:
        """Key channels each thin entry keeps: D - floor(ratio * D), as the authors count them."""
        return head_dim - int(head_dim * self.ratio)

    # -- prefill: the base, plus the observation queries' energy ---------------------------------

    @property
    def packed_tail(self):
        """The base's tail, at least the `observe` queries whose energy picks the channels."""
        tail = self.base.packed_tail
        return None if tail is None else max(tail, self.observe)

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        return self.base.layout(config, prompt_len, max_new_tokens, chunk)

    def scored(self) -> bool:
        return self.base.scored()

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype) -> KVState:
        """The base's prefill state, each layer followed by a zero `QueryEnergy`."""
        state = self.base.allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        energy = QueryEnergy(
            jnp.zeros((batch, config.num_kv_heads, config.head_dim), jnp.float32), tuple(range(config.num_kv_heads))
        )
        return state.replace(layers=tuple(layer + (energy,) for layer in state.layers))

    def step(self, ctx, segments, x, phase):
        """Prefill: the base's step, and the chunk's observation queries added to the energy.
        Decode: per segment, the token joins the full-key entries and attends over thin and full keys."""
        if isinstance(phase, Decode):
            return super().step(ctx, segments, x, phase)
        *base_segments, energy = segments
        out, base_segments = self.base.step(ctx, tuple(base_segments), x, phase)
        observed = (x.new_pos >= 0) & (x.q_pos >= (phase.prompt_lengths - self.observe)[:, None])  # [B, T]
        q32 = x.q.astype(jnp.float32)
        added = jnp.einsum("btkgd,btkgd,bt->bkd", q32, q32, observed.astype(jnp.float32))  # [B, K, D]
        return out, (*base_segments, energy.replace(sum_sq=energy.sum_sq + added))

    def segment_step(self, ctx, segment, x, phase):
        full = write_free_slot(segment.full, x.k, x.v, x.new_pos)
        seg = segment.replace(full=full)
        return attend_thin_keys(x.q, seg, x.q_pos, ctx.window, ctx.scale), seg

    # -- finalize: pick channels, split the kept entries -----------------------------------------

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """The base's compressed prompt, its older kept entries' keys thinned to the chosen channels."""
        energies = [layer[-1] for layer in state.layers]
        state = self.base.finalize(
            config, state.replace(layers=tuple(layer[:-1] for layer in state.layers)), prompt_len, max_new_tokens
        )
        queries = jnp.minimum(state.length, self.observe) * (config.num_heads // config.num_kv_heads)  # [B]
        layers = tuple(
            tuple(
                self._thin(
                    seg, take_heads(e.sum_sq, seg.heads, 1, config.num_kv_heads), queries, prompt_len, max_new_tokens
                )
                for seg in layer
            )
            for layer, e in zip(state.layers, energies)
        )
        return state.replace(layers=layers)

    def _thin(
        self, seg: KVSegment, q_sum_sq: jax.Array, queries: jax.Array, prompt_len: int, max_new_tokens: int
    ) -> ThinKSegment:
        """A finalized base segment (kept entries a valid prefix in position order) split into thin
        keys for all but the last `recent` kept entries and full keys for those and what comes next.

        q_sum_sq: float32[B, Hs, D]; queries: int32[B], the observed queries per KV head.
        """
        kept_max = min(seg.budget if isinstance(seg, EvictionSegment) else prompt_len, prompt_len)
        n = count(seg)  # [B, Hs]
        valid = seg.pos >= 0  # [B, Hs, C]
        k32 = jnp.where(valid[..., None], seg.k.astype(jnp.float32), 0.0)
        k_energy = jnp.einsum("bhcd,bhcd->bhd", k32, k32) / jnp.maximum(n, 1)[..., None]  # [B, Hs, D]
        q_energy = q_sum_sq / jnp.maximum(queries, 1)[:, None, None]  # [B, Hs, D]
        score = q_energy * k_energy  # [B, Hs, D]
        _, top = jax.lax.top_k(score, self.kept_channels(seg.k.shape[-1]))
        channels = jnp.sort(top, axis=-1).astype(jnp.int32)  # [B, Hs, Dk]

        thin_n = jnp.maximum(n - self.recent, 0)  # [B, Hs] entries whose keys are thinned
        thin_cap = round_capacity(max(kept_max - self.recent, 0))
        in_thin = jnp.arange(thin_cap) < thin_n[..., None]  # [B, Hs, Ct]
        thin = KVSegment(
            k=jnp.take_along_axis(seg.k[:, :, :thin_cap], channels[:, :, None, :], axis=3),  # [B, Hs, Ct, Dk]
            v=seg.v[:, :, :thin_cap],
            pos=jnp.where(in_thin, seg.pos[:, :, :thin_cap], -1),
            heads=seg.heads,
        )
        full_cap = round_capacity(min(self.recent, kept_max) + max_new_tokens)
        slot = jnp.arange(full_cap)  # [Cf]
        src = jnp.minimum(thin_n[..., None] + slot, seg.capacity - 1)  # [B, Hs, Cf] source slot
        in_full = slot < (n - thin_n)[..., None]  # [B, Hs, Cf]

        def gather(x):  # [B, Hs, C, ...] -> [B, Hs, Cf, ...]
            return jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 3)), axis=2)

        full = KVSegment(k=gather(seg.k), v=gather(seg.v), pos=jnp.where(in_full, gather(seg.pos), -1), heads=seg.heads)
        return ThinKSegment(thin=thin, channels=channels, full=full)


def attend_thin_keys(q: jax.Array, seg: ThinKSegment, q_pos: jax.Array, window: int | None, scale: float) -> jax.Array:
    """Exact attention over thin-key and full-key entries in one softmax.

    q: [B, T, Hs, G, D] after RoPE; thin entries are scored with q's kept channels only. The scale
    stays 1/sqrt(D): dropped channels contribute nothing, as in the authors' pruned query.
    Returns [B, T, Hs, G, D].
    """
    q_thin = jnp.take_along_axis(q, seg.channels[:, None, :, None, :], axis=-1)  # [B, T, Hs, G, Dk]
    logits = (
        jnp.concatenate(
            [
                jnp.einsum("btkgc,bksc->bkgts", q_thin, seg.thin.k, preferred_element_type=jnp.float32),
                jnp.einsum("btkgd,bksd->bkgts", q, seg.full.k, preferred_element_type=jnp.float32),
            ],
            axis=-1,
        )
        * scale
    )  # [B, Hs, G, T, Ct + Cf]
    probs = visible_softmax(logits, seg.positions(), q_pos, window)  # [B, Hs, G, T, Ct + Cf]
    thin_probs, full_probs = jnp.split(probs.astype(seg.full.v.dtype), [seg.thin.capacity], axis=-1)
    return jnp.einsum("bkgts,bksd->btkgd", thin_probs, seg.thin.v) + jnp.einsum(
        "bkgts,bksd->btkgd", full_probs, seg.full.v
    )
