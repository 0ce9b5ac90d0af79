"""A checkpoint's tokenizer (tokenizer.json via `tokenizers`) and its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

# Files copied from a Hugging Face checkpoint next to the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class Tokenizer:
    """Encodes and decodes text; renders chat messages with the checkpoint's own template."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self._tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_file = directory / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def padding_id(self) -> int:
        """The pad token's id, else EOS's, else 0: what batches pad with (padding is masked anyway)."""
        for key in ("pad_token", "eos_token"):
            name = self._special(key)
            if name and self.token_id(name) is not None:
                return self.token_id(name)
        return 0

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered in a sandbox as transformers does."""
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token") or "",
            eos_token=self._special("eos_token") or "",
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Template-rendered conversation to ids; the template already holds the special tokens."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
