"""AdaKV (Feng et al., 2024): head-wise budgets, chosen jointly over a layer's KV heads.

A wrapper over a prompt-compressing scoring policy (SnapKV, PyramidKV, Knorm): the base policy
prefills and scores exactly as it would alone; at the end of the prompt, per layer, every head keeps
its protected entries (priority +inf, e.g. SnapKV's observation window) and a share of the layer's
selected budget S = budget - protected per head, by one of two safeguards:
- "authors" (FFY0/AdaKV, `AdaptiveSnapKVCluster.update_kv_gqa`, the default): the top S x Hkv scores
  of all heads pooled give each head its share c_h; head h then keeps its own top
  round((1 - alpha) c_h + int(alpha S)) entries (torch's float32 arithmetic and round-half-even), so
  the layer holds about S x Hkv, up to Hkv // 2 more from the rounding;
- "kvpress" (NVIDIA kvpress's `AdaKVPress`): every head first keeps its top max(1, int(alpha x budget))
  entries (protected ones included), then the layer's top budget x Hkv priorities of all heads pooled.
Heads thus keep different counts, and the layer's storage is one `PooledSegment` sized by the layer
total, budget * Hkv (+ Hkv // 2, + Hkv per decode token), never budget * max(count): each slot
records its owning head. Entries are ordered by (head, position) after the prompt, so each head's
entries are a contiguous range a ragged kernel can read on its own; the jnp reference attends over
the pool with the other heads' entries masked (exact, memory-exact, compute x Hkv). Decoding appends
one entry per head. A budget at least as large as a head's entries keeps them all (the authors'
code compresses when the budget equals the prompt: kvjax's rule that such a budget equals Full wins).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import reference_attention
from kvjax.config import ModelConfig
from kvjax.kv_state import KVState
from kvjax.policies.base import Layout, Policy
from kvjax.policies.token_eviction import TokenEviction


@struct.dataclass(frozen=True)
class PooledSegment:
    """All KV heads of a layer in one buffer of `capacity` slots; slot c belongs to head[b, c]."""

    k: jax.Array  # [B, C, D]
    v: jax.Array  # [B, C, D]
    pos: jax.Array  # int32[B, C]: original token position, -1 = empty
    head: jax.Array  # int32[B, C]: owning KV head (index into `heads`)
    heads: tuple[int, ...] = struct.field(pytree_node=False)  # the layer's KV heads

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def head_positions(self) -> jax.Array:
        """int32[B, Hkv, C]: each head's view of the pool, other heads' slots marked empty."""
        mine = self.head[:, None, :] == jnp.arange(len(self.heads))[None, :, None]  # [B, K, C]
        return jnp.where(mine, self.pos[:, None, :], -1)

    def counts(self) -> jax.Array:
        """int32[B, Hkv]: entries held per head."""
        return jnp.sum(self.head_positions() >= 0, axis=-1, dtype=jnp.int32)


def _ranks(priority: jax.Array) -> jax.Array:
    """int32[..., C]: 0 for the highest priority of each row, 1 for the next, ..."""
    order = jnp.argsort(-priority, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


SAFEGUARDS = ("authors", "kvpress")


@dataclasses.dataclass(frozen=True)
class AdaKV(Policy):
    """Scores entries with `base`'s priority; each layer splits budget x Hkv between its heads by the
    pooled scores, with the `safeguard` floor of `alpha` per head (the authors' rule by default, or
    kvpress's). Prompt compression; decoding appends."""

    base: TokenEviction = dataclasses.field(default_factory=lambda: _default_base())
    alpha: float = 0.2  # the safeguard share: the authors' LongBench runs with GQA use 0.2, as kvpress
    safeguard: str = "authors"  # "authors" (FFY0/AdaKV) or "kvpress" (AdaKVPress)

    def __post_init__(self):
        if not isinstance(self.base, TokenEviction):
            raise ValueError(f"AdaKV needs a TokenEviction base policy; got {type(self.base).__name__}")
        if self.base.evict_while_prefilling or self.base.evict_while_decoding:
            raise ValueError(
                f"AdaKV needs a base that compresses the prompt once (no eviction while prefilling "
                f"or decoding); {type(self.base).__name__} evicts as it goes"
            )
        if getattr(self.base, "per_query_head", False):
            raise ValueError("AdaKV pools one entry set per KV head; its base cannot select per query head")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"AdaKV alpha must be in [0, 1]; got {self.alpha}")
        if self.safeguard not in SAFEGUARDS:
            raise ValueError(f"AdaKV safeguard must be one of {SAFEGUARDS}; got {self.safeguard!r}")

    def with_budget(self, tokens):
        """The base policy's budget."""
        base = self.base.with_budget(tokens)
        return None if base is None else dataclasses.replace(self, base=base)

    @property
    def packed_tail(self):
        """The base's: it prefills alone; the head-wise split happens in `finalize`."""
        return self.base.packed_tail

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        return self.base.layout(config, prompt_len, max_new_tokens, chunk)

    def scored(self) -> bool:
        return self.base.scored()

    def segment_step(self, ctx, segment, x, phase):
        if not isinstance(segment, PooledSegment):  # prefill: the base policy, unchanged
            return self.base.segment_step(ctx, segment, x, phase)
        pool = _append(segment, x.k, x.v, x.new_pos)  # the pool holds every KV head of the layer
        k_all = jnp.broadcast_to(pool.k[:, None], (pool.k.shape[0], len(pool.heads)) + pool.k.shape[1:])
        v_all = jnp.broadcast_to(pool.v[:, None], k_all.shape)  # [B, K, C, D] views of one buffer
        # The reference, not `attend`: the decode kernels assume each row's entries fill a prefix of
        # its slots, which a head's masked view of the pool does not.
        out = reference_attention(x.q, k_all, v_all, pool.head_positions(), x.q_pos, ctx.window, ctx.scale)
        return out, pool

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        layers = []
        for layer, segments in enumerate(state.layers):
            if len(segments) != 1 or len(segments[0].heads) != config.num_kv_heads:
                raise ValueError("AdaKV needs a base layout with one segment holding every KV head")
            budget = self.base.budget(config, layer)
            layers.append((self._pool(segments[0], budget, prompt_len, max_new_tokens),))
        return state.replace(layers=tuple(layers))

    def kept(self, priority: jax.Array, budget: int) -> jax.Array:
        """bool[B, K, C]: the entries a layer keeps, from the base's priorities float32[B, K, C] (+inf
        protected, -inf empty) and the per-head `budget`, by the `safeguard` rule."""
        b, kh, c = priority.shape
        budget = min(budget, c)  # a layer that keeps everything (Knorm's skipped layers)
        held = priority > -jnp.inf
        protected = priority == jnp.inf
        rank = _ranks(priority)  # [B, K, C] within each head, protected first
        if self.safeguard == "kvpress":
            safe = max(1, int(budget * self.alpha)) if self.alpha > 0 else 0  # AdaKVPress's n_safe
            forced = jnp.where((rank < safe) & held, jnp.inf, priority).reshape(b, kh * c)
            pooled = _ranks(forced) < kh * budget  # [B, K*C]: the layer's top budget x Hkv
            return pooled.reshape(b, kh, c) & held
        candidate = held & ~protected
        selected = jnp.maximum(budget - jnp.sum(protected, axis=-1), 0)  # [B, K]: S per head
        share = _ranks(jnp.where(candidate, priority, -jnp.inf).reshape(b, kh * c)) < jnp.sum(selected, -1)[:, None]
        c_h = jnp.sum(share.reshape(b, kh, c) & candidate, axis=-1)  # [B, K]: each head's share of the pool
        floor = jnp.asarray([int(s * self.alpha) for s in range(budget + 1)], jnp.float32)[selected]  # int(alpha S)
        cap = jnp.round(c_h.astype(jnp.float32) * jnp.float32(1 - self.alpha) + floor).astype(jnp.int32)
        cap = jnp.where(jnp.sum(candidate, axis=-1) <= selected, c, cap)  # the budget covers the head: keep all
        return held & (protected | (rank - jnp.sum(protected, axis=-1, keepdims=True) < cap[..., None]))

    def _pool(self, seg, budget: int, prompt_len: int, max_new_tokens: int) -> PooledSegment:
        """The layer's kept entries (`kept`), in (head, pos) order, in min(budget, prompt) x Hkv slots
        (+ Hkv // 2 for the authors' rounding) and one slot per head per decode token."""
        b, kh, c, d = seg.k.shape
        total = min(budget, prompt_len) * kh + (kh // 2 if self.safeguard == "authors" else 0)
        priority = jnp.where(seg.pos >= 0, self.base.priority(seg), -jnp.inf)  # [B, K, C]
        keep = self.kept(priority, budget).reshape(b, kh * c)
        owner = jnp.broadcast_to(jnp.arange(kh * c) // c, (b, kh * c))
        pos_all = seg.pos.reshape(b, kh * c)
        key = jnp.where(keep, owner * prompt_len + pos_all, jnp.iinfo(jnp.int32).max)  # (head, position)
        idx = jnp.argsort(key, axis=-1)[:, :total]  # [B, total]: kept entries first, in (head, pos) order
        held = jnp.take_along_axis(keep, idx, axis=-1)
        owner = idx // c
        pos = jnp.where(held, jnp.take_along_axis(pos_all, idx, axis=-1), -1)
        pad = kh * max_new_tokens  # one slot per head per decode token

        def gather(x):  # [B, K, C, D] -> [B, total + pad, D]
            picked = jnp.take_along_axis(x.reshape(b, kh * c, d), idx[..., None], axis=1)
            return jnp.pad(picked, ((0, 0), (0, pad), (0, 0)))

        return PooledSegment(
            k=gather(seg.k),
            v=gather(seg.v),
            pos=jnp.pad(pos, ((0, 0), (0, pad)), constant_values=-1),
            head=jnp.pad(jnp.where(pos >= 0, owner, 0), ((0, 0), (0, pad))).astype(jnp.int32),
            heads=seg.heads,
        )


def _append(pool: PooledSegment, k: jax.Array, v: jax.Array, new_pos: jax.Array) -> PooledSegment:
    """Writes each new token's entry for every head after the pool's last held entry.

    k, v: [B, T, K, D]; new_pos: int32[B, T]. Entries stay a prefix (decoding never evicts).
    """
    b, t, kh, d = k.shape
    start = jnp.sum(pool.pos >= 0, axis=-1, dtype=jnp.int32)  # [B] first free slot
    heads = jnp.broadcast_to(jnp.tile(jnp.arange(kh, dtype=jnp.int32), t), (b, t * kh))  # [B, T*K]
    pos = jnp.repeat(new_pos, kh, axis=1)  # [B, T*K], t-major like the reshape below

    def one(row, new, s):  # one sequence: [C, ...] <- [T*K, ...] at slot s
        return jax.lax.dynamic_update_slice_in_dim(row, new.astype(row.dtype), s, axis=0)

    write = jax.vmap(one)
    return pool.replace(
        k=write(pool.k, k.reshape(b, t * kh, d), start),
        v=write(pool.v, v.reshape(b, t * kh, d), start),
        pos=write(pool.pos, pos, start),
        head=write(pool.head, heads, start),
    )


def _default_base() -> TokenEviction:
    from kvjax.policies.snapkv import SnapKV  # the paper's main integration (Ada-SnapKV)

    return SnapKV()
