"""Numpy readings of query-aware page selection (Quest, Twilight) for one (sequence, KV head) row, and
a random decode step to check them on: a cache row with one new token per sequence to write."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kv_state import KVSegment
from kvjax.layer_step import Decode, LayerContext, StepInputs

PAGE = 16


def page_bounds(k: np.ndarray, pos: np.ndarray, page: int = PAGE) -> tuple[np.ndarray, np.ndarray]:
    """Per page of one row's slots, each channel's min and max over the held keys (+inf / -inf if none)."""
    held = (pos >= 0)[:, None]
    lo = np.where(held, k, np.inf).reshape(-1, page, k.shape[-1]).min(1)
    hi = np.where(held, k, -np.inf).reshape(-1, page, k.shape[-1]).max(1)
    return lo, hi


def visible_slots(pos: np.ndarray, position: int, window: int | None) -> np.ndarray:
    """bool[C]: the held slots a query at `position` may see."""
    visible = (pos >= 0) & (pos <= position)
    return visible if window is None else visible & (pos > position - window)


def quest_pages(
    q: np.ndarray, k: np.ndarray, pos: np.ndarray, position: int, pages_read: int, window: int | None
) -> np.ndarray:
    """The pages a query group q [G, D] at `position` reads from a row k [C, D], as the authors' Quest
    kernel (mit-han-lab/Quest: the last page always, plus the best of the others, at least 3 pages in
    all as in their evaluation's max(3, budget // page)): the current page first, then the visible
    pages with the largest mean-over-G bound sum_d max(q_d M_d, q_d m_d)."""
    lo, hi = page_bounds(k, pos)
    first = np.arange(len(lo)) * PAGE
    visible_page = (pos.reshape(-1, PAGE) >= 0).any(-1) & (first <= position)
    if window is not None:
        visible_page &= first + PAGE - 1 > position - window
    bound = np.maximum(q[:, None] * hi[None], q[:, None] * lo[None]).sum(-1).mean(0)  # [P]
    bound = np.where(visible_page, bound, -np.inf)
    bound[position // PAGE] = np.inf  # the current page
    chosen = np.argsort(-bound, kind="stable")[: max(3, pages_read)]
    return chosen[np.isfinite(bound[chosen]) | (chosen == position // PAGE)]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, attended: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention of q [G, D] over the slots `attended` bool[C] of k, v [C, D]."""
    logits = q @ k[attended].T * scale  # [G, n]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v[attended]


def on_pages(pages: np.ndarray, capacity: int) -> np.ndarray:
    """bool[C]: the slots of the listed pages."""
    return np.isin(np.arange(capacity) // PAGE, pages)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """Rows k, v, pos [B, H, C(, D)] holding slots [0, held) and a decode token per sequence (q, k_new,
    v_new) landing at position held."""

    k: np.ndarray
    v: np.ndarray
    pos: np.ndarray
    held: np.ndarray
    q: np.ndarray  # [B, 1, H, G, D]
    k_new: np.ndarray  # [B, 1, H, D]
    v_new: np.ndarray

    @classmethod
    def random(
        cls, seed: int, held=(150, 93), heads: int = 2, group: int = 3, head_dim: int = 32, capacity: int = 160
    ) -> DecodeCase:
        rng = np.random.default_rng(seed)
        b, held = len(held), np.asarray(held)
        slots = np.arange(capacity)
        pos = np.broadcast_to(np.where(slots < held[:, None], slots, -1)[:, None], (b, heads, capacity))
        pos = pos.astype(np.int32)
        k, v = (
            np.where(pos[..., None] >= 0, rng.normal(size=(b, heads, capacity, head_dim)), 0.0).astype(np.float32)
            for _ in range(2)
        )
        q = rng.normal(size=(b, 1, heads, group, head_dim)).astype(np.float32)
        k_new, v_new = (rng.normal(size=(b, 1, heads, head_dim)).astype(np.float32) for _ in range(2))
        return cls(k=k, v=v, pos=pos, held=held, q=q, k_new=k_new, v_new=v_new)

    def segment(self) -> KVSegment:
        heads = tuple(range(self.k.shape[1]))
        return KVSegment(k=jnp.asarray(self.k), v=jnp.asarray(self.v), pos=jnp.asarray(self.pos), heads=heads)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """k_min, k_max [B, H, P, D] of the held slots."""
        b, h = self.k.shape[:2]
        pairs = [[page_bounds(self.k[i, j], self.pos[i, j]) for j in range(h)] for i in range(b)]
        return tuple(np.stack([[pair[n] for pair in row] for row in pairs]) for n in (0, 1))

    def row(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row (i, j)'s k, v, pos with the new token written at slot = position held[i]."""
        k, v, pos = self.k[i, j].copy(), self.v[i, j].copy(), self.pos[i, j].copy()
        at = self.held[i]
        k[at], v[at], pos[at] = self.k_new[i, 0, j], self.v_new[i, 0, j], at
        return k, v, pos

    def step(self, policy, seg, window: int | None, scale: float, impl: str):
        """policy.step on a sparse layer for the new tokens, attending by `impl`: (output [B, 1, H, G, D],
        new segment). The test tensors carry no RoPE, so they stand for the pre-RoPE ones too."""
        ctx = LayerContext(policy.dense_layers, window, scale, impl)

        def step(seg, q, k, v, q_pos):  # jitted: one compile instead of one per eager op
            out, (new_seg,) = policy.step(ctx, (seg,), StepInputs(q, k, v, q, k, q_pos, q_pos), Decode())
            return out, new_seg

        q_pos = jnp.asarray(self.held[:, None].astype(np.int32))
        out, new_seg = jax.jit(step)(seg, jnp.asarray(self.q), jnp.asarray(self.k_new), jnp.asarray(self.v_new), q_pos)
        return np.asarray(out), new_seg
