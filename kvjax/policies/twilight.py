"""Twilight (Lin et al., 2025): Quest's candidate pages pruned, per decode step and head, to the fewest
whose estimated attention reaches `top_p` (nucleus selection instead of a fixed top-k budget).

Select, then prune. Quest picks a conservative `budget_tokens // page` pages per KV head (8192 tokens
in the authors' Quest configuration). Twilight then estimates the query's attention over the
candidates' tokens from a low-bit copy of the keys (`bits` = 4: per token, asymmetric min/max over all
D channels, as the authors' estimator), softmax over the candidates only, and keeps, for each query
head, the fewest pages whose estimated weight sums to at least `top_p` (0.85); a GQA group reads the
union of its heads' pages, once, through the block-sparse decode kernel. Attention over the kept pages
is exact (full-precision keys). The number of pages read adapts per layer, head and step: a query
that focuses on a needle reads a few pages, a diffuse one most of the candidates.

Deviation: the authors prune single tokens (page size 1 in their FlashInfer kernels); here the unit is
the decode kernel's page, ranked by the summed weight of its tokens. A kept page is attended whole, so
the exact attention covers at least the estimated mass `top_p`.

Memory: Quest's (every token, page bounds) plus the low-bit keys of the sparse layers: at 4 bits and
D = 128, 64 bytes of codes and 4 of scale and zero per token and KV head, about a quarter of the keys.
Each step reads the candidates' codes for the estimate (XLA gather and matmul, not fused into the
kernel), then the kept pages' full keys and values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import visibility_mask
from kvjax.config import ModelConfig
from kvjax.kv_state import KVState
from kvjax.policies.quest import PagedSegment, Quest
from pallas_kernels import kv_quant
from pallas_kernels.block_masks import DecodeBlockTable, decode_table_subset

SCALE_DTYPE = jnp.bfloat16  # the estimate keys' per-token scale and zero


@struct.dataclass(frozen=True)
class EstimatedPagedSegment(PagedSegment):
    """Quest's paged segment with every slot's key also quantized per token, for the weight estimate."""

    k_codes: jax.Array  # uint8[B, Hs, C, D * bits / 8]
    k_scale: jax.Array  # [B, Hs, C, 1] (bfloat16): one group of all D channels per token
    k_zero: jax.Array  # [B, Hs, C, 1]
    bits: int = struct.field(pytree_node=False)

    def estimate_logits(self, q: jax.Array, slots: jax.Array) -> jax.Array:
        """float32[B, Hs, G, T]: q.k for q [B, Hs, G, D] and the quantized keys of the slots int32[B, Hs, T].
        One scale s and zero z per token give q.k = s (q.codes) + z sum(q): no key is dequantized."""

        def take(x):
            return jnp.take_along_axis(x, slots[..., None], axis=2)

        codes = kv_quant.unpack_tokens(take(self.k_codes), self.bits, self.kv.k.shape[-1], jnp.float32)  # [B, Hs, T, D]
        q = q.astype(jnp.float32)
        scale = take(self.k_scale)[..., 0].astype(jnp.float32)[:, :, None]  # [B, Hs, 1, T]
        zero = take(self.k_zero)[..., 0].astype(jnp.float32)[:, :, None]
        return jnp.einsum("bhgd,bhtd->bhgt", q, codes) * scale + q.sum(-1, keepdims=True) * zero


def smallest_covering(mass: jax.Array, p: float) -> jax.Array:
    """bool like mass [..., n]: the fewest largest entries of each row whose sum reaches p (every
    nonzero entry when the row sums to less); entries tied with the smallest kept one are kept too."""
    ranked = -jnp.sort(-mass, axis=-1)  # descending
    before = jnp.cumsum(ranked, axis=-1) - ranked  # mass strictly ahead of each rank
    kept = jnp.sum(before < p, axis=-1, keepdims=True)  # >= 1
    cut = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    return (mass >= cut) & (mass > 0)


@dataclasses.dataclass(frozen=True)
class Twilight(Quest):
    """Quest's `budget_tokens // page` candidate pages, of which each decode query reads only the fewest
    whose attention, estimated from `bits`-bit keys, sums to `top_p` for each of its query heads."""

    budget_tokens: int = 8192  # candidate tokens per KV head (the authors' Quest budget before pruning)
    top_p: float = 0.85
    bits: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Twilight top_p must be in (0, 1]; got {self.top_p}")
        if self.bits not in kv_quant.BITS or isinstance(self.bits, bool):
            raise ValueError(f"Twilight bits must be one of {kv_quant.BITS}; got {self.bits!r}")

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Quest's paged segments, each with its keys quantized for the estimate."""
        state = super().finalize(config, state, prompt_len, max_new_tokens)

        def estimated(seg):
            if not isinstance(seg, PagedSegment):  # a dense layer
                return seg
            codes, scale, zero = kv_quant.quantize_tokens(seg.kv.k, self.bits, config.head_dim, SCALE_DTYPE)
            return EstimatedPagedSegment(
                kv=seg.kv, k_min=seg.k_min, k_max=seg.k_max, k_codes=codes, k_scale=scale, k_zero=zero, bits=self.bits
            )

        return state.replace(layers=tuple(tuple(estimated(seg) for seg in layer) for layer in state.layers))

    def append(
        self, seg: EstimatedPagedSegment, k: jax.Array, v: jax.Array, q_pos: jax.Array, new_pos: jax.Array
    ) -> EstimatedPagedSegment:
        """Quest's append, and the token's quantized key at its slot. k, v: [B, 1, Hs, D]."""
        seg = super().append(seg, k, v, q_pos, new_pos)
        codes, scale, zero = kv_quant.quantize_tokens(k.swapaxes(1, 2), self.bits, k.shape[-1], SCALE_DTYPE)
        rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
        heads = jnp.arange(k.shape[2])[None, :]  # [1, Hs]
        slot = q_pos[:, :1]  # [B, 1]
        return seg.replace(
            k_codes=seg.k_codes.at[rows, heads, slot].set(codes[:, :, 0]),
            k_scale=seg.k_scale.at[rows, heads, slot].set(scale[:, :, 0]),
            k_zero=seg.k_zero.at[rows, heads, slot].set(zero[:, :, 0]),
        )

    def choose_pages(
        self, q: jax.Array, seg: EstimatedPagedSegment, q_pos: jax.Array, window: int | None, scale: float
    ) -> DecodeBlockTable:
        """Quest's candidates reduced to the union over the GQA group of each query head's fewest
        pages covering `top_p` of its estimated attention. q: [B, 1, Hs, G, D]; q_pos: int32[B, 1]."""
        candidates = super().choose_pages(q, seg, q_pos, window, scale)
        mass = self.estimated_page_mass(q, seg, candidates, q_pos, window, scale)  # [B, Hs, G, n]
        return decode_table_subset(candidates, smallest_covering(mass, self.top_p).any(axis=2))

    def estimated_page_mass(
        self,
        q: jax.Array,
        seg: EstimatedPagedSegment,
        table: DecodeBlockTable,
        q_pos: jax.Array,
        window: int | None,
        scale: float,
    ) -> jax.Array:
        """float32[B, Hs, G, n]: each query head's softmax weight over the visible tokens of the listed
        pages, from the quantized keys, summed per table entry (0 past a row's count)."""
        b, _, hs, g, _ = q.shape
        n = table.max_blocks
        entry = jnp.repeat(jnp.arange(n), self.page)  # [T]: the table entry of each candidate token
        slots = jnp.repeat(table.kv_blocks, self.page, axis=-1) * self.page + jnp.arange(n * self.page) % self.page
        logits = seg.estimate_logits(q[:, 0], slots) * scale  # [B, Hs, G, T], T = n * page
        pos = jnp.take_along_axis(seg.kv.pos, slots, axis=2)  # [B, Hs, T]
        visible = visibility_mask(pos, q_pos, window) & (entry < table.counts[..., None, None])  # [B, Hs, 1, T]
        weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)  # [B, Hs, G, T]
        return weights.reshape(b, hs, g, n, self.page).sum(-1)
