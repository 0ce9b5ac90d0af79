"""Haystacks for needle tests: RULER's repeated noise, seeded synthetic prose, or a folder of .txt files.

Every haystack is a frozen dataclass whose `units(seed, n)` returns the first `n` text units of one
deterministic stream (a prefix of `units(seed, m)` for m > n), so a prompt can be grown or shrunk
unit by unit to fit a token budget without the rest of the sample changing.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

# RULER's "repeat" haystack: the same five sentences, over and over.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# Word lists of the synthetic prose generator (no digits, so numeric needles stay unique).
_SUBJECTS = (
    "the old farmer",
    "a quiet engineer",
    "the river",
    "my neighbour",
    "the committee",
    "a small bird",
    "the city council",
    "the young painter",
    "an elderly sailor",
    "the library",
    "our teacher",
    "the travelling merchant",
    "a curious child",
    "the baker",
    "the orchestra",
    "a tired doctor",
    "the mountain village",
    "the night train",
    "a patient gardener",
    "the lighthouse keeper",
)
_VERBS = (
    "walked along",
    "wrote about",
    "looked at",
    "forgot",
    "repaired",
    "painted",
    "described",
    "visited",
    "argued about",
    "remembered",
    "carried",
    "studied",
    "ignored",
    "admired",
    "cleaned",
    "measured",
    "followed",
    "planted",
    "questioned",
    "collected",
)
_OBJECTS = (
    "the wooden bridge",
    "a forgotten letter",
    "the northern hills",
    "an empty market",
    "the broken clock",
    "a field of barley",
    "the harbour wall",
    "a stack of old maps",
    "the narrow street",
    "a silver kettle",
    "the winter garden",
    "a long novel",
    "the stone chapel",
    "a basket of apples",
    "the muddy road",
    "an unfinished song",
    "the quiet lake",
    "a pair of boots",
    "the crowded station",
    "a faded photograph",
)
_TIMES = (
    "In the morning",
    "After the storm",
    "Every autumn",
    "Later that week",
    "Before dinner",
    "At dawn",
    "During the festival",
    "Long ago",
    "On most evenings",
    "When the snow melted",
)
_CLAUSES = (
    "because nobody else would",
    "while the wind kept rising",
    "as if it mattered a great deal",
    "without saying a word",
    "although it was getting late",
    "and then went home",
    "with great care",
    "for reasons nobody understood",
    "just as the bells rang",
    "before anyone noticed",
)


def _prose_sentence(rng: np.random.Generator) -> str:
    """One grammatical, content-free sentence; a few shapes so the text is not one repeated pattern."""
    subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
    shape = rng.integers(4)
    if shape == 0:
        return f"{rng.choice(_TIMES)}, {subject} {verb} {obj}."
    if shape == 1:
        return f"{subject.capitalize()} {verb} {obj} {rng.choice(_CLAUSES)}."
    if shape == 2:
        return f"{rng.choice(_TIMES)}, {subject} {verb} {obj} {rng.choice(_CLAUSES)}."
    return (
        f"{subject.capitalize()} {verb} {obj}, and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    )


@dataclasses.dataclass(frozen=True)
class NoiseHaystack:
    """RULER's repeated noise: its five sentences cycled, one unit per sentence (fine needle depths)."""

    joiner: str = " "

    def units(self, seed: int, n: int) -> list[str]:
        sentences = _SENTENCE_END.split(NOISE)
        return [sentences[i % len(sentences)] for i in range(n)]


@dataclasses.dataclass(frozen=True)
class ProseHaystack:
    """Seeded synthetic prose: sentence i of a sample is a pure function of (seed, i); no digits."""

    seed: int = 0
    joiner: str = " "

    def units(self, seed: int, n: int) -> list[str]:
        rng = np.random.default_rng([self.seed, seed])
        return [_prose_sentence(rng) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class TextDirHaystack:
    """Sentences of every .txt file in a folder (sorted by name), read once; each sample starts at a
    seeded offset and wraps around, so any length can be filled."""

    directory: str
    joiner: str = " "
    sentences: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        folder = Path(self.directory)
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise ValueError(f"haystack folder {folder} has no .txt files")
        text = " ".join(re.sub(r"\s+", " ", f.read_text(encoding="utf-8", errors="replace")) for f in files)
        sentences = tuple(s for s in _SENTENCE_END.split(text.strip()) if s)
        object.__setattr__(self, "sentences", sentences)

    def units(self, seed: int, n: int) -> list[str]:
        start = int(np.random.default_rng(seed).integers(len(self.sentences)))
        return [self.sentences[(start + i) % len(self.sentences)] for i in range(n)]


Haystack = NoiseHaystack | ProseHaystack | TextDirHaystack


def haystack_from_name(name: str) -> Haystack:
    """`noise`, `prose`, or a folder of .txt files (e.g. the essays of the public needle-in-a-haystack test)."""
    if name == "noise":
        return NoiseHaystack()
    if name == "prose":
        return ProseHaystack()
    if Path(name).is_dir():
        return TextDirHaystack(str(name))
    raise ValueError(f"unknown haystack {name!r}: expected 'noise', 'prose' or a folder of .txt files")


def plain_text(haystack: Haystack, seed: int, n_units: int) -> str:
    """Haystack text with no needle (plain language-model training data)."""
    return haystack.joiner.join(haystack.units(seed, n_units))
