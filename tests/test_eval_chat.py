"""`run_eval` on a model whose tokenizer has a chat template: prompts rendered and encoded as chat, and scored
by exact match and by digit_match."""

from __future__ import annotations

import pytest

import kvjax
from kvjax.eval.harness import EvalConfig, run_eval
from kvjax.eval.results import format_table
from tests.support.chat_model import build_chat_model


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat-model"))


def _run(m, monkeypatch, chat):
    seen = []
    generate = kvjax.generate

    def spy(model, ids, *args, **kwargs):
        seen.extend(ids)
        return generate(model, ids, *args, **kwargs)

    monkeypatch.setattr(kvjax, "generate", spy)
    config = EvalConfig(
        tasks=("passkey",), lengths=(300,), samples=2, timing=False, chat=chat, max_new_tokens=4, query_aware=True
    )  # the whole prompt in one generate call
    rows, samples = run_eval(m, [kvjax.policies.Full()], config, progress=False)
    return rows, samples, seen


def test_eval_renders_chat_prompts_when_the_tokenizer_has_a_template(chat_model, monkeypatch):
    rows, samples, seen = _run(chat_model, monkeypatch, chat=None)
    tok = chat_model.tokenizer
    assert rows[0]["chat"] is True and 0.0 <= rows[0]["accuracy"] <= rows[0]["digits"] <= 1.0
    assert rows[0]["digits"] == pytest.approx(sum(s["digits"] for s in samples) / len(samples))
    assert "digits" in format_table(rows).splitlines()[0]
    assert len(seen) == 2
    for ids, sample in zip(seen, samples):
        text = tok.decode(ids, skip_special_tokens=False)
        assert text.startswith("<s><|user|>") and text.endswith("</s><|assistant|>The pass key is")
        assert ids.count(tok.token_id("<s>")) == 1 and len(ids) == sample["num_tokens"] <= 300


def test_eval_plain_prompts_on_request(chat_model, monkeypatch):
    rows, _, seen = _run(chat_model, monkeypatch, chat=False)
    text = chat_model.tokenizer.decode(seen[0], skip_special_tokens=False)
    assert rows[0]["chat"] is False and "<|" not in text and text.startswith("<s>There is an important")
    assert text.endswith("What is the pass key? The pass key is")


def test_chat_option_of_kvjax_eval():
    from kvjax.cli import parser

    assert parser().parse_args(["eval"]).chat is None
    assert parser().parse_args(["eval", "--chat"]).chat is True
    assert parser().parse_args(["eval", "--no-chat"]).chat is False
