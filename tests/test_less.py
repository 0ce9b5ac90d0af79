"""LESS: an empty state is the base policy; the decode step's attention, eviction and state update and the
prefill's state against a numpy transcription of the paper's formulas; H2O's training mask against the
authors' loop; kv_bytes; training lowers the loss and resumes after a SIGKILL; clear errors."""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import ModelConfig
from kvjax.checkpoint import CheckpointError
from kvjax.kv_state import EvictionSegment, round_capacity
from kvjax.layer_step import Decode, LayerContext, StepInputs
from kvjax.policies import H2O, LESS, SnapKV, StreamingLLM
from kvjax.policies.less import PARAMS_FILE, init_params, load_less, save_less, zero_state_params
from kvjax.policies.less.policy import LESSSegment
from kvjax.policies.less.training import LESSTrainConfig, h2o_mask, make_loss_fn, train_less
from kvjax.train.task_rows import make_batch
from tests.support.interrupted_run import straight_and_resumed
from tests.support.policy_reference import layer_queries_keys
from tests.support.quantized_fixtures import teacher_forced
from tests.support.random_data import random_tokens

RANK, HIDDEN = 4, 8
SMALL = dict(
    hidden=HIDDEN,
    rank=RANK,
    tasks=("niah_single", "passkey"),
    min_len=400,
    max_len=500,
    pad_multiple=512,
    sink=4,
    recent=28,
    lr=1e-2,
)


def _erf(x):
    return np.vectorize(math.erf)(x)


def np_gelu(x):
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def np_phi_q(q, w1, w2):
    """The paper's query map, |gelu(gelu(q W1) W2)|: q [..., D]."""
    return np.abs(np_gelu(np_gelu(q @ w1) @ w2))


def np_phi_k(k, w1, w2, mix, s1, s2):
    """The paper's key map: psi = |s1| gelu(gelu(k W1) W2); |psi + (psi M) s2|."""
    psi = np.abs(s1) * np_gelu(np_gelu(k @ w1) @ w2)
    return np.abs(psi + (psi @ mix) * s2)


def _params(config, seed=0, s1=1.0):
    """Random params whose state is not negligible (s1 = 1 instead of the authors' 1e-4 start)."""
    p = init_params(config, RANK, HIDDEN, seed)
    return {**p, "s1": jnp.full_like(p["s1"], s1)}


def _np(p, layer, kv_head):
    """One (layer, KV head)'s params in float64 numpy."""
    return {name: np.asarray(w[layer, kv_head], np.float64) for name, w in p.items()}


@pytest.mark.parametrize("base", [H2O(16, 16), StreamingLLM(4, 28, position_shift=False)], ids=["h2o", "streaming"])
@pytest.mark.parametrize("chunk", [None, 64], ids=["whole", "chunked"])
def test_an_empty_state_is_the_base_policy(tiny_model, base, chunk):
    m = tiny_model
    tokens = random_tokens(0, (2, 170), m.config.vocab_size)
    lengths, new = (150, 120), 12
    less = LESS(base, params=zero_state_params(_params(m.config)))
    want, _, _ = teacher_forced(m, base, tokens, lengths, new, chunk)
    got, _, state = teacher_forced(m, less, tokens, lengths, new, chunk)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(state.layers[0][0].h))  # s1 = 0: every evicted key's features are 0
    if chunk is None:  # generate's jitted loop too, token for token
        prompts, lengths = tokens[:, :150], np.asarray(lengths)
        np.testing.assert_array_equal(
            np.asarray(kvjax.generate(m, prompts, 8, less, lengths=lengths, eos_token_id=())),
            np.asarray(kvjax.generate(m, prompts, 8, base, lengths=lengths, eos_token_id=())),
        )
    else:  # a state that is not empty changes the logits
        changed, _, _ = teacher_forced(m, LESS(base, params=_params(m.config)), tokens, lengths, new, chunk)
        assert np.max(np.abs(changed - want)) > 1e-3


def test_decode_step_against_the_papers_formula(tiny_model):
    # One decode step on a hand-built layer: attend over the kept entries and the state in one normaliser,
    # then the base's eviction (StreamingLLM: the oldest entry after the sink) enters the state.
    cfg = tiny_model.config
    b, kh, g, d, layer = 2, cfg.num_kv_heads, cfg.group_size, cfg.head_dim, 1
    p = _params(cfg, seed=1)
    policy = LESS(StreamingLLM(sink=2, window=5, position_shift=False), params=p)
    rng = np.random.default_rng(0)
    held = np.array([0, 1, 10, 11, 12, 13, 14])  # sink 2 + window 5: the budget, full
    cap = round_capacity(len(held) + 1)
    k, v = rng.normal(size=(2, b, kh, cap, d)).astype(np.float32)
    pos = np.full((b, kh, cap), -1, np.int32)
    pos[:, :, : len(held)] = held
    h0 = rng.normal(size=(b, kh, RANK, d)).astype(np.float32)
    z0 = rng.uniform(0.5, 2.0, size=(b, kh, RANK)).astype(np.float32)
    kept = EvictionSegment(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), heads=(0, 1), budget=7)
    segment = LESSSegment(kept=kept, h=jnp.asarray(h0), z=jnp.asarray(z0))
    q = rng.normal(size=(b, 1, kh, g, d)).astype(np.float32)
    k_new, v_new = rng.normal(size=(2, b, 1, kh, d)).astype(np.float32)
    x = StepInputs(
        q=jnp.asarray(q),
        k=jnp.asarray(k_new),
        v=jnp.asarray(v_new),
        q_raw=jnp.asarray(q),
        k_raw=jnp.asarray(k_new),
        q_pos=jnp.full((b, 1), 15, jnp.int32),
        new_pos=jnp.full((b, 1), 15, jnp.int32),
    )
    out, new = policy.segment_step(LayerContext(index=layer, window=None, scale=d**-0.5), segment, x, Decode())
    for bi in range(b):
        for hi in range(kh):
            w = _np(p, layer, hi)
            keys = np.concatenate([k[bi, hi, : len(held)], k_new[bi, 0, hi][None]]).astype(np.float64)
            vals = np.concatenate([v[bi, hi, : len(held)], v_new[bi, 0, hi][None]]).astype(np.float64)
            for gi in range(g):
                qi = q[bi, 0, hi, gi].astype(np.float64)
                e = np.exp(keys @ qi / np.sqrt(d))
                phi = np_phi_q(qi, w["q1"][gi], w["q2"][gi])  # [R]
                want = (e @ vals + phi @ h0[bi, hi]) / (e.sum() + phi @ z0[bi, hi])
                np.testing.assert_allclose(np.asarray(out[bi, 0, hi, gi]), want, rtol=2e-5, atol=2e-5)
            victim = 2  # position 10: the oldest outside the sink
            phi_k = np_phi_k(keys[victim], w["k1"], w["k2"], w["mix"], w["s1"], w["s2"])
            np.testing.assert_allclose(
                np.asarray(new.h[bi, hi]), h0[bi, hi] + np.outer(phi_k, vals[victim]), rtol=2e-5, atol=2e-5
            )
            np.testing.assert_allclose(np.asarray(new.z[bi, hi]), z0[bi, hi] + phi_k, rtol=2e-5, atol=2e-5)
    assert sorted(np.asarray(new.kept.pos[0, 0])[np.asarray(new.kept.pos[0, 0]) >= 0]) == [0, 1, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("base", [H2O(12, 12), StreamingLLM(4, 20)], ids=["h2o", "streaming"])
@pytest.mark.parametrize("chunk", [None, 32], ids=["whole", "chunked"])
def test_prefill_state_sums_every_evicted_entry(tiny_model, base, chunk):
    # Layer 0's keys and values do not depend on attention, so its state after the prompt is the paper's
    # sum over exactly the positions the cache no longer holds: H = sum phi_k(k_e)^T v_e, z = sum phi_k(k_e).
    m, p = tiny_model, _params(tiny_model.config, seed=2)
    tokens = random_tokens(3, (1, 130), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, LESS(base, params=p), max_new_tokens=4, chunk_size=chunk)
    _, k, v = layer_queries_keys(m, tokens)[0]  # [1, T, K, D]
    seg = state.layers[0][0]
    for hi in range(m.config.num_kv_heads):
        pos = np.asarray(seg.kept.pos[0, hi])
        gone = np.setdiff1d(np.arange(130), pos[pos >= 0])
        assert len(gone) == 130 - 24
        w = _np(p, 0, hi)
        phi = np_phi_k(k[0, gone, hi].astype(np.float64), w["k1"], w["k2"], w["mix"], w["s1"], w["s2"])
        np.testing.assert_allclose(np.asarray(seg.z[0, hi]), phi.sum(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(seg.h[0, hi]), phi.T @ v[0, gone, hi], rtol=1e-4, atol=1e-5)


def test_h2o_training_mask_is_the_authors_loop():
    # The authors' local_heavy_hitter_mask_nonoverlap, transcribed per query head in numpy.
    rng = np.random.default_rng(4)
    t, heavy, recent = 24, 3, 4
    logits = rng.normal(size=(t, t)) * 2
    causal = np.tril(np.ones((t, t), bool))
    probs = np.exp(np.where(causal, logits, -np.inf))
    probs /= probs.sum(-1, keepdims=True)
    budget = heavy + recent
    score = probs[:budget].sum(0)
    score[budget:] = 0
    want = np.zeros((t, t), bool)
    want[:budget, :budget] = True
    for i in range(budget, t):
        top = np.argsort(-score[: i - recent], kind="stable")[:heavy]
        row = np.zeros(t, bool)
        row[top] = True
        row[i - recent : i + 1] = True
        want[i] = row
        score = (score + probs[i]) * row
    want |= np.triu(np.ones((t, t), bool), -recent)  # get_h2o_mask's union with the recent band
    want &= causal
    got = h2o_mask(
        jnp.asarray(probs, jnp.float32)[None, None, None], jnp.asarray(causal)[None, None, None], heavy, recent
    )
    np.testing.assert_array_equal(np.asarray(got[0, 0, 0]), want)


def test_kv_bytes_count_the_state(tiny_model):
    m, base = tiny_model, H2O(16, 16)
    tokens = random_tokens(5, (2, 100), m.config.vocab_size)
    plain = kvjax.kv_bytes(kvjax.prefill(m, tokens, base, max_new_tokens=8))
    less = kvjax.kv_bytes(kvjax.prefill(m, tokens, LESS(base, params=_params(m.config)), max_new_tokens=8))
    cfg = m.config
    assert less - plain == 2 * cfg.num_layers * cfg.num_kv_heads * RANK * (cfg.head_dim + 1) * 4  # H and z, float32


@pytest.fixture(scope="module")
def trained(byte_model, tmp_path_factory):
    """A short in-process training run: (output folder, params, TrainResult)."""
    model, _ = byte_model
    out = tmp_path_factory.mktemp("less-run")
    params, result = train_less(model, out, LESSTrainConfig(steps=8, **SMALL), progress=False, plot=False)
    return out, params, result


def test_training_lowers_the_loss_below_the_evictions(byte_model, trained):
    model, _ = byte_model
    out, params, result = trained
    assert len(result.history) == 8
    # On prompts it never trained on, without dropout: the trained state lowers the loss, and below what
    # eviction alone (the same batch's base_mse) loses; the start's state is near empty (s1 = 1e-4).
    config = LESSTrainConfig(steps=8, **{**SMALL, "dropout": 0.0})
    loss_fn = jax.jit(make_loss_fn(model.graphdef, config))
    start = init_params(model.config, RANK, HIDDEN, seed=0)
    for step in (100, 101):
        batch = {**make_batch(model.tokenizer, config, model.tokenizer.padding_id(), 0, step), "model": model.params}
        batch = {k: batch[k] for k in ("tokens", "valid", "model")}
        before, aux = loss_fn(start, batch, None)
        after, _ = loss_fn(params, batch, None)
        assert float(before) == pytest.approx(float(aux["base_mse"]), rel=1e-2)
        assert float(after) < 0.9 * float(aux["base_mse"]), (float(after), float(aux["base_mse"]))
    assert (out / "loss_curve.json").is_file() and (out / "checkpoints" / "8").is_dir()
    policy = LESS.from_file(out, model.config)  # the training's cache comes with the file
    assert policy.base == StreamingLLM(sink=4, window=28, position_shift=False) and policy.rank == RANK
    for name, w in params.items():
        np.testing.assert_array_equal(np.asarray(policy.params[name]), w)


def test_eval_runs_less_from_its_file(byte_model, trained, tmp_path):
    from kvjax.cli import main

    _, model_dir = byte_model
    out, _, _ = trained
    args = ["eval", "--model", str(model_dir), "--policies", "less", "--budgets", "64", "--lengths", "400"]
    args += ["--tasks", "passkey", "--samples", "1", "--dtype", "float32", "--no-timing", "--no-progress"]
    assert main([*args, "--policy-file", f"less={out / PARAMS_FILE}", "--out", str(tmp_path / "e")]) == 0
    (row,) = json.loads((tmp_path / "e" / "results.json").read_text())["rows"]
    assert (
        row["policy"] == "less@64"
        and "StreamingLLM(compression_ratio=None, sink=4, window=60, position_shift=False" in row["policy_repr"]
    )
    assert row["kv_reduction_x"] > 2  # 64 kept entries and the state against the ~400-token prompt


def test_clear_errors(byte_model, trained, tmp_path, capsys):
    model, model_dir = byte_model
    out, params, _ = trained
    tokens = random_tokens(6, (1, 64), model.config.vocab_size)
    with pytest.raises(ValueError, match="LESS.from_file"):
        kvjax.prefill(model, tokens, LESS())
    for bad in ("tova", SnapKV(), 3):
        with pytest.raises(ValueError, match="H2O or StreamingLLM"):
            LESS(bad)
    assert LESS("streaming").base == StreamingLLM(position_shift=False)  # the state's keys keep their positions
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
    misfit = LESS(params=init_params(other, RANK, HIDDEN))
    with pytest.raises(ValueError, match="do not fit"):
        kvjax.prefill(model, tokens, misfit)
    with pytest.raises(ValueError, match="must be a dict"):
        LESS(params={"q1": params["q1"]}).check_model(model.config)
    save_less(tmp_path / "other", init_params(other, RANK, HIDDEN), other)
    with pytest.raises(ValueError, match="do not fit"):
        LESS.from_file(tmp_path / "other", model.config)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / PARAMS_FILE).write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_less(tmp_path / "garbage", model.config)
    with pytest.raises(CheckpointError, match="no such file"):
        load_less(tmp_path / "nowhere", model.config)
    for bad, match in (
        (dict(mask="tova"), "mask must be"),
        (dict(rank=0), "rank >= 1"),
        (dict(dropout=1.0), "dropout in"),
        (dict(recent=2000), "budget 2004 must be shorter"),
    ):
        with pytest.raises(ValueError, match=match):
            LESSTrainConfig(**bad)
    from kvjax.cli import main

    assert main(["train-gates", "--method", "less", "--warmup", "5", "--model", str(model_dir), "--out", "x"]) == 2
    assert "--warmup applies to --method locret only" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_params(byte_model, tmp_path):
    model, model_dir = byte_model
    steps = 8
    cli = [sys.executable, "-m", "kvjax.cli", "train-gates", "--method", "less", "--model", str(model_dir)]
    cli += ["--steps", str(steps), "--checkpoint-every", "1", "--seed", "7", "--dtype", "float32", "--no-progress"]
    cli += ["--hidden", str(HIDDEN), "--rank", str(RANK), "--tasks", "niah_single,passkey", "--min-len", "400"]
    cli += ["--max-len", "500", "--pad-multiple", "512", "--sink", "4", "--recent", "28", "--lr", "1e-2"]
    straight, killed = straight_and_resumed(cli, tmp_path, steps, PARAMS_FILE)
    a, _ = load_less(straight, model.config)
    b, _ = load_less(killed, model.config)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    start = init_params(model.config, RANK, HIDDEN, seed=7)
    assert not np.allclose(np.asarray(a["s1"]), np.asarray(start["s1"]))  # the params moved
