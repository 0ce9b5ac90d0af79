"""Knorm (Devoto et al., 2024): keys with a low L2 norm draw high attention, so keep those.

No attention weights are needed (the norm is RoPE-invariant and read from the stored keys), so the
plain attention path runs. Like kvpress's KnormPress this compresses the prompt only: the prompt is
prefilled exactly, its `budget_tokens` lowest-norm keys per (layer, KV head) are kept at its end,
and decoding appends without eviction (a generated token's norm says little about future use).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.token_eviction import TokenEviction


@dataclasses.dataclass(frozen=True)
class Knorm(TokenEviction):
    """Scores each prompt entry by minus the L2 norm of its key; keeps the lowest-norm
    `budget_tokens` per KV head at the end of the prompt; decoding appends."""

    budget_tokens: int = 1024

    evict_while_prefilling = False
    evict_while_decoding = False

    def __post_init__(self):
        if self.budget_tokens < 1:
            raise ValueError(f"Knorm budget_tokens must be >= 1; got {self.budget_tokens}")

    def with_budget(self, tokens):
        """`budget_tokens` = tokens."""
        super().with_budget(tokens)
        return dataclasses.replace(self, budget_tokens=tokens)

    def budget(self, config, layer):
        return self.budget_tokens

    def priority(self, segment):
        k = segment.k.astype(jnp.float32)  # [B, Hs, C, D]
        return -jnp.sqrt(jnp.einsum("bhcd,bhcd->bhc", k, k))  # [B, Hs, C]
