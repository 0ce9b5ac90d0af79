"""Squeezed Attention (Hooper et al., 2024): cluster the prompt's keys once, then let each query attend
only to the keys whose cluster centroid predicts a large attention weight.

After prefill, per (layer, sequence, KV head), the context keys (all but the last `recent` prompt tokens)
are grouped by k-means on their L2-normalised vectors into floor(clusters * n) clusters, each centroid the
mean of its cluster's raw keys. A query estimates key i's weight from the centroids alone,
`S_i = exp(q.c_l(i)/sqrt(D)) / sum_j N_j exp(q.c_j/sqrt(D))`, and attends exactly over the context keys with
S_i >= T, the recent prompt tokens and every generated token; T is one global threshold per sequence, the
(1 - keep) quantile of S averaged over the last `recent` prompt queries. `hierarchical=True` adds the
authors' coarse level (clusters of the clusters, their own threshold at 1 - coarse_keep). Context slots are
reordered cluster by cluster, so a selection is a few runs of 16-slot pages that the block-sparse decode
kernel reads with a per-slot mask. It saves attention reads, not memory. Where kvjax differs from the
authors (k-means on each prompt instead of an offline fixed context; S_i >= T where they use >; the coarse
cluster count) and why: docs/squeezed_attention.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import attend_pages, reference_attention
from kvjax.config import ModelConfig
from kvjax.kmeans import cluster_means, kmeans
from kvjax.kv_state import SLOT_MULTIPLE, KVSegment, KVState, write_entries
from kvjax.layer_step import Decode, take_heads
from kvjax.policies.base import Layout, Policy
from kvjax.policies.full import Full
from pallas_kernels.block_masks import decode_table_from_slots

PAGE = SLOT_MULTIPLE  # slots per page the decode kernel reads: about one average cluster (20 keys)


@struct.dataclass(frozen=True)
class ObservedQueries:
    """While prefilling: a layer's last `recent` prompt queries after RoPE, which calibrate the threshold."""

    q: jax.Array  # float32[B, K, R, G, D], times 1/sqrt(D); row r: position length - R + r (zero if < 0)
    heads: tuple[int, ...] = struct.field(pytree_node=False)  # every KV head of the layer


@struct.dataclass(frozen=True)
class CoarseClusters:
    """The hierarchical lookup's first level: k-means clusters of a layer's (fine) clusters."""

    parents: jax.Array  # int32[B, Hs, Kc]: each fine cluster's coarse cluster; -1 for empty fine clusters
    centroids: jax.Array  # [B, Hs, Kq, D]: the plain mean of each coarse cluster's centroids (the authors')
    sizes: jax.Array  # int32[B, Hs, Kq]: keys per coarse cluster
    threshold: jax.Array  # float32[B]: the sequence's global threshold on the coarse estimated weight


@struct.dataclass(frozen=True)
class ClusteredSegment:
    """A layer's full cache with its context keys clustered: what decoding selects from."""

    kv: KVSegment  # every token: context slots grouped by cluster, then recent and generated at slot = position
    labels: jax.Array  # int32[B, Hs, C]: each context key's cluster (non-decreasing over the context slots);
    # -1 for recent, generated and empty slots
    centroids: jax.Array  # [B, Hs, Kc, D]: the mean raw key of each cluster
    sizes: jax.Array  # int32[B, Hs, Kc]: keys per cluster (0 past the sequence's cluster count)
    threshold: jax.Array  # float32[B]: the sequence's global threshold on the estimated weight S
    coarse: CoarseClusters | None = None  # the hierarchical lookup's first level (None: one level)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.kv.heads


@dataclasses.dataclass(frozen=True)
class SqueezedAttention(Policy):
    """Keeps every token; each query attends to the recent and generated tokens plus the context keys
    whose k-means centroid predicts a weight above a threshold calibrated to keep a `keep` share."""

    clusters: float = 0.05  # centroids per KV head, as a share of its context keys
    keep: float = 0.1  # share of context keys the calibration queries attend to
    recent: int = 100  # last prompt tokens: never clustered, always attended, calibration queries
    iterations: int = 50  # Lloyd updates at most (it stops earlier once no key changes cluster)
    seed: int = 0  # k-means++ seeding
    coarse_clusters: float = 0.5  # clusters of the clusters, as a share of the clusters: they order the
    # layout (always) and are the hierarchical lookup's first level
    hierarchical: bool = False  # the authors' two-level lookup: coarse clusters first, then their fine ones
    coarse_keep: float = 0.3  # hierarchical: share of context keys the calibration queries keep at the
    # coarse level (the authors' default 70th percentile)

    def __post_init__(self):
        for name in ("clusters", "keep", "coarse_clusters", "coarse_keep"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"SqueezedAttention {name} (a share) must be in (0, 1]; got {getattr(self, name)}")
        if self.recent < 1 or self.iterations < 1:
            raise ValueError(
                f"SqueezedAttention needs recent >= 1 and iterations >= 1; got {self.recent}, {self.iterations}"
            )

    def max_clusters(self, prompt_len: int) -> int:
        """Centroid slots per KV head for prompts of up to `prompt_len` tokens."""
        return max(1, int(self.clusters * max(prompt_len - self.recent, 0)))

    # -- prefill: full attention, recording the calibration queries ---------------------------------

    @property
    def packed_tail(self):
        """The `recent` calibration queries: the rest of its prefill is Full's."""
        return self.recent

    def layout(self, config: ModelConfig, prompt_len: int, max_new_tokens: int, chunk: int) -> Layout:
        return Full().layout(config, prompt_len, max_new_tokens, chunk)

    def allocate(self, config, batch, prompt_len, max_new_tokens, chunk, dtype) -> KVState:
        """Full's prefill state, each layer followed by an empty `ObservedQueries`."""
        state = super().allocate(config, batch, prompt_len, max_new_tokens, chunk, dtype)
        group = config.num_heads // config.num_kv_heads
        shape = (batch, config.num_kv_heads, self.recent, group, config.head_dim)
        observed = ObservedQueries(jnp.zeros(shape, jnp.float32), tuple(range(config.num_kv_heads)))
        return state.replace(layers=tuple(layer + (observed,) for layer in state.layers))

    def step(self, ctx, segments, x, phase):
        """Prefill: Full's step, and the chunk's queries among the prompt's last `recent` recorded.
        Decode: per segment, the token is written in place and attends over its selected entries."""
        if isinstance(phase, Decode):
            return super().step(ctx, segments, x, phase)
        *kv_segments, observed = segments
        out, kv_segments = Full().step(ctx, tuple(kv_segments), x, phase)
        row = x.q_pos - (phase.prompt_lengths - self.recent)[:, None]  # [B, T]
        row = jnp.where((x.new_pos >= 0) & (row >= 0), row, self.recent)  # out of range: dropped
        b = jnp.arange(x.q.shape[0])[:, None]  # [B, 1]
        scaled = x.q.astype(jnp.float32) * ctx.scale  # [B, T, K, G, D]
        written = observed.q.at[b, :, row].set(scaled, mode="drop")  # rows [B, T] <- [B, T, K, G, D]
        return out, (*kv_segments, observed.replace(q=written))

    def segment_step(self, ctx, segment, x, phase):
        seg = segment.replace(kv=write_entries(segment.kv, x.k, x.v, x.new_pos, x.q_pos[:, 0]))
        return attend_selected(x.q, seg, x.q_pos, ctx.window, ctx.scale, ctx.impl), seg

    # -- finalize: cluster the context keys, calibrate the threshold --------------------------------

    def finalize(self, config: ModelConfig, state: KVState, prompt_len: int, max_new_tokens: int) -> KVState:
        """Each layer's context keys clustered, and each sequence's threshold: the (1 - keep) quantile of
        the calibration queries' mean estimated weight over every layer, KV head and context key (and,
        hierarchical, the coarse threshold likewise at 1 - coarse_keep)."""
        lengths = state.length  # [B]
        calibrating = jnp.arange(self.recent) >= (self.recent - lengths)[:, None]  # [B, R] rows with a query
        root = jax.random.key(self.seed)
        layers, fine, coarse = [], [], []
        for index, (*segments, observed) in enumerate(state.layers):
            clustered = []
            for seg in segments:
                seg = self._cluster(jax.random.fold_in(root, index), seg, lengths, prompt_len)
                q_obs = take_heads(observed.q, seg.heads, 1, config.num_kv_heads).swapaxes(1, 2)  # [B, R, Hs, G, D]
                fine.append(key_weights(q_obs, seg.centroids, seg.sizes, seg.labels, calibrating))
                if self.hierarchical:
                    c = seg.coarse
                    coarse_labels = jnp.where(seg.labels >= 0, _gather(c.parents, seg.labels), -1)  # [B, Hs, C]
                    coarse.append(key_weights(q_obs, c.centroids, c.sizes, coarse_labels, calibrating))
                clustered.append(seg)
            layers.append(clustered)
        threshold = global_threshold(fine, self.keep)  # [B]
        coarse_threshold = global_threshold(coarse, self.coarse_keep) if self.hierarchical else None

        def calibrated(seg):
            if seg.coarse is not None:
                seg = seg.replace(coarse=seg.coarse.replace(threshold=coarse_threshold))
            return seg.replace(threshold=threshold)

        layers = tuple(tuple(calibrated(seg) for seg in layer) for layer in layers)
        return state.replace(layers=layers)

    def _cluster(self, key: jax.Array, seg: KVSegment, lengths: jax.Array, prompt_len: int) -> ClusteredSegment:
        """k-means on the L2-normalised context keys of every (sequence, head) row, centroids the clusters'
        mean raw keys; then k-means on the normalised centroids into coarse clusters. The clusters are
        numbered coarse cluster by coarse cluster and the context slots sorted by cluster, so clusters with
        similar centroids (which queries tend to select together) lie side by side. The thresholds are
        filled in once every layer is clustered."""
        b, hs, capacity = seg.pos.shape
        num_fine = self.max_clusters(prompt_len)
        num_coarse = max(1, int(self.coarse_clusters * num_fine))
        n = jnp.maximum(lengths - self.recent, 0).astype(jnp.float32)  # [B] context keys
        fine_active = jnp.clip(jnp.floor(n * self.clusters), 1, num_fine).astype(jnp.int32)  # [B]
        coarse_active = jnp.clip(jnp.floor(fine_active * self.coarse_clusters), 1, num_coarse).astype(jnp.int32)
        context = (seg.pos >= 0) & (seg.pos < (lengths - self.recent)[:, None, None])  # [B, Hs, C]
        keys = seg.k.astype(jnp.float32)  # [B, Hs, C, D]
        fine_key, coarse_key = jax.random.split(key)
        labels = _kmeans_rows(fine_key, keys, context, fine_active, num_fine, self.iterations)  # [B, Hs, C]
        centroids, sizes = _cluster_means(keys, labels, context, num_fine)  # [B, Hs, Kc, D], [B, Hs, Kc]
        live = sizes > 0
        parents = _kmeans_rows(coarse_key, centroids, live, coarse_active, num_coarse, self.iterations)  # [B, Hs, Kc]
        # Renumber the fine clusters coarse cluster by coarse cluster (stable), empty ones last.
        rank = jnp.argsort(jnp.where(live, parents, num_coarse), axis=-1, stable=True)  # [B, Hs, Kc]: new -> old
        renumber = jnp.argsort(rank, axis=-1)  # old -> new
        labels = jnp.where(context, _gather(renumber, labels), -1)
        centroids = jnp.take_along_axis(centroids, rank[..., None], axis=2)
        sizes, parents = (jnp.take_along_axis(x, rank, axis=2) for x in (sizes, parents))
        # Context slots [0, n) sorted by cluster (stable); every other slot sorts after them, in place.
        order = jnp.argsort(jnp.where(context, labels, num_fine + jnp.arange(capacity)), axis=-1, stable=True)
        grouped = seg.replace(
            k=jnp.take_along_axis(seg.k, order[..., None], axis=2),  # [B, Hs, C, D]
            v=jnp.take_along_axis(seg.v, order[..., None], axis=2),
            pos=jnp.take_along_axis(seg.pos, order, axis=2),  # [B, Hs, C]
        )
        no_threshold = jnp.zeros((b,), jnp.float32)
        coarse = None
        if self.hierarchical:
            coarse_centroids, _ = _cluster_means(centroids, parents, sizes > 0, num_coarse)  # [B, Hs, Kq, D]
            keys_in = jax.vmap(jax.vmap(lambda s, p: jax.ops.segment_sum(s, p, num_coarse + 1)[:num_coarse]))
            coarse_sizes = keys_in(sizes, jnp.where(parents >= 0, parents, num_coarse))  # [B, Hs, Kq]
            coarse = CoarseClusters(parents, coarse_centroids.astype(seg.k.dtype), coarse_sizes, no_threshold)
        return ClusteredSegment(
            kv=grouped,
            labels=jnp.take_along_axis(labels, order, axis=2),
            centroids=centroids.astype(seg.k.dtype),
            sizes=sizes,
            threshold=no_threshold,
            coarse=coarse,
        )


def _gather(values: jax.Array, index: jax.Array) -> jax.Array:
    """values[..., index] along the last axis; an index of -1 (unclustered) reads entry 0, for callers to mask."""
    return jnp.take_along_axis(values, jnp.maximum(index, 0), axis=-1)


def _kmeans_rows(
    key: jax.Array, x: jax.Array, valid: jax.Array, active: jax.Array, num_clusters: int, iterations: int
) -> jax.Array:
    """int32[B, Hs, N] k-means labels of every (sequence, head) row's L2-normalised points (-1 where not
    valid). x: [B, Hs, N, D]; valid: bool[B, Hs, N]; active: int32[B] clusters per sequence."""
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def row(key, x, valid, active):  # one (sequence, head): labels int32[N]
        return kmeans(key, x, valid, active, num_clusters, iterations)[0]

    rows = jax.random.split(key, valid.shape[:2])
    return jax.vmap(jax.vmap(row, in_axes=(0, 0, 0, None)))(rows, unit, valid, active)


def _cluster_means(x: jax.Array, labels: jax.Array, valid: jax.Array, num_clusters: int):
    """(means float32[B, Hs, K, D], sizes int32[B, Hs, K]) of every row's valid points per label."""
    return jax.vmap(jax.vmap(lambda x, labels, valid: cluster_means(x, labels, valid, num_clusters)))(x, labels, valid)


def key_weights(
    q: jax.Array, centroids: jax.Array, sizes: jax.Array, labels: jax.Array, queries: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(float32[B, Hs * C] each clustered key's estimated weight under the calibration queries, bool
    [B, Hs * C] which entries are clustered keys). labels: int32[B, Hs, C], -1 where unclustered."""
    weights = cluster_weights(q, centroids, sizes, queries)  # [B, Hs, Kc]
    per_key = _gather(weights, labels)  # [B, Hs, C]
    batch = labels.shape[0]
    return per_key.reshape(batch, -1), (labels >= 0).reshape(batch, -1)


def global_threshold(weights: list[tuple[jax.Array, jax.Array]], keep: float) -> jax.Array:
    """float32[B]: the (1 - keep) quantile of each sequence's clustered keys' estimated weights (`key_weights`
    of every layer and KV head); -inf when keep = 1: every key, also for queries whose estimates fall lower."""
    values, present = (jnp.concatenate(x, axis=-1) for x in zip(*weights))  # [B, L * K * C]
    threshold = masked_quantile(values, present, 1.0 - keep)
    return jnp.full_like(threshold, -jnp.inf) if keep == 1.0 else threshold


def cluster_weights(
    q: jax.Array, centroids: jax.Array, sizes: jax.Array, queries: jax.Array | None = None
) -> jax.Array:
    """float32[B, Hs, Kc]: per cluster j, S_j = exp(q.c_j) / sum_l N_l exp(q.c_l), the estimated
    attention weight of each of its keys, averaged over the queries (and their GQA group).

    q: [B, T, Hs, G, D] already scaled by 1/sqrt(D); centroids: [B, Hs, Kc, D]; sizes: int32[B, Hs, Kc]
    (clusters of size 0 weigh 0); queries: bool[B, T], the queries to average over (default all).
    """
    logits = jnp.einsum("btkgd,bkjd->bktgj", q.astype(jnp.float32), centroids.astype(jnp.float32))  # [B,Hs,T,G,Kc]
    present = (sizes > 0)[:, :, None, None, :]  # [B, Hs, 1, 1, Kc]
    log_n = jnp.log(jnp.maximum(sizes, 1).astype(jnp.float32))[:, :, None, None, :]
    log_denominator = jax.nn.logsumexp(jnp.where(present, logits + log_n, -jnp.inf), axis=-1, keepdims=True)
    log_denominator = jnp.where(jnp.isfinite(log_denominator), log_denominator, 0.0)  # no clusters at all
    weights = jnp.where(present, jnp.exp(logits - log_denominator), 0.0)  # [B, Hs, T, G, Kc]
    if queries is None:
        return jnp.mean(weights, axis=(2, 3))
    counted = queries.astype(jnp.float32)[:, None, :, None, None]  # [B, 1, T, 1, 1]
    total = jnp.sum(queries, axis=-1) * weights.shape[3]  # [B] queries x group
    return jnp.sum(weights * counted, axis=(2, 3)) / jnp.maximum(total, 1)[:, None, None]


def masked_quantile(values: jax.Array, valid: jax.Array, q: float) -> jax.Array:
    """float32[B]: numpy's default (linear) q-quantile of each row's valid values; +inf for a row of none.

    values: float32[B, M]; valid: bool[B, M].
    """
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf), axis=-1)  # valid values first
    n = jnp.sum(valid, axis=-1)  # [B]
    at = q * jnp.maximum(n - 1, 0).astype(jnp.float32)  # [B] fractional index
    lo = jnp.floor(at).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))

    def pick(i):  # int32[B] -> float32[B]
        return jnp.take_along_axis(ordered, i[:, None], axis=-1)[:, 0]

    below, above = pick(lo), pick(hi)
    return jnp.where(n > 0, below + (at - lo) * (above - below), jnp.inf)


def selected_slots(q: jax.Array, seg: ClusteredSegment, scale: float) -> jax.Array:
    """bool[B, Hs, C]: the entries a query chunk attends to: unclustered ones (recent prompt and generated
    tokens) plus the context keys whose cluster's mean estimated weight reaches the threshold.

    Hierarchical: first the coarse clusters whose estimate reaches the coarse threshold; then, as the
    authors do, the fine clusters' estimates count only the keys of those coarse clusters (the
    denominator loses the rest), and a key is attended when both levels select it.

    q: [B, T, Hs, G, D] after RoPE (the estimate averages over the chunk's queries).
    """
    q = q.astype(jnp.float32) * scale
    sizes = seg.sizes  # [B, Hs, Kc]
    if seg.coarse is not None:
        c = seg.coarse
        open_coarse = cluster_weights(q, c.centroids, c.sizes) >= c.threshold[:, None, None]  # [B, Hs, Kq]
        open_fine = _gather(open_coarse, c.parents) & (c.parents >= 0)
        sizes = jnp.where(open_fine, sizes, 0)  # [B, Hs, Kc]
    chosen = (cluster_weights(q, seg.centroids, sizes) >= seg.threshold[:, None, None]) & (sizes > 0)  # [B, Hs, Kc]
    key_chosen = _gather(chosen, seg.labels)  # [B, Hs, C]
    return seg.kv.valid() & ((seg.labels < 0) | key_chosen)


def attend_selected(
    q: jax.Array,
    seg: ClusteredSegment,
    q_pos: jax.Array,
    window: int | None,
    scale: float,
    impl: str = "reference",
) -> jax.Array:
    """Exact attention over the `selected_slots` of a query chunk. One decode token (no sliding window)
    goes through `attend_pages`: on GPU/TPU the kernel reads only the pages holding a selected key.

    q: [B, T, Hs, G, D] after RoPE; returns [B, T, Hs, G, D].
    """
    selected = selected_slots(q, seg, scale)  # [B, Hs, C]
    k, v, pos = seg.kv.k, seg.kv.v, seg.kv.pos
    if q.shape[1] == 1 and window is None:  # a kernel's window would measure positions by slot
        table = decode_table_from_slots(selected, block_size=PAGE)
        return attend_pages(q, k, v, pos, q_pos, table, None, scale, impl, slot_mask=selected)
    return reference_attention(q, k, v, jnp.where(selected, pos, -1), q_pos, window, scale)
