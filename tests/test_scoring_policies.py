"""Scoring policies (A2SF, TOVA, Knorm, VATP, PyramidKV, AdaKV) keep exactly what their papers'
formulas rank highest, recomputed independently in numpy from each layer's queries and keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.kv_state import count, round_capacity
from kvjax.policies import A2SF, H2O, TOVA, VATP, AdaKV, Knorm, PyramidKV, SnapKV
from kvjax.policies.adakv import PooledSegment
from tests.support.policy_reference import causal_probs, layer_queries_keys
from tests.support.random_data import random_tokens


def kept(state, layer: int) -> list[list[set[int]]]:
    """Per sequence, per KV head, the set of original positions a layer holds (any segment type)."""
    seg = state.layers[layer][0]
    pos = np.asarray(seg.head_positions() if isinstance(seg, PooledSegment) else seg.pos)
    return [[set(row[row >= 0].tolist()) for row in seq] for seq in pos]


def top(scores: np.ndarray, n: int) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:n].tolist())


_LAYERS: dict = {}


def _layers(m, seed: int, b: int, t: int):
    """Random prompts and their per-layer (q, k, v), computed once per test session."""
    if (id(m), seed, b, t) not in _LAYERS:
        tokens = random_tokens(seed, (b, t), m.config.vocab_size)
        _LAYERS[id(m), seed, b, t] = tokens, layer_queries_keys(m, tokens)
    return _LAYERS[id(m), seed, b, t]


def heavy_plus_window(scores: np.ndarray, heavy: int, window: int) -> list[list[set[int]]]:
    """scores [B, K, T] over one whole prompt: top `heavy` of the older tokens plus the last `window`."""
    t = scores.shape[-1]
    return [[top(s[: t - window], heavy) | set(range(t - window, t)) for s in seq] for seq in scores]


# ------------------------------------------------------------------------------------------------
# One chunk = the papers' formulas over the whole prompt (every layer's q/k is then exact).
# ------------------------------------------------------------------------------------------------


def test_a2sf_one_chunk_keeps_the_decayed_heavy_hitters(tiny_model):
    m, lam = tiny_model, 0.9
    tokens, qkv = _layers(m, 1, 2, 192)
    state = kvjax.prefill(m, tokens, A2SF(heavy=40, window=24, forgetting=lam), chunk_size=256)
    for layer, (q, k, _) in enumerate(qkv):
        probs = causal_probs(q, k, m.config.group_size).mean(axis=2)  # [B, K, T, T]
        weights = lam ** np.arange(191, -1, -1.0)  # query t weighs lambda^(T-1-t)
        scores = np.einsum("bkts,t->bks", probs, weights)
        assert kept(state, layer) == heavy_plus_window(scores, 40, 24)
        seg = state.layers[layer][0]
        held = np.asarray(seg.pos)
        np.testing.assert_allclose(
            np.asarray(seg.score)[held >= 0],
            np.take_along_axis(scores, np.maximum(held, 0), -1)[held >= 0],
            rtol=1e-4,
            atol=1e-7,
        )


@pytest.mark.parametrize("sink", [4, 0])
def test_vatp_one_chunk_weighs_attention_by_value_norm_and_keeps_the_sinks(tiny_model, sink):
    """guozhiyu/vatp: score = accumulated attention x L1 norm of the value, the first `sink_len` tokens
    pinned at the largest score (so they fill part of the heavy budget), plus the recent window."""
    m = tiny_model
    tokens, qkv = _layers(m, 1, 2, 192)
    state = kvjax.prefill(m, tokens, VATP(heavy=40, window=24, sink=sink), chunk_size=256)
    for layer, (q, k, v) in enumerate(qkv):
        attention = causal_probs(q, k, m.config.group_size).mean(axis=2).sum(axis=2)  # [B, K, T]
        v_l1 = np.abs(v.astype(np.float64)).sum(-1).transpose(0, 2, 1)  # [B, K, T]
        scores = attention * v_l1
        scores[..., :sink] = np.finfo(np.float64).max
        assert kept(state, layer) == heavy_plus_window(scores, 40, 24)
    assert VATP().sink == 4 and VATP().with_budget(6) == VATP(heavy=3, window=3, sink=3)


def test_tova_one_chunk_keeps_the_last_querys_choice_for_every_head(tiny_model):
    m = tiny_model
    tokens, qkv = _layers(m, 1, 2, 192)
    state = kvjax.prefill(m, tokens, TOVA(budget_tokens=50), chunk_size=256)
    for layer, (q, k, _) in enumerate(qkv):
        last = causal_probs(q, k, m.config.group_size)[:, :, :, -1].mean(axis=(1, 2))  # [B, T]
        expected = [[top(s, 50)] * m.config.num_kv_heads for s in last]
        assert kept(state, layer) == expected


@pytest.mark.parametrize("chunk", [256, 64])
def test_knorm_keeps_the_lowest_key_norms(tiny_model, chunk):
    """Prompt-only compression: the prompt runs exactly, so chunking changes nothing."""
    m = tiny_model
    tokens, qkv = _layers(m, 3, 2, 192)
    state = kvjax.prefill(m, tokens, Knorm(budget_tokens=50, skip_layers=()), chunk_size=chunk)
    for layer, (_, k, _) in enumerate(qkv):
        norms = np.linalg.norm(k.astype(np.float64), axis=-1).transpose(0, 2, 1)  # [B, K, T]
        assert kept(state, layer) == [[top(-n, 50) for n in seq] for seq in norms]


def test_knorm_skips_the_layers_its_authors_skip(tiny_model):
    """The authors compress every layer but 0 and 1 (the default); a skipped layer keeps the whole prompt."""
    assert Knorm().skip_layers == (0, 1) and Knorm(skip_layers=[1, 0, 1]).skip_layers == (0, 1)
    m = tiny_model
    tokens, qkv = _layers(m, 3, 2, 192)
    state = kvjax.prefill(m, tokens, Knorm(budget_tokens=50, skip_layers=(0,)), max_new_tokens=2, chunk_size=64)
    assert kept(state, 0) == [[set(range(192))] * m.config.num_kv_heads] * 2
    norms = np.linalg.norm(qkv[1][1].astype(np.float64), axis=-1).transpose(0, 2, 1)  # [B, K, T]
    assert kept(state, 1) == [[top(-n, 50) for n in seq] for seq in norms]
    _, state = kvjax.decode_step(m, state, tokens[:, 0], Knorm(budget_tokens=50, skip_layers=(0,)))
    assert int(count(state.layers[0][0]).min()) == 193
    with pytest.raises(ValueError, match="skip_layers"):
        Knorm(skip_layers=(-1,))


def _snapkv_votes(q, k, group, window, kernel):
    """[B, K, T - window]: the observation window's pooled votes (SnapKV / PyramidKV / AdaKV)."""
    t = q.shape[1]
    probs = causal_probs(q, k, group).mean(axis=2)
    votes = probs[:, :, t - window :, : t - window].sum(axis=2)
    padded = np.pad(votes, ((0, 0), (0, 0), (kernel // 2, kernel // 2)))
    return np.stack([padded[..., i : i + t - window] for i in range(kernel)]).mean(0)


def test_pyramidkv_layer_budgets_selection_and_bytes(tiny_model):
    m = tiny_model
    # The authors' schedule on Llama-3.1-8B's 32 layers, budget 128 with window 8 (S = 120):
    # top = 120 // 20 = 6, bottom = 240 - 6 = 234, step = 228 // 31 = 7.
    budgets = PyramidKV(budget_tokens=128, window=8).layer_budgets(32)
    assert budgets[0] == 242 and budgets[-1] == 25 and all(a - b == 7 for a, b in zip(budgets, budgets[1:]))
    policy = PyramidKV(budget_tokens=72, window=16, kernel=5, pooling="avg", beta=4)  # S = 56: 98 + 16, 14 + 16
    assert policy.layer_budgets(2) == (114, 30)
    tokens, qkv = _layers(m, 2, 2, 256)
    state = kvjax.prefill(m, tokens, policy, chunk_size=64)
    for layer, (q, k, _) in enumerate(qkv):
        pooled = _snapkv_votes(q, k, m.config.group_size, 16, 5)
        keep = policy.layer_budgets(2)[layer] - 16
        assert kept(state, layer) == [[top(p, keep) | set(range(240, 256)) for p in seq] for seq in pooled]
    c = m.config
    held = [int(jnp.sum(count(layer[0]))) for layer in state.layers]
    assert held == [2 * c.num_kv_heads * b for b in (114, 30)]  # exactly the layer budgets
    # Buffers are the budgets rounded up to the decode kernel's 16-slot tiles (114 -> 128, 30 -> 32):
    # k, v float32 + pos int32 + score float32 per slot, plus length int32[B].
    per_slot = 2 * c.head_dim * 4 + 4 + 4
    slots = sum(2 * c.num_kv_heads * round_capacity(b) for b in (114, 30))
    assert kvjax.kv_bytes(state) == slots * per_slot + 2 * 4


def _authors_pyramid_budget(budget: int, window: int, beta: int, layers: int, layer: int, n: int) -> int:
    """Zefan-Cai/KVCache-Factory `PyramidKVCluster.update_kv`, written out: tokens a layer keeps of an
    n-token prompt (window included)."""
    min_num = (budget - window) // beta
    max_num = (budget - window) * 2 - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = (budget - window) * 2 - max_num
    steps = (max_num - min_num) // (layers - 1)
    if n < budget:
        return n
    if n < (budget - window) * 2:
        return budget
    return max_num - layer * steps + window


@pytest.mark.parametrize("lengths", [(120, 100), (112, 64)])
def test_pyramidkv_follows_the_authors_rule_for_each_prompt_length(tiny_model, lengths):
    """Prompts shorter than the budget keep everything, shorter than 2 x (budget - window) keep SnapKV's
    budget in every layer, and near 2 x (budget - window) the bottom layer shrinks to the prompt: each row
    of a ragged batch by its own length (budget 72, window 16, beta 4: S = 56)."""
    m = tiny_model
    policy = PyramidKV(budget_tokens=72, window=16, kernel=5, pooling="avg", beta=4)
    tokens = random_tokens(11, (2, max(lengths)), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, policy, chunk_size=64, lengths=list(lengths))
    for row, n in enumerate(lengths):
        qkv = layer_queries_keys(m, tokens[row : row + 1, :n])
        for layer, (q, k, _) in enumerate(qkv):
            keep = _authors_pyramid_budget(72, 16, 4, 2, layer, n)
            if keep >= n:
                expected = set(range(n))
            else:
                pooled = _snapkv_votes(q, k, m.config.group_size, 16, 5)[0]  # [K, n - 16]
                expected = [top(p, keep - 16) | set(range(n - 16, n)) for p in pooled]
            got = kept(state, layer)[row]
            assert got == (expected if isinstance(expected, list) else [expected] * len(got)), (n, layer)


def test_pyramidkv_ragged_rows_keep_at_most_the_longest_rows_buffer(tiny_model):
    """The one deliberate deviation: a layer's buffer is sized for the batch's longest prompt, so a much
    shorter row whose rule asks more (SnapKV's 72 in every layer at 100 tokens) keeps at most that buffer
    (the 200-token row's top-layer 30) in that layer."""
    m = tiny_model
    policy = PyramidKV(budget_tokens=72, window=16, kernel=5, pooling="avg", beta=4)
    tokens = random_tokens(12, (2, 200), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, policy, chunk_size=64, lengths=[200, 100])
    held = [np.asarray(count(layer[0])) for layer in state.layers]  # [B, K] per layer
    assert held[0].tolist() == [[114, 114], [72, 72]] and held[1].tolist() == [[30, 30], [30, 30]]


def test_pyramidkv_defaults_are_the_authors_longbench_run():
    """KVCache-Factory's run_longbench.py: window 8, kernel 7, max pooling; beta 20."""
    policy = PyramidKV()
    assert (policy.window, policy.kernel, policy.pooling, policy.beta) == (8, 7, "max", 20)


def _authors_adakv(pooled: np.ndarray, selected: int, alpha: float) -> list[set[int]]:
    """FFY0/AdaKV `AdaptiveSnapKVCluster.update_kv_gqa`, written out for one sequence: pooled [K, T - W]
    scores; the top selected x K of all heads give each head its count c_h, and head h keeps its top
    round((1 - alpha) c_h + int(alpha selected)) (float32, round half to even, as torch)."""
    kh, n = pooled.shape
    order = np.argsort(-pooled.reshape(-1), kind="stable")[: selected * kh]
    c = np.bincount(order // n, minlength=kh)
    caps = np.round(c.astype(np.float32) * np.float32(1 - alpha) + int(selected * alpha)).astype(int)
    return [top(p, cap) for p, cap in zip(pooled, caps)]


def _kvpress_adakv(pooled: np.ndarray, budget: int, window: int, alpha: float) -> list[set[int]]:
    """kvpress `AdaKVPress` over SnapKV's scores (the window scored highest), for one sequence: each head's
    top max(1, int(alpha budget)) forced, then the top budget x K of all heads."""
    kh, n = pooled.shape
    scores = np.concatenate([pooled, np.full((kh, window), pooled.max() + 1)], axis=1)  # [K, T]
    safe = max(1, int(budget * alpha))
    for h in range(kh):
        scores[h, np.argsort(-scores[h], kind="stable")[:safe]] = np.finfo(np.float64).max
    keep = np.argsort(-scores.reshape(-1), kind="stable")[: budget * kh]
    return [{int(i) % (n + window) for i in keep if i // (n + window) == h} for h in range(kh)]


@pytest.mark.parametrize("safeguard", ["authors", "kvpress"])
def test_adakv_splits_the_layer_budget_by_its_safeguard(tiny_model, safeguard):
    m, budget, window, alpha = tiny_model, 40, 8, 0.2
    tokens, qkv = _layers(m, 2, 2, 256)
    policy = AdaKV(SnapKV(budget_tokens=budget, window=window, kernel=5, pooling="avg"), alpha, safeguard)
    state = kvjax.prefill(m, tokens, policy, chunk_size=64)
    kh, recent = m.config.num_kv_heads, set(range(256 - window, 256))
    for layer, (q, k, _) in enumerate(qkv):
        pooled = _snapkv_votes(q, k, m.config.group_size, window, 5)  # [B, K, T - W]
        if safeguard == "authors":
            expected = [[h | recent for h in _authors_adakv(seq, budget - window, alpha)] for seq in pooled]
        else:
            expected = [_kvpress_adakv(seq, budget, window, alpha) for seq in pooled]
        got = kept(state, layer)
        assert got == expected
        assert len({len(h) for seq in got for h in seq}) > 1  # budgets really differ between heads
        if safeguard == "kvpress":
            assert all(sum(map(len, seq)) == budget * kh for seq in got)
        else:  # S x K selected, give or take the rounding of each head's share
            assert all(abs(sum(map(len, seq)) - budget * kh) <= kh // 2 for seq in got)
    c = m.config  # one pool per layer: k, v float32 + pos, head int32 per slot, plus length int32[B]
    slots = 2 * (budget * kh + (kh // 2 if safeguard == "authors" else 0))
    assert kvjax.kv_bytes(state) == c.num_layers * slots * (2 * c.head_dim * 4 + 8) + 2 * 4


# ------------------------------------------------------------------------------------------------
# Chunked prefill: eviction at chunk ends changes later layers' inputs, so layer 0 (whose q/k do
# not depend on the cache) is checked against a numpy replay of the stated chunk semantics, with a
# ragged batch so the last chunk of the short row is partly padding.
# ------------------------------------------------------------------------------------------------


def _replay_layer0(m, tokens, lengths, chunk, budget, update, priority):
    """Per sequence, per head, the positions layer 0 holds after chunked prefill with eviction.

    update(score[K, T], probs[K, G, T] of one query, is_last_real_query) -> score, called per real
    query in order; priority(score[K, T], held[K, T], v_l1[K, T]) -> [K, T].
    """
    q, k, v = layer_queries_keys(m, tokens)[0]
    b, t, h, d = q.shape
    kh, g = k.shape[2], h // k.shape[2]
    q = q.reshape(b, t, kh, g, d).astype(np.float64)
    out = []
    for row in range(b):
        held = np.zeros((kh, t), bool)
        score = np.zeros((kh, t))
        logits = np.einsum("tkgd,skd->kgts", q[row], k[row].astype(np.float64)) / np.sqrt(d)
        v_l1 = np.abs(v[row].astype(np.float64)).sum(-1).T  # [K, T]
        for start in range(0, t, chunk):
            real = range(start, min(start + chunk, lengths[row]))
            for i, qt in enumerate(real):
                visible = held.copy()
                visible[:, start : qt + 1] = True
                x = np.where(visible[:, None], logits[:, :, qt], -np.inf)
                p = np.exp(x - x.max(-1, keepdims=True))
                score = update(score, p / p.sum(-1, keepdims=True), i == len(real) - 1)
            held[:, list(real)] = True
            prio = np.where(held, priority(score, held, v_l1), -np.inf)
            for hh in range(kh):
                keep = np.argsort(-prio[hh], kind="stable")[: min(budget, held[hh].sum())]
                held[hh] = False
                held[hh, keep] = True
        out.append([set(np.flatnonzero(hh).tolist()) for hh in held])
    return out


def _window_priority(window):
    def priority(score, held, v_l1):
        newest = np.max(np.where(held, np.arange(held.shape[1]), -1), axis=-1, keepdims=True)
        return np.where(np.arange(held.shape[1]) > newest - window, np.inf, score)

    return priority


def test_a2sf_chunked_replays_the_per_query_recurrence(tiny_model):
    m, lam, lengths = tiny_model, 0.8, [192, 150]
    tokens = random_tokens(6, (2, 192), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, A2SF(heavy=24, window=16, forgetting=lam), chunk_size=64, lengths=lengths)
    expected = _replay_layer0(m, tokens, lengths, 64, 40, lambda s, p, last: lam * s + p.mean(1), _window_priority(16))
    assert kept(state, 0) == expected


def test_tova_chunked_scores_by_each_chunks_last_real_query(tiny_model):
    m, lengths = tiny_model, [192, 150]
    tokens = random_tokens(6, (2, 192), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, TOVA(budget_tokens=40), chunk_size=64, lengths=lengths)

    def update(score, p, last):
        return np.broadcast_to(p.mean((0, 1)), score.shape) if last else score

    assert kept(state, 0) == _replay_layer0(m, tokens, lengths, 64, 40, update, lambda s, h, v: s)


def test_a2sf_with_lambda_one_is_h2o(tiny_model):
    m = tiny_model
    tokens = random_tokens(7, (2, 192), m.config.vocab_size)
    got = kvjax.prefill(m, tokens, A2SF(heavy=24, window=16, forgetting=1.0), chunk_size=64, lengths=[192, 131])
    ref = kvjax.prefill(m, tokens, H2O(heavy=24, window=16), chunk_size=64, lengths=[192, 131])
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


# ------------------------------------------------------------------------------------------------
# Decoding (budget-holding and budget-covers-context tests for every policy: tests/test_policies.py).
# ------------------------------------------------------------------------------------------------


def test_adakv_over_pyramidkv_appends_one_entry_per_head(tiny_model):
    m = tiny_model
    tokens = random_tokens(8, (2, 128), m.config.vocab_size)
    policy = AdaKV(PyramidKV(budget_tokens=40, window=8, kernel=5, pooling="avg", beta=4))
    state = kvjax.prefill(m, tokens, policy, max_new_tokens=5, chunk_size=64)
    assert policy.base.layer_budgets(2) == (64, 16)  # S = 32: bottom 56 + 8, top 8 + 8
    # Sized by the layer total (budget x Hkv, + Hkv // 2 for the rounding) plus one slot per head per decode token.
    assert [layer[0].capacity for layer in state.layers] == [64 * 2 + 1 + 2 * 5, 16 * 2 + 1 + 2 * 5]
    before = [np.asarray(layer[0].counts()) for layer in state.layers]
    for n, budget in zip(before, (64, 16)):  # budget x Hkv per sequence, give or take the safeguard's rounding
        assert np.all(np.abs(n.sum(-1) - budget * 2) <= 2)
    _, state = kvjax.decode_step(m, state, tokens[:, 0], policy)
    for layer, n in zip(state.layers, before):
        np.testing.assert_array_equal(np.asarray(layer[0].counts()), n + 1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="forgetting"):
        A2SF(forgetting=0.0)
    with pytest.raises(ValueError, match="forgetting"):
        A2SF(forgetting=1.5)
    with pytest.raises(ValueError, match="budget_tokens"):
        TOVA(budget_tokens=0)
    with pytest.raises(ValueError, match="budget_tokens"):
        Knorm(budget_tokens=-1)
    with pytest.raises(ValueError, match="window >= 1"):
        VATP(window=0)
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(beta=0)
    with pytest.raises(ValueError, match="window < budget"):
        PyramidKV(budget_tokens=64, window=64)
    with pytest.raises(ValueError, match="alpha"):
        AdaKV(alpha=1.5)
    with pytest.raises(ValueError, match="evicts as it goes"):
        AdaKV(H2O())
    with pytest.raises(ValueError, match="TokenEviction"):
        AdaKV(base="snapkv")
