"""The public API of the README, exactly as users write it, on a converted checkpoint."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import kvjax
from tests.support.random_data import random_tokens


def test_design_public_api(hf_checkpoints):
    _, path = hf_checkpoints("llama3")
    m = kvjax.load(path, dtype=jnp.bfloat16)
    tokens = random_tokens(0, (2, 48), m.config.vocab_size)
    logits = kvjax.logits(m, tokens)
    assert logits.shape == (2, 48, m.config.vocab_size) and logits.dtype == jnp.float32
    out = kvjax.generate(m, tokens, max_new_tokens=64, policy=None)
    assert out.shape == (2, 64) and out.dtype == jnp.int32
    state = kvjax.prefill(m, tokens, policy=None)
    policy = kvjax.policies.SnapKV(budget_tokens=24, window=8)
    small = kvjax.prefill(m, tokens, policy=policy)
    assert 0 < kvjax.kv_bytes(small) < kvjax.kv_bytes(state)
    np.testing.assert_array_equal(np.asarray(state.length), [48, 48])
    assert all(
        name in kvjax.policies.__all__
        for name in (
            "Full",
            "StreamingLLM",
            "H2O",
            "A2SF",
            "SnapKV",
            "PyramidKV",
            "TOVA",
            "Knorm",
            "VATP",
            "AdaKV",
            "RazorAttention",
            "DuoAttention",
            "KIVI",
            "QuantizedPruning",
        )
    )
