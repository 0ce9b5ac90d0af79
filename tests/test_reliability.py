"""Nothing silently wrong, nothing lost, nothing read from outside the checkpoint (issue 45): one test per
class of failure, each asserting that the message names the problem, plus a property test over malformed
inputs."""

from __future__ import annotations

import json
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kvjax.train.loop import LoopConfig, NonFiniteLossError, check_learning_rate, train

# ------------------------------------------------------------------------------------------------
# Lost or poisoned work: the NaN guard
# ------------------------------------------------------------------------------------------------

TRUE_W = np.array([1.5, -2.0, 0.5, 3.0], np.float32)


def _batch(seed: int, step: int) -> dict:
    rng = np.random.default_rng([seed, step])
    x = rng.normal(size=(16, 4)).astype(np.float32)
    return {"x": x, "y": x @ TRUE_W + 0.7}


def _loss(params, batch, rng):
    pred = jnp.einsum("bi,i->b", batch["x"], params["w"]) + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2), {}


def _params():
    return {"w": jnp.zeros(4), "b": jnp.zeros(())}


def _run(tmp_path, lr: float, steps: int = 12):
    record = {"lr": lr, "model": "regression"}
    return train(
        _params(),
        _loss,
        optax.adam(lr),
        _batch,
        LoopConfig(steps=steps, checkpoint_every=2, progress=False, plot=False),
        tmp_path,
        record=record,
        fixed=("model",),
    )


def test_a_nan_stopped_run_keeps_a_finite_checkpoint_and_resumes_with_a_sane_lr(tmp_path):
    # Adam moves every parameter by about lr per step: 1e30 is finite, but the loss of the params it makes is not.
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*Rerun with other settings") as err:
        _run(tmp_path, 1e30)
    assert "no checkpoint" in str(err.value)
    # A run that blows up later: checkpoints only ever hold params whose loss and gradient were finite.
    good = _run(tmp_path / "b", 1e-2, steps=4)
    assert good.step == 4
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*rolled back to checkpoint 4.*resumes from step 4"):
        _run(tmp_path / "b", 1e30, steps=12)
    manager = ocp.CheckpointManager(tmp_path / "b" / "checkpoints")
    assert manager.latest_step() == 4
    for step in manager.all_steps():
        restored = manager.restore(step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    manager.close()
    # The rerun with a sane learning rate resumes from the good checkpoint, finishes, and records both settings.
    done = _run(tmp_path / "b", 1e-2, steps=12)
    assert done.resumed_from == 4 and done.step == 12 and np.isfinite(done.history[-1]["loss"])
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["lr"] == 1e-2 and record["resumes"][-1] == {"step": 4, "changed": {"lr": [1e30, 1e-2]}}
    # What may not change on a resume is refused, naming it.
    with pytest.raises(ValueError, match=r"model: 'regression' -> 'other'"):
        train(
            _params(),
            _loss,
            optax.adam(1e-2),
            _batch,
            LoopConfig(steps=14, progress=False, plot=False),
            tmp_path / "b",
            record={"lr": 1e-2, "model": "other"},
            fixed=("model",),
        )
    for bad in (0, -1e-3, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(ValueError, match="learning rate"):
            check_learning_rate(bad)


# ------------------------------------------------------------------------------------------------
# Conversion: a tiny Hugging Face folder written by hand (no transformers, no network)
# ------------------------------------------------------------------------------------------------

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def write_safetensors(path, tensors: dict[str, np.ndarray], header: dict | list | None = None) -> None:
    """A .safetensors file; `header` replaces the one the tensors imply (to write malformed files)."""
    import struct

    entries, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        entries[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(entries if header is None else header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def hf_tensors(config: dict = HF_CONFIG) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    v, e, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    h, k, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (v, e),
        "model.norm.weight": (e,),
        "model.layers.0.input_layernorm.weight": (e,),
        "model.layers.0.post_attention_layernorm.weight": (e,),
        "model.layers.0.self_attn.q_proj.weight": (h * d, e),
        "model.layers.0.self_attn.k_proj.weight": (k * d, e),
        "model.layers.0.self_attn.v_proj.weight": (k * d, e),
        "model.layers.0.self_attn.o_proj.weight": (e, h * d),
        "model.layers.0.mlp.gate_proj.weight": (f, e),
        "model.layers.0.mlp.up_proj.weight": (f, e),
        "model.layers.0.mlp.down_proj.weight": (e, f),
    }
    return {name: 0.1 * rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_hf_dir(path, config: dict | list | None = None, tensors: dict | None = None):
    """A convertible Hugging Face folder: config.json, model.safetensors, the byte tokenizer."""
    from kvjax.train.byte_tokenizer import write_byte_tokenizer

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(HF_CONFIG if config is None else config))
    write_safetensors(path / "model.safetensors", hf_tensors() if tensors is None else tensors)
    write_byte_tokenizer(path)
    return path


def convert_cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of `kvjax convert ARGV`."""
    from kvjax.cli import main

    capsys.readouterr()
    code = main(["convert", *map(str, argv)])
    return code, capsys.readouterr().err


def test_convert_failures_are_one_line_errors_naming_the_problem(tmp_path, capsys, monkeypatch):
    good = write_hf_dir(tmp_path / "good")
    cases = {  # what to break -> what the message must name
        "header_list": (lambda d: write_safetensors(d / "model.safetensors", {}, header=[1, 2]), "JSON object"),
        "no_offsets": (
            lambda d: write_safetensors(d / "model.safetensors", {}, header={"w": {"dtype": "F32", "shape": [2]}}),
            "data_offsets",
        ),
        "hidden_str": (lambda d: _edit_config(d, hidden_size="32"), "hidden_size must be an integer"),
        "heads_zero": (lambda d: _edit_config(d, num_attention_heads=0), "num_attention_heads must be an integer >= 1"),
        "config_list": (lambda d: (d / "config.json").write_text("[1, 2]"), "JSON object"),
        "config_bad_json": (lambda d: (d / "config.json").write_text("{"), r"config\.json is not valid JSON"),
        "index_bad_json": (
            lambda d: (d / "model.safetensors.index.json").write_text("{nope"),
            r"model\.safetensors\.index\.json is not valid JSON",
        ),
        "rope_string": (lambda d: _edit_config(d, rope_scaling="linear"), "rope_scaling must be an object"),
        "garbage_tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"model": 3}'), "not a usable tokenizer"),
        "bad_template": (
            lambda d: _edit_json(d / "tokenizer_config.json", chat_template="{% if %}"),
            "chat template does not parse",
        ),
        "transposed_head": (
            lambda d: write_safetensors(
                d / "model.safetensors", {**hf_tensors(), "model.embed_tokens.weight": np.zeros((16, 259))}
            ),
            r"'model\.embed_tokens\.weight'.*shape \(16, 259\); the config implies \(259, 16\)",
        ),
    }
    for name, (damage, message) in cases.items():
        source = shutil.copytree(good, tmp_path / name)
        damage(source)
        code, err = convert_cli(capsys, source, tmp_path / f"{name}-out")
        lines = err.strip().splitlines()
        assert code == 2 and re.search(message, lines[-1]), (name, err)
        assert lines[-1].startswith("kvjax convert: error:") and "Traceback" not in err, (name, err)
        assert not (tmp_path / f"{name}-out").exists()
    # An output that cannot be written is refused before any weight is read.
    (tmp_path / "a_file").write_text("")
    read = []
    monkeypatch.setattr(sys.modules["checkpoints_convert.convert"], "_weight_files", lambda d: read.append(d))
    code, err = convert_cli(capsys, good, tmp_path / "a_file" / "out")
    assert code == 2 and "not a directory" in err and not read
    monkeypatch.setattr("os.access", lambda path, mode: False)
    code, err = convert_cli(capsys, good, tmp_path / "new" / "out")
    assert code == 2 and "not writable" in err and not read
    monkeypatch.undo()
    # With the progress bar on, the error is the last line printed (the bar does not redraw after it).
    from kvjax.cli import main

    broken = shutil.copytree(good, tmp_path / "late")
    write_safetensors(broken / "model.safetensors", {**hf_tensors(), "model.layers.0.extra": np.zeros(2)})
    capsys.readouterr()
    assert main(["convert", str(broken), str(tmp_path / "late-out")]) == 2
    assert re.match(r"kvjax convert: error: unexpected tensor", capsys.readouterr().err.strip().splitlines()[-1])


def test_chat_template_raise_exception_is_a_clear_error(tmp_path, capsys):
    from kvjax.tokenizer import Tokenizer

    source = write_hf_dir(tmp_path / "hf")
    _edit_json(source / "tokenizer_config.json", chat_template="{{ raise_exception('only user turns, please') }}")
    with pytest.raises(ValueError, match="chat template refused these messages: only user turns, please"):
        Tokenizer(source).encode_chat([{"role": "user", "content": "hi"}])


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_config(hf_dir, **changes) -> None:
    _edit_json(hf_dir / "config.json", **changes)


def test_nothing_is_read_from_outside_the_source_folder(tmp_path, capsys):
    outside = tmp_path / "outside.safetensors"
    write_safetensors(outside, hf_tensors())
    good = write_hf_dir(tmp_path / "good")
    for shard in ("../outside.safetensors", str(outside), "/etc/passwd"):
        source = shutil.copytree(good, tmp_path / f"index{len(shard)}")
        (source / "model.safetensors").unlink()
        weight_map = {name: shard for name in hf_tensors()}
        (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        code, err = convert_cli(capsys, source, tmp_path / "out")
        assert code == 2 and "outside" in err and "refusing to read it" in err, err
    # A tokenizer file (or a weight file) that links outside the folder is refused...
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    for name in ("tokenizer_config.json", "model.safetensors"):
        source = shutil.copytree(good, tmp_path / f"link-{name}")
        (source / name).unlink()
        (source / name).symlink_to(secret)
        code, err = convert_cli(capsys, source, tmp_path / "out")
        assert code == 2 and f"{name} is a link to {secret}" in err and "root:x" not in err, err
    # ... but a Hugging Face cache's snapshots/REV/FILE -> ../../blobs/HASH is the normal layout.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in good.iterdir():
        blob = repo / "blobs" / f"hash-{file.name}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(f"../../blobs/{blob.name}")
    code, err = convert_cli(capsys, snapshot, tmp_path / "from-cache")
    assert code == 0, err
    # The converted folder gets the user's umask, not mkdtemp's 0700.
    import os

    umask = os.umask(0o022)
    try:
        assert convert_cli(capsys, good, tmp_path / "shared")[0] == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "shared" / "config.json").stat().st_mode & 0o777 == 0o644


def test_a_killed_conversion_leaves_nothing_that_a_rerun_does_not_remove(tmp_path, capsys):
    import os
    import socket

    good = write_hf_dir(tmp_path / "hf")
    stale = [tmp_path / ".out.partial-k2j4_x9a", tmp_path / f".out.partial-{socket.gethostname()}-999999999-ab12"]
    running = tmp_path / f".out.partial-{socket.gethostname()}-{os.getpid()}-cd34"  # still being written
    for folder in (*stale, running):
        (folder / "params").mkdir(parents=True)
        (folder / "params" / "blob").write_bytes(b"\0" * 4096)
    code, err = convert_cli(capsys, good, tmp_path / "out")
    assert code == 0 and not any(p.exists() for p in stale) and running.is_dir()
    assert all(f"removed {p}: the staging folder of an interrupted write" in err for p in stale)


def test_eval_and_bench_check_out_before_any_work(tmp_path, capsys):
    from kvjax.cli import main

    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    done = tmp_path / "done"
    done.mkdir()
    for command, result in (("eval", "results.json"), ("bench", "bench.json")):
        (done / result).write_text("[]")
        base = [command, "--model", str(tmp_path / "no-model"), "--no-progress"]  # any work would fail on this
        for out, message in ((a_file, "is a file, not a folder"), (done, f"already holds results \\({result}")):
            capsys.readouterr()
            assert main([*base, "--out", str(out)]) == 2
            assert re.search(message, capsys.readouterr().err)
        assert main([*base, "--out", str(done), "--overwrite"]) == 2  # gets past the check, to the model
        assert "no kvjax checkpoint" in capsys.readouterr().err
        assert (done / result).read_text() == "[]"


# ------------------------------------------------------------------------------------------------
# Silently wrong results: token ids and counts
# ------------------------------------------------------------------------------------------------


def test_token_ids_and_counts_are_checked_on_every_path(tiny_model):
    import kvjax

    m, vocab = tiny_model, tiny_model.config.vocab_size
    paths = {
        "logits": lambda t: kvjax.logits(m, t),
        "prefill": lambda t: kvjax.prefill(m, t),
        "generate": lambda t: kvjax.generate(m, t, 2),
    }
    bad = {
        "negative": ([[1, 2, -1]], r"must lie in \[0, 256\).*got -1"),
        "too large": ([[1, 2, vocab]], r"must lie in \[0, 256\).*got 256"),
        "floats": (np.array([[1.0, 2.0]]), "must be integers; got dtype float64"),
        "bools": ([[True, False]], "must be integers; got dtype bool"),
        "ragged floats": ([[1, 2], [3.5]], "integers"),
    }
    for path, run in paths.items():
        for case, (tokens, message) in bad.items():
            with pytest.raises(ValueError, match=message):
                run(tokens)
                pytest.fail(f"{path} took {case} token ids")
    state = kvjax.prefill(m, [[1, 2, 3]], max_new_tokens=4)
    for token, message in (
        ([vocab + 3], "decode token ids must lie in"),
        ([1.5], "must be integers"),
        ([1, 2], "one token per sequence"),
    ):
        with pytest.raises(ValueError, match=message):
            kvjax.decode_step(m, state, token)
    for count in (2.5, "3", True, np.float32(4)):
        with pytest.raises(ValueError, match=r"max_new_tokens must be an integer"):
            kvjax.generate(m, [[1, 2]], count)
        with pytest.raises(ValueError, match=r"max_new_tokens must be an integer"):
            kvjax.prefill(m, [[1, 2]], max_new_tokens=count)
    with pytest.raises(ValueError, match="steps must be an integer"):
        from kvjax.inference import greedy_decode

        greedy_decode(m, state, [1], 2.0)
    # Integers of any width are fine, and so is a device array of them.
    out = kvjax.generate(m, np.array([[1, 2, 3]], np.int64), np.int64(2))
    logits, state = kvjax.decode_step(m, state, out[:, 0])
    assert logits.shape == (1, vocab)


def test_malformed_inputs_fail_cleanly_or_work(tiny_model, tmp_path, capsys):
    """A seeded property test (hypothesis is not installed): random malformed configs, safetensors headers and
    token arrays each end in a clean ValueError, or in a correct result."""
    import kvjax
    from checkpoints_convert.safetensors_file import SafetensorsFile
    from kvjax.config import ModelConfig, config_from_hf

    rng = np.random.default_rng(45)
    junk = [None, 0, -1, 1, 2, 3.5, float("nan"), float("inf"), "32", "", [], [1], {}, {"a": 1}, True, 10**12]

    def mutate(value):
        return junk[rng.integers(len(junk))] if rng.random() < 0.7 else value

    for _ in range(300):  # configs
        config = {k: mutate(v) if rng.random() < 0.3 else v for k, v in HF_CONFIG.items()}
        if rng.random() < 0.3:
            config["rope_scaling"] = mutate({"rope_type": "linear", "factor": 2.0})
        if rng.random() < 0.05:
            config = mutate(config)
        try:
            assert isinstance(config_from_hf(config), ModelConfig)
        except ValueError:
            pass
    good = write_hf_dir(tmp_path / "hf")
    for i in range(12):  # whole conversions from the command line: converted, or one `kvjax convert: error:` line
        source = shutil.copytree(good, tmp_path / f"c{i}")
        key = list(HF_CONFIG)[rng.integers(len(HF_CONFIG))]
        _edit_config(source, **{key: mutate(HF_CONFIG[key])})
        code, err = convert_cli(capsys, source, tmp_path / f"c{i}-out")
        assert code == 0 or (code == 2 and err.strip().splitlines()[-1].startswith("kvjax convert: error:")), err
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    for i in range(200):  # safetensors headers
        header = {"w": {k: mutate(v) if rng.random() < 0.5 else v for k, v in entry.items()}}
        header = mutate(header) if rng.random() < 0.1 else header
        path = tmp_path / f"h{i}.safetensors"
        write_safetensors(path, {}, header=header)
        with open(path, "ab") as f:
            f.write(np.arange(2, dtype=np.float32).tobytes())
        try:
            file = SafetensorsFile(path)
            assert file.names() in ([], ["w"])  # a header may also be a valid empty one
            if file.names():
                np.testing.assert_array_equal(file.read("w"), [0.0, 1.0])
        except ValueError:
            pass
    vocab = tiny_model.config.vocab_size
    for _ in range(40):  # token arrays (a few shapes, so a few compiles)
        dtype = [np.int32, np.int64, np.uint8, np.float32, np.bool_][rng.integers(5)]
        tokens = rng.integers(-2, vocab + 2, size=(1, int(rng.integers(2, 4)))).astype(dtype)
        valid = np.issubdtype(dtype, np.integer) and tokens.min() >= 0 and tokens.max() < vocab
        try:
            out = kvjax.logits(tiny_model, tokens)
            assert valid and out.shape == (*tokens.shape, vocab)
        except ValueError:
            assert not valid


# ------------------------------------------------------------------------------------------------
# Silently wrong results: decoding a state past its room, or with another policy or model
# ------------------------------------------------------------------------------------------------


def test_decoding_past_a_states_room_is_refused_or_evicts(tiny_model):
    import kvjax
    from kvjax.inference import greedy_decode
    from kvjax.policies import H2O, Full, SnapKV, StreamingLLM

    m = tiny_model
    prompt = np.arange(1, 40)[None]
    for policy in (Full(), SnapKV(budget_tokens=16, window=4)):
        state = kvjax.prefill(m, prompt, policy, max_new_tokens=2)
        room = state.origin.room  # at least the 2 reserved; Full's slot = position buffer rounds up to more
        assert room >= 2 and (room == 2) == isinstance(policy, SnapKV)
        for _ in range(room):
            _, state = kvjax.decode_step(m, state, [5], policy)
        with pytest.raises(ValueError, match=r"room for 0 more decode step.*max_new_tokens=2.*larger max_new_tokens"):
            kvjax.decode_step(m, state, [5], policy)
        with pytest.raises(ValueError, match=rf"room for {room} more.*{room + 1} more would overwrite"):
            greedy_decode(m, kvjax.prefill(m, prompt, policy, max_new_tokens=2), [5], room + 1, policy)
    # A policy that evicts as it decodes never runs out of room; where its budget covers the prompt and the
    # reserve it cannot evict, and only the reserve is accepted.
    state = kvjax.prefill(m, prompt, StreamingLLM(sink=4, window=12), max_new_tokens=0)
    for _ in range(20):
        _, state = kvjax.decode_step(m, state, [5], StreamingLLM(sink=4, window=12))
    assert int(state.length[0]) == 59 and state.origin.room is None
    big = H2O(heavy=256, window=256)
    with pytest.raises(ValueError, match="room for 0 more"):
        kvjax.decode_step(m, kvjax.prefill(m, prompt, big), [5], big)
    # Within its room, the checked path decodes what the full forward computes, without recompiling per step.
    tokens = np.arange(1, 50)[None]
    full = np.asarray(kvjax.logits(m, tokens))
    state = kvjax.prefill(m, tokens[:, :40], max_new_tokens=9)
    compiled = kvjax.inference._decode_step._cache_size()  # other tests in this worker compile their own
    for t in range(40, 49):
        logits, state = kvjax.decode_step(m, state, tokens[:, t])
        np.testing.assert_allclose(np.asarray(logits)[0], full[0, t], atol=1e-5)
    assert kvjax.inference._decode_step._cache_size() <= compiled + 1


def test_a_state_is_decoded_only_by_the_policy_and_model_that_made_it(tiny_model):
    import dataclasses

    import kvjax
    from kvjax.policies import H2O, SnapKV

    m = tiny_model
    state = kvjax.prefill(m, np.arange(1, 40)[None], H2O(heavy=8, window=8), max_new_tokens=4)
    for other, message in (
        (SnapKV(budget_tokens=16, window=4), r"made by H2O\(.*heavy=8, window=8\).*cannot be decoded with SnapKV"),
        (None, r"made by H2O.*cannot be decoded with Full\("),
        (H2O(heavy=8, window=16), r"made by H2O\(.*window=8\).*cannot be decoded with H2O\(.*window=16\)"),
    ):
        with pytest.raises(ValueError, match=message):
            kvjax.decode_step(m, state, [5], other)
    wider = kvjax.init_model(dataclasses.replace(m.config, num_layers=3), dtype=jnp.float32)
    for model, message in (
        (wider, "3 layers"),
        (m.astype(jnp.bfloat16), "bfloat16"),
        (dataclasses.replace(m, name="x"), "x \\("),
    ):
        with pytest.raises(ValueError, match=f"made by an unnamed model .*cannot be decoded with .*{message}"):
            kvjax.decode_step(model, state, [5], H2O(heavy=8, window=8))
    logits, state = kvjax.decode_step(m, state, [5], H2O(heavy=8, window=8))  # the pair that made it
    assert logits.shape == (1, m.config.vocab_size)
