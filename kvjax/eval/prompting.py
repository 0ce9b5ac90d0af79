"""How a task's text becomes the prompt a model sees: plain text, or the model's chat template with the answer begun.

A task gives an instruction (its context and question) and an answer prefix, the words that open the answer
("The pass key is"). The plain format is `instruction + " " + answer_prefix`, the text a base model continues.
The chat format renders one user turn holding the instruction through the tokenizer's chat template with its
generation prompt, then pre-fills the assistant turn with the answer prefix (RULER's `answer_prefix`), so an
instruct model's first new tokens are the answer rather than a restatement of the question. A chat prompt
already holds the template's special tokens, so it is encoded without adding any (as `Tokenizer.encode_chat`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Tokenizer = Any  # anything with `encode(text) -> list[int]`, or a callable text -> int token count


def has_chat_template(tokenizer: Tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat(tokenizer: Tokenizer, chat: bool | None) -> bool:
    """`chat` as given, or (None: auto) whether the tokenizer has a chat template; True needs one."""
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise ValueError("chat prompts need a tokenizer with a chat template; this one has none (use plain prompts)")
    return bool(chat)


def render_prompt(tokenizer: Tokenizer, instruction: str, answer_prefix: str, chat: bool) -> str:
    """The prompt text: `instruction + " " + answer_prefix`, or (chat) the template's user turn holding
    `instruction`, its generation prompt, then `answer_prefix`."""
    if not chat:
        return f"{instruction} {answer_prefix}"
    if not has_chat_template(tokenizer):
        raise ValueError("chat prompts need a tokenizer with a chat template; this one has none (use plain prompts)")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True) + (
        answer_prefix
    )


def encode_prompt(tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's ids as the model sees them: a chat prompt already holds its special tokens."""
    return tokenizer.encode(prompt, add_special_tokens=False) if chat else tokenizer.encode(prompt)


def token_counter(tokenizer: Tokenizer, chat: bool = False) -> Callable[[str], int]:
    """text -> its token count under `tokenizer` as `encode_prompt` counts it; a plain callable counts itself."""
    if hasattr(tokenizer, "encode"):
        return lambda text: len(encode_prompt(tokenizer, text, chat))
    if chat:
        raise ValueError("chat prompts need a tokenizer with .encode and a chat template, not a counting function")
    if callable(tokenizer):
        return tokenizer
    raise ValueError(
        f"tokenizer must have .encode(text) or be a callable text -> token count; got {type(tokenizer).__name__}"
    )
