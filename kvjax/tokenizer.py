"""A checkpoint's tokenizer (tokenizer.json via `tokenizers`) and its chat template."""

from __future__ import annotations

from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from kvjax.config import read_json

# Files copied from a Hugging Face checkpoint next to the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class Tokenizer:
    """Encodes and decodes text; renders chat messages with the checkpoint's own template."""

    def __init__(self, directory: Path):
        """Reads the tokenizer files of `directory`; a file that cannot be used raises ValueError naming it."""
        directory = Path(directory)
        try:
            self._tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as err:  # tokenizers raises its own Exception type for any unreadable file
            raise ValueError(f"{directory / 'tokenizer.json'} is not a usable tokenizer ({err})") from None
        config_file = directory / "tokenizer_config.json"
        self.config = read_json(config_file) if config_file.is_file() else {}
        if not isinstance(self.config, dict):
            raise ValueError(f"{config_file} must hold a JSON object; got a {type(self.config).__name__}")
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{directory}: the chat template must be a string; got {type(template).__name__}")
        self.chat_template: str | None = template
        if template:
            try:
                self._environment().parse(template)
            except jinja2.TemplateError as err:
                raise ValueError(f"{directory}: the chat template does not parse ({err})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode takes a string; got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """{"input_ids": ids} for a string, or a list of id lists for a list of strings (as transformers)."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise ValueError("a tokenizer takes a string or a list of strings")
        return {"input_ids": [e.ids for e in self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens)]}

    def _special_id(self, key: str) -> int | None:
        name = self._special(key)
        return None if name is None else self.token_id(name)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

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

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """The prompt text for a conversation (its ids when `tokenize`), rendered in a sandbox as
        transformers does."""
        if tokenize:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
        if not self.chat_template:
            raise ValueError("this checkpoint's tokenizer has no chat template")
        try:
            return (
                self._environment()
                .from_string(self.chat_template)
                .render(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self._special("bos_token") or "",
                    eos_token=self._special("eos_token") or "",
                )
            )
        except jinja2.TemplateError as err:  # raise_exception(...) in the template, or a template error
            raise ValueError(f"the checkpoint's chat template refused these messages: {err}") from None

    @staticmethod
    def _environment() -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Template-rendered conversation to ids; the template already holds the special tokens."""
        return self.apply_chat_template(messages, tokenize=True)
