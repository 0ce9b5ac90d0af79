"""The Retrieval Head paper's detector (Wu et al., 2024): which heads copy-paste a needle.

While greedily decoding the answer to a needle question, a head scores 1/|needle| at each step whose
top-1 attended position lies inside the needle and holds the token just generated. A head's score
is its mean over the tests answered correctly; heads above 0.1 are retrieval heads. As the authors'
code, the prompt minus its last token is prefilled and every decode step, from the one that feeds
the prompt's last token, is scored. Scores are per query head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.attention import attend, attend_with_probs
from kvjax.kv_state import empty_segment, write_entries

PROMPT = (
    "This is a very long story book: <book> {context} </book>.\n"
    "Based on the content of the book, Question: {question}\nAnswer:"
)


@dataclasses.dataclass(frozen=True)
class NeedleTest:
    """A prompt with a needle at tokens [needle_start, needle_end) and what a correct answer contains."""

    prompt: tuple[int, ...]
    needle_start: int
    needle_end: int
    answer: tuple[int, ...] | None = None  # None: every answer counts as correct
    min_recall: float = 0.5  # share of the answer's tokens a correct generation contains

    def __post_init__(self):
        if not 0 <= self.needle_start < self.needle_end <= len(self.prompt):
            raise ValueError(
                f"needle span [{self.needle_start}, {self.needle_end}) is not inside the "
                f"{len(self.prompt)}-token prompt"
            )

    def correct(self, generated: Sequence[int]) -> bool:
        """Whether the generation recalls at least `min_recall` of the answer's tokens (multiset
        overlap; a token-level stand-in for the paper's ROUGE > 50 between answer and needle)."""
        if self.answer is None:
            return True
        left, hits = list(generated), 0
        for token in self.answer:
            if token in left:
                left.remove(token)
                hits += 1
        return hits >= self.min_recall * len(self.answer)


def needle_test(
    haystack: Sequence[int],
    needle: Sequence[int],
    suffix: Sequence[int],
    depth: float,
    prefix: Sequence[int] = (),
    answer: Sequence[int] | None = None,
) -> NeedleTest:
    """prefix + haystack with the needle inserted at `depth` in [0, 1] + suffix (the question), as ids."""
    if not 0 <= depth <= 1 or not needle:
        raise ValueError(f"depth must lie in [0, 1] and the needle be non-empty; got {depth}, {len(needle)} tokens")
    cut = int(round(depth * len(haystack)))
    start = len(prefix) + cut
    prompt = (*prefix, *haystack[:cut], *needle, *haystack[cut:], *suffix)
    return NeedleTest(
        tuple(int(t) for t in prompt),
        start,
        start + len(needle),
        None if answer is None else tuple(int(t) for t in answer),
    )


def haystack_tests(
    encode: Callable[[str], list[int]],
    context_lengths: Sequence[int],
    depths: Sequence[float],
    root: str | Path,
    bos: Sequence[int] = (),
) -> list[NeedleTest]:
    """Tests from a haystack folder laid out as the paper's public data (`root/PaulGrahamEssays/*.txt`
    and `root/retrieval_head_needles.jsonl`), one per (needle, context length, depth). `encode(text)`
    returns ids without special tokens."""
    root = Path(root)
    needles_file, essays = root / "retrieval_head_needles.jsonl", sorted((root / "PaulGrahamEssays").glob("*.txt"))
    if not needles_file.exists() or not essays:
        raise ValueError(f"no haystack at {root}: expected retrieval_head_needles.jsonl and PaulGrahamEssays/")
    text = "".join(p.read_text(encoding="utf-8") for p in essays)
    head, tail = PROMPT.split("{context}")
    tests = []
    for line in needles_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        needle, answer = encode(" " + item["needle"] + " "), encode(item["real_needle"])
        prefix, suffix = encode(head), encode(tail.format(question=item["question"]))
        for length in context_lengths:
            room = length - len(prefix) - len(needle) - len(suffix) - len(bos)
            if room < 1:
                raise ValueError(f"context length {length} leaves no room for the haystack")
            hay = encode(text[: 8 * room])[:room]  # ~4 chars per token: enough text, then truncate
            for depth in depths:
                tests.append(needle_test(hay, needle, suffix, depth, (*bos, *prefix), answer))
    return tests


def _record_step(recording, ctx, carry, shared, x):
    """Full-cache step (slot = position) that also returns each query head's top-1 attended position
    for the chunk's last query (only when recording: prefill does not build the weights)."""
    seg, _ = carry
    b, t, kh, g, _ = x.q.shape
    seg = write_entries(seg, x.k, x.v, x.new_pos, x.q_pos[:, 0])
    if not recording:
        out = attend(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale)
        return out, (seg, jnp.full((b, kh * g), -1, jnp.int32)), shared
    out, probs = attend_with_probs(x.q, seg.k, seg.v, seg.pos, x.q_pos, ctx.window, ctx.scale)  # [B, K, G, T, C]
    slot = jnp.argmax(probs[:, :, :, -1, :], axis=-1)  # [B, K, G]
    top = jnp.take_along_axis(seg.pos[:, :, None, :], slot[..., None], axis=-1)[..., 0]  # [B, K, G]
    return out, (seg, top.reshape(b, kh * g)), shared


@functools.partial(jax.jit, static_argnames=("graphdef", "recording"), donate_argnames=("carry",))
def _forward(graphdef, params, carry, tokens, start, recording):
    """Greedy next token int32[B], the new cache, and top-1 positions int32[L, B, H] for tokens at start."""
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    hidden, carry, _ = model(
        tokens, positions, jnp.ones((b, t), bool), carry, functools.partial(_record_step, recording)
    )
    token = jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)  # [B]
    return token, carry, jnp.stack([c[1] for c in carry])


def copy_paste_scores(tops, generated, prompt, needle_start: int, needle_end: int) -> np.ndarray:
    """float64[L, H]: per head, 1/|needle| for every step whose top-1 position tops[s, l, h] lies in
    [needle_start, needle_end) and holds the token generated at that step, generated[s]."""
    tops, generated, prompt = np.asarray(tops), np.asarray(generated), np.asarray(prompt)
    inside = (tops >= needle_start) & (tops < needle_end)  # [S, L, H]
    held = prompt[np.clip(tops, 0, len(prompt) - 1)]  # [S, L, H]
    copied = inside & (held == generated[:, None, None])
    return copied.sum(0) / (needle_end - needle_start)


def per_test_scores(
    m, test: NeedleTest, max_new_tokens: int = 50, stop_ids=()
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """One test: float64[L, H] copy-paste scores, the greedy tokens generated, and each step's
    top-1 attended positions int32[S, L, H]."""
    cfg = m.config
    prompt = np.asarray(test.prompt, np.int32)[None]  # [1, T]
    t = prompt.shape[1]
    if t < 2 or t + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"a {t}-token prompt plus {max_new_tokens} new tokens does not fit the model")
    heads = tuple(range(cfg.num_kv_heads))
    carry = tuple(  # one buffer per layer (the carry is donated)
        (empty_segment(1, heads, t + max_new_tokens, cfg.head_dim, m.dtype), jnp.zeros((1, cfg.num_heads), jnp.int32))
        for _ in range(cfg.num_layers)
    )
    _, carry, _ = _forward(m.graphdef, m.params, carry, jnp.asarray(prompt[:, :-1]), jnp.int32(0), False)
    feed, generated, tops = prompt[:, -1], [], []
    for step in range(max_new_tokens):
        token, carry, top = _forward(
            m.graphdef, m.params, carry, jnp.asarray(feed)[:, None], jnp.int32(t - 1 + step), True
        )
        generated.append(int(token[0]))
        tops.append(np.asarray(top[:, 0]))  # [L, H]
        if generated[-1] in stop_ids:
            break
        feed = np.asarray(generated[-1:], np.int32)
    tops = np.stack(tops)
    return copy_paste_scores(tops, generated, prompt[0], test.needle_start, test.needle_end), generated, tops


def retrieval_scores(m, tests: Sequence[NeedleTest], max_new_tokens: int = 50, stop_ids=()) -> np.ndarray:
    """float64[L, H]: each query head's mean copy-paste score over the correctly answered tests
    (zeros when none is answered correctly)."""
    kept = []
    for test in tests:
        scores, generated, _ = per_test_scores(m, test, max_new_tokens, stop_ids)
        if test.correct(generated):
            kept.append(scores)
    if not kept:
        return np.zeros((m.config.num_layers, m.config.num_heads))
    return np.mean(kept, axis=0)


def retrieval_heads(scores, threshold: float = 0.1) -> tuple[tuple[int, ...], ...]:
    """Per layer, the query heads whose retrieval score exceeds `threshold` (the paper's 0.1)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be float[L, H]; got shape {scores.shape}")
    return tuple(tuple(int(h) for h in np.flatnonzero(row > threshold)) for row in scores)


def kv_head_sets(query_heads, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """Per layer, the KV heads serving any of the given query heads (a policy's retrieval_heads)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    return tuple(tuple(sorted({h // group for h in layer})) for layer in query_heads)
