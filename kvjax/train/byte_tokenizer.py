"""A byte-level tokenizer.json (ids 0-255 are the bytes, then <pad>, <bos>, <eos>) for kvjax's own models.

Any text encodes, every token is one byte, so token budgets are byte budgets and nothing is out of
vocabulary; built with the `tokenizers` library so `kvjax.tokenizer.Tokenizer` loads it like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what the ByteLevel pre-tokenizer emits)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_byte_tokenizer() -> Tokenizer:
    """Token id = byte value; <bos> is prepended by `encode` (add_special_tokens=True)."""
    vocab = {char: byte for byte, char in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    if (tok.token_to_id(PAD), tok.token_to_id(BOS), tok.token_to_id(EOS)) != (PAD_ID, BOS_ID, EOS_ID):
        raise ValueError("byte tokenizer special ids moved; the tokenizers library changed how it numbers them")
    return tok


def write_byte_tokenizer(directory: str | Path) -> dict[str, Path]:
    """Writes tokenizer.json and tokenizer_config.json; returns {file name: path} for save_checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_byte_tokenizer().save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "tokenizer_class": "kvjax-bytes"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {
        "tokenizer.json": directory / "tokenizer.json",
        "tokenizer_config.json": directory / "tokenizer_config.json",
    }
