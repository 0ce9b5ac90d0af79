"""StreamingLLM (Xiao et al., 2023): attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.token_eviction import TokenEviction


@dataclasses.dataclass(frozen=True)
class StreamingLLM(TokenEviction):
    """Keeps the first `sink` tokens and the most recent `window`; evicts as it prefills and decodes."""

    sink: int = 4
    window: int = 1020

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"StreamingLLM needs sink >= 0 and window >= 1; got {self.sink}, {self.window}")

    def with_budget(self, tokens):
        """The sink stays; the window takes the rest."""
        super().with_budget(tokens)
        if tokens <= self.sink:
            raise ValueError(f"StreamingLLM: a budget of {tokens} tokens must exceed the sink ({self.sink})")
        return dataclasses.replace(self, window=tokens - self.sink)

    def budget(self, config, layer):
        return self.sink + self.window

    def priority(self, segment):
        recency = segment.pos.astype(jnp.float32)  # newer is better
        return jnp.where(segment.pos < self.sink, jnp.inf, recency)
