"""TOVA (Oren et al., 2024): keep the tokens the current query attends to most, averaged over heads.

The score is replaced, not accumulated: after each step it is the attention of the step's last real
query, averaged over every query head of the layer, so all KV heads of a layer keep the same tokens
(the paper found the head-averaged choice better than per-head eviction). Prefill chunks evict too:
after a chunk, the last real query of each sequence in that chunk scores the entries and the top
`budget_tokens` survive (a row whose chunk is all padding keeps its scores). One chunk covering the
prompt is the paper's prompt compression by the last prompt token; decoding evicts one per token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.policies.token_eviction import TokenEviction


@dataclasses.dataclass(frozen=True)
class TOVA(TokenEviction):
    """Scores each entry by the last query's attention averaged over all heads of the layer; evicts
    the lowest, while prefilling (per chunk) and decoding."""

    budget_tokens: int = 512  # the paper's multi-state sizes span 64-4096; 512 is its typical point

    def __post_init__(self):
        if self.budget_tokens < 1:
            raise ValueError(f"TOVA budget_tokens must be >= 1; got {self.budget_tokens}")

    def with_budget(self, tokens):
        """`budget_tokens` = tokens."""
        super().with_budget(tokens)
        return dataclasses.replace(self, budget_tokens=tokens)

    def scored(self):
        return True

    def budget(self, config, layer):
        return self.budget_tokens

    def observed_queries(self, q_pos, new_pos, prompt_lengths):
        t = new_pos.shape[1]
        return jnp.max(jnp.where(new_pos >= 0, jnp.arange(t), -1), axis=1, keepdims=True)  # [B, 1] last real query

    def observe(self, segment, probs, new_pos, prompt_lengths):
        # probs: [B, K, G, T, C] over the segment's heads; TokenEviction keeps every KV head of a
        # layer in one segment, so the mean over (K, G) is the mean over all of the layer's heads.
        t = new_pos.shape[1]
        last = jnp.max(jnp.where(new_pos >= 0, jnp.arange(t), -1), axis=1)  # [B] last real query
        mean = jnp.mean(probs, axis=(1, 2))  # [B, T, C]
        picked = jnp.take_along_axis(mean, jnp.maximum(last, 0)[:, None, None], axis=1)  # [B, 1, C]
        fresh = jnp.broadcast_to(picked, segment.score.shape)  # [B, Hs, C]: every head the same
        return jnp.where((last >= 0)[:, None, None], fresh, segment.score)

    def priority(self, segment):
        return segment.score
