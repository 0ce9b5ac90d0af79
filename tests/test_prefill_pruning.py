"""PyramidInfer and LazyLLM: tokens pruned between layers while prefilling, each against a numpy
transcription of its paper's rule run on an independent layer-by-layer forward (the NNX blocks on the
kept tokens, attention recomputed in float64)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import ModelConfig, init_model
from kvjax.layer_step import LayerContext
from kvjax.models.llama import layer_runs
from kvjax.policies import Full, LazyLLM, PyramidInfer
from kvjax.rope import apply_rope, rope_tables
from tests.support.policy_reference import causal_probs
from tests.support.random_data import random_tokens

LAYERS = 4
# Pruning in a 4-layer model on prompts of a few hundred tokens: a steeper decay, a lower floor.
PYRAMID = PyramidInfer(decay_ratio=0.5, min_context=8)
LAZY = LazyLLM(depths=(0.2, 0.5, 0.8), percentiles=(0.3, 0.4, 0.5))


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(
        family="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=LAYERS,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    return init_model(config, seed=0, dtype=jnp.float32)


def np_pruned_forward(m, tokens: np.ndarray, rule) -> list[np.ndarray]:
    """Per layer, the positions it computes for one prompt int[T]: the NNX blocks run one at a time on
    the kept tokens (at their own positions); after each layer, `rule(layer, probs, positions)` (probs
    float64[K, G, T_l, T_l] of that layer) returns the indices of the tokens the next layer keeps."""
    model, cfg = m.module(), m.config
    positions = np.arange(len(tokens))
    x = model.embed[...][jnp.asarray(tokens)][None]
    kept = []
    for layer, block in enumerate(model.blocks):
        kept.append(positions)
        pos = jnp.asarray(positions)[None]
        rope = rope_tables(cfg.rope, cfg.head_dim, pos, jnp.int32(len(tokens)))
        q, k, _ = block.attn.project(block.input_norm(x))
        probs = causal_probs(np.asarray(apply_rope(q, *rope)), np.asarray(apply_rope(k, *rope)), cfg.group_size)[0]
        ctx = LayerContext(layer, None, cfg.head_dim**-0.5)
        x, _, _ = block(x, pos, jnp.ones(pos.shape, bool), rope, ctx, None, None, None)
        keep = rule(layer, probs, positions)
        x, positions = x[:, keep], positions[keep]
    return kept


def np_pyramidinfer(p: PyramidInfer, n: int):
    """The authors' prefill rule (modeling_llama_pyramidinfer.py, LlamaModel.forward), for a prompt of n."""
    recent = int(n * p.recent_ratio)
    min_context = min(p.min_context, n - 1 - recent)

    def rule(layer, probs, positions):
        ratio = (1.0 - p.decay_ratio) * (math.cos(math.pi * layer / LAYERS) + 1) / 2 + p.decay_ratio
        attn = probs.mean(axis=(0, 1))  # [T_l, T_l] over the query heads
        scores = attn[-(1 + recent) :, : -(1 + recent)] * np.linspace(1.0, p.distance_weight, 1 + recent)[:, None]
        scores = scores.mean(axis=0)
        scores[: p.sinks] = np.finfo(np.float64).max
        context = scores.shape[0]
        if context > min_context and ratio < 1.0:
            top = int(context * ratio) if int(context * ratio) > min_context else context
            chosen = np.sort(np.argsort(-scores, kind="stable")[:top])
            return np.concatenate([chosen, np.arange(context, len(positions))])
        return np.arange(len(positions))

    return rule


def np_lazyllm(p: LazyLLM):
    """The paper's rule: before a pruning layer, drop the floor(k T) tokens (of the T computed) whose
    attention from the last token, averaged over the heads, is lowest; never the last token."""
    at = {max(1, int(d * LAYERS)) - 1: k for d, k in zip(p.depths, p.percentiles)}  # scored by the layer before

    def rule(layer, probs, positions):
        t = len(positions)
        if layer not in at:
            return np.arange(t)
        scores = probs[:, :, -1, :].mean(axis=(0, 1))
        scores[-1] = np.inf
        dropped = np.argsort(scores, kind="stable")[: int(np.floor(t * at[layer]))]
        return np.setdiff1d(np.arange(t), dropped)

    return rule


def held_positions(state, row: int = 0) -> list[np.ndarray]:
    """Per layer, the sorted positions its cache holds for `row` (head 0; heads share them)."""
    return [np.sort(np.asarray(layer[0].pos[row, 0])[np.asarray(layer[0].pos[row, 0]) >= 0]) for layer in state.layers]


@pytest.mark.parametrize(
    "policy, rule",
    [(PYRAMID, lambda n: np_pyramidinfer(PYRAMID, n)), (LAZY, lambda n: np_lazyllm(LAZY))],
    ids=["pyramidinfer", "lazyllm"],
)
def test_pruned_sets_per_layer_match_numpy(model, policy, rule):
    n = 200
    tokens = random_tokens(1, (n,), 256)
    want = np_pruned_forward(model, tokens, rule(n))
    got = held_positions(kvjax.prefill(model, tokens[None], policy))
    assert [len(w) for w in want] == [len(g) for g in got] == list(policy.layer_tokens(LAYERS, [n])[:, 0])
    assert len(want[-1]) < n  # something was pruned
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w)


def test_ragged_rows_equal_their_own_runs(model):
    """Each row keeps its own length's counts and tokens (PyramidInfer: its window too, a share of its
    length); its next-token logits equal its own run's."""
    policy = PYRAMID
    lengths = [300, 203]
    tokens = random_tokens(2, (2, 300), 256)
    state = kvjax.prefill(model, tokens, policy, lengths=lengths, max_new_tokens=4)
    held = [held_positions(state, row) for row in range(2)]
    batch_logits, _ = kvjax.decode_step(model, state, np.array([7, 7]), policy)  # donates the state
    for row, n in enumerate(lengths):
        alone = kvjax.prefill(model, tokens[row : row + 1, :n], policy, max_new_tokens=4)
        for g, w in zip(held[row], held_positions(alone)):
            np.testing.assert_array_equal(g, w)
        logits, _ = kvjax.decode_step(model, alone, np.array([7]), policy)
        np.testing.assert_allclose(batch_logits[row], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "policy, n, new",
    [
        (PyramidInfer(decay_ratio=1.0, gen_decay_ratio=1.0, gen_compress_ratio=1.0), 40, 50),
        (LazyLLM(percentiles=(0.0, 0.0, 0.0)), 200, 6),
    ],
    ids=["pyramidinfer", "lazyllm"],
)
def test_keeping_everything_equals_full(model, policy, n, new):
    """PyramidInfer's decode passes two generation-stage compressions (at positions 68 and 88), each keeping
    all 16 entries of its block."""
    tokens = random_tokens(3, (1, n), 256)
    steps = random_tokens(4, (new,), 256)
    states = [kvjax.prefill(model, tokens, p, max_new_tokens=len(steps)) for p in (Full(), policy)]
    for token in steps:
        (want, states[0]), (got, states[1]) = (
            kvjax.decode_step(model, s, token[None], p) for s, p in zip(states, (Full(), policy))
        )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "policy", [dataclasses.replace(PYRAMID, gen_interval=0), LAZY], ids=["pyramidinfer-appending", "lazyllm"]
)
def test_budgets_hold_through_a_long_decode_and_pruned_tokens_stay_gone(model, policy):
    """Decoding appends to each layer's kept prompt tokens (no revival; PyramidInfer without its generation
    stage), in buffers that never grow; a step past the reserved room is refused."""
    n, new = 250, 24
    tokens = random_tokens(5, (1, n), 256)
    state = kvjax.prefill(model, tokens, policy, max_new_tokens=new)
    kept, shapes = held_positions(state), [layer[0].k.shape for layer in state.layers]
    assert state.shared is None
    assert [s[2] for s in shapes] == sorted((s[2] for s in shapes), reverse=True) and shapes[-1][2] < shapes[0][2]
    token = np.array([1])
    for _ in range(new):
        logits, state = kvjax.decode_step(model, state, token, policy)
        token = np.asarray(jnp.argmax(logits, -1))
    for before, after, layer, shape in zip(kept, held_positions(state), state.layers, shapes):
        np.testing.assert_array_equal(after, np.concatenate([before, np.arange(n, n + new)]))
        assert layer[0].k.shape == shape
    with pytest.raises(ValueError, match="room for 0 more decode step"):
        kvjax.decode_step(model, state, token, policy)


def np_generation_stage(m, tokens: np.ndarray, n: int, p: PyramidInfer, kept: list[np.ndarray]):
    """The authors' generation stage (their first implementation's bookkeeping by cache lengths; the recent
    window from the true length) on a float64 forward that decodes tokens[n:] one at a time; kept[l]: the
    positions layer l's prefill cached. Returns, per layer, the positions its cache holds at the end, and the
    last token's logits."""
    model, cfg = m.module(), m.config
    t, e = len(tokens), p.gen_interval
    k_heads, group, dim = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    rope = rope_tables(cfg.rope, cfg.head_dim, jnp.arange(t)[None], jnp.int32(t))
    x = np.asarray(model.embed[...][jnp.asarray(tokens)], np.float64)  # [T, E]
    caches = []
    for layer, block in enumerate(model.blocks):
        q, k, v = block.attn.project(block.input_norm(jnp.asarray(x, jnp.float32)[None]))
        q = np.asarray(apply_rope(q, *rope), np.float64)[0].reshape(t, k_heads, group, dim)
        k, v = np.asarray(apply_rope(k, *rope), np.float64)[0], np.asarray(v, np.float64)[0]
        heads, rows = np.zeros((t, k_heads, group, dim)), {}

        def attend(i, cache):  # query i over the cached positions; its head-mean row over all positions
            logits = np.einsum("kgd,ckd->kgc", q[i], k[cache]) / np.sqrt(dim)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            heads[i] = np.einsum("kgc,ckd->kgd", w, v[cache])
            rows[i] = np.zeros(t)
            rows[i][cache] = w.mean(axis=(0, 1))

        for i in kept[layer]:  # the prefill, over the tokens that entered this layer
            attend(i, [j for j in kept[layer] if j <= i])
        ratio = (1.0 - p.gen_decay_ratio) * (math.cos(math.pi * layer / LAYERS) + 1) / 2 + p.gen_decay_ratio
        keep = max(int(e * p.gen_compress_ratio * ratio), 1)
        cache = list(kept[layer])
        recent_rows = [rows[i] for i in kept[layer][-(1 + int(n * p.recent_ratio)) :]]
        past = len(cache)
        for i in range(n, t):
            cache.append(i)
            attend(i, cache)
            recent_rows.append(rows[i])
            recent = int((i + 1) * p.recent_ratio)
            if len(cache) - recent - past >= e:
                chunk = cache[-(1 + recent + e) : -(1 + recent)]
                w = np.linspace(1.0, p.distance_weight, 1 + recent)[:, None]
                score = (np.stack(recent_rows[-(1 + recent) :])[:, chunk] * w).mean(axis=0)
                top = np.sort(np.argsort(-score, kind="stable")[:keep])
                cache = cache[: -(1 + recent + e)] + [chunk[j] for j in top] + cache[-(1 + recent) :]
                past = len(cache) - recent
            recent_rows = recent_rows[-(1 + recent) :]
        caches.append(np.asarray(cache))
        out = np.einsum("thd,hde->te", heads.reshape(t, -1, dim), np.asarray(block.attn.o_proj[...], np.float64))
        x = x + out
        x = x + np.asarray(block.mlp(block.post_attention_norm(jnp.asarray(x, jnp.float32)[None]))[0], np.float64)
    hidden = model.final_norm(jnp.asarray(x[-1:], jnp.float32))
    return caches, np.asarray(model.logits(hidden)[0], np.float64)


def test_generation_stage_keeps_what_the_authors_rule_keeps(model):
    """A 40-token prompt decoding 80 tokens: blocks [39, 55), [55, 71), [71, 87) come due at positions 68,
    88 and 108; per layer, the cache ends as the numpy transcription's, and so do the logits."""
    n, t = 40, 120
    tokens = random_tokens(8, (t,), 256)
    kept = np_pruned_forward(model, tokens[:n], np_pyramidinfer(PYRAMID, n))
    want, want_logits = np_generation_stage(model, tokens, n, PYRAMID, kept)
    assert PYRAMID.generation_due([n], t - n).tolist() == [[68, 88, 108, -1, -1]]
    state = kvjax.prefill(model, tokens[None, :n], PYRAMID, max_new_tokens=t - n)
    for token in tokens[n:]:
        logits, state = kvjax.decode_step(model, state, token[None], PYRAMID)
    got = held_positions(state)
    keeps = PYRAMID.block_keeps(LAYERS)
    assert keeps == (14, 12, 7, 3)
    for layer, (w, g) in enumerate(zip(want, got)):
        assert len(g) == len(kept[layer]) + (t - n) - 3 * (16 - keeps[layer])
        np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(logits[0], want_logits, atol=1e-4, rtol=1e-4)


def test_generation_stage_bounds_the_cache_through_a_long_decode(model):
    """100 generated tokens after ragged prompts of 60 and 45: buffers sized at prefill hold every step (their
    shapes never change; the longest-lived rows fill a buffer to within a slot multiple), each layer holds its
    prefill count plus the steps minus what the due blocks dropped, and the bounded buffers take fewer bytes
    than appending would."""
    lengths, new = [60, 45], 100
    tokens = random_tokens(9, (2, 60), 256)
    state = kvjax.prefill(model, tokens, PYRAMID, lengths=lengths, max_new_tokens=new)
    shapes = [layer[0].k.shape for layer in state.layers]
    appending = kvjax.prefill(
        model, tokens, dataclasses.replace(PYRAMID, gen_interval=0), lengths=lengths, max_new_tokens=new
    )
    assert kvjax.kv_bytes(state) < kvjax.kv_bytes(appending)
    assert shapes[-1][2] < [layer[0].k.shape for layer in appending.layers][-1][2]
    prefilled = [[len(h) for h in held_positions(state, row)] for row in range(2)]
    due = PYRAMID.generation_due(lengths, new)
    token = np.array([1, 1])
    for _ in range(new):
        logits, state = kvjax.decode_step(model, state, token, PYRAMID)
        token = np.asarray(jnp.argmax(logits, -1))
    assert [layer[0].k.shape for layer in state.layers] == shapes
    for row in range(2):
        blocks = int(np.sum(due[row] >= 0))
        assert blocks >= 4
        for layer, (held, keep) in enumerate(zip(held_positions(state, row), PYRAMID.block_keeps(LAYERS))):
            assert len(held) == prefilled[row][layer] + new - blocks * (16 - keep)
            assert held[-1] == lengths[row] + new - 1  # the newest token is held
    with pytest.raises(ValueError, match="room for 0 more decode step"):
        kvjax.decode_step(model, state, token, PYRAMID)


def test_kv_bytes_shrink_and_layer_runs_split_where_tokens_drop(model):
    tokens = random_tokens(6, (1, 300), 256)
    full = kvjax.kv_bytes(kvjax.prefill(model, tokens))
    for policy in (PYRAMID, LAZY):
        assert kvjax.kv_bytes(kvjax.prefill(model, tokens, policy)) < full
    # One scanned run per stretch of layers computing the same tokens (LAZY prunes before layers 1, 2, 3).
    counts = tuple(int(c) for c in LAZY.layer_tokens(LAYERS, [320])[:, 0])
    assert layer_runs(model.config, None, counts) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert layer_runs(model.config, None, (320, 200, 200, 100)) == ((0, 1), (1, 3), (3, 4))
    assert layer_runs(model.config, None) == ((0, LAYERS),)


def test_bad_configs_raise_one_line_errors(model):
    bad = [
        lambda: PyramidInfer(recent_ratio=1.0),
        lambda: PyramidInfer(decay_ratio=0.0),
        lambda: PyramidInfer(min_context=-1),
        lambda: PyramidInfer(gen_decay_ratio=0.0),
        lambda: PyramidInfer(gen_compress_ratio=1.5),
        lambda: PyramidInfer(gen_interval=-1),
        lambda: LazyLLM(depths=(0.5,), percentiles=(0.2, 0.3)),
        lambda: LazyLLM(depths=(0.5, 0.25), percentiles=(0.2, 0.3)),
        lambda: LazyLLM(depths=(1.0,), percentiles=(0.2,)),
        lambda: LazyLLM(depths=(0.5,), percentiles=(1.0,)),
        lambda: LazyLLM(depths=(0.5, 0.55), percentiles=(0.2, 0.2)).layer_tokens(LAYERS, [10]),
        lambda: kvjax.prefill(model, random_tokens(7, (1, 200), 256), PYRAMID, chunk_size=64),
    ]
    for make in bad:
        with pytest.raises(ValueError) as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="chunked prefill"):
        kvjax.prefill(model, random_tokens(7, (1, 200), 256), LAZY, chunk_size=64)
