"""LServe (Yang et al., 2025): DuoAttention's static split of KV heads plus query-aware page selection, with
hierarchical pages and a selection reused across decode steps, on the retrieval heads.

Streaming heads (the head split of DuoAttention's gates, `full_attention_heads.tsv`, by its quantile rule)
keep the first `sink` tokens and the latest `local`, in their own smaller buffer: they save memory. While
prefilling they see `sink` + `prefill_local` tokens (the authors' ctx_sink_token / ctx_local_token), kept
in a buffer of that size plus one chunk, then shrunk to `sink` + `local` for decoding (dec_sink_token /
dec_local_token).

Retrieval heads keep every token (slot = position, in whole `page`-token physical pages, the pages the
block-sparse decode kernel reads) plus, per `logical_page`-token logical page, each key channel's min m
and max M. A decode query scores a logical page by Quest's bound sum_d max(q_d M_d, q_d m_d) (mean over
the query heads of a GQA group) and a physical page by the largest score of its logical pages. It reads
its own page plus the best others, max(3, token_budget // page) pages in all, or every page while its
position is at most `token_budget` (the authors' dense start). One selection serves `reuse` consecutive
decode steps: the segment carries it with a per-sequence step counter, and decode steps whose rows all
reuse skip the scoring (`lax.cond`). Selection saves reads, not memory: the bounds add 2 / logical_page
of the keys' bytes (`kvjax.kv_bytes`).

A decode step of a layer holding both kinds of heads is one attention launch, as the authors' fused
kernel: like their engine (a retrieval and a streaming cache per layer, both addressed by one kernel),
the two buffers stay apart, so the streaming heads keep only sink + local slots, and the block-sparse
decode kernel takes the streaming buffer as a second cache (`block_sparse_decode`'s tail) under one
table: per retrieval head its selected pages, per streaming head every page below its count (the last
page, the buffer not being whole pages, read ending at the buffer's end). A sliding-window model, or a
streaming buffer smaller than one page, keeps one call per kind of head.

A prefill chunk of a layer holding both kinds is one launch too, while the streaming heads evict nothing
(a prompt of at most sink + prefill_local tokens, the authors' 8320 by default) and the model has no
sliding window: the layer's heads then share one slot = position buffer (`fuses_prefill`) and one call of
the block-sparse prefill kernel. The authors' fused prefill gives streaming heads a block table of their
sink and local blocks; while sink + prefill_local covers the prompt, those are every block up to the
query's, the rows retrieval heads read, so the one dense table serves every head. `finalize` splits the
buffer by kind. Longer prompts prefill one call per kind, the streaming heads over their own buffer of
sink + prefill_local + one chunk slots, evicting after each chunk.

Defaults are the authors' (mit-han-lab/omniserve engine arguments and evaluation scripts): static
sparsity 0.5, sink 128, local 256, prefill_local 8192, page 64 (the cache block), 4 logical pages per
physical page (16 tokens), token budget 4096, selector update interval 4.

Where kvjax differs on purpose:
- one selection per KV head shared by its GQA group (the decode kernel lists pages per KV head, reading each
  once), where the authors' selector picks per query head;
- the step counter counts decode steps since the prompt (a ragged batch's rows select together), where
  the authors reselect when the absolute position is a multiple of the interval;
- a reused selection also reads the page the query lands in when a new page has begun since, where the
  authors' kernel reads the stale last page up to the current offset.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend_pages
from kvjax.cached_attention import write_in_place_then_attend
from kvjax.config import ModelConfig
from kvjax.kv_state import (
    EvictionSegment,
    KVSegment,
    KVState,
    count,
    evict_lowest,
    position_capacity,
    write_entries,
    write_free_slot,
)
from kvjax.layer_step import Decode, merge_heads, take_heads
from kvjax.policies.base import Layout, Policy, SegmentSpec
from kvjax.policies.duo_attention import HeadSets, quantile_head_sets, read_gates_tsv
from kvjax.policies.duo_attention.policy import head_split_layout
from kvjax.policies.streaming_llm import StreamingLLM
from pallas_kernels.block_masks import DecodeBlockTable, page_key_bounds, page_scores

MIN_PAGES = 3  # the authors' selector reads min(max(3, token_budget // page), pages) pages


@struct.dataclass(frozen=True)
class SelectedPagesSegment:
    """A layer's retrieval heads: every token, per-logical-page key bounds, and the reused page selection."""

    kv: KVSegment  # every token, slot = position (the Full layout), capacity a multiple of the physical page
    k_min: jax.Array  # [B, Hs, C // logical_page, D] (cache dtype): each channel's smallest key (+inf: empty)
    k_max: jax.Array  # [B, Hs, C // logical_page, D]: each channel's largest key (-inf: empty)
    pages: jax.Array  # int32[B, Hs, W]: the physical pages last selected, ascending, padded with the last one
    counts: jax.Array  # int32[B, Hs]: valid entries of `pages`
    steps: jax.Array  # int32[B]: decode steps since the prompt; a step selects anew when steps % reuse == 0

    @property
    def heads(self) -> tuple[int, ...]:
        return self.kv.heads


def _ascending(best: jax.Array, won: jax.Array, width: int, none: int) -> tuple[jax.Array, jax.Array]:
    """The `won` entries of best int32[..., K] in ascending order, padded to `width` with the last one: (pages
    int32[..., width], counts int32[...]); `none` is larger than any page."""
    counts = jnp.sum(won, axis=-1, dtype=jnp.int32)
    ordered = jnp.sort(jnp.where(won, best, none), axis=-1).astype(jnp.int32)  # winners first
    ordered = jnp.pad(ordered, [(0, 0)] * (ordered.ndim - 1) + [(0, width - ordered.shape[-1])], constant_values=none)
    last = jnp.take_along_axis(ordered, jnp.maximum(counts - 1, 0)[..., None], axis=-1)  # [..., 1]
    return jnp.where(jnp.arange(width) < counts[..., None], ordered, last), counts


@dataclasses.dataclass(frozen=True)
class LServe(Policy):
    """Streaming KV heads keep `sink` + `local` tokens; retrieval KV heads keep every token and each decode
    query reads the physical pages whose best logical page bounds its logit highest, one selection reused
    for `reuse` steps."""

    retrieval_heads: HeadSets  # per layer, the KV heads that keep everything (DuoAttention's split)
    sink: int = 128
    local: int = 256  # streaming heads' recent tokens while decoding
    prefill_local: int = 8192  # streaming heads' recent tokens while prefilling
    token_budget: int = 4096  # tokens read per retrieval KV head and decode step: token_budget // page pages
    page: int = 64  # physical page: the unit the decode kernel reads
    logical_page: int = 16  # logical page: the unit scored by its keys' min and max
    reuse: int = 4  # decode steps that share one selection

    file_needed = "full_attention_heads.tsv: gates from `kvjax train-gates --method duo` or DuoAttention's release"

    def __post_init__(self):
        name = type(self).__name__
        if self.sink < 0 or self.local < 1 or self.prefill_local < self.local:
            raise ValueError(
                f"{name} needs sink >= 0, local >= 1 and prefill_local >= local; "
                f"got {self.sink}, {self.local}, {self.prefill_local}"
            )
        for field in ("page", "logical_page"):
            value = getattr(self, field)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} {field} must be a power of two; got {value}")
        if self.page < 16 or self.logical_page > self.page:
            raise ValueError(
                f"{name} needs page >= 16 (the decode kernels' smallest block) and logical_page <= page; "
                f"got {self.page}, {self.logical_page}"
            )
        if self.token_budget < self.page or self.token_budget % self.page:
            raise ValueError(
                f"{name} token_budget must be a positive multiple of page ({self.page}); got {self.token_budget}"
            )
        if not 1 <= self.reuse <= self.page:  # a reused selection adds only the query's own page
            raise ValueError(f"{name} reuse must be in [1, page ({self.page})]; got {self.reuse}")
        object.__setattr__(
            self, "retrieval_heads", tuple(tuple(sorted({int(h) for h in layer})) for layer in self.retrieval_heads)
        )

    def with_budget(self, tokens):
        """`token_budget` = tokens read per retrieval KV head and decode step, in whole pages (at least one)."""
        super().with_budget(tokens)
        return dataclasses.replace(self, token_budget=max(self.page, tokens // self.page * self.page))

    @classmethod
    def from_file(cls, path, config, **options) -> LServe:
        """`from_tsv(path, **options)` (sparsity, break_ties, and the policy's fields)."""
        return cls.from_tsv(path, **options)

    @classmethod
    def from_gates(cls, gates, sparsity: float = 0.5, break_ties: bool = True, **fields) -> LServe:
        """Head split from gates float[L, Hkv] by DuoAttention's quantile rule (the authors' static sparsity 0.5)."""
        return cls(quantile_head_sets(gates, sparsity, break_ties), **fields)

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, sparsity: float = 0.5, break_ties: bool = True, **fields) -> LServe:
        """Head split from a `full_attention_heads.tsv` (DuoAttention's release or kvjax's gate file)."""
        return cls.from_gates(read_gates_tsv(path), sparsity, break_ties, **fields)

    @property
    def pages_read(self) -> int:
        """Physical pages a retrieval head's decode query reads past the dense start (its own included)."""
        return max(MIN_PAGES, self.token_budget // self.page)

    @property
    def width(self) -> int:
        """Entries of a stored selection: `pages_read`, or every page at the dense start (one more)."""
        return self.pages_read + 1

    def streaming(self) -> StreamingLLM:
        """The rule streaming heads follow (keys at their original positions, as DuoAttention's)."""
        return StreamingLLM(sink=self.sink, window=self.local, position_shift=False)

    def fuses_prefill(self, config: ModelConfig, layer: int, prompt_len: int) -> bool:
        """Whether `layer` prefills a prompt of `prompt_len` tokens with all its KV heads in one buffer, in one
        attention launch per chunk: it holds both kinds of heads, has no sliding window, and the streaming
        heads evict nothing while prefilling (prompt_len <= sink + prefill_local), so every head attends to
        every earlier token."""
        retrieval = len(self.retrieval_heads[layer])
        return (
            0 < retrieval < config.num_kv_heads
            and config.sliding_window(layer) is None
            and prompt_len <= self.sink + self.prefill_local
        )

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        """Per layer: retrieval heads in Full's layout in whole pages; streaming heads in a buffer of sink +
        prefill_local (+ one chunk while a longer prompt streams through it); where the layer `fuses_prefill`,
        every head in the retrieval heads' layout, one buffer."""
        full = -(-position_capacity(prompt_len + max_new_tokens) // self.page) * self.page
        keep = self.sink + self.prefill_local
        prefill = StreamingLLM(sink=self.sink, window=self.prefill_local, position_shift=False)
        streaming = prefill.layout(config, prompt_len, max_new_tokens, chunk)[0][0].capacity
        split = head_split_layout(config, self.retrieval_heads, full, streaming, keep)
        every = tuple(range(config.num_kv_heads))
        return tuple(
            (SegmentSpec(every, full),) if self.fuses_prefill(config, layer, prompt_len) else specs
            for layer, specs in enumerate(split)
        )

    def split_heads(self, seg: KVSegment, layer: int) -> tuple[KVSegment, EvictionSegment]:
        """A fused prefill buffer (`fuses_prefill`) as the two-call prefill leaves a layer: its retrieval heads'
        entries, and its streaming heads' as an eviction segment keeping sink + prefill_local."""
        retrieval = self.retrieval_heads[layer]
        streaming = tuple(h for h in seg.heads if h not in retrieval)

        def pick(heads):  # the entries of `heads` (KV head ids, which index `seg.heads` = every head)
            take = lambda x: take_heads(x, heads, 1, len(seg.heads))  # noqa: E731
            return take(seg.k), take(seg.v), take(seg.pos)

        k, v, pos = pick(retrieval)
        kept = KVSegment(k=k, v=v, pos=pos, heads=retrieval)
        k, v, pos = pick(streaming)
        budget = self.sink + self.prefill_local
        return kept, EvictionSegment(k=k, v=v, pos=pos, heads=streaming, budget=budget, score=None)

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """A fused layer's buffer split by kind (`split_heads`); then streaming buffers shrink to sink + local
        (+ a spare slot) and retrieval buffers gain their logical pages' bounds, an empty selection and a zero
        step counter."""
        b = state.batch_size

        def resize(seg):
            if isinstance(seg, EvictionSegment):  # streaming heads: keep the decode budget
                alone = state.replace(layers=((seg.replace(budget=self.sink + self.local),),))
                return self.streaming().finalize(config, alone, prompt_len, max_new_tokens).layers[0][0]
            k_min, k_max = page_key_bounds(seg.k, state.length, block_size=self.logical_page)  # [B, Hs, Pl, D]
            hs = len(seg.heads)
            return SelectedPagesSegment(
                kv=seg,
                k_min=k_min.astype(seg.k.dtype),
                k_max=k_max.astype(seg.k.dtype),
                pages=jnp.zeros((b, hs, self.width), jnp.int32),
                counts=jnp.zeros((b, hs), jnp.int32),
                steps=jnp.zeros((b,), jnp.int32),
            )

        layers = tuple(
            self.split_heads(layer[0], i) if self.fuses_prefill(config, i, prompt_len) else layer
            for i, layer in enumerate(state.layers)
        )
        return state.replace(layers=tuple(tuple(resize(s) for s in layer) for layer in layers))

    def step(self, ctx, segments, x, phase):
        """A decode step of a layer holding both kinds of heads: one attention launch for all of them
        (`attend_pages` with the streaming buffer as its tail, one table: the retrieval heads' selected pages,
        the streaming heads' pages below their count). Anything else: each segment's `segment_step`; so also a
        sliding window (measured by slot in the kernel, which streaming slots are not) and a streaming
        buffer smaller than one page (no whole page to read)."""
        if not isinstance(phase, Decode) or len(segments) != 2 or ctx.window is not None:
            return super().step(ctx, segments, x, phase)
        retrieval, streaming = segments  # `head_split_layout`'s order
        if streaming.capacity < self.page:
            return super().step(ctx, segments, x, phase)
        x_r, x_s = x.heads(retrieval.heads), x.heads(streaming.heads)
        retrieval, table = self.decode_retrieval(ctx, retrieval, x_r)
        streaming = write_free_slot(streaming, x_s.k, x_s.v, x_s.new_pos)  # StreamingLLM's decode write
        held = -(-count(streaming) // self.page)  # [B, Hs]: pages holding entries, all read
        wide = max(table.max_blocks, -(-streaming.capacity // self.page))
        pages = jnp.minimum(jnp.arange(wide), jnp.maximum(held - 1, 0)[..., None])  # [B, Hs, wide] padded
        edge = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, wide - a.shape[-1])), mode="edge")  # noqa: E731
        table = DecodeBlockTable(
            kv_blocks=jnp.concatenate([edge(table.kv_blocks), pages], axis=1),
            counts=jnp.concatenate([table.counts, held], axis=1),
            block_size=self.page,
        )  # [B, Hr + Hs, wide]
        kv = retrieval.kv
        q = jnp.concatenate([x_r.q, x_s.q], axis=2)  # [B, 1, Hr + Hs, G, D]
        tail = (streaming.k, streaming.v, streaming.pos)
        out = attend_pages(q, kv.k, kv.v, kv.pos, x.q_pos, table, None, ctx.scale, ctx.impl, tail=tail)
        streaming = evict_lowest(streaming, self.streaming().priority(streaming), streaming.budget)
        hr = len(retrieval.heads)
        return merge_heads([out[:, :, :hr], out[:, :, hr:]], segments, axis=2), (retrieval, streaming)

    def segment_step(self, ctx, segment, x, phase):
        """Streaming heads: StreamingLLM's step. Retrieval heads while prefilling, and a fused layer's heads
        (`fuses_prefill`): Full's (the block-sparse prefill kernel); retrieval heads while decoding: `decode_retrieval`, then attention over the selected pages (the
        block-sparse decode kernel)."""
        if isinstance(segment, EvictionSegment):
            return self.streaming().segment_step(ctx, segment, x, phase)
        if not isinstance(phase, Decode):
            return write_in_place_then_attend(ctx, segment, x)
        seg, table = self.decode_retrieval(ctx, segment, x)
        kv = seg.kv
        return attend_pages(x.q, kv.k, kv.v, kv.pos, x.q_pos, table, ctx.window, ctx.scale, ctx.impl), seg

    def decode_retrieval(self, ctx, segment: SelectedPagesSegment, x) -> tuple[SelectedPagesSegment, DecodeBlockTable]:
        """The retrieval segment after a decode token (written, its logical page's bounds widened, the
        selection renewed every `reuse` steps, the step counted) and the table its query reads (`read_table`)."""
        seg = self.append(segment, x.k, x.v, x.q_pos, x.new_pos)
        fresh = seg.steps % self.reuse == 0  # [B]
        pages, counts = jax.lax.cond(
            jnp.any(fresh), lambda: self.select_pages(x.q, seg, x.q_pos, ctx.window), lambda: (seg.pages, seg.counts)
        )
        pages = jnp.where(fresh[:, None, None], pages, seg.pages)  # [B, Hs, W]
        counts = jnp.where(fresh[:, None], counts, seg.counts)  # [B, Hs]
        table = self.read_table(pages, counts, x.q_pos)
        return seg.replace(pages=pages, counts=counts, steps=seg.steps + 1), table

    def append(
        self, seg: SelectedPagesSegment, k: jax.Array, v: jax.Array, q_pos: jax.Array, new_pos: jax.Array
    ) -> SelectedPagesSegment:
        """The segment with one decode token at slot = position and its logical page's bounds widened.
        k, v: [B, 1, Hs, D]; q_pos, new_pos: int32[B, 1]."""
        slot = q_pos[:, 0]  # [B]
        seg = seg.replace(kv=write_entries(seg.kv, k, v, new_pos, slot))
        rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
        heads = jnp.arange(k.shape[2])[None, :]  # [1, Hs]
        page = (slot // self.logical_page)[:, None]  # [B, 1]
        key = k[:, 0].astype(seg.k_min.dtype)  # [B, Hs, D]
        return seg.replace(
            k_min=seg.k_min.at[rows, heads, page].min(key), k_max=seg.k_max.at[rows, heads, page].max(key)
        )

    def select_pages(
        self, q: jax.Array, seg: SelectedPagesSegment, q_pos: jax.Array, window: int | None
    ) -> tuple[jax.Array, jax.Array]:
        """The hierarchical selection for the query at q_pos: (pages int32[B, Hs, W] ascending, padded with the
        last; counts int32[B, Hs]). Logical pages score Quest's bound (mean over the GQA group), a physical page
        the max of its logical pages; the query's own page always, then the best others up to `pages_read`,
        or every visible page while q_pos <= token_budget. q: [B, 1, Hs, G, D]; q_pos: int32[B, 1]."""
        b, _, hs, g, d = q.shape
        n_logical = seg.k_min.shape[2]
        per = self.page // self.logical_page
        n_pages = n_logical // per
        last = q_pos[:, :1, None]  # [B, 1, 1]
        first = jnp.arange(n_logical) * self.logical_page  # [Pl] each logical page's first slot (= position)
        seen = first <= last  # [B, 1, Pl]
        if window is not None:
            seen &= first + self.logical_page - 1 > last - window
        logical = page_scores(q.reshape(b, hs * g, d), seg.k_min, seg.k_max)  # [B, Hs, Pl]
        logical = jnp.where(seen, logical, -jnp.inf)
        physical = jnp.max(logical.reshape(b, hs, n_pages, per), axis=-1)  # [B, Hs, P]
        visible = jnp.any(seen.reshape(b, 1, n_pages, per), axis=-1)  # [B, 1, P]
        current = jnp.arange(n_pages) == last // self.page  # [B, 1, P]
        dense = q_pos[:, :1, None] <= self.token_budget  # [B, 1, 1]: the authors read every page until then
        scores = jnp.where(visible, jnp.where(current | dense, jnp.inf, physical), -jnp.inf)  # [B, Hs, P]
        top = min(self.width, n_pages)
        values, best = jax.lax.top_k(scores, top)  # [B, Hs, top], best first (ties: the earlier page)
        limit = jnp.where(dense[..., 0], top, min(self.pages_read, top))  # [B, 1]
        won = (values > -jnp.inf) & (jnp.arange(top) < limit[..., None])
        return _ascending(best, won, self.width, n_pages)

    def read_table(self, pages: jax.Array, counts: jax.Array, q_pos: jax.Array) -> DecodeBlockTable:
        """The decode table: the stored selection plus the query's own page when a new one has begun since it
        was made (width W + 1, ascending). pages: int32[B, Hs, W]; counts: int32[B, Hs]; q_pos: int32[B, 1]."""
        current = (q_pos[:, :1] // self.page).astype(jnp.int32)  # [B, 1]
        last = jnp.take_along_axis(pages, jnp.maximum(counts - 1, 0)[..., None], axis=-1)[..., 0]  # [B, Hs]
        new = (counts == 0) | (last < current)  # [B, Hs]
        tail = jnp.where(new, current, last)[..., None]  # [B, Hs, 1]
        padded = jnp.concatenate([pages, tail], axis=-1)  # [B, Hs, W + 1]
        kv_blocks = jnp.where(jnp.arange(self.width + 1) >= counts[..., None], tail, padded)
        return DecodeBlockTable(kv_blocks=kv_blocks, counts=counts + new, block_size=self.page)
