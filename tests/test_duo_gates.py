"""DuoAttention gate training: the mixed attention's limits, learning, the gate file, and exact resume
after a SIGKILL of the `kvjax train-gates` command."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import ModelConfig
from kvjax.attention import reference_attention
from kvjax.language_model import abstract_model
from kvjax.policies.duo_attention import DuoAttention, read_gates_tsv
from kvjax.policies.duo_attention.training import (
    GATES_TSV,
    DuoGateConfig,
    _Spec,
    duo_forward,
    lr_multiplier,
    make_batch,
    make_loss_fn,
    mixed_attention,
    passkey_sample,
    train_duo_gates,
)
from kvjax.tokenizer import Tokenizer
from kvjax.train.byte_tokenizer import write_byte_tokenizer
from tests.support.interrupted_run import straight_and_resumed

SINK, RECENT = 8, 32
SMALL = dict(
    sink=SINK, recent=RECENT, min_len=300, max_len=600, num_passkeys=2, passkey_words=4, pad_multiple=640, chunk=128
)
CLI_ARGS = [
    "--sink",
    str(SINK),
    "--recent",
    str(RECENT),
    "--min-len",
    "300",
    "--max-len",
    "600",
    "--passkeys",
    "2",
    "--passkey-words",
    "4",
    "--pad-multiple",
    "640",
    "--chunk",
    "128",
    "--dtype",
    "float32",
    "--no-progress",
]


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
        outs.append(
            reference_attention(
                q[:, t : t + 1], k, v, jnp.asarray(np.where(keep, j, -1)), jnp.array([[t]], jnp.int32), None, scale
            )
        )
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


def test_duo_forward_runs_each_layer_with_its_weights_and_window(byte_model):
    """Gates at 1: both passes equal the model's own forward (the layer scan picks layer i's weights and
    sliding window); gates at 0: the mixed pass differs."""
    model, _ = byte_model
    model = model.with_config(dataclasses.replace(model.config, sliding_windows=(None, 24)))
    t, n = 128, 117
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 200, (1, t)), jnp.int32)
    valid = jnp.asarray(np.arange(t) < n)[None]
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    want = jax.jit(lambda params: nnx.merge(model.graphdef, params)(tokens, positions, valid)[0])(model.params)
    forward = jax.jit(duo_forward, static_argnums=(0, 5))
    spec = _Spec(sink=4, recent=16, chunk=32)
    full, mixed = forward(model.graphdef, model.params, jnp.ones((2, 2)), tokens, valid, spec)
    np.testing.assert_allclose(full[:, :n], want[:, :n], atol=1e-5)
    np.testing.assert_allclose(mixed[:, :n], want[:, :n], atol=1e-5)
    _, streaming = forward(model.graphdef, model.params, jnp.zeros((2, 2)), tokens, valid, spec)
    assert not np.allclose(streaming[:, :n], want[:, :n], atol=1e-3)


def test_schedule_and_data(tmp_path):
    mult = [float(lr_multiplier(s, 10)) for s in range(10)]
    np.testing.assert_allclose(mult, [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0.5])
    assert float(lr_multiplier(0, 2000)) == pytest.approx(0.1) and float(lr_multiplier(1999, 2000)) == pytest.approx(
        0.1
    )
    tokenizer_dir = write_byte_tokenizer(tmp_path / "bytes")["tokenizer.json"].parent
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


@pytest.mark.usefixtures("optimized_xla")  # ten training steps
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


def _gradient_temp_bytes(config: ModelConfig, t: int, chunk: int) -> int:
    """Temporary bytes XLA assigns to the compiled gate gradient (abstract bf16 weights, nothing allocated)."""
    model = abstract_model(config, jnp.bfloat16)
    loss_fn = make_loss_fn(model.graphdef, DuoGateConfig(chunk=chunk, pad_multiple=chunk))
    gates = {"gates": jax.ShapeDtypeStruct((config.num_layers, config.num_kv_heads), jnp.float32)}
    batch = {
        "tokens": jax.ShapeDtypeStruct((1, t), jnp.int32),
        "valid": jax.ShapeDtypeStruct((1, t), jnp.bool_),
        "answer": jax.ShapeDtypeStruct((1, t), jnp.float32),
        "model": model.params,
    }
    compiled = jax.jit(jax.grad(loss_fn, has_aux=True)).lower(gates, batch, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.usefixtures("optimized_xla")  # the memory of the program users compile
def test_gradient_memory_grows_by_one_hidden_state_per_layer():
    """Each added layer may cost the backward pass its input [T, E] (bf16), not its activations: at
    Llama's shape ratios a layer's activations are ~27 x that ([T, F] MLP tensors in f32), which the
    unrolled per-layer jax.checkpoint loop kept (6.8 GB per layer for Llama-3-8B at 32K tokens)."""
    t, e = 2048, 256
    config = ModelConfig(
        family="llama",
        vocab_size=256,
        hidden_size=e,
        intermediate_size=896,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=t,
    )
    two, four = (_gradient_temp_bytes(dataclasses.replace(config, num_layers=n), t, 256) for n in (2, 4))
    per_layer = (four - two) / 2
    assert per_layer <= 1.25 * t * e * 2, f"{per_layer / (t * e * 2):.2f} x [T, E] bf16 per layer"


def test_cli_errors(capsys, monkeypatch):
    import kvjax.cli
    from kvjax.cli import main

    with pytest.raises(SystemExit):
        main(["train-gates", "--method", "magic", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err
    monkeypatch.setattr(kvjax.cli, "bundled_models", lambda: [])  # an install without the bundled model
    assert main(["train-gates", "--method", "duo", "--out", "x"]) == 2
    assert "no bundled model" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_gates(byte_model, tmp_path):
    _, model_dir = byte_model
    steps = 12
    command = [
        sys.executable,
        "-m",
        "kvjax.cli",
        "train-gates",
        "--method",
        "duo",
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
    straight, killed = straight_and_resumed(command, tmp_path, steps, GATES_TSV, timeout=120)
    a, b = read_gates_tsv(straight / GATES_TSV), read_gates_tsv(killed / GATES_TSV)
    np.testing.assert_array_equal(a, b)
    assert np.all(a < 1)  # the gates moved, so equality is not trivial
