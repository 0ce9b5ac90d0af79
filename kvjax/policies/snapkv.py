"""SnapKV (Li et al., 2024): the prompt's last queries vote for the earlier tokens worth keeping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.layer_step import StepInputs
from kvjax.policies.token_eviction import TokenEviction, newest


def pool_1d(x: jax.Array, kernel: int, kind: str) -> jax.Array:
    """Same-size 1-D pooling along the last axis (stride 1, padding kernel // 2; avg counts padding,
    as torch's avg_pool1d does)."""
    pad = kernel // 2
    window = (1,) * (x.ndim - 1) + (kernel,)
    padding = ((0, 0),) * (x.ndim - 1) + ((pad, pad),)
    ones = (1,) * x.ndim
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, ones, padding)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, ones, padding) / kernel


def query_head_inputs(x: StepInputs) -> StepInputs:
    """The step's inputs with each query head as its own KV head: q [B, T, K*G, 1, D], k and v repeated
    G times along the heads (query head k*G + g reads KV head k), as the authors' `repeat_kv`."""
    b, t, kh, g, d = x.q.shape
    flat = lambda q: None if q is None else q.reshape(b, t, kh * g, 1, d)  # noqa: E731
    rep = lambda a: None if a is None else jnp.repeat(a, g, axis=2)  # noqa: E731
    return dataclasses.replace(
        x, q=flat(x.q), q_raw=flat(x.q_raw), k=rep(x.k), k_raw=rep(x.k_raw), v=rep(x.v), score=rep(x.score)
    )


@dataclasses.dataclass(frozen=True)
class SnapKV(TokenEviction):
    """Scores prompt tokens by the attention of the last `window` prompt queries (softmax over the
    whole prompt, summed over those queries, averaged over the GQA group), smoothed by 1-D pooling;
    keeps the top `budget - window` plus the window. Compresses the prompt only: decoding appends.

    Defaults are the authors' released LongBench configs (FasterDecoding/SnapKV
    `ablation_c*_w32_k7_maxpool.json`: window 32, kernel 7, max pooling). The authors repeat K/V to
    the query heads and select per query head; kvjax averages each GQA group's votes and keeps one set
    per KV head (as kvpress and the AdaKV authors' GQA mode), and `per_query_head=True` selects per
    query head as the authors do, storing num_heads / num_kv_heads times the entries.
    """

    budget_tokens: int = 1024
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    per_query_head: bool = False

    evict_while_prefilling = False
    evict_while_decoding = False

    def __post_init__(self):
        if self.window < 1 or self.budget_tokens <= self.window:
            raise ValueError(
                f"SnapKV needs 1 <= window < budget; got window {self.window}, budget {self.budget_tokens}"
            )
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be odd and positive; got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV pooling must be 'avg' or 'max'; got {self.pooling!r}")

    def layout(self, config, prompt_len, max_new_tokens, chunk):
        """TokenEviction's layout; with `per_query_head`, one row per query head (the authors' repeated K/V)."""
        layout = super().layout(config, prompt_len, max_new_tokens, chunk)
        if not self.per_query_head:
            return layout
        heads = tuple(range(config.num_heads))
        return tuple(tuple(dataclasses.replace(spec, heads=heads) for spec in layer) for layer in layout)

    def step(self, ctx, segments, x, phase):
        """With `per_query_head`, every query head is its own KV head (K/V repeated over the group)."""
        if not self.per_query_head:
            return super().step(ctx, segments, x, phase)
        g = x.q.shape[3]
        out, segments = super().step(ctx, segments, query_head_inputs(x), phase)
        b, t, h, _, d = out.shape
        return out.reshape(b, t, h // g, g, d), segments

    @property
    def packed_tail(self):
        """The observation window: only its queries vote. None with `per_query_head` (its rows repeat the KV
        heads, which packing does not unpack)."""
        return None if self.per_query_head else self.window

    def with_budget(self, tokens):
        """`budget_tokens` = tokens; an observation window at least as large shrinks to tokens // 2."""
        super().with_budget(tokens)
        window = self.window if self.window < tokens else max(1, tokens // 2)
        return dataclasses.replace(self, budget_tokens=tokens, window=window)

    def scored(self):
        return True

    def needs_attention(self, decoding):
        return not decoding

    def budget(self, config, layer):
        return self.budget_tokens

    def observed_queries(self, q_pos, new_pos, prompt_lengths):
        window = jnp.arange(self.window)  # [W]
        first = prompt_lengths[:, None] - self.window  # [B, 1] the window's first position (< 0: short prompt)
        at = first + window - q_pos[:, :1]  # [B, W] index in this chunk of each window position
        return jnp.where((at >= 0) & (at < q_pos.shape[1]) & (first + window >= 0), at, -1)

    def vote_weights(self, new_pos, prompt_lengths):
        in_window = new_pos >= (prompt_lengths - self.window)[:, None]  # [B, T] observation queries
        return (in_window & (new_pos >= 0)).astype(jnp.float32)

    def priority(self, segment):
        # Slots hold the prompt in position order here, so pooling runs along positions.
        window = segment.pos > newest(segment) - self.window
        votes = jnp.where(window | (segment.pos < 0), 0.0, segment.score)  # the window votes, not is voted for
        return jnp.where(window, jnp.inf, pool_1d(votes, self.kernel, self.pooling))
