"""D2O: the merge rule (cosine match, moving threshold, weighted mean), the layer split by attention
density, and the policy end to end, each against a numpy transcription of the authors' code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.kv_state import round_capacity
from kvjax.policies import D2O
from kvjax.policies.d2o import D2OSegment, head_variance, layer_density
from kvjax.policies.d2o import merge_evicted as eager_merge
from tests.support.policy_reference import causal_probs, layer_queries_keys
from tests.support.random_data import random_tokens

merge_evicted = jax.jit(eager_merge, static_argnums=(3, 4, 5))  # one compile, not one per jnp op

# ------------------------------------------------------------------------------------------------
# numpy transcriptions
# ------------------------------------------------------------------------------------------------


def np_merge(k, v, evicted, kept, tau, alpha, beta):
    """The authors' merge per sequence: u_e = max cosine of k_e over the kept keys; tau the mean of u at
    the first eviction, then alpha tau + beta mean(u); e with u_e >= tau (per head here) joins its best
    match c by k_c <- (k_c + sum u_e k_e) / (1 + n_c), v alike. k, v [B, H, C, D]; tau [B] (NaN: unset)."""
    k, v, tau = k.astype(np.float64), v.astype(np.float64), tau.astype(np.float64).copy()
    out_k, out_v = k.copy(), v.copy()
    for b in range(k.shape[0]):
        matches = []  # (head, evicted slot, best kept slot, similarity)
        for h in range(k.shape[1]):
            unit = k[b, h] / np.linalg.norm(k[b, h], axis=-1, keepdims=True)
            for e in np.flatnonzero(evicted[b, h]):
                sim = np.where(kept[b, h], unit @ unit[e], -np.inf)
                matches.append((h, e, int(np.argmax(sim)), float(np.max(sim))))
        if not matches:
            continue
        mean = np.mean([u for *_, u in matches])
        tau[b] = mean if np.isnan(tau[b]) else alpha * tau[b] + beta * mean
        for h in range(k.shape[1]):
            num_k, num_v, n = k[b, h].copy(), v[b, h].copy(), np.ones(k.shape[2])
            for hh, e, c, u in matches:
                if hh == h and u >= tau[b]:
                    num_k[c] += u * k[b, h, e]
                    num_v[c] += u * v[b, h, e]
                    n[c] += 1
            out_k[b, h], out_v[b, h] = num_k / n[:, None], num_v / n[:, None]
    return out_k, out_v, tau


def np_layer_budgets(scores, held, heavy, window, max_share):
    """scores, held [L, B, H, C] -> heavy_l, recent_l int[L, B]: per head the variance (ddof 1) of the
    held scores, min-max normalised across heads (+1e-6), averaged; shares L softmax(-sigma)."""
    n_layers, batch = scores.shape[:2]
    sigma = np.zeros((n_layers, batch))
    for layer in range(n_layers):
        for b in range(batch):
            var = np.array([np.var(s[m], ddof=1) for s, m in zip(scores[layer, b], held[layer, b])])
            sigma[layer, b] = np.mean((var - var.min()) / (var.max() - var.min() + 1e-6))
    share = n_layers * np.exp(-sigma) / np.exp(-sigma).sum(0)
    share = np.minimum(share, max_share)
    cap_heavy, cap_recent = int(max_share * heavy), max(1, int(max_share * window))
    return np.minimum(np.floor(share * heavy), cap_heavy), np.clip(np.floor(share * window), 1, cap_recent)


def segment(k, v, tau, held=None):
    b, h, c, _ = k.shape
    pos = np.broadcast_to(np.arange(c), (b, h, c)) if held is None else np.where(held, np.arange(c), -1)
    return D2OSegment(
        k=jnp.asarray(k, jnp.float32),
        v=jnp.asarray(v, jnp.float32),
        pos=jnp.asarray(pos, jnp.int32),
        heads=tuple(range(h)),
        budget=c,
        score=jnp.zeros((b, h, c)),
        threshold=jnp.broadcast_to(jnp.asarray(tau, jnp.float32)[:, None], (b, h)),
        keep=jnp.full((b, h), c, jnp.int32),
        recent=jnp.ones((b, h), jnp.int32),
    )


# ------------------------------------------------------------------------------------------------
# The merge rule
# ------------------------------------------------------------------------------------------------


def test_merge_on_hand_built_keys_decides_per_head():
    """Head 0's evicted key matches kept slot 0 exactly (u = 1), head 1's best is 0.6: tau = 0.8, so
    head 0 merges ((k + 1 k_e) / 2) and head 1 does not. The authors' code compares the heads' mean
    u (0.8) and would merge both: kvjax decides per head (its one deviation in the rule)."""
    k = np.array([[[[1, 0], [0, 1], [2, 0], [-1, 0]], [[1, 0], [0, 1], [0.6, -0.8], [-1, 0]]]])
    v = np.array([[[[0, 2], [1, 1], [4, 0], [3, 3]], [[0, 2], [1, 1], [4, 0], [3, 3]]]])
    evicted = np.zeros((1, 2, 4), bool)
    evicted[:, :, 2] = True
    out = merge_evicted(segment(k, v, [np.nan]), jnp.asarray(evicted), jnp.asarray(~evicted), 4, 0.5, 0.5)
    np.testing.assert_allclose(np.asarray(out.threshold), [[0.8, 0.8]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.k)[0, 0, 0], [1.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.v)[0, 0, 0], [2.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.k)[0, 1], np.float32(k[0, 1]))  # head 1 unchanged
    np.testing.assert_array_equal(np.asarray(out.v)[0, 1], np.float32(v[0, 1]))
    ref_k, ref_v, ref_tau = np_merge(k, v, evicted, ~evicted, np.array([np.nan]), 0.5, 0.5)
    np.testing.assert_allclose(np.asarray(out.k), ref_k, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.v), ref_v, atol=1e-6)


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.3, 0.7)])
def test_merge_matches_numpy_through_successive_evictions(alpha, beta):
    """Random keys, several entries evicted per row (some sharing a match), twice: the second eviction
    moves tau by the EMA; rows keep their own tau; empty slots are never matched."""
    rng = np.random.default_rng(0)
    b, h, c, d = 2, 3, 24, 8
    k = rng.normal(size=(b, h, c, d))
    k[:, :, 12:18] = k[:, :, :6] + 0.3 * rng.normal(size=(b, h, 6, d))  # near-copies: high similarity
    v = rng.normal(size=(b, h, c, d))
    held = np.ones((b, h, c), bool)
    held[1, :, -3:] = False  # a shorter row
    tau = np.array([np.nan, np.nan])
    seg = first = segment(k, v, tau, held)
    for _ in range(2):
        evicted = np.zeros((b, h, c), bool)
        for i in range(b):
            for j in range(h):
                evicted[i, j, rng.choice(np.flatnonzero(held[i, j]), size=5, replace=False)] = True
        kept = held & ~evicted
        seg = merge_evicted(seg, jnp.asarray(evicted), jnp.asarray(kept), c, alpha, beta)
        k, v, tau = np_merge(k, v, evicted, kept, tau, alpha, beta)
        np.testing.assert_allclose(np.asarray(seg.k), k, atol=1e-5)
        np.testing.assert_allclose(np.asarray(seg.v), v, atol=1e-5)
        np.testing.assert_allclose(np.asarray(seg.threshold), np.repeat(tau[:, None], h, 1), atol=1e-6)
    assert not np.allclose(np.asarray(seg.k), np.asarray(first.k)), "some evicted entry should have merged"


def test_decode_merge_of_one_entry_matches_numpy():
    """The decode path (one evicted entry per row, updated in place) is the same rule."""
    rng = np.random.default_rng(1)
    k, v = rng.normal(size=(2, 2, 10, 4)), rng.normal(size=(2, 2, 10, 4))
    evicted = np.zeros((2, 2, 10), bool)
    evicted[0, 0, 3] = evicted[0, 1, 7] = evicted[1, 0, 0] = evicted[1, 1, 9] = True
    tau = np.array([0.1, 0.9])
    out = merge_evicted(segment(k, v, tau), jnp.asarray(evicted), jnp.asarray(~evicted), 1, 0.5, 0.5)
    ref_k, ref_v, ref_tau = np_merge(k, v, evicted, ~evicted, tau, 0.5, 0.5)
    np.testing.assert_allclose(np.asarray(out.k), ref_k, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.v), ref_v, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.threshold)[:, 0], ref_tau, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The layer split
# ------------------------------------------------------------------------------------------------


def test_layer_budgets_follow_the_authors_formula():
    rng = np.random.default_rng(2)
    n_layers, b, h, c = 6, 2, 3, 40
    scores = rng.gamma(rng.uniform(0.2, 3.0, size=(n_layers, b, h, 1)), size=(n_layers, b, h, c))
    held = rng.uniform(size=(n_layers, b, h, c)) < 0.9
    density = jnp.stack(
        [layer_density(head_variance(jnp.asarray(s, jnp.float32), jnp.asarray(m))) for s, m in zip(scores, held)]
    )
    heavy, recent = D2O(heavy=30, window=20, max_share=1.05).layer_budgets(density)
    ref_heavy, ref_recent = np_layer_budgets(scores, held, 30, 20, 1.05)
    np.testing.assert_array_equal(np.asarray(heavy), ref_heavy)
    np.testing.assert_array_equal(np.asarray(recent), ref_recent)
    assert (np_layer_budgets(scores, held, 30, 20, 100.0)[0] > 31).any(), "some dense layer should be clipped"
    # Without clipping, the shares average 1: the layers split L x (heavy + window) up to the floors.
    heavy, recent = D2O(heavy=3000, window=2000, max_share=100.0).layer_budgets(density)
    total = np.asarray(heavy + recent).sum(0)
    assert np.all(total <= n_layers * 5000) and np.all(total > n_layers * 5000 - 2 * n_layers)


# ------------------------------------------------------------------------------------------------
# End to end on a tiny random model
# ------------------------------------------------------------------------------------------------


def test_one_chunk_prefill_keeps_and_merges_as_the_authors(tiny_model):
    """The whole prompt in one chunk: each layer's split from the numpy density of its attention (per
    query head), its kept set (recent window, sinks, then the heaviest by the GQA group's mean), and its
    kept keys and values merged from the evicted ones with the first tau, all from the layers' q, k, v."""
    m = tiny_model
    b, t = 2, 96
    tokens = random_tokens(5, (b, t), m.config.vocab_size)
    policy = D2O(heavy=14, window=10, max_share=1.25)
    state = kvjax.prefill(m, tokens, policy, chunk_size=None)
    qkv = layer_queries_keys(m, tokens)
    probs = [causal_probs(q, k, m.config.group_size) for q, k, _ in qkv]  # [B, K, G, T, T] per layer
    per_query_head = np.stack([p.sum(axis=3).reshape(b, m.config.num_heads, t) for p in probs])  # [L, B, H, T]
    scores = np.stack([p.mean(axis=2).sum(axis=2) for p in probs])  # [L, B, K, T]: H2O's
    ref_heavy, ref_recent = np_layer_budgets(per_query_head, np.ones(per_query_head.shape, bool), 14, 10, 1.25)
    for layer, (_, k, v) in enumerate(qkv):
        seg = state.layers[layer][0]
        assert seg.capacity == round_capacity(int(1.25 * 14) + int(1.25 * 10) + 1)
        np.testing.assert_array_equal(np.asarray(seg.recent)[:, 0], ref_recent[layer])
        np.testing.assert_array_equal(np.asarray(seg.keep)[:, 0], ref_heavy[layer] + ref_recent[layer])
        kept = np.zeros((b, m.config.num_kv_heads, t), bool)
        for i in range(b):
            recent = int(ref_recent[layer, i])
            rank = np.where(np.arange(t) < policy.sinks, np.inf, scores[layer, i])[:, : t - recent]  # [K, T - recent]
            for j in range(m.config.num_kv_heads):
                kept[i, j, t - recent :] = True
                kept[i, j, np.argsort(-rank[j], kind="stable")[: int(ref_heavy[layer, i])]] = True
        pos = np.asarray(seg.pos)
        assert [[set(row[row >= 0]) for row in seq] for seq in pos] == [
            [set(np.flatnonzero(row)) for row in seq] for seq in kept
        ]
        ref_k, ref_v, ref_tau = np_merge(
            k.swapaxes(1, 2), v.swapaxes(1, 2), ~kept, kept, np.full(b, np.nan), policy.alpha, policy.beta
        )
        at = np.maximum(pos, 0)[..., None]
        valid = (pos >= 0)[..., None]
        got_k = np.where(valid, np.asarray(seg.k), 0)
        np.testing.assert_allclose(got_k, np.where(valid, np.take_along_axis(ref_k, at, 2), 0), atol=2e-5)
        got_v = np.where(valid, np.asarray(seg.v), 0)
        np.testing.assert_allclose(got_v, np.where(valid, np.take_along_axis(ref_v, at, 2), 0), atol=2e-5)
        np.testing.assert_allclose(np.asarray(seg.threshold)[:, 0], ref_tau, atol=1e-5)
        assert not np.allclose(ref_k, k.swapaxes(1, 2)), "some evicted entry should have merged"
        assert seg.head_score is None  # the per-query-head sums end with the prompt
    assert (ref_heavy[0] != ref_heavy[1]).any(), "the density should split the layers unevenly"


def test_prefill_compression_moves_the_per_query_head_sums_with_their_entries():
    """Between chunks the buffer is compressed: each kept entry's per-query-head sums travel with it."""
    b, h, g, c, d = 2, 2, 3, 12, 4
    rng = np.random.default_rng(3)
    pos = np.stack([rng.permutation(c) for _ in range(b * h)]).reshape(b, h, c)
    pos[1, :, -2:] = -1  # empty slots
    seg = segment(rng.normal(size=(b, h, c, d)), rng.normal(size=(b, h, c, d)), [np.nan, np.nan])
    seg = seg.replace(
        pos=jnp.asarray(pos, jnp.int32),
        budget=7,
        score=jnp.asarray(rng.uniform(size=(b, h, c)), jnp.float32),
        keep=jnp.full((b, h), 7, jnp.int32),
        recent=jnp.full((b, h), 2, jnp.int32),
        head_score=jnp.asarray(100.0 * pos[:, :, None, :] + np.arange(g)[:, None], jnp.float32),
    )
    compress = jax.jit(lambda s: D2O(heavy=5, window=2).compress(s, c, c - 7, final=False))
    out = compress(seg)
    kept_pos, head_score = np.asarray(out.pos), np.asarray(out.head_score)
    assert ((kept_pos >= 0).sum(-1) == 7).all()
    held = (kept_pos >= 0)[:, :, None, :]
    np.testing.assert_array_equal(
        head_score, np.where(held, 100.0 * kept_pos[:, :, None, :] + np.arange(g)[:, None], 0)
    )


@pytest.mark.parametrize("chunk", [None, 32])
def test_budgets_hold_over_a_long_decode(tiny_model, chunk):
    """Every layer (the first and last too: the authors' code leaves layers 0, 1 and L - 1 whole) keeps
    each row's share through a decode much longer than its budget; the state never grows."""
    m = tiny_model
    tokens = random_tokens(6, (2, 200), m.config.vocab_size)
    policy = D2O(heavy=12, window=8)
    state = kvjax.prefill(m, tokens[:, :80], policy, chunk_size=chunk, lengths=np.array([80, 61]))
    size = kvjax.kv_bytes(state)
    first = [np.asarray(layer[0].keep) for layer in state.layers]
    for step in range(120):
        _, state = kvjax.decode_step(m, state, tokens[:, 80 + step], policy)
        for layer, keep in zip(state.layers, first):
            seg = layer[0]
            np.testing.assert_array_equal(np.asarray(seg.keep), keep)
            held = (np.asarray(seg.pos) >= 0).sum(-1)
            np.testing.assert_array_equal(held, keep)  # full to its share, never over it
    assert kvjax.kv_bytes(state) == size
    for seg in (layer[0] for layer in state.layers):
        for pos, recent, newest in zip(np.asarray(seg.pos), np.asarray(seg.recent), (80 + 119, 61 + 119)):
            for row, r in zip(pos, recent):
                assert set(range(newest - r + 1, newest + 1)) <= set(row.tolist())  # the recent window held


def test_budget_covering_the_context_equals_full(tiny_model):
    m = tiny_model
    tokens = random_tokens(4, (2, 150), m.config.vocab_size)
    policy = D2O(heavy=4000, window=4000)
    ref = kvjax.prefill(m, tokens[:, :120], max_new_tokens=30, chunk_size=32)
    got = kvjax.prefill(m, tokens[:, :120], policy, max_new_tokens=30, chunk_size=32)
    for t in range(120, 150):
        ref_logits, ref = kvjax.decode_step(m, ref, tokens[:, t])
        got_logits, got = kvjax.decode_step(m, got, tokens[:, t], policy)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ragged_rows_equal_their_own_runs(tiny_model):
    """Budgets and thresholds are per sequence: a row of a ragged batch ends as it would alone."""
    m = tiny_model
    tokens = random_tokens(7, (2, 90), m.config.vocab_size)
    policy = D2O(heavy=10, window=6)
    both = kvjax.prefill(m, tokens, policy, lengths=np.array([90, 70]))
    for row, n in enumerate((90, 70)):
        alone = kvjax.prefill(m, tokens[row : row + 1, :n], policy)
        for a, s in zip(both.layers, alone.layers):
            a, s = a[0], s[0]
            np.testing.assert_array_equal(np.asarray(a.pos)[row], np.asarray(s.pos)[0])
            valid = np.asarray(s.pos)[0] >= 0
            np.testing.assert_allclose(np.asarray(a.k)[row][valid], np.asarray(s.k)[0][valid], atol=2e-5)
            np.testing.assert_allclose(np.asarray(a.threshold)[row], np.asarray(s.threshold)[0], atol=1e-5)
    out = kvjax.generate(m, tokens, max_new_tokens=12, policy=policy, lengths=np.array([90, 70]))
    assert out.shape == (2, 12)


def test_kv_bytes_budget_and_compression_ratio(tiny_model):
    m = tiny_model
    tokens = random_tokens(8, (1, 128), m.config.vocab_size)
    policy = D2O(compression_ratio=0.75).resolve(128)
    assert (policy.heavy, policy.window) == (16, 16)
    state = kvjax.prefill(m, tokens, D2O(compression_ratio=0.75))
    full = kvjax.prefill(m, tokens)
    slots = round_capacity(int(1.5 * 16) * 2 + 1)  # max_share x the average budget, + 1 for decoding
    assert all(layer[0].capacity == slots for layer in state.layers)
    heads, d, n_layers = m.config.num_kv_heads, m.config.head_dim, m.config.num_layers
    per_slot = 2 * d * 4 + 4 + 4  # float32 k and v, int32 position, float32 score
    assert kvjax.kv_bytes(state) == 4 + n_layers * heads * (slots * per_slot + 3 * 4)  # + length, tau, keep, recent
    assert kvjax.kv_bytes(state) < 0.6 * kvjax.kv_bytes(full)


def test_bad_arguments_raise():
    for bad in (dict(window=0), dict(heavy=-1), dict(sinks=-1), dict(alpha=1.5), dict(beta=-0.1), dict(max_share=0.5)):
        with pytest.raises(ValueError, match="D2O"):
            D2O(**bad)
