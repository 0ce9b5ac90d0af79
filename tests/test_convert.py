"""Conversion: layouts found in the wild, sharded files, and every failure named with nothing left behind."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from checkpoints_convert import ConversionError, convert
from kvjax.checkpoint import CheckpointError, load
from kvjax.config import UnsupportedModelError, config_from_hf
from tests.support.random_data import random_tokens

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@pytest.fixture
def hf_copy(hf_checkpoints, tmp_path):
    """A private copy of the tiny llama3 checkpoint that a test may damage."""
    source, _ = hf_checkpoints("llama3")
    return shutil.copytree(source, tmp_path / "hf")


def _edit_weights(hf_dir, edit):
    file = hf_dir / "model.safetensors"
    tensors = safetensors_numpy.load_file(file)
    edit(tensors)
    safetensors_numpy.save_file(tensors, file, metadata={"format": "pt"})


def _assert_fails_cleanly(hf_dir, out, match):
    with pytest.raises(ConversionError, match=match):
        convert(hf_dir, out, progress=False)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


def test_sharded_checkpoint_converts_like_a_single_file(hf_checkpoints, tmp_path):
    from checkpoints_convert.tiny_checkpoints import build

    sharded = build("qwen2", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    _, single = hf_checkpoints("qwen2")
    tokens = random_tokens(0, (1, 40), 300)
    a = kvjax.logits(load(convert(sharded, tmp_path / "out", progress=False), jnp.float32), tokens)
    b = kvjax.logits(load(single, jnp.float32), tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_both_rope_config_layouts_map_to_the_same_config(hf_checkpoints):
    hf_dir, _ = hf_checkpoints("llama3")
    new = json.loads((hf_dir / "config.json").read_text())
    assert "rope_parameters" in new  # what transformers 5 writes
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = dict(new["rope_parameters"])
    old["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")  # the oldest published spelling
    old["rope_scaling"] = params
    assert config_from_hf(old) == config_from_hf(new)
    assert config_from_hf(new).rope.kind == "llama3" and config_from_hf(new).rope.factor == 8.0


def test_pickled_weights_are_refused(hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    (hf_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    _assert_fails_cleanly(hf_copy, tmp_path / "out", "pickled weights.*never unpickles")


def test_missing_tensor_is_named(hf_copy, tmp_path):
    _edit_weights(hf_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _assert_fails_cleanly(hf_copy, tmp_path / "out", r"missing tensors for blocks\.1\.mlp\.up_proj")


def test_unexpected_tensor_is_named(hf_copy, tmp_path):
    _edit_weights(hf_copy, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.ones((4, 4), np.float32)}))
    _assert_fails_cleanly(hf_copy, tmp_path / "out", r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'")


def test_misshaped_tensor_is_named(hf_copy, tmp_path):
    _edit_weights(hf_copy, lambda t: t.update({"model.norm.weight": np.ones((65,), np.float32)}))
    _assert_fails_cleanly(hf_copy, tmp_path / "out", r"'model\.norm\.weight'.*shape \(65,\).*\(64,\)")


def test_unsupported_architecture_is_named(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (hf_copy / "config.json").write_text(json.dumps(config))
    _assert_fails_cleanly(hf_copy, tmp_path / "out", "unsupported architecture.*GPT2LMHeadModel")


def test_unsupported_rope_type_is_named(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config["rope_parameters"]["rope_type"] = "dynamic"
    (hf_copy / "config.json").write_text(json.dumps(config))
    _assert_fails_cleanly(hf_copy, tmp_path / "out", "unsupported rope type 'dynamic'")
    assert issubclass(UnsupportedModelError, ValueError)


def test_corrupted_safetensors_is_named(hf_copy, tmp_path):
    data = (hf_copy / "model.safetensors").read_bytes()
    (hf_copy / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    _assert_fails_cleanly(hf_copy, tmp_path / "out", "model.safetensors.*(truncated|exceeds)")


def test_existing_output_is_never_overwritten(hf_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(hf_copy, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_loading_bad_checkpoints_names_the_problem(hf_checkpoints, tmp_path):
    hf_dir, kv_dir = hf_checkpoints("llama2")
    with pytest.raises(CheckpointError, match="Hugging Face checkpoint.*kvjax convert"):
        load(hf_dir)
    with pytest.raises(CheckpointError, match="no kvjax checkpoint at"):
        load(tmp_path / "nowhere")
    broken = shutil.copytree(kv_dir, tmp_path / "broken")
    for f in (broken / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(b"\0" * 16)  # clobber the array data
    with pytest.raises(CheckpointError, match="corrupted or incomplete"):
        load(broken)


def test_tokenizer_and_chat_template_match_transformers(hf_checkpoints):
    transformers = pytest.importorskip("transformers")
    hf_dir, kv_dir = hf_checkpoints("llama2")
    ours = load(kv_dir).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "A needle hides in a haystack of many words."
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "user", "content": "Where is the needle?"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_cli_converts_and_generates(hf_checkpoints, tmp_path, capsys):
    from kvjax.cli import main

    hf_dir, _ = hf_checkpoints("mistral")
    out = tmp_path / "cli-out"
    assert main(["convert", str(hf_dir), str(out), "--dtype", "float32"]) == 0
    assert (
        main(
            [
                "generate",
                "--model",
                str(out),
                "--prompt",
                "The quick brown",
                "--max-new-tokens",
                "8",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    m = load(out, jnp.float32)
    ids = np.asarray(kvjax.generate(m, [m.tokenizer.encode("The quick brown")], max_new_tokens=8))[0]
    eos = [i for i, t in enumerate(ids) if t in m.config.eos_token_ids]
    assert printed == m.tokenizer.decode(ids[: eos[0] if eos else 8]).strip()
    assert main(["convert", str(hf_dir), str(out)]) == 2  # refuses to overwrite, with a message
    assert "already exists" in capsys.readouterr().err
