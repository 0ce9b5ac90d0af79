"""DuoAttention gate training: the mixed attention's limits, learning, the gate file, and exact resume
after a SIGKILL of the `kvjax train-gates` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import ModelConfig, init_model
from kvjax.attention import reference_attention
from kvjax.checkpoint import save_checkpoint
from kvjax.policies.duo_attention import DuoAttention, read_gates_tsv
from kvjax.tokenizer import Tokenizer
from kvjax.train.byte_tokenizer import write_byte_tokenizer
from kvjax.train.duo_gates import (
    GATES_TSV, DuoGateConfig, lr_multiplier, make_batch, mixed_attention, passkey_sample, train_duo_gates,
)

SINK, RECENT = 8, 32
SMALL = dict(sink=SINK, recent=RECENT, min_len=300, max_len=600, num_passkeys=2, passkey_words=4,
             pad_multiple=640, chunk=128)
CLI_ARGS = ["--sink", str(SINK), "--recent", str(RECENT), "--min-len", "300", "--max-len", "600", "--passkeys", "2",
            "--passkey-words", "4", "--pad-multiple", "640", "--chunk", "128", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random GQA Llama over the byte tokenizer, in memory and saved as a kvjax checkpoint."""
    root = tmp_path_factory.mktemp("duo")
    files = write_byte_tokenizer(root / "tokenizer")
    tokenizer = Tokenizer(root / "tokenizer")
    config = ModelConfig(
        family="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
    )
    model = init_model(config, seed=0, dtype=jnp.float32, tokenizer=tokenizer)
    path = save_checkpoint(root / "model", config, nnx.to_pure_dict(model.params), files)
    return model, path


def _qkv(seed: int, t: int = 48, kh: int = 2, g: int = 2, d: int = 8, n_valid: int = 41):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(1, t, kh, g, d)), jnp.float32)  # [B, T, K, G, D]
    k = jnp.asarray(rng.normal(size=(1, kh, t, d)), jnp.float32)  # [B, K, T, D]
    v = jnp.asarray(rng.normal(size=(1, kh, t, d)), jnp.float32)  # [B, K, T, D]
    pos = np.arange(t, dtype=np.int32)
    q_pos = jnp.asarray(pos[None])  # [B, T]
    k_pos = jnp.asarray(np.broadcast_to(np.where(pos < n_valid, pos, -1), (1, kh, t)))  # [B, K, T], padded tail
    return q, k, v, q_pos, k_pos


def _streaming_reference(q, k, v, k_pos, sink, recent, scale):
    """Streaming attention one query at a time: reference_attention over the entries a mask built here keeps."""
    outs = []
    for t in range(q.shape[1]):
        j = np.asarray(k_pos)
        keep = (j >= 0) & ((j < sink) | (j > t - recent))
        outs.append(reference_attention(q[:, t : t + 1], k, v, jnp.asarray(np.where(keep, j, -1)),
                                        jnp.array([[t]], jnp.int32), None, scale))
    return jnp.concatenate(outs, axis=1)  # [B, T, K, G, D]


def test_mixed_attention_interpolates_full_and_streaming():
    q, k, v, q_pos, k_pos = _qkv(0)
    scale, kw = 8**-0.5, dict(sink=4, recent=10, window=None, scale=8**-0.5, chunk=16)
    full = reference_attention(q, k, v, k_pos, q_pos, None, scale)
    stream = _streaming_reference(q, k, v, k_pos, 4, 10, scale)
    assert not np.allclose(full, stream, atol=1e-3)  # the test distinguishes the two
    np.testing.assert_allclose(mixed_attention(q, k, v, q_pos, k_pos, jnp.ones(2), **kw), full, atol=1e-5)
    np.testing.assert_allclose(mixed_attention(q, k, v, q_pos, k_pos, None, **kw), full, atol=1e-5)
    np.testing.assert_allclose(mixed_attention(q, k, v, q_pos, k_pos, jnp.zeros(2), **kw), stream, atol=1e-5)
    alpha = jnp.array([0.3, 0.8])  # per KV head, shared by its query group
    want = alpha[None, None, :, None, None] * full + (1 - alpha[None, None, :, None, None]) * stream
    np.testing.assert_allclose(mixed_attention(q, k, v, q_pos, k_pos, alpha, **kw), want, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the attention chunk"):
        mixed_attention(q, k, v, q_pos, k_pos, alpha, **{**kw, "chunk": 20})


def test_schedule_and_data():
    mult = [float(lr_multiplier(s, 10)) for s in range(10)]
    np.testing.assert_allclose(mult, [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5])
    assert float(lr_multiplier(0, 2000)) == pytest.approx(0.1) and float(lr_multiplier(1999, 2000)) == pytest.approx(0.1)
    tokenizer_dir = write_byte_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / "duo-bytes")["tokenizer.json"].parent
    tokenizer = Tokenizer(tokenizer_dir)
    config = DuoGateConfig(**SMALL)
    sample = passkey_sample(tokenizer, config, 3, 5)
    assert 300 - 150 <= len(sample.ids) <= 600  # the drawn length, less at most one haystack sentence
    answer_text = tokenizer.decode(sample.ids[sample.answer])
    assert all(key in answer_text for key in sample.passkeys)
    context = tokenizer.decode(sample.ids[: int(np.argmax(sample.answer))])
    assert all(context.count(key) == 1 for key in sample.passkeys)  # each needle once, before the questions
    a, b = make_batch(tokenizer, config, 0, 3, 5), make_batch(tokenizer, config, 0, 3, 5)
    assert a["tokens"].shape == (1, 640) and all(np.array_equal(a[x], b[x]) for x in a)  # pure in (seed, step)
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(tokenizer, DuoGateConfig(min_len=100, max_len=100), 0, 0)


def test_training_lowers_the_loss_keeps_gates_in_range_and_writes_the_gate_file(byte_model, tmp_path):
    model, _ = byte_model
    gates, result = train_duo_gates(model, tmp_path, DuoGateConfig(steps=10, **SMALL), progress=False, plot=False)
    losses = [h["loss"] for h in result.history]
    assert losses[0] == pytest.approx(0.05)  # alpha = 1: no distillation error, L1 = 0.05 x 1
    assert losses[-1] < losses[0] - 0.002 and result.history[-1]["distill"] > 0
    assert gates.shape == (2, 2) and np.all((gates >= 0) & (gates <= 1)) and np.all(gates < 1)
    read = read_gates_tsv(tmp_path / GATES_TSV)
    np.testing.assert_array_equal(read, gates)  # savetxt's %.18e round-trips float64 exactly
    policy = DuoAttention.from_tsv(tmp_path / GATES_TSV, sparsity=0.5)
    assert policy.retrieval_fraction(2) == pytest.approx(0.5)
    assert (tmp_path / "loss_curve.json").is_file() and (tmp_path / "checkpoints" / "10").is_dir()


def test_cli_errors(capsys):
    from kvjax.cli import main

    with pytest.raises(SystemExit):
        main(["train-gates", "--method", "locret", "--out", "x"])
    assert "not implemented yet" in capsys.readouterr().err
    if not __import__("kvjax.checkpoint").checkpoint.bundled_models():
        assert main(["train-gates", "--method", "duo", "--out", "x"]) == 2
        assert "no bundled model" in capsys.readouterr().err


def _latest(out: Path) -> int:
    folder = out / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps, default=0)


def test_sigkilled_run_resumes_to_the_same_gates(byte_model, tmp_path):
    _, model_dir = byte_model
    steps = 12
    command = [sys.executable, "-m", "kvjax.cli", "train-gates", "--method", "duo", "--model", str(model_dir),
               "--steps", str(steps), "--checkpoint-every", "1", "--seed", "7", *CLI_ARGS]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    straight = subprocess.Popen([*command, "--out", str(tmp_path / "straight")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = subprocess.Popen([*command, "--out", str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _latest(tmp_path / "killed") < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    reached = _latest(tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL and 3 <= reached < steps, reached
    assert not (tmp_path / "killed" / GATES_TSV).exists()
    resumed = subprocess.run([*command, "--out", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    out, err = straight.communicate()
    assert straight.returncode == 0, err.decode()
    a, b = read_gates_tsv(tmp_path / "straight" / GATES_TSV), read_gates_tsv(tmp_path / "killed" / GATES_TSV)
    np.testing.assert_array_equal(a, b)
    assert np.all(a < 1)  # the gates moved, so equality is not trivial
    curve = lambda d: [h["loss"] for h in json.loads((tmp_path / d / "loss_curve.json").read_text())]  # noqa: E731
    assert curve("straight") == curve("killed") and len(curve("killed")) == steps
