"""Knorm (Devoto et al., 2024): keys with a low L2 norm draw high attention, so keep those.

No attention weights are needed (the norm is RoPE-invariant and read from the stored keys), so the
plain attention path runs. Like kvpress's KnormPress this compresses the prompt only: the prompt is
prefilled exactly, its `budget_tokens` lowest-norm keys per (layer, KV head) are kept at its end,
and decoding appends without eviction (a generated token's norm says little about future use). The
layers in `skip_layers` keep every token: the authors leave layers 0 and 1 uncompressed (their
attention does not follow the key norm); kvpress's KnormPress compresses every layer (`skip_layers=()`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.policies.token_eviction import TokenEviction

EVERYTHING = int(np.iinfo(np.int32).max)  # the budget of a layer that keeps every token


@dataclasses.dataclass(frozen=True)
class Knorm(TokenEviction):
    """Scores each prompt entry by minus the L2 norm of its key; keeps the lowest-norm
    `budget_tokens` per KV head at the end of the prompt, except in `skip_layers`; decoding appends."""

    budget_tokens: int = 1024
    skip_layers: tuple[int, ...] = (0, 1)  # the authors'; () compresses every layer, as kvpress

    evict_while_prefilling = False
    evict_while_decoding = False

    def __post_init__(self):
        if self.budget_tokens < 1:
            raise ValueError(f"Knorm budget_tokens must be >= 1; got {self.budget_tokens}")
        skip = (self.skip_layers,) if isinstance(self.skip_layers, int) else self.skip_layers
        if not all(isinstance(layer, (int, np.integer)) and layer >= 0 for layer in skip):
            raise ValueError(f"Knorm skip_layers must be layer indices >= 0; got {self.skip_layers!r}")
        object.__setattr__(self, "skip_layers", tuple(sorted({int(layer) for layer in skip})))

    @property
    def packed_tail(self):
        """0: the prompt is written in place and ranked by its keys alone at its end."""
        return 0

    def with_budget(self, tokens):
        """`budget_tokens` = tokens."""
        super().with_budget(tokens)
        return dataclasses.replace(self, budget_tokens=tokens)

    def budget(self, config, layer):
        return EVERYTHING if layer in self.skip_layers else self.budget_tokens

    def priority(self, segment):
        k = segment.k.astype(jnp.float32)  # [B, Hs, C, D]
        return -jnp.sqrt(jnp.einsum("bhcd,bhcd->bhc", k, k))  # [B, Hs, C]
