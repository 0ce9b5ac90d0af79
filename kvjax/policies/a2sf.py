"""A2SF (Jo & Shin, 2024): H2O's accumulated attention with a forgetting factor.

The paper's score of token k after n queries is A_n,k = sum_{q<=n} lambda^(n-q) S_q,k, i.e. the
recurrence s <- lambda * s + a_q applied once per query token. kvjax applies it exactly per real
query: a chunk whose row b has n_b real (non-padding) queries updates
    s <- lambda^n_b * s + sum_t lambda^(#real queries after t) * a_t,
so padding queries neither decay nor add, and a decode token is the case n_b = 1. New entries start
at 0, so the result equals feeding the prompt one token at a time with eviction at chunk ends.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.h2o import H2O


@dataclasses.dataclass(frozen=True)
class A2SF(H2O):
    """Scores each token by its attention received, decayed by `forgetting` per later query (GQA
    group mean); keeps the top `heavy` plus the `window` most recent; evicts as it goes."""

    # The paper tunes lambda per model and task (0 < lambda < 1, 0.1-0.99 in its experiments) and
    # gives no single default; 0.95 keeps a ~20-query memory, a mild correction of H2O's bias
    # towards early tokens. lambda = 1 is H2O exactly.
    forgetting: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.forgetting <= 1.0:
            raise ValueError(f"A2SF forgetting factor must be in (0, 1]; got {self.forgetting}")

    def vote_weights(self, new_pos, prompt_lengths):
        real = new_pos >= 0  # [B, T]
        later = jnp.sum(real, axis=1, keepdims=True) - jnp.cumsum(real, axis=1)  # [B, T] real queries after t
        return jnp.where(real, jnp.float32(self.forgetting) ** later, 0.0)

    def observe_votes(self, segment, votes, new_pos, prompt_lengths):
        n = jnp.sum(new_pos >= 0, axis=1)  # [B] real queries in this step
        return (jnp.float32(self.forgetting) ** n)[:, None, None] * segment.score + votes
