"""VATP (Guo et al., 2024): attention alone misjudges tokens; weigh it by the value's size.

The first tokens draw much attention but carry tiny value vectors (attention sinks), so the product
would evict them; the paper keeps them. The authors' code (guozhiyu/vatp, `--sink_len`) pins the first
`sink_len` tokens at the largest score, inside the heavy budget; it has no default, and kvjax takes 4,
StreamingLLM's sink.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.h2o import H2O
from kvjax.policies.token_eviction import newest


@dataclasses.dataclass(frozen=True)
class VATP(H2O):
    """Scores each token by its accumulated attention (H2O) times the L1 norm of its value vector;
    keeps the first `sink` tokens, the top of the rest up to `heavy` in all, and the `window` most
    recent; evicts as it goes."""

    sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sink <= self.heavy:
            raise ValueError(f"VATP needs 0 <= sink <= heavy (sinks count in the heavy budget); got {self.sink}")

    def with_budget(self, tokens):
        """H2O's even split; the sink stays within the heavy half."""
        super(H2O, self).with_budget(tokens)
        heavy = tokens // 2
        return dataclasses.replace(self, heavy=heavy, window=tokens - heavy, sink=min(self.sink, heavy))

    def priority(self, segment):
        v_l1 = jnp.sum(jnp.abs(segment.v.astype(jnp.float32)), axis=-1)  # [B, Hs, C]
        recent = segment.pos > newest(segment) - self.window
        sink = (segment.pos >= 0) & (segment.pos < self.sink)
        return jnp.where(recent | sink, jnp.inf, segment.score * v_l1)
