"""PyramidInfer and LazyLLM: tokens pruned between layers while prefilling, each against a numpy
transcription of its paper's rule run on an independent layer-by-layer forward (the NNX blocks on the
kept tokens, attention recomputed in float64)."""

from __future__ import annotations

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
    "policy", [PyramidInfer(decay_ratio=1.0), LazyLLM(percentiles=(0.0, 0.0, 0.0))], ids=["pyramidinfer", "lazyllm"]
)
def test_keeping_everything_equals_full(model, policy):
    tokens = random_tokens(3, (1, 200), 256)
    steps = random_tokens(4, (6,), 256)
    states = [kvjax.prefill(model, tokens, p, max_new_tokens=len(steps)) for p in (Full(), policy)]
    for token in steps:
        (want, states[0]), (got, states[1]) = (
            kvjax.decode_step(model, s, token[None], p) for s, p in zip(states, (Full(), policy))
        )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [PYRAMID, LAZY], ids=["pyramidinfer", "lazyllm"])
def test_budgets_hold_through_a_long_decode_and_pruned_tokens_stay_gone(model, policy):
    """Decoding appends to each layer's kept prompt tokens (no revival, no generation-stage compression),
    in buffers that never grow; a step past the reserved room is refused."""
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
