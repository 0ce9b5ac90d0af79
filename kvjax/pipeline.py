"""Text in, answer out: compress a context once, then ask it one or more questions (kvpress's pipeline).

By default the context is prefilled and compressed without the question (query-agnostic: what a cache
serving many questions must do, and what keeps question-aware scorers such as SnapKV honest); each
question is then fed on top of the compressed state (`prefill(..., state=)`) and answered. With
`query_aware=True` context and question are compressed together, as one prompt.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.checkpoint import load
from kvjax.inference import DEFAULT_CHUNK, generate, prefill
from kvjax.kv_state import kv_bytes
from kvjax.language_model import LanguageModel
from kvjax.policies import Full, Policy

_SPLIT = "\x00kvjax-question\x00"  # marks where the context ends inside a rendered chat turn


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A model with a tokenizer, called as `pipe(context, question, policy=...)`."""

    model: LanguageModel

    def __post_init__(self):
        if self.model.tokenizer is None:
            raise ValueError(f"model {self.model.name or ''} has no tokenizer; a text pipeline needs one")

    def encode(self, context: str, questions: Sequence[str], chat: bool) -> tuple[list[int], list[list[int]]]:
        """(context ids, each question's ids): in chat form one user turn holds context + question, split
        where the context ends, so the question and the generation prompt follow the compressed part."""
        tok = self.model.tokenizer
        if not chat:
            return tok.encode(context), [tok.encode(q, add_special_tokens=False) for q in questions]
        if not tok.chat_template:
            raise ValueError("chat=True needs a tokenizer with a chat template; this one has none")
        rendered = tok.apply_chat_template([{"role": "user", "content": context + _SPLIT}])
        if rendered.count(_SPLIT) != 1:
            raise ValueError("the chat template does not render the user's message verbatim; use chat=False")
        head, tail = rendered.split(_SPLIT)
        return tok.encode(head, add_special_tokens=False), [
            tok.encode(q + tail, add_special_tokens=False) for q in questions
        ]

    def __call__(
        self,
        context: str,
        question: str | Sequence[str] | None = None,
        *,
        policy: Policy | None = None,
        max_new_tokens: int = 64,
        chat: bool | None = None,
        query_aware: bool = False,
        answer_prefix: str = "",
        chunk_size: int = DEFAULT_CHUNK,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> dict:
        """{"answer": str} for one question (or none: the context is the prompt), {"answers": [str, ...]}
        for a list, plus "kv_bytes" (the compressed context's state, one sequence), "full_kv_bytes" (Full's
        for the same context), "context_tokens" and "question_tokens". `chat` None: when the tokenizer has
        a template. `answer_prefix` opens the answer (it is fed, not returned)."""
        if not isinstance(context, str):
            raise ValueError(f"context must be a string; got {type(context).__name__}")
        several = question is not None and not isinstance(question, str)
        questions = [""] if question is None else [question] if isinstance(question, str) else list(question)
        if not questions or not all(isinstance(q, str) for q in questions):
            raise ValueError("question must be a string, a non-empty list of strings, or None")
        chat = bool(self.model.tokenizer.chat_template) if chat is None else chat
        context_ids, question_ids = self.encode(context, questions, chat)
        prefix = self.model.tokenizer.encode(answer_prefix, add_special_tokens=False) if answer_prefix else []
        question_ids = [q + prefix for q in question_ids]
        if query_aware or question is None:  # no question: the context is the whole prompt
            answers, state_bytes = self._query_aware(
                context_ids, question_ids, policy, max_new_tokens, chunk_size, (temperature, top_k, top_p, seed)
            )
        else:
            answers, state_bytes = self._query_agnostic(
                context_ids, question_ids, policy, max_new_tokens, chunk_size, (temperature, top_k, top_p, seed)
            )
        full = jax.eval_shape(lambda: prefill(self.model, [context_ids], Full(), chunk_size=chunk_size))
        out = {
            "kv_bytes": state_bytes,
            "full_kv_bytes": kv_bytes(full),
            "context_tokens": len(context_ids),
            "question_tokens": [len(q) for q in question_ids],
        }
        out.update({"answers": answers} if several else {"answer": answers[0]})
        return out

    def _decode_text(self, rows) -> list[str]:
        eos = set(self.model.config.eos_token_ids)
        texts = []
        for row in np.asarray(rows):
            stop = next((i for i, t in enumerate(row) if int(t) in eos), len(row))
            texts.append(self.model.tokenizer.decode(row[:stop]))
        return texts

    def _query_agnostic(self, context_ids, question_ids, policy, max_new_tokens, chunk_size, sampling):
        """The context compressed alone (room reserved for the longest question and the answer), then per
        question a copy of that state continued with the question and decoded."""
        temperature, top_k, top_p, seed = sampling
        room = max(map(len, question_ids)) + max_new_tokens
        state = prefill(self.model, [context_ids], policy, chunk_size=chunk_size, max_new_tokens=room)
        answers = []
        for ids in question_ids:
            copy = jax.tree.map(jnp.copy, state)  # generate donates the state it continues
            out = generate(
                self.model,
                [ids],
                max_new_tokens,
                policy,
                state=copy,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
            )
            answers += self._decode_text(out)
        return answers, kv_bytes(state)

    def _query_aware(self, context_ids, question_ids, policy, max_new_tokens, chunk_size, sampling):
        """Context and question as one prompt, compressed together (each question its own prefill)."""
        temperature, top_k, top_p, seed = sampling
        answers, sizes = [], []
        for ids in question_ids:
            prompt = [context_ids + ids]
            out = generate(
                self.model,
                prompt,
                max_new_tokens,
                policy,
                chunk_size=chunk_size,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
            )
            answers += self._decode_text(out)
            state = jax.eval_shape(
                lambda p=prompt: prefill(self.model, p, policy, chunk_size=chunk_size, max_new_tokens=max_new_tokens)
            )
            sizes.append(kv_bytes(state))
        return answers, max(sizes)


def pipeline(model: str | os.PathLike | LanguageModel, *, dtype=None) -> Pipeline:
    """A text pipeline over a model: a LanguageModel, a fetched or bundled model's name, or a checkpoint
    folder (`kvjax.load`, in `dtype` when given)."""
    if isinstance(model, LanguageModel):
        if dtype is not None:
            raise ValueError("dtype applies when loading; this model is already loaded")
        return Pipeline(model)
    return Pipeline(load(model) if dtype is None else load(model, dtype=dtype))
