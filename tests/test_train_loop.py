"""The generic training loop: it learns, resumes exactly, stops on NaN keeping the last good checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kvjax.train.loop import LoopConfig, NonFiniteLossError, train

TRUE_W = np.array([1.5, -2.0, 0.5, 3.0], np.float32)


def regression_batch(seed: int, step: int, poison_from: int | None = None) -> dict:
    rng = np.random.default_rng([seed, step])
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = x @ TRUE_W + 0.7 + 0.01 * rng.normal(size=16).astype(np.float32)
    if poison_from is not None and step >= poison_from:
        y[0] = np.nan
    return {"x": x, "y": y}


def regression_loss(params, batch, rng):
    noise = 1e-3 * jax.random.normal(rng, ())  # uses the step key, so resume must reproduce it too
    pred = jnp.einsum("bi,i->b", batch["x"], params["w"]) + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2) + noise
    return loss, {"bias": params["b"]}


def init_params():
    return {"w": jnp.zeros(4), "b": jnp.zeros(())}


def optimizer():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 0.5, 3, 12, 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))


def config(steps, **kw):
    return LoopConfig(steps=steps, seed=3, checkpoint_every=3, progress=False, plot=False, **kw)


def assert_same_run(straight, resumed) -> None:
    """Bit-equal params and loss history: the resumed run is the uninterrupted one."""
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    straight = train(init_params(), regression_loss, optimizer(), regression_batch, config(12), tmp_path / "a")
    first = train(init_params(), regression_loss, optimizer(), regression_batch, config(6), tmp_path / "b")
    assert first.step == 6 and first.resumed_from is None
    resumed = train(init_params(), regression_loss, optimizer(), regression_batch, config(12), tmp_path / "b")
    assert resumed.resumed_from == 6 and resumed.step == 12
    assert_same_run(straight, resumed)
    curve = json.loads((tmp_path / "b" / "loss_curve.json").read_text())
    assert [h["step"] for h in curve] == list(range(1, 13))
    assert straight.history[-1]["loss"] < 0.1 * straight.history[0]["loss"]  # and it learned


def test_a_stage_ending_at_stop_at_resumes_to_the_uninterrupted_run(tmp_path):
    straight = train(init_params(), regression_loss, optimizer(), regression_batch, config(12), tmp_path / "a")
    stage = train(init_params(), regression_loss, optimizer(), regression_batch, config(12, stop_at=5), tmp_path / "b")
    assert stage.step == 5 and len(stage.history) == 5
    assert ocp.CheckpointManager(tmp_path / "b" / "checkpoints").latest_step() == 5  # saved off the 3-step grid
    resumed = train(init_params(), regression_loss, optimizer(), regression_batch, config(12), tmp_path / "b")
    assert resumed.resumed_from == 5 and resumed.step == 12
    assert_same_run(straight, resumed)
    for bad in (0, 13):
        with pytest.raises(ValueError, match="stop_at"):
            config(12, stop_at=bad)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    poisoned = lambda seed, step: regression_batch(seed, step, poison_from=7)  # noqa: E731
    with pytest.raises(NonFiniteLossError, match=r"step 7.*checkpoint 6"):
        train(init_params(), regression_loss, optimizer(), poisoned, config(12), tmp_path)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest_step() == 6
    restored = manager.restore(6)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    curve = json.loads((tmp_path / "loss_curve.json").read_text())
    assert [h["step"] for h in curve] == list(range(1, 8)) and all(np.isfinite(h["loss"]) for h in curve)
    # the same run resumes from the good checkpoint once the data is fixed
    resumed = train(init_params(), regression_loss, optimizer(), regression_batch, config(9), tmp_path)
    assert resumed.resumed_from == 6 and np.isfinite(resumed.history[-1]["loss"])


def test_loss_curve_png_and_validation(tmp_path):
    import matplotlib.image

    train(
        init_params(),
        regression_loss,
        optimizer(),
        regression_batch,
        LoopConfig(steps=4, checkpoint_every=10, progress=False),
        tmp_path,
    )
    assert matplotlib.image.imread(tmp_path / "loss_curve.png").shape[-1] in (3, 4)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]  # the last step is saved
    with pytest.raises(ValueError, match="steps"):
        LoopConfig(steps=0)


def test_language_model_loss_falls_on_a_tiny_transformer(tmp_path):
    from flax import nnx

    from kvjax.language_model import init_model
    from kvjax.tokenizer import Tokenizer
    from kvjax.train.byte_tokenizer import EOS_ID, PAD_ID, write_byte_tokenizer
    from kvjax.train.lm import DataConfig, ModelSize, make_batch, make_loss_fn, make_optimizer, model_config

    write_byte_tokenizer(tmp_path / "tok")
    tok = Tokenizer(tmp_path / "tok")
    size = ModelSize(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, max_positions=512)
    m = init_model(model_config(size, tok.vocab_size, 257, EOS_ID, PAD_ID), seed=0, dtype=jnp.float32)
    data = DataConfig(seq_len=96, batch_size=4, tasks=(), text_fraction=1.0, answer_reserve=8)
    batch_fn = lambda seed, step: make_batch(tok, data, PAD_ID, EOS_ID, seed, step)  # noqa: E731
    assert (batch_fn(0, 1)["tokens"] == batch_fn(0, 1)["tokens"]).all()
    result = train(
        nnx.to_pure_dict(m.params),
        make_loss_fn(m.graphdef),
        make_optimizer(1e-2, 12, 2),
        batch_fn,
        LoopConfig(steps=12, progress=False, plot=False),
    )
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])


def test_train_lm_cli_writes_a_loadable_checkpoint(tmp_path):
    import kvjax
    from kvjax.checkpoint import load
    from kvjax.cli import main

    out = tmp_path / "model"
    argv = [
        "train-lm",
        "--out",
        str(out),
        "--steps",
        "2",
        "--seq-len",
        "448",
        "--batch-size",
        "2",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "16",
        "--intermediate",
        "64",
        "--max-positions",
        "1024",
        "--tasks",
        "niah_single,passkey",
        "--no-progress",
    ]
    assert main([*argv, "--stop-at", "1"]) == 0  # a first stage: a checkpoint, no model
    assert not out.exists() and (tmp_path / "model.train" / "checkpoints" / "1").is_dir()
    assert main([*argv, "--stop-at", "3"]) == 2 and not out.exists()  # past --steps: refused
    assert main(argv) == 0  # resumes the stage
    assert [h["step"] for h in json.loads((out / "loss_curve.json").read_text())] == [1, 2]
    m = load(out, dtype=jnp.float32)
    assert m.tokenizer is not None and m.config.vocab_size == 259
    info = json.loads((out / "kvjax.json").read_text())
    assert info["steps"] == 2 and "train-lm" in info["command"]
    assert (out / "loss_curve.json").is_file() and (out / "loss_curve.png").is_file()
    ids = m.tokenizer.encode("The pass key is")
    assert kvjax.generate(m, [ids], 4).shape == (1, 4)
    assert main(argv) == 2  # refuses to overwrite


def test_curriculum_phases_parse_and_reject_bad_specs():
    from kvjax.train.lm import Phase, parse_curriculum

    assert parse_curriculum("128x32:900=copy, 512x16:350, 1024X8:200@8192") == (
        Phase(128, 32, 900, None, copy_only=True),
        Phase(512, 16, 350),
        Phase(1024, 8, 200, 8192),
    )
    for bad in ("", "512x16", "512:3", "axb:1", "512x0:3", "512x16:3@x", "512x16:3=text"):
        with pytest.raises(ValueError):
            parse_curriculum(bad)


def test_a_copy_phase_draws_only_copy_rows(tmp_path):
    from kvjax.tokenizer import Tokenizer
    from kvjax.train.byte_tokenizer import EOS_ID, PAD_ID, write_byte_tokenizer
    from kvjax.train.lm import DataConfig, Phase, _copy_row, make_batch, phase_data

    write_byte_tokenizer(tmp_path / "tok")
    tok = Tokenizer(tmp_path / "tok")
    data = phase_data(DataConfig(drill_fraction=0.5, text_fraction=0.2), Phase(128, 6, 10, copy_only=True), tok)
    assert (data.seq_len, data.tasks, data.copy_fraction) == (128, (), 1.0)
    batch = make_batch(tok, data, PAD_ID, EOS_ID, seed=3, step=7)
    for r in range(6):  # each row is exactly the copy row its generator state draws
        rng = np.random.default_rng([3, 7, r])
        length = int(rng.integers(32, 129))
        rng.integers(2**31), rng.uniform()  # the row's seed and kind draws
        ids, weights = _copy_row(tok, rng, length)
        np.testing.assert_array_equal(batch["tokens"][r, :length], ids)
        np.testing.assert_array_equal(batch["weights"][r, :length], weights)
        assert not batch["valid"][r, length:].any()


def test_learning_rate_warms_up_holds_then_decays_to_a_tenth():
    from kvjax.train.lm import lr_schedule

    f = lr_schedule(2e-3, steps=1000, warmup=100)
    lrs = np.array([float(f(i)) for i in range(1001)])
    np.testing.assert_allclose(
        lrs[[0, 50, 100, 500, 800, 900, 1000]], [0, 1e-3, 2e-3, 2e-3, 2e-3, 1.1e-3, 2e-4], rtol=1e-5, atol=1e-9
    )
    assert (np.diff(lrs[:100]) > 0).all() and (np.diff(lrs[800:]) < 0).all()


def test_copy_rows_train_only_on_tokens_an_earlier_occurrence_predicts(tmp_path):
    from kvjax.tokenizer import Tokenizer
    from kvjax.train.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, write_byte_tokenizer
    from kvjax.train.lm import _copy_row

    write_byte_tokenizer(tmp_path / "tok")
    tok = Tokenizer(tmp_path / "tok")
    for seed in range(5):
        ids, weights = _copy_row(tok, np.random.default_rng(seed), 700)
        assert len(ids) == len(weights) == 700 and ids[0] == BOS_ID
        assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids[1:])
        trained = [i for i, w in enumerate(weights) if w > 0]
        assert len(trained) > 150  # dense: a retrieval row trains ~10 tokens
        for i in trained:  # the bigram ending at i occurred earlier (the previous token, then this one)
            assert any(ids[j - 1 : j + 1] == ids[i - 1 : i + 1] for j in range(1, i)), (seed, i)


def test_drill_rows_ask_about_needles_of_the_same_row_and_train_only_the_answers(tmp_path):
    import re

    from kvjax.tokenizer import Tokenizer
    from kvjax.train.byte_tokenizer import write_byte_tokenizer
    from kvjax.train.lm import DataConfig, _drill_row

    write_byte_tokenizer(tmp_path / "tok")
    tok = Tokenizer(tmp_path / "tok")
    data = DataConfig(seq_len=1200, drill_fraction=1.0, text_fraction=0.0)
    for seed in range(4):
        ids, weights = _drill_row(tok, data, np.random.default_rng(seed), 1200)
        assert len(ids) == len(weights) <= 1200
        text = bytes(ids[1:]).decode()
        context, _, questions = text.partition("\n")
        asked = re.findall(r"The special magic (\w+) for (\S+) in the text above is ([^ ]+)\.", questions)
        assert len(asked) >= 5
        for noun, key, value in asked:  # each answer is the value its key's needle holds, in this row
            assert f"One special magic {noun} for {key} is: {value}." in context
        trained = bytes(i for i, w in zip(ids, weights) if w > 0).decode()
        assert trained == "".join(f" {value}." for _, _, value in asked)


def test_pose_positions_rise_inside_chunks_and_stay_in_the_span():
    from kvjax.train.lm import pose_positions

    for seed in range(20):
        pos = pose_positions(np.random.default_rng(seed), 300, 4096)
        steps = np.diff(pos)
        assert pos[0] == 0 and pos[-1] < 4096 and (steps >= 1).all()
        assert (steps > 1).sum() <= 2  # three chunks: at most two jumps
    assert (pose_positions(np.random.default_rng(0), 300, 300) == np.arange(300)).all()
    spans = [pose_positions(np.random.default_rng(s), 300, 4096)[-1] for s in range(50)]
    assert max(spans) > 2000  # the long distances are actually reached


def test_word_tokenizer_is_reproducible_keeps_keys_short_splits_digits_and_encodes_any_text(tmp_path):
    from kvjax.tokenizer import Tokenizer
    from kvjax.train.word_tokenizer import DEFAULT_VOCAB, build_word_tokenizer, write_word_tokenizer

    write_word_tokenizer(tmp_path / "tok")
    built_again = json.loads(build_word_tokenizer().to_str())  # same merges from the same synthetic corpus
    assert json.loads((tmp_path / "tok" / "tokenizer.json").read_text()) == built_again
    tok = Tokenizer(tmp_path / "tok")
    assert tok.vocab_size == DEFAULT_VOCAB
    assert tok.encode("x")[0] == tok.token_id("<bos>") and tok.padding_id() == tok.token_id("<pad>")
    digits = tok.encode(" 7258439", add_special_tokens=False)
    assert [tok.decode([i]) for i in digits] == [" ", "7", "2", "5", "8", "4", "3", "9"]
    for key in (" brave-falcon", " lazy-castle", " zealous-window"):  # bytes would need 12-15 tokens
        assert len(tok.encode(key, add_special_tokens=False)) <= 3, key
    for text in ("Any text: café, 東京, emoji 🙂, tabs\tand\nnewlines.", "The pass key is 12345. Remember it."):
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_specs_are_checked_and_a_resumed_work_dir_keeps_its_vocabulary(tmp_path):
    from kvjax.train.byte_tokenizer import write_byte_tokenizer
    from kvjax.train.lm import _tokenizer_files

    for bad in ("bpe:x", "bpe:", "no-such-folder"):
        with pytest.raises(ValueError, match="tokenizer"):
            _tokenizer_files(bad, tmp_path / "build")
    write_byte_tokenizer(tmp_path / "old")  # a work dir left by a run with another tokenizer (259 ids)
    with pytest.raises(ValueError, match="another vocabulary size"):
        _tokenizer_files("bpe", tmp_path / "old")


def test_loss_curve_is_smoothed_and_marks_the_schedule(tmp_path):
    import matplotlib.image

    from kvjax.train.loop import plot_loss_curve, smoothed

    np.testing.assert_allclose(smoothed([2.0] * 10, 4), 2.0)  # bias-corrected: no ramp up from 0
    step = smoothed([0.0] * 20 + [1.0] * 20, 4)
    assert step[19] == 0.0 and 0.3 < step[20] < 0.5 and step[-1] > 0.99  # follows a jump within a few spans
    history = [{"step": i + 1, "loss": 1.0 / (i + 1)} for i in range(60)]
    path = plot_loss_curve(history, tmp_path / "curve.png", "t", ((12, "end of warm-up"), (48, "decay")))
    assert matplotlib.image.imread(path).ndim == 3
