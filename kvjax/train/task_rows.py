"""Training rows from the evaluation's tasks: a prompt followed by its answer, a pure function of (seed, step).

The learned policies' trainers (Locret's retaining heads, LESS's low-rank states) supervise with the answer
tokens of kvjax.eval.tasks prompts: each step draws a length, a task, a needle depth and a sample seed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kvjax.eval.tasks import get_task, make_sample


class RowSource(Protocol):
    """The data fields a trainer's config carries."""

    tasks: tuple[str, ...]  # kvjax.eval.tasks names, one drawn per step
    min_len: int  # sequence lengths (prompt + answer, tokens) drawn uniformly in [min_len, max_len]
    max_len: int
    answer_reserve: int  # tokens of each sequence left for the answer
    pad_multiple: int  # rows are right-padded to a multiple of this (fewer compiled shapes)


def task_row(tokenizer, config: RowSource, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32[N] and answer bool[N] of a step: a task prompt of at most (drawn length - answer_reserve)
    tokens, then its answer (the sample's target text), whose tokens are the supervising queries."""
    rng = np.random.default_rng([seed, step])
    length = int(rng.integers(config.min_len, config.max_len + 1))
    task = get_task(config.tasks[int(rng.integers(len(config.tasks)))])
    sample_seed, depth = int(rng.integers(2**31)), float(rng.uniform())
    sample = make_sample(task, tokenizer, length - config.answer_reserve, sample_seed, depth)
    prompt = tokenizer.encode(sample.prompt)
    answer = tokenizer.encode(sample.target, add_special_tokens=False)
    if len(answer) > config.answer_reserve:
        raise ValueError(
            f"{task.name}: an answer of {len(answer)} tokens exceeds answer_reserve {config.answer_reserve}"
        )
    ids = np.asarray(prompt + answer, np.int32)
    return ids, np.arange(len(ids)) >= len(prompt)


def check_tasks(tokenizer, config: RowSource) -> None:
    """Raises ValueError naming the first task whose prompt cannot fit in the shortest sequence."""
    for name in config.tasks:
        try:
            make_sample(get_task(name), tokenizer, config.min_len - config.answer_reserve, 0, 0.5)
        except ValueError as err:
            raise ValueError(f"min_len {config.min_len} is too short for task {name}: {err}") from err


def make_batch(tokenizer, config: RowSource, pad_id: int, seed: int, step: int) -> dict:
    """Batch of one row, right-padded to a multiple of pad_multiple: tokens int32[1, T], valid bool[1, T],
    answer bool[1, T]."""
    ids, answer = task_row(tokenizer, config, seed, step)
    n = len(ids)
    t = -(-n // config.pad_multiple) * config.pad_multiple
    tokens = np.full((1, t), pad_id, np.int32)
    valid, answer_row = np.zeros((1, t), bool), np.zeros((1, t), bool)
    tokens[0, :n], valid[0, :n], answer_row[0, :n] = ids, True, answer
    return {"tokens": tokens, "valid": valid, "answer": answer_row}
