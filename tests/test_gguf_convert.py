"""GGUF conversion: every tensor type, the Q/K un-permutation, config and tokenizer from metadata, checked
against transformers' own GGUF loader; every damaged file named, with nothing left behind."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from checkpoints_convert import ConversionError, convert
from checkpoints_convert.gguf_checkpoint import SUPPORTED_TYPES, unpermute_rows
from checkpoints_convert.weight_map import hf_targets
from kvjax.checkpoint import load
from tests.support.gguf_fixtures import SMALL, interleave_rows, write_tiny_gguf
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


def _reference(folder, name="m.gguf"):
    """transformers' own GGUF loader: its dequantization, un-permutation and config mapping."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def _param(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_weights_and_logits_match_transformers_gguf_loader(tmp_path, qtype):
    tie = qtype in ("Q8_0", "Q4_1", "Q5_K")  # both with and without output.weight
    write_tiny_gguf(tmp_path / "m.gguf", qtype, tie=tie)
    out = convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    hf = _reference(tmp_path)
    m = load(out, dtype=jnp.float32)
    assert m.config.tie_word_embeddings == tie and m.config.num_heads != m.config.num_kv_heads  # GQA
    from flax import nnx

    ours = nnx.to_pure_dict(m.params)
    compared = 0
    for name, w in hf.state_dict().items():
        for path, value in hf_targets(m.config, name, w.numpy()):
            np.testing.assert_allclose(_param(ours, path), value, atol=1e-4, rtol=0, err_msg=name)
            compared += 1
    assert compared == len(nnx.to_flat_state(m.params))
    tokens = random_tokens(0, (1, 12), m.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(kvjax.logits(m, tokens)), ref, atol=1e-4, rtol=0)


def test_unpermute_inverts_llama_cpp_row_interleave():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    interleaved = interleave_rows(w, 4)
    assert not np.array_equal(interleaved, w)
    np.testing.assert_array_equal(unpermute_rows(interleaved, 4), w)
    # a head's rows come back as [first rotary half; second half]: GGUF row 2i+c -> row c*D/2+i
    np.testing.assert_array_equal(unpermute_rows(interleaved, 4)[:16:8], interleaved[:2])


def test_config_from_metadata(tmp_path):
    sizes = dict(SMALL, head_dim=32)  # key_length differs from hidden / heads
    write_tiny_gguf(
        tmp_path / "m.gguf",
        "F16",
        vocab="gpt2",
        sizes=sizes,
        extra_metadata={"llama.rope.freq_base": ("float32", 50000.0), "llama.context_length": ("uint32", 4096)},
    )
    m = load(convert(tmp_path / "m.gguf", tmp_path / "out", progress=False), dtype=jnp.float32)
    c = m.config
    assert (c.family, c.hidden_size, c.intermediate_size, c.num_layers) == ("llama", 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (4, 2, 32, 4096)
    assert (c.rope.kind, c.rope.theta, c.rms_norm_eps) == ("default", 50000.0, pytest.approx(1e-6))
    assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id, c.tie_word_embeddings) == (0, (1,), 2, False)
    assert c.vocab_size == m.tokenizer.vocab_size
    info = json.loads((tmp_path / "out" / "kvjax.json").read_text())
    assert info["dtype"] == "float32" and info["gguf_metadata"]["llama.block_count"] == 2
    tokens = random_tokens(1, (1, 10), c.vocab_size)
    with torch.no_grad():
        ref = _reference(tmp_path)(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(kvjax.logits(m, tokens)), ref, atol=1e-4, rtol=0)


def test_linear_rope_scaling_is_read(tmp_path):
    write_tiny_gguf(
        tmp_path / "m.gguf",
        layers=1,
        extra_metadata={"llama.rope.scaling.type": ("string", "linear"), "llama.rope.scaling.factor": ("float32", 4.0)},
    )
    rope = load(convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)).config.rope
    assert (rope.kind, rope.factor) == ("linear", 4.0)


@pytest.mark.parametrize("vocab", ["gpt2", "llama"])
def test_tokenizer_and_chat_template_match_transformers(tmp_path, vocab):
    write_tiny_gguf(tmp_path / "m.gguf", vocab=vocab, layers=1)
    ours = load(convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "needle  hides\n in a café, haystack!",
        " leading space, tokens and positions",
        "<s> keys</s>",
    ]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        if "<" not in text and not text.startswith(" "):  # SentencePiece drops a leading space, as designed
            assert ours.decode(ids) == text
    assert ours.encode("<s> keys</s>")[-1] == ours.token_id("</s>")  # special tokens stay whole
    messages = [{"role": "user", "content": "Where is the needle?"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours.encode_chat(messages)[0] == ours.token_id("<s>")
    assert ours.padding_id() == (2 if vocab == "gpt2" else ours.token_id("</s>"))


def test_cli_converts_gguf(tmp_path, capsys):
    from kvjax.cli import main

    write_tiny_gguf(tmp_path / "m.gguf", "Q8_0", layers=1)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "bf16" / "kvjax.json").read_text())["dtype"] == "bfloat16"
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "bf16")]) == 2
    assert "already exists" in capsys.readouterr().err


# --- damaged files: one named error each, and no output or staging folder left behind ---


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("good") / "m.gguf", layers=1)


def _assert_fails_cleanly(source, out, match, error=ConversionError):
    with pytest.raises(error, match=match):
        convert(source, out, progress=False)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_magic(good_gguf, tmp_path):
    data = bytearray(good_gguf.read_bytes())
    data[:4] = b"GGUX"
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    _assert_fails_cleanly(tmp_path / "bad.gguf", tmp_path / "out", r"bad\.gguf is not a GGUF file: bad magic")


@pytest.mark.parametrize("keep", [0.5, 0.02])  # in the tensor data; in the header
def test_truncated_file(good_gguf, tmp_path, keep):
    data = good_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    _assert_fails_cleanly(tmp_path / "cut.gguf", tmp_path / "out", r"cut\.gguf.*truncated")


def test_unsupported_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, arch="falcon")
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"unsupported architecture 'falcon'")


def test_unsupported_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, replace_tensors={"output_norm.weight": np.ones(64, np.float64)})
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"'output_norm\.weight'.*type F64")


def test_missing_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, drop_tensors=("blk.0.ffn_up.weight",))
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"lacks tensors blk\.0\.ffn_up\.weight")


def test_unexpected_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, replace_tensors={"blk.0.attn_extra.weight": np.ones(8, np.float32)})
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"unexpected tensor 'blk\.0\.attn_extra\.weight'")


def test_misshaped_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, replace_tensors={"output_norm.weight": np.ones(65, np.float32)})
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"'output_norm\.weight'.*shape \(65,\).*\(64,\)")


def test_missing_metadata_key(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, drop_keys=("llama.feed_forward_length",))
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"lacks metadata key 'llama\.feed_forward_length'")


def test_llama3_rope_factors_are_refused(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, replace_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"rope_freqs\.weight \(llama3-style")


def test_unsupported_rope_scaling(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", layers=1, extra_metadata={"llama.rope.scaling.type": ("string", "yarn")})
    _assert_fails_cleanly(tmp_path / "m.gguf", tmp_path / "out", r"unsupported llama\.rope\.scaling\.type 'yarn'")


def test_existing_output_is_never_overwritten(good_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(good_gguf, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    shutil.rmtree(tmp_path / "out")
