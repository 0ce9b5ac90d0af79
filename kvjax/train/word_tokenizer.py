"""A small byte-level BPE tokenizer.json learned from kvjax's own synthetic text, for kvjax's own models.

Bytes cost a model the n-gram matching that retrieval needs (a key like "brave-falcon" is 12 bytes,
so finding it means matching 12 tokens); with whole words as tokens the key is 3 tokens and a 4K-token
prompt holds four times the text. Digits are split one per token so every number is copied digit by
digit. The 256 bytes stay in the vocabulary (ByteLevel), so any text, essays included, still encodes.
The corpus is a pure function of the seed (prose, RULER's noise, every task's needles and questions),
so the tokenizer is reproducible and needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kvjax.eval.haystack import NoiseHaystack, ProseHaystack, plain_text
from kvjax.eval.tasks import default_tasks, make_sample
from kvjax.train.byte_tokenizer import BOS, EOS, PAD

DEFAULT_VOCAB = 2048


def training_corpus(seed: int = 0, samples_per_task: int = 60) -> list[str]:
    """Texts the merges are learned from: prose, noise, and short samples of every task (keys, templates)."""
    texts = [plain_text(ProseHaystack(), seed * 1000 + i, 64) for i in range(200)]
    texts.append(plain_text(NoiseHaystack(), 0, 50))
    chars = len  # token budgets in characters: any tokenizer works for drafting the corpus
    for task in default_tasks().values():
        for i in range(samples_per_task):
            sample = make_sample(task, chars, 1200, seed * 100_000 + i, float(np.linspace(0, 1, samples_per_task)[i]))
            texts.append(sample.prompt + sample.target)
    return texts


def build_word_tokenizer(vocab_size: int = DEFAULT_VOCAB, seed: int = 0) -> Tokenizer:
    """BPE over bytes with single-digit tokens; <pad>, <bos>, <eos> first; <bos> prepended by `encode`."""
    if vocab_size < 256 + 3 + 16:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges (the 256 bytes and 3 specials come first)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def write_word_tokenizer(directory: str | Path, vocab_size: int = DEFAULT_VOCAB, seed: int = 0) -> dict[str, Path]:
    """Writes tokenizer.json and tokenizer_config.json; returns {file name: path} for save_checkpoint."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_word_tokenizer(vocab_size, seed).save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "tokenizer_class": f"kvjax-bpe{vocab_size}"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {
        "tokenizer.json": directory / "tokenizer.json",
        "tokenizer_config.json": directory / "tokenizer_config.json",
    }
