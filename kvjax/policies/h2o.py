"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.token_eviction import TokenEviction, newest


@dataclasses.dataclass(frozen=True)
class H2O(TokenEviction):
    """Scores each token by the attention it has received (summed over queries, averaged over the
    GQA group); keeps the top `heavy` plus the `window` most recent; evicts as it goes."""

    heavy: int = 512
    window: int = 512

    def __post_init__(self):
        if self.heavy < 0 or self.window < 1:
            raise ValueError(f"H2O needs heavy >= 0 and window >= 1; got {self.heavy}, {self.window}")

    def with_budget(self, tokens):
        """`heavy` and `window` split the tokens evenly, as H2O's paper does."""
        super().with_budget(tokens)
        return dataclasses.replace(self, heavy=tokens // 2, window=tokens - tokens // 2)

    def scored(self):
        return True

    def budget(self, config, layer):
        return self.heavy + self.window

    def vote_weights(self, new_pos, prompt_lengths):
        return (new_pos >= 0).astype(jnp.float32)  # every query's attention, summed

    def priority(self, segment):
        recent = segment.pos > newest(segment) - self.window
        return jnp.where(recent, jnp.inf, segment.score)
