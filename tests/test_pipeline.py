"""Text in, answer out: the tokenizer's transformers-style surface, prefill continuing a state, and
`kvjax.pipeline` (query-agnostic by default, several questions on one compressed context)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.policies import Full, SnapKV, StreamingLLM
from tests.support.chat_model import build_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("pipeline-model"))


@pytest.fixture(scope="module")
def needle():
    return kvjax.load("needle-llama", dtype=jnp.float32)


def test_tokenizer_is_callable_and_names_its_special_ids(chat_model):
    tok = chat_model.tokenizer
    assert tok("a cat")["input_ids"] == tok.encode("a cat")
    assert tok(["a cat", "dog"])["input_ids"] == [tok.encode("a cat"), tok.encode("dog")]
    assert tok.eos_token_id == chat_model.config.eos_token_ids[0] and tok.bos_token_id is not None
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=True) == tok.encode(
        tok.apply_chat_template(messages), add_special_tokens=False
    )
    with pytest.raises(ValueError, match="string"):
        tok(3)


@pytest.mark.parametrize("policy", [Full(), SnapKV(budget_tokens=96, window=8)], ids=["full", "snapkv"])
def test_prefill_continues_a_state_as_one_prefill_of_the_concatenation(needle, policy):
    rng = np.random.default_rng(0)
    context, question = rng.integers(3, 250, 300).tolist(), rng.integers(3, 250, 7).tolist()
    state = kvjax.prefill(needle, [context], policy, max_new_tokens=len(question) + 4)
    continued = kvjax.prefill(needle, [question], policy, state=state)
    assert int(continued.length[0]) == len(context) + len(question)
    nxt = jnp.asarray([5])
    got, _ = kvjax.decode_step(needle, continued, nxt, policy)
    if isinstance(policy, Full):  # nothing dropped: the same as one prefill of context + question
        whole = kvjax.prefill(needle, [context + question], policy, max_new_tokens=4)
        want, _ = kvjax.decode_step(needle, whole, nxt, policy)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    else:  # the context compressed alone, then the question appended exactly, token by token
        manual = kvjax.prefill(needle, [context], policy, max_new_tokens=len(question) + 4)
        for token in question:
            _, manual = kvjax.decode_step(needle, manual, jnp.asarray([token]), policy)
        want, _ = kvjax.decode_step(needle, manual, nxt, policy)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_continuation_takes_ragged_rows_and_refuses_what_does_not_fit(needle):
    rng = np.random.default_rng(1)
    contexts = [rng.integers(3, 250, n).tolist() for n in (200, 260)]
    questions = [rng.integers(3, 250, n).tolist() for n in (3, 6)]
    continued = kvjax.prefill(needle, questions, state=kvjax.prefill(needle, contexts, max_new_tokens=8))
    assert continued.length.tolist() == [203, 266]
    got, _ = kvjax.decode_step(needle, continued, jnp.asarray([7, 7]))
    for row, (c, q) in enumerate(zip(contexts, questions)):  # each row as if it ran alone, in one prefill
        want, _ = kvjax.decode_step(needle, kvjax.prefill(needle, [c + q], max_new_tokens=2), jnp.asarray([7]))
        np.testing.assert_allclose(got[row], want[0], atol=1e-5, rtol=1e-5)
    small = kvjax.prefill(needle, [contexts[0]], max_new_tokens=2)  # Full: room up to its rounded capacity
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvjax.prefill(needle, [rng.integers(3, 250, 40).tolist()], state=small)
    with pytest.raises(ValueError, match="one row per sequence"):
        kvjax.prefill(needle, questions, state=kvjax.prefill(needle, [contexts[0]], max_new_tokens=8))
    with pytest.raises(ValueError, match="max_new_tokens sizes a new state"):
        kvjax.prefill(
            needle, [questions[0]], state=kvjax.prefill(needle, [contexts[0]], max_new_tokens=8), max_new_tokens=4
        )


def test_compression_ratio_keeps_what_the_equal_budget_keeps(needle):
    prompt = np.random.default_rng(2).integers(3, 250, 400).tolist()
    by_ratio = kvjax.prefill(needle, [prompt], SnapKV(window=8, compression_ratio=0.75), max_new_tokens=4)
    by_budget = kvjax.prefill(needle, [prompt], SnapKV(window=8, budget_tokens=100), max_new_tokens=4)  # 400 * 0.25
    for a, b in zip(jax.tree.leaves(by_ratio), jax.tree.leaves(by_budget)):
        np.testing.assert_array_equal(a, b)
    kept = by_ratio.layers[0][0].pos
    assert int(jnp.sum(kept[0, 0] >= 0)) == 100
    step, _ = kvjax.decode_step(needle, by_ratio, jnp.asarray([5]), SnapKV(window=8, compression_ratio=0.75))
    want, _ = kvjax.decode_step(needle, by_budget, jnp.asarray([5]), SnapKV(window=8, budget_tokens=100))
    np.testing.assert_array_equal(step, want)  # decoding resolves the ratio against the same prompt
    with pytest.raises(ValueError, match="compression_ratio does not apply"):
        kvjax.prefill(needle, [prompt], kvjax.policies.KIVI(compression_ratio=0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kvjax.prefill(needle, [prompt], SnapKV(compression_ratio=1.5))


def test_pipeline_answers_as_a_hand_run_prefill_continuation_and_decode(chat_model):
    pipe = kvjax.pipeline(chat_model)
    context, question = "The pass key is 4711. " * 20, "What is the pass key?"
    policy = StreamingLLM(sink=4, window=60)
    out = pipe(context, question, policy=policy, max_new_tokens=6)
    ctx_ids, (q_ids,) = pipe.encode(context, [question], chat=True)
    assert out["context_tokens"] == len(ctx_ids) and out["question_tokens"] == [len(q_ids)]
    state = kvjax.prefill(chat_model, [ctx_ids], policy, max_new_tokens=len(q_ids) + 6)
    assert out["kv_bytes"] == kvjax.kv_bytes(state) < out["full_kv_bytes"]
    tokens = kvjax.generate(chat_model, [q_ids], 6, policy, state=state)
    eos = set(chat_model.config.eos_token_ids)
    row = [int(t) for t in np.asarray(tokens)[0]]
    row = row[: next((i for i, t in enumerate(row) if t in eos), len(row))]
    assert out["answer"] == chat_model.tokenizer.decode(row)
    rendered = chat_model.tokenizer.decode(ctx_ids + q_ids, skip_special_tokens=False)
    assert rendered.index("4711") < rendered.index(question)  # the question follows the compressed context


def test_pipeline_several_questions_share_one_compressed_context(chat_model):
    pipe = kvjax.pipeline(chat_model)
    context = "Alice lives in Paris. Bob lives in Rome. " * 10
    questions = ["Where does Alice live?", "Where does Bob live?"]
    out = pipe(context, questions, policy=SnapKV(budget_tokens=48, window=8), max_new_tokens=4)
    singles = [pipe(context, q, policy=SnapKV(budget_tokens=48, window=8), max_new_tokens=4) for q in questions]
    assert out["answers"] == [s["answer"] for s in singles]
    aware = pipe(context, questions[0], policy=SnapKV(budget_tokens=48, window=8), max_new_tokens=4, query_aware=True)
    assert set(aware) == {"answer", "kv_bytes", "full_kv_bytes", "context_tokens", "question_tokens"}
    plain = pipe(context + questions[0], max_new_tokens=4)  # no question: the context is the prompt
    head, (tail,) = pipe.encode(context + questions[0], [""], chat=True)
    want = np.asarray(kvjax.generate(chat_model, [head + tail], 4))[0].tolist()
    eos = set(chat_model.config.eos_token_ids)
    assert plain["answer"] == chat_model.tokenizer.decode(want[: next((i for i, t in enumerate(want) if t in eos), 4)])
    with pytest.raises(ValueError, match="question"):
        pipe(context, [])
    with pytest.raises(ValueError, match="context"):
        pipe(123, "q")
