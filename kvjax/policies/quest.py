"""Quest (Tang et al., 2024): per cache page, keep each key channel's minimum and maximum; each decode
query reads only the `budget_tokens // page` pages whose bound on q.k is highest.

The cache keeps every token (slot = position, as Full). After the prompt, each page of `page`
consecutive slots of a KV head gets the per-channel min m and max M of its keys; a decode token updates
the bounds of the page it lands in. A query q bounds any logit in a page by

    U = sum_d max(q_d * M_d, q_d * m_d)

and attends exactly over the page it lands in plus the top pages by U among the others it can see (a
sliding window hides whole pages from the choice), at least 3 pages in all: the authors' kernel always
reads the last page, and their evaluation reads max(3, budget // page) pages. With GQA a KV head's choice averages U over its query heads, so the group shares one
set of pages: the block-sparse decode kernel then reads each of them once. The authors' models are MHA,
where that average is over one head. The first `dense_layers` layers attend fully, as in the authors'
evaluation, and the prompt itself is attended fully (Quest selects during decoding only).

It saves attention reads, not memory: the bounds add 2 / page of the keys' bytes (`kvjax.kv_bytes`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend_pages
from kvjax.cached_attention import write_in_place_then_attend
from kvjax.config import ModelConfig
from kvjax.kv_state import KVSegment, KVState, position_capacity, write_entries
from kvjax.layer_step import Prefill
from kvjax.policies.base import Layout, Policy, SegmentSpec
from pallas_kernels.block_masks import DecodeBlockTable, decode_table_top_k, page_key_bounds, page_scores

_SMALLEST_PAGE = 16  # the decode kernels' smallest block (Triton's dot needs 16 rows)
MIN_PAGES = 3  # the authors' evaluation reads max(3, token_budget // page_size) pages


@struct.dataclass(frozen=True)
class PagedSegment:
    """A layer's full cache with the per-page key bounds that decode queries choose pages by."""

    kv: KVSegment  # every token, slot = position (the Full layout)
    k_min: jax.Array  # [B, Hs, P, D] (cache dtype): per page, each channel's smallest key (+inf: page empty)
    k_max: jax.Array  # [B, Hs, P, D]: each channel's largest key (-inf: page empty)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.kv.heads


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """Keeps every token; each decode query attends to the `budget_tokens // page` pages of its KV head
    whose min/max key bounds allow the largest logit. Layers below `dense_layers` attend fully."""

    prefills_in_place: ClassVar[bool] = True  # Full's prefill; the page bounds come in `finalize`

    budget_tokens: int = 1024  # tokens read per KV head and decode step: budget_tokens // page pages
    page: int = 16
    dense_layers: int = 2

    def __post_init__(self):
        if self.page < _SMALLEST_PAGE or self.page & (self.page - 1):
            raise ValueError(
                f"{type(self).__name__} page must be a power of two >= {_SMALLEST_PAGE} (the decode "
                f"kernels' smallest block); got {self.page}"
            )
        if self.budget_tokens < self.page:
            raise ValueError(
                f"{type(self).__name__} budget_tokens ({self.budget_tokens}) must cover at least "
                f"one page ({self.page} tokens)"
            )
        if self.dense_layers < 0:
            raise ValueError(f"{type(self).__name__} dense_layers must be >= 0; got {self.dense_layers}")

    def with_budget(self, tokens):
        """`budget_tokens` = tokens read per KV head and decode step (at least one page)."""
        super().with_budget(tokens)
        return dataclasses.replace(self, budget_tokens=tokens)

    @property
    def pages_read(self) -> int:
        """Pages each sparse layer's decode query reads per KV head (the current one included): at least
        MIN_PAGES, as the authors' max(3, token_budget // page_size)."""
        return max(MIN_PAGES, self.budget_tokens // self.page)

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """Full's layout in whole pages."""
        heads = tuple(range(config.num_kv_heads))
        capacity = -(-position_capacity(prompt_len + max_new_tokens) // self.page) * self.page
        return ((SegmentSpec(heads, capacity),),) * config.num_layers

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Every sparse layer's segments with the bounds of the prompt's pages."""

        def paged(seg: KVSegment) -> PagedSegment:
            k_min, k_max = page_key_bounds(seg.k, state.length, block_size=self.page)  # [B, Hs, P, D] each
            return PagedSegment(kv=seg, k_min=k_min.astype(seg.k.dtype), k_max=k_max.astype(seg.k.dtype))

        layers = tuple(
            layer if index < self.dense_layers else tuple(paged(seg) for seg in layer)
            for index, layer in enumerate(state.layers)
        )
        return state.replace(layers=layers)

    def segment_step(self, ctx, segment, x, phase):
        """Prefill and dense layers (plain segments): Full's step. A sparse layer's decode token
        (a `PagedSegment`): written in place, its page's bounds widened, then attention over the
        chosen pages. x.q: [B, 1, Hs, G, D]; x.k, x.v: [B, 1, Hs, D] while decoding."""
        if isinstance(phase, Prefill) or not isinstance(segment, PagedSegment):
            return write_in_place_then_attend(ctx, segment, x)
        seg = self.append(segment, x.k, x.v, x.q_pos, x.new_pos)
        table = self.choose_pages(x.q, seg, x.q_pos, ctx.window, ctx.scale)
        kv = seg.kv
        return attend_pages(x.q, kv.k, kv.v, kv.pos, x.q_pos, table, ctx.window, ctx.scale, ctx.impl), seg

    def append(
        self, seg: PagedSegment, k: jax.Array, v: jax.Array, q_pos: jax.Array, new_pos: jax.Array
    ) -> PagedSegment:
        """The segment with one decode token written at slot = position and its page's bounds widened.
        k, v: [B, 1, Hs, D]; q_pos, new_pos: int32[B, 1]."""
        slot = q_pos[:, 0]  # [B]
        seg = seg.replace(kv=write_entries(seg.kv, k, v, new_pos, slot))
        rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
        heads = jnp.arange(k.shape[2])[None, :]  # [1, Hs]
        page = (slot // self.page)[:, None]  # [B, 1]
        key = k[:, 0].astype(seg.k_min.dtype)  # [B, Hs, D]
        return seg.replace(
            k_min=seg.k_min.at[rows, heads, page].min(key), k_max=seg.k_max.at[rows, heads, page].max(key)
        )

    def choose_pages(
        self, q: jax.Array, seg: PagedSegment, q_pos: jax.Array, window: int | None, scale: float
    ) -> DecodeBlockTable:
        """The pages one decode query reads per KV head: its own page and the `pages_read` - 1 best by the
        Quest bound among the other pages holding a key it may see (the order does not depend on `scale`).
        q: [B, 1, Hs, G, D]; q_pos: int32[B, 1]."""
        b, _, hs, g, d = q.shape
        first = jnp.arange(seg.k_min.shape[2]) * self.page  # [P] each page's first slot (= position)
        last = q_pos[:, :1, None]  # [B, 1, 1]
        visible = first <= last  # [B, 1, P]
        if window is not None:
            visible &= first + self.page - 1 > last - window
        scores = page_scores(q.reshape(b, hs * g, d), seg.k_min, seg.k_max)  # [B, Hs, P]
        current = jnp.arange(seg.k_min.shape[2]) == q_pos[:, :1, None] // self.page  # [B, 1, P]: the query's page
        scores = jnp.where(current, jnp.inf, scores)  # always read, as the authors' kernel reads the last page
        visible = jnp.broadcast_to(visible, scores.shape)
        return decode_table_top_k(scores, visible, top_k=self.pages_read, block_size=self.page)
