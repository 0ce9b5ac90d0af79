"""VATP (Guo et al., 2024): attention alone misjudges tokens; weigh it by the value's size."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.h2o import H2O
from kvjax.policies.token_eviction import newest


@dataclasses.dataclass(frozen=True)
class VATP(H2O):
    """Scores each token by its accumulated attention (H2O) times the L1 norm of its value vector;
    keeps the top `heavy` plus the `window` most recent; evicts as it goes."""

    def priority(self, segment):
        v_l1 = jnp.sum(jnp.abs(segment.v.astype(jnp.float32)), axis=-1)  # [B, Hs, C]
        recent = segment.pos > newest(segment) - self.window
        return jnp.where(recent, jnp.inf, segment.score * v_l1)
