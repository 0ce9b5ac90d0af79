"""`prefill_shared`: policies whose prefill attends as Full's share one forward and get their own states."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import kvjax
from kvjax.inference import prefill_shared, shares_prefill
from kvjax.policies import (
    A2SF,
    D2O,
    H2O,
    KIVI,
    TOVA,
    VATP,
    Full,
    Knorm,
    PromptSVD,
    PyramidKV,
    Quest,
    SnapKV,
    StreamingLLM,
    Twilight,
)
from tests.support.random_data import random_tokens

SHARING = (
    Full(),
    SnapKV(compression_ratio=0.5),
    SnapKV(compression_ratio=0.75, per_query_head=True),
    PyramidKV(compression_ratio=0.5),
    Knorm(compression_ratio=0.5),
    H2O(compression_ratio=0.5),
    H2O(compression_ratio=0.75),
    StreamingLLM(compression_ratio=0.5),
    TOVA(compression_ratio=0.5),
    A2SF(compression_ratio=0.5),
    VATP(compression_ratio=0.5),
    D2O(compression_ratio=0.5),
    Quest(),
    Twilight(),
    KIVI(bits=2, group=8, residual=32),  # quantizes once the whole prompt has attended
)


def _assert_same_state(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=1e-5)


def test_each_policy_gets_the_state_and_answer_of_its_own_prefill(tiny_model):
    m = tiny_model
    tokens = [random_tokens(1, 200, m.config.vocab_size), random_tokens(2, 150, m.config.vocab_size)]
    assert all(shares_prefill(m, SHARING, 200))
    states = prefill_shared(m, tokens, SHARING, max_new_tokens=8)
    question = [random_tokens(3, 5, m.config.vocab_size), random_tokens(4, 3, m.config.vocab_size)]
    for policy, state in zip(SHARING, states):
        own = kvjax.prefill(m, tokens, policy, max_new_tokens=8)
        _assert_same_state(state, own)
        assert state.origin == own.origin
        np.testing.assert_array_equal(
            kvjax.generate(m, question, 4, policy, state=state), kvjax.generate(m, question, 4, policy, state=own)
        )


def test_policies_that_change_the_prefill_attention_cannot_share(tiny_model):
    m = tiny_model
    tokens = random_tokens(5, (1, 200), m.config.vocab_size)
    # PromptSVD attends to low-rank keys; in 64-token chunks, H2O attends to what survived the previous chunk
    # and KIVI to the previous chunks quantized.
    kivi, h2o = KIVI(group=8, residual=32), H2O(heavy=20, window=20)
    assert shares_prefill(m, [Full(), kivi, PromptSVD(), h2o], 200) == (True, True, False, True)
    assert shares_prefill(m, [Full(), kivi, h2o], 200, chunk_size=64) == (True, False, False)
    with pytest.raises(ValueError, match=r"^PromptSVD does not prefill as Full does in the shared chunk"):
        prefill_shared(m, tokens, [Full(), PromptSVD()])
    with pytest.raises(ValueError, match=r"^H2O does not prefill as Full"):
        prefill_shared(m, tokens, [SnapKV(budget_tokens=64, window=8), H2O(heavy=20, window=20)], chunk_size=64)
    with pytest.raises(ValueError, match="at least one policy"):
        prefill_shared(m, tokens, [])
