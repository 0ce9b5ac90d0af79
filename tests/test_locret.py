"""Locret: retaining heads read pre-RoPE q, k, v; the chunk/stabilizer/local eviction rule against a numpy
simulation; labels against brute force; memory; training, the heads file, errors, and exact resume after a
SIGKILL of `kvjax train-gates --method locret`."""

from __future__ import annotations

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import ModelConfig
from kvjax.checkpoint import CheckpointError
from kvjax.kv_state import count, round_capacity
from kvjax.policies import Full, Locret
from kvjax.policies.locret import (
    HEADS_DIR,
    HEADS_JSON,
    load_retaining_heads,
    random_retaining_heads,
    retaining_head_scores,
    retaining_scores,
    save_retaining_heads,
)
from kvjax.policies.locret.training import LocretHeadConfig, features_and_targets, train_locret_heads
from kvjax.train.task_rows import make_batch
from tests.support.interrupted_run import straight_and_resumed
from tests.support.policy_reference import causal_probs, layer_queries_keys
from tests.support.random_data import random_tokens

HIDDEN = 32
SMALL = dict(
    hidden=HIDDEN,
    tasks=("niah_single", "passkey"),
    min_len=400,
    max_len=600,
    pad_multiple=640,
    chunk=128,
    warmup=2,
    lr=3e-3,
)
CLI_ARGS = [
    "--hidden",
    str(HIDDEN),
    "--tasks",
    "niah_single,passkey",
    "--min-len",
    "400",
    "--max-len",
    "600",
    "--pad-multiple",
    "640",
    "--chunk",
    "128",
    "--warmup",
    "2",
    "--lr",
    "3e-3",
    "--dtype",
    "float32",
    "--no-progress",
]


@pytest.fixture(scope="module")
def heads(byte_model):
    """Fixed random retaining heads for the byte model."""
    model, _ = byte_model
    return random_retaining_heads(model.config, HIDDEN, seed=3)


def _locret(heads, **hyper) -> Locret:
    """Locret with the given heads as its parameters."""
    return Locret(**hyper, params=heads)


@pytest.fixture(scope="module")
def trained(byte_model, tmp_path_factory):
    """A short in-process training run: (output folder, trained heads, TrainResult)."""
    model, _ = byte_model
    out = tmp_path_factory.mktemp("locret-run")
    heads, result = train_locret_heads(model, out, LocretHeadConfig(steps=8, **SMALL), progress=False, plot=False)
    return out, heads, result


def _layer0_numpy(m, heads, tokens: np.ndarray, rope: bool) -> np.ndarray:
    """float64[B, T, K] layer-0 retaining-head scores from the weights in numpy; rope=True feeds post-RoPE q, k."""
    p = nnx.to_pure_dict(m.params)
    block = p["blocks"][0]
    x = np.asarray(p["embed"], np.float64)[tokens]  # [B, T, E]
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + m.config.rms_norm_eps)
    x = x * np.asarray(block["input_norm"]["weight"])
    q, k, v = (
        np.einsum("bte,ehd->bthd", x, np.asarray(block["attn"][n], np.float64)) for n in ("q_proj", "k_proj", "v_proj")
    )
    if rope:
        q, k, _ = layer_queries_keys(m, tokens)[0]
    b, t = tokens.shape
    f = np.concatenate([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], -1)
    h = f @ np.asarray(heads["fc1"][0], np.float64)
    h = h / (1 + np.exp(-h))  # silu
    return h @ np.asarray(heads["fc2"][0], np.float64)


def test_retaining_heads_read_pre_rope_projections(byte_model, heads):
    m, _ = byte_model
    policy = _locret(heads, budget_tokens=200, stabilizers=50, local_len=4)
    tokens = random_tokens(0, (2, 96), m.config.vocab_size)
    scores = np.asarray(retaining_scores(m, policy, tokens))  # [L, B, T, K]
    np.testing.assert_allclose(scores[0], _layer0_numpy(m, heads, tokens, rope=False), atol=1e-4, rtol=1e-4)
    # post-RoPE inputs would differ
    assert np.abs(scores[0] - _layer0_numpy(m, heads, tokens, rope=True)).max() > 1e-2
    # Pre-RoPE inputs: shifting every position leaves every layer's scores unchanged (attention is relative).
    np.testing.assert_allclose(
        np.asarray(retaining_scores(m, policy, tokens, offset=777)), scores, atol=1e-4, rtol=1e-4
    )
    # The policy's layer step scores the same way: a budget covering the prompt stores them all.
    state = kvjax.prefill(m, tokens, policy, chunk_size=32)
    for layer, (seg,) in enumerate(state.layers):
        pos = np.asarray(seg.pos)  # [B, K, C]
        assert (np.sort(pos, -1)[..., -96:] == np.arange(96)).all()
        want = np.take_along_axis(scores[layer].transpose(0, 2, 1), np.maximum(pos, 0), -1)  # [B, K, C]
        np.testing.assert_allclose(np.asarray(seg.score)[pos >= 0], want[pos >= 0], atol=1e-4, rtol=1e-4)


def test_labels_equal_brute_force(byte_model):
    m, _ = byte_model
    n, t, answer_len = 60, 64, 8
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :n] = random_tokens(1, (n,), m.config.vocab_size)
    valid = np.arange(t)[None] < n
    answer = (np.arange(t)[None] >= n - answer_len) & valid
    run = jax.jit(features_and_targets, static_argnums=(0, 5))
    features, targets = (np.asarray(a) for a in run(m.graphdef, m.params, tokens, valid, answer, 16))
    assert features.shape == (2, 1, t, (4 + 2 * 2) * 16) and targets.shape == (2, 1, t, 2)
    g = m.config.group_size
    for layer, (q, k, _) in enumerate(layer_queries_keys(m, tokens[:, :n])):
        probs = causal_probs(q, k, g)  # [B, K, G, T, T]
        want = probs[:, :, :, n - answer_len :, :].max(axis=(2, 3))  # [B, K, T]: max over group and answer queries
        np.testing.assert_allclose(targets[layer, :, :n], want.transpose(0, 2, 1), atol=1e-5)
        assert (targets[layer, :, n:] == 0).all()  # padding receives nothing
    module = m.module()
    block = module.blocks[0]
    q, k, v = block.attn.project(block.input_norm(module.embed[...][tokens]))  # layer 0, before RoPE
    want = np.concatenate([np.asarray(a).reshape(1, t, -1) for a in (q, k, v)], -1)
    np.testing.assert_allclose(features[0], want, atol=1e-5)


def _reference_keep(scores: np.ndarray, n: int, chunk: int, budget: int, stabilizers: int, local: int) -> set[int]:
    """Positions one (sequence, KV head) keeps after Locret's chunked prefill, simulated in numpy.

    scores: float[T] per position. Chunks follow kvjax's grid; after each chunk the local prompt tokens stay,
    and of the others the top `budget`, the most recent `stabilizers` counting as maximal until the chunk
    that completes the prefix before the local tokens."""
    held: list[int] = []
    for start in range(0, n, chunk):
        held += list(range(start, min(start + chunk, n)))
        newest = max(held)
        prefix_done = start + chunk - 1 >= n - local - 1
        local_set = [p for p in held if p >= n - local]
        others = [p for p in held if p < n - local]
        rank = lambda p: np.inf if (not prefix_done and p > newest - stabilizers) else scores[p]  # noqa: E731
        others = sorted(others, key=lambda p: -rank(p))[:budget]
        held = sorted(others + local_set)
    return set(held)


def test_prefill_keeps_exactly_the_top_budget_of_each_chunk_rule(byte_model, heads):
    """Ragged rows; 196's local tokens straddle a chunk boundary. Layer 0's scores depend on the tokens
    alone, so the numpy simulation is exact there; every layer keeps its local tokens within budget."""
    m, _ = byte_model
    policy = _locret(heads, budget_tokens=40, stabilizers=16, local_len=8)
    lengths = [256, 196]
    tokens = random_tokens(2, (2, 256), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, policy, lengths=lengths, chunk_size=64)
    scores = np.asarray(retaining_scores(m, policy, tokens))[0]  # [B, T, K]
    pos = np.asarray(state.layers[0][0].pos)
    for b, n in enumerate(lengths):
        for h in range(m.config.num_kv_heads):
            got = set(pos[b, h][pos[b, h] >= 0].tolist())
            assert got == _reference_keep(scores[b, :, h], n, 64, 40, 16, 8), (b, h)
            assert set(range(n - 8, n)) <= got and len(got) == 48
    for (seg,) in state.layers:
        held = np.asarray(seg.pos)
        assert (np.asarray(count(seg)) == 48).all()
        for b, n in enumerate(lengths):
            assert all(set(range(n - 8, n)) <= set(row.tolist()) for row in held[b])
            assert (held[b] < n).all()


def test_decode_evicts_the_lowest_score_outside_the_local_window(byte_model, heads):
    """`decode_evicts=True` (kvjax's option; the authors' decoding appends): one eviction per token."""
    m, _ = byte_model
    policy = _locret(heads, budget_tokens=20, stabilizers=8, local_len=4, decode_evicts=True)
    tokens = random_tokens(3, (2, 64), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, policy, chunk_size=32, max_new_tokens=6)
    shapes = jax.tree.map(jnp.shape, state)
    assert state.layers[0][0].capacity == round_capacity(24 + 1)
    vocab = np.arange(m.config.vocab_size)[None]
    token_scores = np.asarray(retaining_scores(m, policy, vocab))[0, 0]  # [V, K]: layer 0
    new_tokens = random_tokens(4, (6, 2), m.config.vocab_size)
    for step, new in enumerate(new_tokens):
        seg = state.layers[0][0]
        before_pos, before_score = np.asarray(seg.pos), np.asarray(seg.score)
        _, state = kvjax.decode_step(m, state, jnp.asarray(new), policy)
        assert jax.tree.map(jnp.shape, state) == shapes
        p = 64 + step  # the new token's position
        after = np.asarray(state.layers[0][0].pos)
        for b in range(2):
            for h in range(m.config.num_kv_heads):
                held = {q: s for q, s in zip(before_pos[b, h], before_score[b, h]) if q >= 0}
                held[p] = token_scores[new[b], h]
                outside = {q: s for q, s in held.items() if q <= p - 4}
                held.pop(min(outside, key=outside.get))
                assert set(after[b, h][after[b, h] >= 0].tolist()) == set(held), (step, b, h)


def test_kv_bytes_shrink_with_the_budget(byte_model, heads):
    m, _ = byte_model
    tokens = random_tokens(5, (1, 512), m.config.vocab_size)
    full = kvjax.kv_bytes(kvjax.prefill(m, tokens, chunk_size=128))
    states = [
        kvjax.prefill(m, tokens, _locret(heads, budget_tokens=b, stabilizers=b // 4, local_len=16), chunk_size=128)
        for b in (224, 96, 32)
    ]
    sizes = [kvjax.kv_bytes(s) for s in states]
    assert full > sizes[0] > sizes[1] > sizes[2]
    # Decoding appends (the authors'), so the buffers are budget + local_len + the 0 reserved tokens.
    assert [s.layers[0][0].capacity for s in states] == [round_capacity(b + 16) for b in (224, 96, 32)]
    assert sizes[2] < full / 7  # 48 slots plus a float32 score each, instead of 512


def test_budget_covering_the_context_equals_full(byte_model, heads):
    m, _ = byte_model
    tokens = random_tokens(4, (2, 150), m.config.vocab_size)
    policy = _locret(heads, budget_tokens=500, stabilizers=100, local_len=10)
    ref = kvjax.prefill(m, tokens[:, :120], Full(), max_new_tokens=30, chunk_size=32)
    got = kvjax.prefill(m, tokens[:, :120], policy, max_new_tokens=30, chunk_size=32)
    for t in range(120, 150):
        ref_logits, ref = kvjax.decode_step(m, ref, tokens[:, t])
        got_logits, got = kvjax.decode_step(m, got, tokens[:, t], policy)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-5, rtol=0)


def test_training_lowers_the_loss_and_the_heads_round_trip(byte_model, trained):
    model, _ = byte_model
    out, heads, result = trained
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    assert (out / "loss_curve.json").is_file() and (out / "checkpoints" / "8").is_dir()
    info = json.loads((out / HEADS_JSON).read_text())
    assert info["hidden"] == HIDDEN and info["num_layers"] == 2 and info["step"] == 8
    policy = Locret.from_pretrained(out, model.config)
    policy.check_model(model.config)  # the saved heads fit the model they were trained for
    assert policy.activation == model.config.hidden_act == info["activation"]
    assert policy.params["fc1"].shape[-1] == HIDDEN and policy.params["fc1"].dtype == jnp.float32
    for name in ("fc1", "fc2"):
        np.testing.assert_array_equal(np.asarray(policy.params[name]), heads[name])
    # The policy's scores are what training optimised: the same head on the same pre-RoPE features.
    batch = make_batch(model.tokenizer, LocretHeadConfig(**SMALL), 0, 0, 0)
    features, _ = jax.jit(features_and_targets, static_argnums=(0, 5))(
        model.graphdef, model.params, batch["tokens"], batch["valid"], batch["answer"], 128
    )
    head = lambda f, a, b: retaining_head_scores(f, a, b, "silu")  # noqa: E731
    trained_pred = jax.vmap(head)(features, heads["fc1"], heads["fc2"])
    real = batch["valid"][0]  # the padding tail is masked in training, attended in this plain forward
    np.testing.assert_allclose(
        np.asarray(retaining_scores(model, policy, batch["tokens"]))[:, :, real],
        np.asarray(trained_pred)[:, :, real],
        atol=1e-5,
        rtol=1e-5,
    )


def test_clear_errors(byte_model, trained, tmp_path, capsys):
    model, model_dir = byte_model
    out, heads, _ = trained
    tokens = random_tokens(6, (1, 64), model.config.vocab_size)
    with pytest.raises(ValueError, match="from_pretrained"):
        kvjax.prefill(model, tokens, Locret())
    with pytest.raises(ValueError, match="from_pretrained"):
        kvjax.generate(model, tokens, 4, Locret())
    with pytest.raises(ValueError, match="from_pretrained"):
        retaining_scores(model, Locret(), tokens)
    with pytest.raises(CheckpointError, match="not a Locret retaining-heads folder"):
        Locret.from_pretrained(tmp_path / "nowhere", model.config)
    other = ModelConfig(
        family="llama",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
    )
    save_retaining_heads(tmp_path / "other", random_retaining_heads(other, HIDDEN), other)
    with pytest.raises(ValueError, match="do not fit"):
        Locret.from_pretrained(tmp_path / "other", model.config)
    misfit = Locret(params=random_retaining_heads(other, HIDDEN))  # heads of another model, built in Python
    with pytest.raises(ValueError, match="do not fit"):
        misfit.check_model(model.config)
    with pytest.raises(ValueError, match="do not fit"):
        kvjax.prefill(model, tokens, misfit)
    old = json.loads(model.config.to_json())  # a config saved when the model carried the heads
    assert ModelConfig.from_json(json.dumps({**old, "retaining_hidden": None})) == model.config
    with pytest.raises(ValueError, match="Locret.from_pretrained"):
        ModelConfig.from_json(json.dumps({**old, "retaining_hidden": HIDDEN}))
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    for f in (broken / HEADS_DIR).rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_retaining_heads(broken, model.config)
    for bad, match in (
        (dict(budget_tokens=0), "budget_tokens >= 1"),
        (dict(local_len=-1), "local_len >= 0"),
        (dict(budget_tokens=100, stabilizers=100), "stabilizers < budget_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            Locret(**bad)
    with pytest.raises(ValueError, match="warmup"):
        LocretHeadConfig(steps=10, warmup=20)
    assert Locret().with_budget(256) == Locret(budget_tokens=156, stabilizers=78, local_len=100)
    from kvjax.cli import main

    assert main(["eval", "--model", str(model_dir), "--policies", "locret", "--out", str(tmp_path / "e")]) == 2
    assert "--policy-file locret=PATH" in capsys.readouterr().err
    assert main(["train-gates", "--method", "duo", "--warmup", "5", "--model", "nowhere", "--out", "x"]) == 2
    assert "locret only" in capsys.readouterr().err


def test_eval_runs_locret_with_trained_heads(byte_model, trained, tmp_path, capsys):
    from kvjax.cli import main

    _, model_dir = byte_model
    out, _, _ = trained
    rc = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--policies",
            "locret",
            "--budgets",
            "96",
            "--lengths",
            "400",
            "--tasks",
            "passkey",
            "--samples",
            "1",
            "--dtype",
            "float32",
            "--no-timing",
            "--policy-file",
            f"locret={out}",
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert row["policy"] == "locret@96"
    assert "budget_tokens=48, stabilizers=24, local_len=48, activation='silu'," in row["policy_repr"]
    # 96 slots plus the answer's (decoding appends, as the authors') instead of the ~400-token prompt plus the answer
    assert row["kv_reduction_x"] > 2.5


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_heads(byte_model, tmp_path):
    model, model_dir = byte_model
    steps = 10
    command = [
        sys.executable,
        "-m",
        "kvjax.cli",
        "train-gates",
        "--method",
        "locret",
        "--model",
        str(model_dir),
        "--steps",
        str(steps),
        "--checkpoint-every",
        "1",
        "--seed",
        "7",
        *CLI_ARGS,
    ]
    straight, killed = straight_and_resumed(command, tmp_path, steps, HEADS_JSON)
    a, _ = load_retaining_heads(straight, model.config)
    b, _ = load_retaining_heads(killed, model.config)
    for name in ("fc1", "fc2"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    start = random_retaining_heads(model.config, HIDDEN, seed=7)
    assert not np.allclose(np.asarray(a["fc2"]), np.asarray(start["fc2"]))  # the heads moved
