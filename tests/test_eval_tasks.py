"""RULER-style tasks: deterministic by seed, answers present once at the requested depth, fitted to budgets."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvjax.eval.haystack import NoiseHaystack, ProseHaystack, TextDirHaystack, haystack_from_name
from kvjax.eval.tasks import default_tasks, get_task, make_sample, make_samples, string_match_all, string_match_part
from kvjax.tokenizer import Tokenizer
from kvjax.train.byte_tokenizer import BOS_ID, write_byte_tokenizer

ESSAYS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "haystack" / "PaulGrahamEssays"
NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey")


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(directory)
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
        abs(s.depth - d) < 0.05 for s, d in zip(samples, [0, 0.25, 0.5, 0.75, 1]))


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


@pytest.mark.skipif(not ESSAYS.is_dir(), reason=f"{ESSAYS} is absent (shared data not mounted)")
def test_paul_graham_essays_haystack(byte_tok):
    essays = haystack_from_name(str(ESSAYS))
    for name in ("niah_single", "niah_multikey"):
        s = make_sample(get_task(name, essays), byte_tok, 8192, seed=4, depth=0.6)
        assert 7500 < s.num_tokens <= 8192 and s.prompt.count(s.answers[0]) == 1 and abs(s.depth - 0.6) < 0.02


def test_ruler_metrics():
    assert string_match_all("The numbers are 12 and 34.", ("12", "34", "56")) == pytest.approx(2 / 3)
    assert string_match_all("abc", ("ABC",)) == 1.0
    assert string_match_part("only 34", ("12", "34")) == 1.0 and string_match_part("none", ("12",)) == 0.0
