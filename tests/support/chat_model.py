"""A random 1-layer Llama over the tiny checkpoints' BPE tokenizer, whose chat template is
<s><|user|>...</s><|assistant|>: a model with a real tokenizer and template, built in a second."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

import kvjax


def build_chat_model(root: Path, max_positions: int = 1024) -> kvjax.LanguageModel:
    from checkpoints_convert.tiny_checkpoints import build_tokenizer
    from kvjax.checkpoint import load, save_checkpoint
    from kvjax.train.lm import ModelSize, model_config

    vocab = build_tokenizer(root)
    files = {name: root / name for name in ("tokenizer.json", "tokenizer_config.json")}
    size = ModelSize(
        layers=1, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, max_positions=max_positions
    )
    m = kvjax.init_model(model_config(size, vocab, 0, 1, 2), seed=0, dtype=jnp.float32)
    path = save_checkpoint(root / "model", m.config, nnx.to_pure_dict(m.params), files, {"note": "random"})
    return load(path, dtype=jnp.float32)
