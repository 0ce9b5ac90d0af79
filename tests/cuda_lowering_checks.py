"""The block-sparse kernels, and kvjax's jitted prefill and decode dispatched as on a GPU
(jax.default_backend patched), lower to Triton for CUDA on this CPU machine (not run there) for head
dims Triton cannot tile whole: Phi-3's 96, and 80. Run by test_cuda_lowering.py in a process of its
own, so Triton's MLIR lowering stays out of the test workers (moved there while chasing CI segfaults,
which later recurred without it: not their cause)."""

import jax
import jax.numpy as jnp
import pytest

import kvjax
from kvjax import ModelConfig, init_model
from kvjax.policies import KIVI, DuoAttention, Full, Quest, RazorAttention
from pallas_kernels import block_masks as bm
from pallas_kernels.block_sparse_decode import DecodeConfig, block_sparse_decode
from pallas_kernels.block_sparse_prefill import block_sparse_prefill

PHI3_HEAD_DIM = 96  # Phi-3/3.5-mini: hidden 3072 over 32 heads


@pytest.fixture(scope="module")
def phi3_shaped():
    config = ModelConfig(
        family="llama",
        vocab_size=256,
        hidden_size=2 * PHI3_HEAD_DIM,
        intermediate_size=256,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=PHI3_HEAD_DIM,
        max_position_embeddings=4096,
    )
    return init_model(config, seed=0, dtype=jnp.float32)


def _lowered_for_cuda(m, policy, prompt: int, chunk: int) -> list[str]:
    """The jitted prefill (one prompt padded to `prompt`) and one decode step, lowered for CUDA with
    kvjax dispatching as on a GPU (jax.default_backend must say "gpu")."""
    tokens, lengths = jnp.zeros((1, prompt), jnp.int32), jnp.array([prompt - 24], jnp.int32)
    run = kvjax.inference.Execution()  # attention_impl "auto"
    prefill = kvjax.inference._prefill.trace(
        m.graphdef, m.params, None, tokens, lengths, policy=policy, chunk=chunk, max_new_tokens=8, run=run
    )
    decode = kvjax.inference._decode_step.trace(
        m.graphdef, m.params, None, prefill.out_info[0], jax.ShapeDtypeStruct((1,), jnp.int32), policy=policy, run=run
    )
    return [traced.lower(lowering_platforms=("cuda",)).as_text() for traced in (prefill, decode)]


@pytest.mark.parametrize(
    "policy,kernels",
    [
        (Full(), (1, 1)),  # (prefill, decode) Triton calls: chunk prefill and block-sparse decode
        (Quest(), (1, 1)),  # page-selected decode
        (DuoAttention(((),)), (0, 1)),  # the one KV head streaming: its decode
        (RazorAttention(((),)), (0, 1)),  # the kernel's log-sum-exp takes in the compensation token
        (KIVI(4), (0, 0)),  # its Triton kernel unpacks power-of-two rows: the reference instead
    ],
)
def test_prefill_and_decode_lower_to_triton(phi3_shaped, monkeypatch, policy, kernels):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what attention_impl="auto" reads
    lowered = _lowered_for_cuda(phi3_shaped, policy, prompt=1024, chunk=512)
    assert tuple(text.count("triton") for text in lowered) == kernels


def test_a_head_dim_triton_cannot_tile_runs_the_reference(monkeypatch):
    """Head dim 24 (not a multiple of 16, tl.dot's smallest side): the reference, not an error."""
    config = ModelConfig(
        family="llama",
        vocab_size=256,
        hidden_size=48,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=24,
        max_position_embeddings=4096,
    )
    m = init_model(config, seed=0, dtype=jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert all("triton" not in text for text in _lowered_for_cuda(m, Full(), prompt=256, chunk=128))


@pytest.mark.parametrize("head_dim", [96, 80])
def test_kernels_lower_head_dims_that_are_not_powers_of_two(head_dim):
    """Decode (streaming heads, 2 splits) and a chunk prefill lower as 64 + 32 (64 + 16) column
    pieces; whole-D tiles would be refused (Triton's tensors must have power-of-two sizes)."""
    q = jax.ShapeDtypeStruct((1, 32, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 32, 2048, head_dim), jnp.bfloat16)
    q_chunk = jax.ShapeDtypeStruct((1, 32, 512, head_dim), jnp.bfloat16)
    scalar = jax.ShapeDtypeStruct((1,), jnp.int32)

    def decode(q, k, v, lengths):
        return block_sparse_decode(
            q, k, v, lengths, mask=bm.SinkLocal(4, 256), config=DecodeConfig(num_splits=2), implementation="gpu"
        )

    def prefill(q, k, v, offset):
        return block_sparse_prefill(q, k, v, bm.DenseCausal(), q_offset=offset, implementation="gpu")

    for fn, q_shape in ((decode, q), (prefill, q_chunk)):
        lowered = jax.jit(fn).trace(q_shape, k, k, scalar).lower(lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()
