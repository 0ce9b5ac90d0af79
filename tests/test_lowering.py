"""`attention_impl="auto"` on GPUs below compute capability 8.0 (a T4): the jnp reference, never Pallas."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import kvjax.attention
from pallas_kernels import lowering
from pallas_kernels.lowering import Lowering, gpu_compute_capability, gpu_runs_kernels
from tests.support.random_data import random_tokens


@dataclasses.dataclass
class FakeGpu:
    """What `jax.devices()[0]` reports on a CUDA GPU, as far as the lowering choice reads it."""

    compute_capability: str | None
    platform: str = "gpu"


def _on_gpu(monkeypatch, compute_capability: str | None) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *_: [FakeGpu(compute_capability)])


@pytest.mark.parametrize(
    "capability, platform",
    [("7.5", "reference"), ("7.0", "reference"), ("6.1", "reference"), ("8.0", "gpu"), ("9.0", "gpu"), (None, "gpu")],
)
def test_auto_falls_back_below_compute_capability_8(monkeypatch, capability, platform):
    """A T4 (7.5) or older runs the reference under "auto"; Ampere and newer, and GPUs that report no
    capability (ROCm), the kernels. Naming "gpu" still forces the kernels anywhere."""
    _on_gpu(monkeypatch, capability)
    assert Lowering.parse("auto") == Lowering(platform)
    assert gpu_runs_kernels() == (platform == "gpu")
    assert Lowering.parse("gpu") == Lowering("gpu")
    assert lowering.resolve("auto") == Lowering(platform)


def test_compute_capability_parsing(monkeypatch):
    _on_gpu(monkeypatch, "7.5")
    assert gpu_compute_capability() == (7, 5)
    monkeypatch.setattr(jax, "devices", lambda *_: [FakeGpu("", platform="cpu")])
    assert gpu_compute_capability() is None
    monkeypatch.setattr(jax, "devices", lambda *_: [FakeGpu("gfx90a")])  # not CUDA's major.minor
    assert gpu_compute_capability() is None
    monkeypatch.undo()
    assert gpu_compute_capability() is None  # this CPU


def test_kvjax_auto_on_a_t4_runs_the_reference(monkeypatch, tiny_model):
    """kvjax's "auto" dispatch on a T4 hands no call to a Pallas kernel, and decodes exactly as
    attention_impl="reference" does."""
    m = tiny_model
    tokens = random_tokens(3, (1, 40), m.config.vocab_size)
    expected = np.asarray(kvjax.generate(m, tokens, 6, attention_impl="reference", chunk_size=16))

    def no_kernel(*args, **kwargs):
        raise AssertionError("a Pallas kernel was called on a compute capability 7.5 GPU")

    _on_gpu(monkeypatch, "7.5")
    for name in ("block_sparse_decode", "block_sparse_prefill", "quantized_decode_attention"):
        monkeypatch.setattr(kvjax.attention, name, no_kernel)
    b, k, g, c, d = 1, 2, 2, 32, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, 1, k, g, d))
    kv = jax.random.normal(keys[1], (b, k, c, d)), jax.random.normal(keys[2], (b, k, c, d))
    k_pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, k, c))
    q_pos = jnp.full((b, 1), c - 1, jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(kvjax.attention.attend(q, *kv, k_pos, q_pos, None, d**-0.5)),
        np.asarray(kvjax.attention.reference_attention(q, *kv, k_pos, q_pos, None, d**-0.5)),
    )
    # A fresh trace (chunk 32 was not compiled above): generate under "auto" on the T4 equals the reference.
    got = np.asarray(kvjax.generate(m, tokens, 6, attention_impl="auto", chunk_size=32))
    np.testing.assert_array_equal(got, expected)
