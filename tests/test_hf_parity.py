"""Every family and rope variant reproduces transformers (PyTorch, CPU) on converted checkpoints."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from checkpoints_convert.tiny_checkpoints import VARIANTS
from kvjax.checkpoint import load
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers_past_original_context(hf_checkpoints, variant):
    hf_dir, kv_dir = hf_checkpoints(variant)
    m = load(kv_dir, dtype=jnp.float32)
    tokens = random_tokens(0, (2, 600), m.config.vocab_size)  # 600 > the 256-token original context
    with torch.no_grad():
        ref = _hf_model(hf_dir)(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(kvjax.logits(m, tokens))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["llama3", "phi3", "mistral"])
def test_parity_depends_on_the_rope_and_window_details(hf_checkpoints, variant):
    """The tolerance above is tight enough to catch a wrong rope schedule or a missing window."""
    hf_dir, kv_dir = hf_checkpoints(variant)
    m = load(kv_dir, dtype=jnp.float32)
    wrong = dataclasses.replace(m.config, rope=kvjax.RopeConfig(theta=m.config.rope.theta), sliding_windows=())
    tokens = random_tokens(1, (1, 600), m.config.vocab_size)
    good = np.asarray(kvjax.logits(m, tokens))
    bad = np.asarray(kvjax.logits(m.with_config(wrong), tokens))
    assert np.abs(good - bad).max() > 1e-2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_matches_transformers(hf_checkpoints, variant):
    hf_dir, kv_dir = hf_checkpoints(variant)
    m = load(kv_dir, dtype=jnp.float32)
    prompt = random_tokens(2, (1, 20), m.config.vocab_size)
    hf = _hf_model(hf_dir)
    hf.generation_config.eos_token_id = None  # 32 tokens on both sides, EOS or not
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False)
    ours = np.asarray(kvjax.generate(m, prompt, max_new_tokens=32, eos_token_id=()))
    np.testing.assert_array_equal(ours, ref[:, prompt.shape[1] :].numpy())


@pytest.mark.parametrize("prompt_len", [240, 256])
def test_longrope_generation_across_the_original_context(hf_checkpoints, prompt_len):
    """Decoding past Phi-3's original context switches to the long factors the way transformers does
    (it recomputes the cache with them), including a prompt that ends exactly at the switch."""
    hf_dir, kv_dir = hf_checkpoints("phi3")
    m = load(kv_dir, dtype=jnp.float32)
    prompt = random_tokens(3, (1, prompt_len), m.config.vocab_size)
    hf = _hf_model(hf_dir)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False)
    ours = np.asarray(kvjax.generate(m, prompt, max_new_tokens=32, eos_token_id=(), chunk_size=64))
    np.testing.assert_array_equal(ours, ref[:, prompt_len:].numpy())


def test_eos_stops_like_transformers(hf_checkpoints):
    """Rows stop at EOS and are padded afterwards, as transformers' greedy generate does."""
    hf_dir, kv_dir = hf_checkpoints("phi3")
    m = load(kv_dir, dtype=jnp.float32)
    prompt = random_tokens(2, (1, 20), m.config.vocab_size)  # this prompt reaches EOS (id 1) early
    with torch.no_grad():
        ref = _hf_model(hf_dir).generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=32, do_sample=False)
    ref = ref[0, prompt.shape[1] :].numpy()
    assert ref[-1] == m.config.eos_token_ids[0] and len(ref) < 32
    ours = np.asarray(kvjax.generate(m, prompt, max_new_tokens=32))[0]
    np.testing.assert_array_equal(ours[: len(ref)], ref)
    assert (ours[len(ref) :] == m.config.pad_token_id).all()
