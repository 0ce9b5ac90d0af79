"""Squeezed Attention: k-means clusters of the context keys, the calibrated global threshold, and exact
attention over exactly the keys the centroids select (by jnp and by the decode kernels, interpreted, over
the pages holding a selected key); k-means itself against numpy Lloyd."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import init_model
from kvjax.kmeans import assign, kmeans, lloyd, plus_plus_init
from kvjax.kv_state import KVSegment, position_capacity
from kvjax.policies import Full, SqueezedAttention
from kvjax.policies.quantized_pruning import decode_state_bytes
from kvjax.policies.squeezed_attention import (
    PAGE,
    ClusteredSegment,
    CoarseClusters,
    attend_selected,
    selected_slots,
)
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    eager_queries_and_keys,
    head_dim_32_config,
    llama8b_cache_config,
    teacher_forced,
)
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

LENGTHS = (450, 230, 80)  # the last prompt is shorter than `recent`: nothing to cluster, it attends fully
NEW = 16
CHUNK = 128
RECENT = 100


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=2), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(2, (len(LENGTHS), max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "squeezed": SqueezedAttention(),
        "keep_all": SqueezedAttention(keep=1.0),
        "hierarchical": SqueezedAttention(hierarchical=True),
        "coarse_keep_all": SqueezedAttention(hierarchical=True, coarse_keep=1.0),
    }
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


@pytest.fixture(scope="module")
def seen(model, runs):
    """Per layer, an eager forward's post-RoPE queries and keys of the prompts (independent of the policy)."""
    return eager_queries_and_keys(model, runs[0], LENGTHS)


# -- k-means --------------------------------------------------------------------------------------


def _numpy_lloyd(x, valid, active, centers, iterations):
    """Textbook Lloyd in float64: (labels, -1 where invalid; centers; updates run)."""
    centers = centers.astype(np.float64).copy()

    def nearest(c):
        return np.argmin(((x[:, None, :] - c[None, :active]) ** 2).sum(-1), axis=-1)

    labels = nearest(centers)
    for step in range(1, iterations + 1):
        for j in range(active):
            members = valid & (labels == j)
            if members.any():
                centers[j] = x[members].mean(0)
        new = nearest(centers)
        done = not np.any(valid & (new != labels))
        labels = new
        if done:
            return np.where(valid, labels, -1), centers, step
    return np.where(valid, labels, -1), centers, iterations


def test_lloyd_matches_numpy_from_the_same_seeds():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 8)) * 1.5  # overlapping blobs: Lloyd needs several updates
    x = (means[rng.integers(0, 3, 300)] + rng.normal(size=(300, 8))).astype(np.float32)
    valid = rng.random(300) < 0.8
    active, num_clusters = 4, 6
    centers = plus_plus_init(jax.random.key(3), jnp.asarray(x), jnp.asarray(valid), jnp.asarray(active), num_clusters)
    labels, moved = lloyd(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(active), centers, 100)
    want_labels, want_centers, steps = _numpy_lloyd(x.astype(np.float64), valid, active, np.asarray(centers), 100)
    assert 2 < steps < 100
    np.testing.assert_array_equal(np.asarray(labels), want_labels)
    np.testing.assert_allclose(np.asarray(moved)[:active], want_centers[:active], atol=1e-5)
    # capped at one update, it stops where numpy's first update does
    one, _ = lloyd(jnp.asarray(x), jnp.asarray(valid), jnp.asarray(active), centers, 1)
    want_one = _numpy_lloyd(x.astype(np.float64), valid, active, np.asarray(centers), 1)[0]
    np.testing.assert_array_equal(np.asarray(one), want_one)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plus_plus_seeds_one_valid_point_per_separated_blob(seed):
    # Five tight blobs far apart, plus invalid points farther still: D^2 seeding would favour them if it
    # looked at them. Clusters past `active` stay empty.
    rng = np.random.default_rng(seed)
    blob = rng.integers(0, 5, 200)
    x = 10.0 * np.eye(8)[blob] + 0.01 * rng.normal(size=(200, 8))
    valid = rng.random(200) < 0.9
    x[~valid] = 100.0 * np.eye(8)[7]
    x = jnp.asarray(x, jnp.float32)
    centers = np.asarray(plus_plus_init(jax.random.key(seed), x, jnp.asarray(valid), jnp.asarray(5), 8))
    np.testing.assert_array_equal(centers[5:], 0.0)
    picked = [np.flatnonzero((np.asarray(x) == c).all(-1)) for c in centers[:5]]
    assert all(len(p) and valid[p].all() for p in picked)
    assert sorted(blob[p[0]] for p in picked) == list(range(5))
    labels, _ = kmeans(jax.random.key(seed), x, jnp.asarray(valid), jnp.asarray(5), 8, 20)
    labels = np.asarray(labels)
    np.testing.assert_array_equal(labels[~valid], -1)
    assert all(len(set(labels[valid & (blob == i)])) == 1 for i in range(5))
    assert len(set(labels[valid])) == 5


def test_assign_in_chunks_is_the_nearest_live_center():
    rng = np.random.default_rng(1)
    x, centers = rng.normal(size=(5000, 16)), rng.normal(size=(37, 16))  # 5000 points: the chunked path
    got = np.asarray(assign(jnp.asarray(x, jnp.float32), jnp.asarray(centers, jnp.float32), jnp.asarray(30)))
    d = ((x[:, None] - centers[None, :30]) ** 2).sum(-1)
    order = np.sort(d, axis=-1)
    clear = order[:, 1] - order[:, 0] > 1e-3  # float32 may break near-ties either way
    assert clear.mean() > 0.99 and got.max() < 30
    np.testing.assert_array_equal(got[clear], np.argmin(d, -1)[clear])


# -- the policy's state ---------------------------------------------------------------------------


def _weights(q_scaled, centroids, sizes):
    """numpy S_j = exp(q.c_j) / sum_l N_l exp(q.c_l), averaged over q's leading axes; float64 [Kc]."""
    logits = np.einsum("...d,jd->...j", q_scaled, centroids)
    logits = logits.reshape(-1, logits.shape[-1])
    present = sizes > 0
    if not present.any():
        return np.zeros(len(sizes))
    e = np.exp(logits - logits[:, present].max(-1, keepdims=True))
    s = np.where(present, e / (sizes * e).sum(-1, keepdims=True), 0.0)
    return s.mean(0)


@pytest.mark.parametrize("phase", [1, 2], ids=["prefilled", "decoded"])
@pytest.mark.parametrize("layer", [0, 1])
def test_context_keys_are_clustered_to_a_kmeans_fixed_point(model, runs, phase, layer):
    # Labels exactly on the context keys (every prompt position before length - 100), floor(5%) clusters,
    # sizes their counts, centroids the mean raw keys; each normalised key nearest its own cluster's
    # normalised mean (Lloyd converged). Generated tokens stay unclustered.
    _, results = runs
    (seg,) = results["squeezed"][phase].layers[layer]
    assert isinstance(seg, ClusteredSegment)
    for b, length in enumerate(LENGTHS):
        clusters = max(1, int(0.05 * max(length - RECENT, 0)))
        for h in range(model.config.num_kv_heads):
            pos, labels = np.asarray(seg.kv.pos[b, h]), np.asarray(seg.labels[b, h])
            context = (pos >= 0) & (pos < length - RECENT)
            np.testing.assert_array_equal(labels >= 0, context)
            sizes = np.asarray(seg.sizes[b, h])
            if not context.any():
                np.testing.assert_array_equal(sizes, 0)
                continue
            lab, keys = labels[context], np.asarray(seg.kv.k[b, h], np.float64)[context]
            assert lab.max() < clusters and len(np.unique(lab)) > clusters // 2
            np.testing.assert_array_equal(sizes, np.bincount(lab, minlength=len(sizes)))
            used = np.flatnonzero(sizes)
            means = np.stack([keys[lab == j].mean(0) for j in used])
            np.testing.assert_allclose(np.asarray(seg.centroids[b, h], np.float64)[used], means, atol=1e-5)
            unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
            unit_means = np.stack([unit[lab == j].mean(0) for j in used])
            d = ((unit[:, None] - unit_means[None]) ** 2).sum(-1)  # [n, clusters used]
            own = d[np.arange(len(lab)), np.searchsorted(used, lab)]
            assert np.all(own <= d.min(-1) + 1e-5)


def test_context_slots_are_grouped_by_cluster_and_hold_fulls_entries(model, runs):
    # Each row's context slots [0, n) hold exactly the context positions, sorted by cluster; the recent and
    # generated tokens stay at slot = position; every prompt slot holds Full's key and value for its position
    # (generated tokens differ from Full's after layer 0: they came from sparse attention).
    tokens, results = runs
    for phase in (1, 2):
        full, squeezed = results["full"][phase], results["squeezed"][phase]
        for layer in range(model.config.num_layers):
            (ref,), (seg,) = full.layers[layer], squeezed.layers[layer]
            for b, length in enumerate(LENGTHS):
                n = max(length - RECENT, 0)
                for h in range(model.config.num_kv_heads):
                    pos, labels = np.asarray(seg.kv.pos[b, h]), np.asarray(seg.labels[b, h])
                    np.testing.assert_array_equal(np.sort(pos[:n]), np.arange(n))
                    np.testing.assert_array_equal(pos[n:], np.asarray(ref.pos[b, h, n:]))
                    assert np.all(np.diff(labels[:n]) >= 0) and np.all(labels[n:] == -1)
                    prompt = (pos >= 0) & (pos < length)
                    for name in ("k", "v"):
                        want = np.asarray(getattr(ref, name)[b, h])[pos[prompt]]
                        np.testing.assert_array_equal(np.asarray(getattr(seg.kv, name)[b, h])[prompt], want)


def test_grouped_layout_reads_fewer_pages_than_position_order(model, runs, seen):
    # The last prompt query's selected context keys, counted in pages of 16 slots: grouped by cluster they lie
    # in a few runs of slots; the same keys in position order are scattered over most context pages.
    tokens, results = runs
    state = results["squeezed"][1]
    grouped = scattered = 0
    for layer, (q, _) in enumerate(seen):
        (seg,) = state.layers[layer]
        last = np.stack([q[b, length - 1] for b, length in enumerate(LENGTHS)])[:, None]  # [B, 1, K, G, D]
        selected = np.asarray(selected_slots(jnp.asarray(last, jnp.float32), seg, model.config.head_dim**-0.5))
        selected = selected & (np.asarray(seg.labels) >= 0)  # the context keys (recent ones are always read)
        pos = np.asarray(seg.kv.pos)
        by_position = np.zeros_like(selected)
        b, h, _ = np.nonzero(selected)
        by_position[b, h, pos[selected]] = True
        pages = lambda x: x.reshape(*x.shape[:2], -1, PAGE).any(-1).sum()  # noqa: E731
        grouped, scattered = grouped + pages(selected), scattered + pages(by_position)
    assert grouped < 0.7 * scattered, (grouped, scattered)


def test_decode_through_the_kernel_matches_the_reference(model, runs):
    # The GPU lowering, interpreted (both lowerings take slot masks in test_block_sparse_decode).
    tokens, results = runs
    logits, state = results["squeezed"][0], jax.tree.map(jnp.copy, results["squeezed"][1])
    for i in range(2):
        token = tokens[np.arange(len(LENGTHS)), np.array(LENGTHS) + i]
        step, state = kvjax.decode_step(model, state, token, SqueezedAttention(), attention_impl="gpu-interpret")
        np.testing.assert_allclose(np.asarray(step), logits[:, i], atol=2e-5, rtol=0)


def _coarse_labels(seg, b, h):
    labels, parents = np.asarray(seg.labels[b, h]), np.asarray(seg.coarse.parents[b, h])
    return np.where(labels >= 0, parents[np.maximum(labels, 0)], -1)


def _fine(seg, b, h):
    return seg.centroids[b, h], seg.sizes[b, h], seg.labels[b, h], seg.threshold[b], 0.1


def _coarse(seg, b, h):
    return seg.coarse.centroids[b, h], seg.coarse.sizes[b, h], _coarse_labels(seg, b, h), seg.coarse.threshold[b], 0.3


LEVELS = {"squeezed": _fine, "hierarchical": _fine, "hierarchical-coarse": _coarse}  # run -> a row's
# (centroids, sizes, labels, threshold, keep)


@pytest.mark.parametrize("level", LEVELS)
def test_threshold_is_the_quantile_of_the_calibration_weights(model, runs, seen, level):
    # numpy from an eager forward's queries: each context key weighs its cluster's S averaged over the
    # last 100 prompt queries and the GQA group; the threshold is the (1 - keep) quantile over all layers,
    # KV heads and context keys of the sequence (hierarchical: the fine level's with every cluster counted,
    # and the coarse level's at 1 - coarse_keep).
    tokens, results = runs
    state = results[level.split("-")[0]][1]
    scale = model.config.head_dim**-0.5
    for b, length in enumerate(LENGTHS):
        per_key, thresholds = [], set()
        for layer, (q, _) in enumerate(seen):
            (seg,) = state.layers[layer]
            for h in range(model.config.num_kv_heads):
                centroids, sizes, labels, threshold, keep = (np.asarray(x) for x in LEVELS[level](seg, b, h))
                s = _weights(q[b, max(length - RECENT, 0) : length, h] * scale, centroids.astype(np.float64), sizes)
                per_key.append(s[labels[labels >= 0]])
                thresholds.add(float(threshold))
        (threshold,) = thresholds
        values = np.concatenate(per_key)
        if values.size == 0:
            assert threshold == np.inf
            continue
        np.testing.assert_allclose(threshold, np.quantile(values, 1 - keep), rtol=1e-4)
        assert keep - 0.02 < np.mean(values >= threshold) < keep + 0.1  # about `keep`, give or take a cluster


def test_coarse_clusters_group_the_clusters_into_a_kmeans_fixed_point(model, runs):
    # Half as many coarse clusters as clusters; each live cluster has one, numbered so that the clusters
    # of a coarse cluster are consecutive; coarse centroids are the plain means of their clusters'
    # centroids, coarse sizes their keys; each normalised centroid is nearest its own coarse cluster's
    # normalised mean (Lloyd converged).
    _, results = runs
    for phase in (1, 2):
        for layer in results["hierarchical"][phase].layers:
            (seg,) = layer
            for b, length in enumerate(LENGTHS):
                clusters = max(1, int(0.05 * max(length - RECENT, 0)))
                for h in range(model.config.num_kv_heads):
                    sizes, parents = np.asarray(seg.sizes[b, h]), np.asarray(seg.coarse.parents[b, h])
                    live = sizes > 0
                    np.testing.assert_array_equal(parents >= 0, live)
                    if not live.any():
                        continue
                    n_live = live.sum()
                    assert live[:n_live].all() and np.all(np.diff(parents[:n_live]) >= 0)
                    assert parents.max() < max(1, int(0.5 * clusters))
                    coarse_sizes = np.asarray(seg.coarse.sizes[b, h])
                    np.testing.assert_array_equal(
                        coarse_sizes, np.bincount(parents[live], sizes[live], minlength=len(coarse_sizes))
                    )
                    fine = np.asarray(seg.centroids[b, h], np.float64)[live]
                    used = np.unique(parents[live])
                    means = np.stack([fine[parents[live] == j].mean(0) for j in used])
                    np.testing.assert_allclose(
                        np.asarray(seg.coarse.centroids[b, h], np.float64)[used], means, atol=1e-5
                    )
                    unit = fine / np.linalg.norm(fine, axis=-1, keepdims=True)
                    unit_means = np.stack([unit[parents[live] == j].mean(0) for j in used])
                    d = ((unit[:, None] - unit_means[None]) ** 2).sum(-1)  # [live clusters, coarse used]
                    own = d[np.arange(len(unit)), np.searchsorted(used, parents[live])]
                    assert np.all(own <= d.min(-1) + 1e-5)


def test_hierarchical_with_every_coarse_cluster_open_is_the_one_level_lookup(runs):
    _, results = runs
    np.testing.assert_allclose(results["coarse_keep_all"][0], results["squeezed"][0], atol=1e-6, rtol=0)
    assert np.abs(results["hierarchical"][0][:2] - results["squeezed"][0][:2]).max() > 1e-3


def test_hierarchical_selection_is_the_authors_two_level_lookup():
    # Coarse clusters reaching the coarse threshold open; the fine estimates then count only the keys of
    # open coarse clusters (the others leave the denominator) and must reach the fine threshold.
    rng = np.random.default_rng(5)
    b, h, g, d, c, kc, kq = 2, 2, 3, 16, 96, 8, 3
    context, scale = np.array([80, 50]), d**-0.5
    slots = np.arange(c)
    pos = np.broadcast_to(np.where(slots < context[:, None] + 10, slots, -1)[:, None], (b, h, c)).astype(np.int32)
    labels = np.where(slots < context[:, None, None], np.sort(rng.integers(0, kc, (b, h, c)), -1), -1).astype(np.int32)
    sizes = np.stack([[np.bincount(row[row >= 0], minlength=kc) for row in heads] for heads in labels])
    parents = np.where(sizes > 0, np.sort(rng.integers(0, kq, (b, h, kc)), -1), -1).astype(np.int32)
    coarse_sizes = np.stack(
        [[np.bincount(p[p >= 0], n[p >= 0], minlength=kq) for p, n in zip(ps, ns)] for ps, ns in zip(parents, sizes)]
    ).astype(np.int32)
    centroids, coarse_centroids = (rng.normal(size=(b, h, n, d)).astype(np.float32) for n in (kc, kq))
    q = rng.normal(size=(b, 1, h, g, d)).astype(np.float32)
    coarse_w = np.stack(
        [
            [
                _weights(q[i, :, j].astype(np.float64) * scale, coarse_centroids[i, j], coarse_sizes[i, j])
                for j in range(h)
            ]
            for i in range(b)
        ]
    )  # [B, Hs, Kq]
    coarse_threshold = np.array([np.median(w[w > 0]) for w in coarse_w])
    open_fine = np.take_along_axis(coarse_w >= coarse_threshold[:, None, None], np.maximum(parents, 0), -1)
    restricted = np.where(open_fine & (parents >= 0), sizes, 0)
    fine_w = np.stack(
        [
            [_weights(q[i, :, j].astype(np.float64) * scale, centroids[i, j], restricted[i, j]) for j in range(h)]
            for i in range(b)
        ]
    )  # [B, Hs, Kc]
    threshold = np.array([np.median(w[w > 0]) for w in fine_w])
    chosen = (fine_w >= threshold[:, None, None]) & (restricted > 0)
    assert 0 < open_fine[sizes > 0].mean() < 1 and 0 < chosen[restricted > 0].mean() < 1
    seg = ClusteredSegment(
        kv=KVSegment(k=jnp.zeros((b, h, c, d)), v=jnp.zeros((b, h, c, d)), pos=jnp.asarray(pos), heads=(0, 1)),
        labels=jnp.asarray(labels),
        centroids=jnp.asarray(centroids),
        sizes=jnp.asarray(sizes, jnp.int32),
        threshold=jnp.asarray(threshold, jnp.float32),
        coarse=CoarseClusters(
            jnp.asarray(parents),
            jnp.asarray(coarse_centroids),
            jnp.asarray(coarse_sizes),
            jnp.asarray(coarse_threshold, jnp.float32),
        ),
    )
    want = (pos >= 0) & ((labels < 0) | np.take_along_axis(chosen, np.maximum(labels, 0), -1))
    np.testing.assert_array_equal(np.asarray(selected_slots(jnp.asarray(q), seg, scale)), want)


@pytest.mark.parametrize(
    "t,window,impl",
    [
        (1, None, "reference"),
        (3, None, "reference"),
        (1, 40, "reference"),
        (3, 40, "reference"),
        (1, None, "gpu-interpret"),
        (1, None, "tpu-interpret"),  # one decode token: the kernel over selected pages
    ],
)
def test_attention_is_exact_over_the_selected_keys(t, window, impl):
    rng = np.random.default_rng(t)
    b, h, g, d, c, kc = 2, 2, 3, 16, 64, 6
    held, context, active = np.array([60, 41]), np.array([40, 25]), np.array([5, 4])
    slots = np.arange(c)
    pos = np.broadcast_to(np.where(slots < held[:, None], slots, -1)[:, None], (b, h, c)).astype(np.int32)
    labels = rng.integers(0, active[:, None, None], (b, h, c))
    labels = np.where(slots < context[:, None, None], labels, -1).astype(np.int32)
    sizes = np.stack([[np.bincount(row[row >= 0], minlength=kc) for row in heads] for heads in labels])
    k, v, centroids = (rng.normal(size=s).astype(np.float32) for s in [(b, h, c, d), (b, h, c, d), (b, h, kc, d)])
    q = rng.normal(size=(b, t, h, g, d)).astype(np.float32)
    scale = d**-0.5
    weights = np.stack(
        [
            [_weights(q[i, :, j].astype(np.float64) * scale, centroids[i, j], sizes[i, j]) for j in range(h)]
            for i in range(b)
        ]
    )  # [B, Hs, Kc]
    threshold = np.array([np.median(weights[i][sizes[i] > 0]) for i in range(b)], np.float32)
    chosen = weights >= threshold[:, None, None]
    assert 0 < chosen[sizes > 0].mean() < 1
    seg = ClusteredSegment(
        kv=KVSegment(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), heads=(0, 1)),
        labels=jnp.asarray(labels),
        centroids=jnp.asarray(centroids),
        sizes=jnp.asarray(sizes, jnp.int32),
        threshold=jnp.asarray(threshold),
    )
    q_pos = (held - 1)[:, None] - (t - 1) + np.arange(t)  # [B, T]: the last queries over held entries
    got = np.asarray(attend_selected(jnp.asarray(q), seg, jnp.asarray(q_pos, jnp.int32), window, scale, impl))
    for i in range(b):
        for j in range(h):
            selected = (labels[i, j] < 0) | np.take(chosen[i, j], np.maximum(labels[i, j], 0))
            for s in range(t):
                visible = selected & (pos[i, j] >= 0) & (pos[i, j] <= q_pos[i, s])
                if window is not None:
                    visible &= pos[i, j] > q_pos[i, s] - window
                logits = q[i, s, j].astype(np.float64) @ k[i, j, visible].T * scale  # [G, n]
                p = np.exp(logits - logits.max(-1, keepdims=True))
                want = (p / p.sum(-1, keepdims=True)) @ v[i, j, visible]
                np.testing.assert_allclose(got[i, s, j], want, atol=2e-6)


def test_keep_all_is_full_attention_and_keep_10_percent_is_not(runs):
    _, results = runs
    full, squeezed = results["full"][0], results["squeezed"][0]
    np.testing.assert_allclose(results["keep_all"][0], full, atol=1e-5)
    np.testing.assert_allclose(squeezed[2], full[2], atol=1e-5)  # 80 tokens: all recent, nothing left out
    assert np.abs(squeezed[:2] - full[:2]).max() > 1e-2


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, _ = runs
    assert_generate_is_the_greedy_chain(model, SqueezedAttention(keep=0.2), tokens, LENGTHS, 6, CHUNK)


def test_kv_bytes_keep_every_key_plus_labels_and_centroids():
    # Llama-3.1-8B shape, 32K prompt, 64 new tokens, bf16: nothing is freed; labels cost 4 bytes a
    # token and 1633 centroids (5% of the 32668 context keys) 12.8 bytes a token, per KV head.
    cfg, prompt, new = llama8b_cache_config(), 32768, 64
    slots, clusters = position_capacity(prompt + new), int(0.05 * (prompt - RECENT))
    per_head = slots * (2 * 128 * 2 + 4 + 4) + clusters * (128 * 2 + 4)
    expected = cfg.num_layers * (cfg.num_kv_heads * per_head + 4) + 4
    got = decode_state_bytes(SqueezedAttention(), cfg, prompt, new)
    assert got == expected
    assert got < 1.04 * decode_state_bytes(Full(), cfg, prompt, new)
    # hierarchical adds, per layer: each cluster's coarse cluster (4 bytes), 816 coarse centroids and sizes per
    # KV head, a coarse threshold (2 of the 32 layers traced: tracing k-means twice per layer takes a while)
    cfg = dataclasses.replace(cfg, num_layers=2)
    one_level, coarse = decode_state_bytes(SqueezedAttention(), cfg, prompt, new), clusters // 2
    hierarchical = one_level + cfg.num_layers * (cfg.num_kv_heads * (clusters * 4 + coarse * (128 * 2 + 4)) + 4)
    assert decode_state_bytes(SqueezedAttention(hierarchical=True), cfg, prompt, new) == hierarchical


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clusters": 0.0},
        {"clusters": 1.5},
        {"keep": 0.0},
        {"keep": 1.2},
        {"recent": 0},
        {"iterations": 0},
        {"coarse_clusters": 0.0},
        {"coarse_clusters": 2.0},
        {"coarse_keep": 0.0},
        {"coarse_keep": 1.5},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="SqueezedAttention"):
        SqueezedAttention(**kwargs)
