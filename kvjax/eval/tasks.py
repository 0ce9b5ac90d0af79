"""RULER-style long-context retrieval tasks: needles, passkey and variable tracking, fitted to a token budget.

Tasks follow RULER's definitions (Hsieh et al., 2024; NVIDIA/RULER `synthetic.yaml`) in kvjax's own
wording: niah_single (1 key, 1 value), niah_multikey (4 keys, one queried, the others distractors),
niah_multivalue (1 key with 4 values, all asked), niah_multiquery (4 keys, all asked), passkey (the
classic pass-key retrieval in repeated noise) and vt (one chain of 4 hops of variable assignments).
Samples are text plus expected answer strings: deterministic functions of (task, seed, depth,
length, tokenizer, chat), with the haystack grown until the prompt, as rendered (kvjax.eval.prompting:
plain, or the chat template with the task's answer prefix pre-filled), fills the token budget.
"""

from __future__ import annotations

import dataclasses
import re
import string
import uuid
import zlib

import numpy as np

from kvjax.eval.haystack import Haystack, NoiseHaystack, ProseHaystack
from kvjax.eval.prompting import Tokenizer, render_prompt, token_counter

# Keys are "adjective-noun" words, as RULER's wonderwords keys.
_ADJECTIVES = (
    "ancient",
    "bitter",
    "brave",
    "bright",
    "calm",
    "clever",
    "crimson",
    "curious",
    "damp",
    "eager",
    "fancy",
    "fragile",
    "gentle",
    "gloomy",
    "golden",
    "hollow",
    "humble",
    "icy",
    "jolly",
    "lazy",
    "loud",
    "lucky",
    "mellow",
    "misty",
    "noble",
    "odd",
    "pale",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rusty",
    "shy",
    "silent",
    "sleepy",
    "smooth",
    "sour",
    "spicy",
    "steady",
    "stormy",
    "sweet",
    "tender",
    "tidy",
    "vast",
    "wicked",
    "wild",
    "witty",
    "wooden",
    "young",
    "zealous",
)
_NOUNS = (
    "anchor",
    "badger",
    "banner",
    "barrel",
    "beacon",
    "blanket",
    "bottle",
    "bucket",
    "cabin",
    "candle",
    "canyon",
    "castle",
    "cherry",
    "cloud",
    "comet",
    "cottage",
    "crystal",
    "desert",
    "dragon",
    "engine",
    "falcon",
    "feather",
    "forest",
    "garden",
    "glacier",
    "harbor",
    "helmet",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "lantern",
    "meadow",
    "mirror",
    "needle",
    "orchard",
    "otter",
    "pebble",
    "pepper",
    "pillow",
    "planet",
    "puzzle",
    "quarry",
    "rabbit",
    "ribbon",
    "saddle",
    "tunnel",
    "violin",
    "walrus",
    "window",
)
# RULER draws random needle depths from 40 evenly spaced percentages.
_DEPTH_GRID = np.linspace(0.0, 1.0, 40)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt and what a correct completion must contain."""

    task: str
    prompt: str
    answers: tuple[str, ...]  # every one must appear in the prediction (RULER's string_match_all)
    target: str  # the completion a model is trained to produce: " a, b, c."
    depth: float  # the share of the context's other characters that precede the first answer's needle
    length: int  # the requested prompt length in tokens
    num_tokens: int  # the prompt's length under the tokenizer it was fitted with (<= length)
    seed: int
    context: str = dataclasses.field(default="", repr=False)  # the haystack with needles, no template
    answer_prefix: str = ""  # the words opening the answer, the prompt's last (pre-filled when chat)
    question: str = ""  # the question as the prompt holds it, after the context
    chat: bool = False  # rendered through the tokenizer's chat template (encode with kvjax.eval.prompting)


@dataclasses.dataclass(frozen=True)
class Draft:
    """A sample before its haystack is sized: needles with depths, and the text around the context.
    The instruction is prefix + context + question; the answer prefix opens the answer."""

    needles: tuple[tuple[str, float], ...]  # (sentence, depth in [0, 1]) in insertion order
    prefix: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    first_needle: int  # index in `needles` of the first answer's needle (its depth is reported)


def random_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "numbers":
        return str(int(rng.integers(1_000_000, 10_000_000)))  # 7 digits, as RULER
    if kind == "words":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    raise ValueError(f"unknown needle kind {kind!r}: expected numbers, words or uuids")


def distinct_values(rng: np.random.Generator, kind: str, count: int) -> list[str]:
    """`count` different random values (no value a substring of another, so each matches once)."""
    out: list[str] = []
    while len(out) < count:
        value = random_value(rng, kind)
        if not any(value in o or o in value for o in out):
            out.append(value)
    return out


def _other_depths(rng: np.random.Generator, count: int) -> list[float]:
    return [float(d) for d in rng.choice(_DEPTH_GRID, size=count)]


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    """RULER's NIAH family: `num_keys` keys with `num_values` values each; `num_queries` keys asked."""

    name: str
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    key_kind: str = "words"
    value_kind: str = "numbers"
    haystack: Haystack = ProseHaystack()  # RULER's default is an essay; kvjax ships synthetic prose
    max_new_tokens: int = 16

    def __post_init__(self):
        if min(self.num_keys, self.num_values, self.num_queries) < 1 or self.num_queries > self.num_keys:
            raise ValueError(f"{self.name}: need 1 <= num_queries <= num_keys and num_values >= 1")

    def draft(self, rng: np.random.Generator, depth: float) -> Draft:
        keys = distinct_values(rng, self.key_kind, self.num_keys)
        values = distinct_values(rng, self.value_kind, self.num_keys * self.num_values)
        kind = {"numbers": "number", "words": "word", "uuids": "uuid"}[self.value_kind]
        queried = [int(i) for i in rng.permutation(self.num_keys)[: self.num_queries]]
        needles, answers = [], []
        for k, key in enumerate(keys):
            for v in range(self.num_values):
                needles.append((f"One special magic {kind} for {key} is: {values[k * self.num_values + v]}.", k, v))
        order = [int(i) for i in rng.permutation(len(needles))]  # RULER shuffles the needles
        needles = [needles[i] for i in order]
        depths = _other_depths(rng, len(needles))
        for q in queried:
            answers += [values[q * self.num_values + v] for v in range(self.num_values)]
        first = next(i for i, (_, k, v) in enumerate(needles) if k == queried[0] and v == 0)
        depths[first] = depth
        query = (
            keys[queried[0]]
            if len(queried) == 1
            else (", ".join(keys[q] for q in queried[:-1]) + f", and {keys[queried[-1]]}")
        )
        if len(answers) == 1:
            prefix = f"A special magic {kind} is hidden in the text below. Memorize it; I will ask you about it afterwards.\n"
            question = f"\nWhat is the special magic {kind} for {query} in the text above?"
            answer_prefix = f"The special magic {kind} for {query} in the text above is"
        else:
            prefix = (
                f"Some special magic {kind}s are hidden in the text below. Memorize them; "
                f"I will ask you about them afterwards.\n"
            )
            question = f"\nWhat are all the special magic {kind}s for {query} in the text above?"
            answer_prefix = f"The special magic {kind}s for {query} in the text above are"
        return Draft(
            tuple((n, d) for (n, _, _), d in zip(needles, depths)),
            prefix,
            question,
            answer_prefix,
            tuple(answers),
            first,
        )


@dataclasses.dataclass(frozen=True)
class PasskeyTask:
    """Pass-key retrieval (Mohtashami & Jaggi, 2023): a 5-digit key hidden in repeated noise."""

    name: str = "passkey"
    haystack: Haystack = NoiseHaystack()
    max_new_tokens: int = 12

    def draft(self, rng: np.random.Generator, depth: float) -> Draft:
        key = str(int(rng.integers(10_000, 100_000)))
        prefix = (
            "There is an important piece of information hidden inside a lot of irrelevant text. "
            "Find it and remember it; I will ask you about it.\n"
        )
        return Draft(
            ((f"The pass key is {key}. Remember it.", depth),),
            prefix,
            "\nWhat is the pass key?",
            "The pass key is",
            (key,),
            0,
        )


@dataclasses.dataclass(frozen=True)
class VariableTrackingTask:
    """RULER's variable tracking: `VAR A = 12345`, then `VAR B = VAR A`, ... (`num_hops` hops); the answer
    is every variable holding the value. The first assignment sits at `depth`, later hops after it."""

    name: str = "vt"
    num_hops: int = 4
    haystack: Haystack = NoiseHaystack()
    max_new_tokens: int = 48

    def draft(self, rng: np.random.Generator, depth: float) -> Draft:
        names: list[str] = []
        while len(names) < self.num_hops + 1:
            name = "".join(rng.choice(list(string.ascii_uppercase), size=5))
            if name not in names:
                names.append(name)
        value = str(int(rng.integers(10_000, 100_000)))
        statements = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(self.num_hops)
        ]
        later = sorted(float(d) for d in rng.uniform(depth, 1.0, size=self.num_hops))
        prefix = "Memorize and track the chain of variable assignments hidden in the text below.\n\n"
        question = f"\nQuestion: Which variables are assigned the value {value} in the text above?"
        answer_prefix = (
            f"Answer: Following the chain of variable assignments in the text above, {self.num_hops + 1} "
            f"variables are assigned the value {value}, they are:"
        )
        return Draft(tuple(zip(statements, [depth] + later)), prefix, question, answer_prefix, tuple(names), 0)


Task = NeedleTask | PasskeyTask | VariableTrackingTask


def default_tasks() -> dict[str, Task]:
    """The suite by name, with RULER's settings (niah_single uses the noise haystack as RULER's niah_single_1)."""
    return {
        "niah_single": NeedleTask("niah_single", haystack=NoiseHaystack()),
        "niah_multikey": NeedleTask("niah_multikey", num_keys=4),
        "niah_multivalue": NeedleTask("niah_multivalue", num_values=4, max_new_tokens=48),
        "niah_multiquery": NeedleTask("niah_multiquery", num_keys=4, num_queries=4, max_new_tokens=48),
        "passkey": PasskeyTask(),
        "vt": VariableTrackingTask(),
    }


def get_task(name: str, haystack: Haystack | None = None) -> Task:
    """A task by name; `haystack` replaces its default haystack."""
    tasks = default_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(tasks)}")
    task = tasks[name]
    return task if haystack is None else dataclasses.replace(task, haystack=haystack)


def _render(draft: Draft, units: list[str], joiner: str) -> tuple[str, float]:
    """The context with needles between haystack units, each placed so that the text before it is the
    closest a unit boundary allows to its depth x the rest of the context; and the first answer's depth."""
    sizes = [len(u) + len(joiner) for u in units]
    total = sum(sizes) + sum(len(n) + len(joiner) for n, _ in draft.needles) - len(joiner)
    slots, offset, slot = [0] * len(draft.needles), 0, 0
    for i in sorted(range(len(draft.needles)), key=lambda i: draft.needles[i][1]):
        needle, depth = draft.needles[i]
        target = depth * (total - len(needle))
        while slot < len(units) and offset + sizes[slot] / 2 <= target:  # pass units whose middle comes first
            offset, slot = offset + sizes[slot], slot + 1
        slots[i], offset = slot, offset + len(needle) + len(joiner)
    pieces: list[str] = []
    start = 0
    for s in range(len(units) + 1):
        for i in sorted((i for i in range(len(draft.needles)) if slots[i] == s), key=lambda i: draft.needles[i][1]):
            if i == draft.first_needle:
                start = sum(len(p) + len(joiner) for p in pieces)
            pieces.append(draft.needles[i][0])
        if s < len(units):
            pieces.append(units[s])
    context = joiner.join(pieces)
    return context, start / max(1, len(context) - len(draft.needles[draft.first_needle][0]))


def _task_seed(task: Task, seed: int) -> list[int]:
    return [seed, zlib.crc32(task.name.encode())]


def make_sample(
    task: Task, tokenizer: Tokenizer, length: int, seed: int, depth: float | None = None, chat: bool = False
) -> Sample:
    """The largest prompt of `task` with at most `length` tokens under `tokenizer`, counted as rendered.

    `depth` in [0, 1] places the first answer's needle (None: drawn from RULER's 40-point grid). The
    needles depend on (task, seed) only, so one seed gives the same needle at every length and depth.
    `chat` renders through the tokenizer's chat template with the answer prefix pre-filled (prompting.py).
    """
    rng = np.random.default_rng(_task_seed(task, seed))
    if depth is None:
        depth = float(rng.choice(_DEPTH_GRID))
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth}")
    draft = task.draft(rng, depth)
    count = token_counter(tokenizer, chat)
    haystack_seed = int(rng.integers(2**31))

    def build(n: int) -> tuple[str, str, float]:
        context, where = _render(draft, task.haystack.units(haystack_seed, n), task.haystack.joiner)
        prompt = render_prompt(tokenizer, draft.prefix + context + draft.question, draft.answer_prefix, chat)
        return prompt, context, where

    if count(build(0)[0]) > length:
        raise ValueError(
            f"{task.name}: {length} tokens is too short; the prompt without any haystack needs {count(build(0)[0])}"
        )
    lo, hi = 0, 8  # invariant: build(lo) fits; grow hi until build(hi) does not
    while count(build(hi)[0]) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(build(mid)[0]) <= length else (lo, mid)
    prompt, context, where = build(lo)
    return Sample(
        task=task.name,
        prompt=prompt,
        answers=draft.answers,
        target=" " + ", ".join(draft.answers) + ".",
        depth=where,
        length=length,
        num_tokens=count(prompt),
        seed=seed,
        context=context,
        answer_prefix=draft.answer_prefix,
        question=draft.question,
        chat=chat,
    )


def make_samples(
    task: Task,
    tokenizer: Tokenizer,
    length: int,
    num_samples: int,
    seed: int = 0,
    spread_depths: bool = True,
    chat: bool = False,
) -> list[Sample]:
    """`num_samples` samples with seeds seed, seed+1, ...; depths evenly spaced over [0, 1] when
    `spread_depths` (for depth x length heatmaps), else drawn as RULER does."""
    depths = np.linspace(0.0, 1.0, num_samples) if num_samples > 1 else np.array([0.5])
    return [
        make_sample(task, tokenizer, length, seed + i, float(depths[i]) if spread_depths else None, chat)
        for i in range(num_samples)
    ]


def string_match_all(prediction: str, answers: tuple[str, ...]) -> float:
    """RULER's metric for NIAH and VT: the fraction of answers found (case-insensitive substring)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: tuple[str, ...]) -> float:
    """RULER's metric for QA: 1 when any answer is found (case-insensitive substring)."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[0-9a-z_-]+")


def char_match(answer: str, candidate: str) -> float:
    """The share of `answer`'s characters that `candidate` repeats at the same position, both aligned at the
    start (case-insensitive): "1234567" vs "1234560" is 6/7, vs "123" 3/7, vs "12345678" 1."""
    return sum(a == c for a, c in zip(answer.lower(), candidate.lower())) / len(answer)


def digit_match(prediction: str, answers: tuple[str, ...]) -> float:
    """string_match_all with partial credit: the mean over `answers` of each answer's score, where an answer
    found verbatim (case-insensitive substring) scores 1, and otherwise the best `char_match` against the
    prediction's candidates: its maximal digit runs for an all-digit answer, else its maximal runs of
    letters, digits, `_` and `-` (words, uuids, variable names). Text around a candidate does not count; a
    dropped or inserted character shifts the rest out of alignment; no candidate scores 0. It is never
    below string_match_all."""
    pred = prediction.lower()
    total = 0.0
    for answer in answers:
        if answer.lower() in pred:
            total += 1.0
            continue
        candidates = (_NUMBER if answer.isdigit() else _WORD).findall(pred)
        total += max((char_match(answer, c) for c in candidates), default=0.0)
    return total / len(answers)
