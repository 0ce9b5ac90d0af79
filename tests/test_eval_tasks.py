"""RULER-style tasks: deterministic by seed, answers present once at the requested depth, fitted to budgets."""

from __future__ import annotations

import pytest

from kvjax.eval.haystack import NoiseHaystack, ProseHaystack, TextDirHaystack, haystack_from_name
from kvjax.eval.prompting import encode_prompt, resolve_chat
from kvjax.eval.tasks import (
    char_match,
    default_tasks,
    digit_match,
    get_task,
    make_sample,
    make_samples,
    string_match_all,
    string_match_part,
)
from kvjax.tokenizer import Tokenizer
from kvjax.train.byte_tokenizer import BOS_ID, write_byte_tokenizer

NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey")


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(directory)
    return Tokenizer(directory)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """The tiny checkpoints' BPE tokenizer: its template is <s><|user|>...</s><|assistant|>."""
    from checkpoints_convert.tiny_checkpoints import build_tokenizer

    directory = tmp_path_factory.mktemp("chat")
    build_tokenizer(directory)
    return Tokenizer(directory)


def test_byte_tokenizer_round_trips_any_text(byte_tok):
    text = "Needle: 1234567.\n\tÜnïcödé 😀 and bytes"
    ids = byte_tok.encode(text)
    assert ids[0] == BOS_ID and ids[1:] == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text


@pytest.mark.parametrize("name", list(default_tasks()))
def test_samples_are_deterministic_by_seed(byte_tok, name):
    task = get_task(name)
    a, b = make_sample(task, byte_tok, 1500, seed=7, depth=0.4), make_sample(task, byte_tok, 1500, seed=7, depth=0.4)
    assert a == b
    c = make_sample(task, byte_tok, 1500, seed=8, depth=0.4)
    assert c.answers != a.answers and c.prompt != a.prompt
    # the needle depends on (task, seed) only: the same answers at another length and depth
    assert make_sample(task, byte_tok, 3000, seed=7, depth=0.9).answers == a.answers


@pytest.mark.parametrize("name", NIAH)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_answers_appear_once_at_the_requested_depth(byte_tok, name, depth):
    s = make_sample(get_task(name), byte_tok, 2048, seed=3, depth=depth)
    for answer in s.answers:
        assert s.prompt.count(answer) == 1, answer
    assert abs(s.depth - depth) < 0.03
    found = s.context.find(s.answers[0]) / len(s.context)  # independent of the generator's bookkeeping
    assert abs(found - depth) < 0.05
    assert s.prompt.endswith(" is") or s.prompt.endswith(" are")
    assert string_match_all(s.target, s.answers) == 1.0


def test_variable_tracking_chain(byte_tok):
    s = make_sample(get_task("vt"), byte_tok, 2048, seed=5, depth=0.3)
    assert len(s.answers) == 5 and len(set(s.answers)) == 5
    value = s.context.split(f"VAR {s.answers[0]} = ")[1].split(".")[0]
    assert value.isdigit() and s.context.count(value) == 1
    for prev, var in zip(s.answers, s.answers[1:]):  # each hop once, after the previous one
        hop = f"VAR {var} = VAR {prev}."
        assert s.context.count(hop) == 1
        assert s.context.index(hop) > s.context.index(f"VAR {prev} =")
    assert abs(s.context.index(f"VAR {s.answers[0]} =") / len(s.context) - 0.3) < 0.05


@pytest.mark.parametrize("length", [600, 1000, 4096])
@pytest.mark.parametrize("name", ["niah_single", "niah_multivalue", "vt"])
def test_prompts_fill_the_token_budget(byte_tok, name, length):
    s = make_sample(get_task(name), byte_tok, length, seed=1)
    assert s.num_tokens == len(byte_tok.encode(s.prompt)) <= length
    assert s.num_tokens > length - 160  # within one haystack unit (a prose sentence) of the budget


def test_any_tokenizer_works_even_a_word_counter():
    count_words = lambda text: len(text.split())  # noqa: E731
    s = make_sample(get_task("niah_multikey"), count_words, 900, seed=2, depth=0.5)
    assert 850 < count_words(s.prompt) <= 900


def test_too_short_a_budget_names_the_problem(byte_tok):
    with pytest.raises(ValueError, match="too short"):
        make_sample(get_task("niah_multiquery"), byte_tok, 100, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("niah_quadruple")
    with pytest.raises(ValueError, match="depth"):
        make_sample(get_task("passkey"), byte_tok, 1000, seed=0, depth=1.5)


def test_make_samples_spread_depths(byte_tok):
    samples = make_samples(get_task("passkey"), byte_tok, 1000, 5, seed=10)
    assert [s.seed for s in samples] == [10, 11, 12, 13, 14]
    assert [round(s.depth, 1) for s in samples] == [0.0, 0.2, 0.5, 0.8, 1.0] or all(
        abs(s.depth - d) < 0.05 for s, d in zip(samples, [0, 0.25, 0.5, 0.75, 1])
    )


def test_haystacks(tmp_path, byte_tok):
    assert NoiseHaystack().units(0, 7)[5] == "The grass is green."
    prose = ProseHaystack()
    assert prose.units(3, 10) == prose.units(3, 20)[:10] and prose.units(3, 10) != prose.units(4, 10)
    assert not any(ch.isdigit() for ch in " ".join(prose.units(0, 200)))
    (tmp_path / "b.txt").write_text("Second file. It has two sentences.")
    (tmp_path / "a.txt").write_text("First file!  Where are we? Here.")
    folder = haystack_from_name(str(tmp_path))
    assert isinstance(folder, TextDirHaystack) and len(folder.sentences) == 5
    assert len(folder.units(0, 12)) == 12  # wraps around
    s = make_sample(get_task("niah_single", folder), byte_tok, 800, seed=0, depth=0.5)
    assert s.prompt.count(s.answers[0]) == 1 and "file" in s.prompt
    with pytest.raises(ValueError, match="unknown haystack"):
        haystack_from_name("grass")


def test_ruler_metrics():
    assert string_match_all("The numbers are 12 and 34.", ("12", "34", "56")) == pytest.approx(2 / 3)
    assert string_match_all("abc", ("ABC",)) == 1.0
    assert string_match_part("only 34", ("12", "34")) == 1.0 and string_match_part("none", ("12",)) == 0.0


@pytest.mark.parametrize("name", list(default_tasks()))
def test_chat_prompts_render_the_template_and_end_with_the_answer_prefix(chat_tok, name):
    task, length = get_task(name), 1024
    s = make_sample(task, chat_tok, length, seed=6, depth=0.5, chat=True)
    assert s.chat and s.prompt.startswith("<s><|user|>") and s.prompt.count("<|user|>") == 1
    assert s.prompt.index(s.context) < s.prompt.index("</s><|assistant|>")  # the context is in the user turn
    assert s.prompt.endswith("</s><|assistant|>" + s.answer_prefix)
    assert s.answer_prefix.split()[-1] in ("is", "are", "are:")
    assert all(a in s.context and a not in s.answer_prefix for a in s.answers)
    ids = encode_prompt(chat_tok, s.prompt, chat=True)
    assert ids.count(chat_tok.token_id("<s>")) == 1  # the template's BOS, none added on top
    # counted as the model sees it: at most the budget, and short of it by less than one more haystack unit
    # (the haystack grows unit by unit; +2 for BPE merges across the unit's boundaries)
    unit = max(
        len(chat_tok.encode(u + task.haystack.joiner, add_special_tokens=False)) for u in task.haystack.units(0, 200)
    )
    assert s.num_tokens == len(ids) <= length
    assert s.num_tokens > length - unit - 2


@pytest.mark.parametrize("name", ["niah_single", "niah_multiquery", "passkey", "vt"])
def test_chat_and_plain_prompts_ask_the_same(chat_tok, name):
    """The chat prompt's user turn is the plain prompt's instruction (for its own context), the answer prefix
    the plain prompt's last words."""
    plain = make_sample(get_task(name), chat_tok, 900, seed=2, depth=0.3)
    chat = make_sample(get_task(name), chat_tok, 900, seed=2, depth=0.3, chat=True)
    assert not plain.chat and plain.answers == chat.answers and plain.answer_prefix == chat.answer_prefix
    assert plain.prompt.endswith(" " + plain.answer_prefix) and "<|" not in plain.prompt
    instruction = plain.prompt[: -len(plain.answer_prefix) - 1].replace(plain.context, chat.context)
    user = chat_tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True)
    assert chat.prompt == user + chat.answer_prefix
    assert plain.num_tokens == len(chat_tok.encode(plain.prompt)) <= 900  # plain: BOS added by encode


def test_plain_format_is_kept_without_a_template(byte_tok, chat_tok):
    assert byte_tok.chat_template is None and resolve_chat(byte_tok, None) is False
    assert resolve_chat(chat_tok, None) is True and resolve_chat(chat_tok, False) is False
    with pytest.raises(ValueError, match="chat template"):
        resolve_chat(byte_tok, True)
    with pytest.raises(ValueError, match="chat template"):
        make_sample(get_task("passkey"), byte_tok, 600, seed=0, chat=True)
    for name in default_tasks():
        auto = make_sample(get_task(name), byte_tok, 700, seed=9, depth=0.6, chat=resolve_chat(byte_tok, None))
        assert auto == make_sample(get_task(name), byte_tok, 700, seed=9, depth=0.6)
    s = make_sample(get_task("niah_single"), byte_tok, 700, seed=9, depth=0.6)
    key = s.answer_prefix.split(" for ")[1].split(" in ")[0]
    assert s.prompt == (
        "A special magic number is hidden in the text below. Memorize it; I will ask you about it afterwards.\n"
        + s.context
        + f"\nWhat is the special magic number for {key} in the text above? "
        f"The special magic number for {key} in the text above is"
    )


def test_digit_match_gives_partial_credit_per_position():
    assert char_match("1234567", "1234560") == pytest.approx(6 / 7)
    assert digit_match("1234560", ("1234567",)) == pytest.approx(6 / 7)
    assert digit_match("The special magic number is: 1234560.\nDone", ("1234567",)) == pytest.approx(6 / 7)
    assert digit_match("1234567", ("1234567",)) == 1.0 == digit_match(" 991234567 more", ("1234567",))  # verbatim
    assert digit_match("no number here", ("1234567",)) == 0.0 == digit_match("", ("1234567",))
    assert digit_match("123", ("1234567",)) == pytest.approx(3 / 7)  # a cut-off number: its digits count
    assert digit_match("12 then 1234500 then 1", ("1234567",)) == pytest.approx(5 / 7)  # the best candidate
    assert digit_match("134567", ("1234567",)) == pytest.approx(1 / 7)  # a dropped digit misaligns the rest
    assert digit_match("1234567, 7654000.", ("1234567", "7654321")) == pytest.approx((1 + 4 / 7) / 2)
    assert digit_match("only 7654321", ("1234567", "7654321")) == pytest.approx((1 / 7 + 1) / 2)  # its middle 4


def test_digit_match_on_words_uuids_and_variables():
    assert digit_match("It is BRIGHT-CANDLE.", ("bright-candle",)) == 1.0
    assert digit_match("bright-candel", ("bright-candle",)) == pytest.approx(11 / 13)
    assert digit_match("bright candle", ("bright-candle",)) == pytest.approx(6 / 13)  # split: "bright" is best
    uid = "3f2b8c1e-0d4a-4e5f-9a7b-1c2d3e4f5a6b"
    assert digit_match(f"the uuid {uid[:-1]}0.", (uid,)) == pytest.approx(35 / 36)
    assert digit_match(" ABCDX, FGHIJ.", ("ABCDE", "FGHIJ")) == pytest.approx((4 / 5 + 1) / 2)


def test_digit_match_is_never_below_string_match_all():
    cases = [
        ("The numbers are 12 and 34.", ("12", "34", "56")),
        ("abc", ("ABC",)),
        ("x12345y", ("2345",)),
        ("1234 5678", ("12345678",)),
        ("VAR ABCDE", ("ABCDE", "QQQQQ")),
    ]
    for prediction, answers in cases:
        assert digit_match(prediction, answers) >= string_match_all(prediction, answers)
    assert digit_match("1234 5678", ("12345678",)) == pytest.approx(4 / 8)
