"""Model shapes the benchmarks measure (configs only: the benchmarks build random or abstract weights)."""

from __future__ import annotations

from kvjax.config import ModelConfig, RopeConfig

LLAMA31_8B = ModelConfig(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rope=RopeConfig(theta=500000.0, kind="llama3", factor=8.0, original_max_position_embeddings=8192),
)
SMOLLM2_135M = ModelConfig(
    family="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope=RopeConfig(theta=100000.0),
)
