"""Shared fixtures: tiny random Hugging Face checkpoints and models, built once per test session."""

from __future__ import annotations

import os

from tests.support.own_process import JAXLIB_010_FLAGS

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {JAXLIB_010_FLAGS}")
# No persistent compilation cache (also in the subprocesses that inherit this): it saved no time, and on
# jaxlib 0.10.2 writing an entry was one more way into the crash tests/support/crash_rerun.py works around.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax
import jax.numpy as jnp
import pytest

pytest_plugins = ["tests.support.crash_rerun"]

jax.config.update("jax_default_matmul_precision", "highest")
# The suite compiles many small programs and runs each once or twice, where XLA's expensive backend passes
# cost more than they save; tests that run a program long enough for it to pay take `optimized_xla`. A config
# update, not an environment variable: the CLI tests' subprocesses compile as users' do.
jax.config.update("jax_disable_most_optimizations", True)

# The files whose tests take longest go first: `--dist worksteal` splits the collection in order and an idle
# worker steals from the end of another's share, so a long test left near the end would run on alone.
LONGEST_FIRST = ("test_sharding.py", "test_bundled_model.py", "test_policies.py", "test_block_sparse_prefill.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture
def optimized_xla():
    """XLA's full optimisation for what this test compiles (it runs a model long enough to pay)."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """variant -> (HF directory, kvjax directory), built lazily."""
    pytest.importorskip("transformers")
    from checkpoints_convert import convert
    from checkpoints_convert.tiny_checkpoints import build

    root = tmp_path_factory.mktemp("tiny")
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            hf = build(variant, root / variant)
            cache[variant] = (hf, convert(hf, root / f"{variant}-kvjax", progress=False))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tiny_model():
    """A small random GQA Llama in float32 (no conversion), for tests of kvjax's own invariants."""
    from kvjax import ModelConfig, init_model

    config = ModelConfig(
        family="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
    )
    return init_model(config, seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random GQA Llama over the byte tokenizer, in memory and saved as a kvjax checkpoint
    (for the trainers, which load models from disk in their CLI tests)."""
    from flax import nnx

    from kvjax import ModelConfig, init_model
    from kvjax.checkpoint import save_checkpoint
    from kvjax.tokenizer import Tokenizer
    from kvjax.train.byte_tokenizer import write_byte_tokenizer

    root = tmp_path_factory.mktemp("byte-model")
    files = write_byte_tokenizer(root / "tokenizer")
    tokenizer = Tokenizer(root / "tokenizer")
    config = ModelConfig(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
    )
    model = init_model(config, seed=0, dtype=jnp.float32, tokenizer=tokenizer)
    path = save_checkpoint(root / "model", config, nnx.to_pure_dict(model.params), files)
    return model, path
