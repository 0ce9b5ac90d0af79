"""kvjax's jitted prefill and decode, dispatched as on a GPU, lower to Triton for CUDA on this CPU
machine (not run there) for a head dim Triton cannot tile whole, Phi-3's 96; interpreted, the same
kernels give the reference's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import ModelConfig, init_model
from kvjax.policies import KIVI, DuoAttention, Full, Quest, RazorAttention

PHI3_HEAD_DIM = 96  # Phi-3/3.5-mini: hidden 3072 over 32 heads


@pytest.fixture(scope="module")
def phi3_shaped():
    config = ModelConfig(
        family="llama", vocab_size=256, hidden_size=2 * PHI3_HEAD_DIM, intermediate_size=256, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=PHI3_HEAD_DIM, max_position_embeddings=4096,
    )
    return init_model(config, seed=0, dtype=jnp.float32)


@pytest.mark.parametrize("policy,kernels", [
    (Full(), (1, 1)),  # (prefill, decode) Triton calls: chunk prefill and block-sparse decode
    (Quest(), (1, 1)),  # page-selected decode
    (DuoAttention(((),)), (0, 1)),  # the one KV head streaming: its decode
    (RazorAttention(((),)), (0, 1)),  # the kernel's log-sum-exp takes in the compensation token
    (KIVI(4), (0, 0)),  # its Triton kernel unpacks power-of-two rows: the reference instead
])
def test_prefill_and_decode_lower_to_triton(phi3_shaped, monkeypatch, policy, kernels):
    m = phi3_shaped
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what attention_impl="auto" reads
    tokens, lengths = jnp.zeros((1, 1024), jnp.int32), jnp.array([1000], jnp.int32)
    prefill = kvjax.inference._prefill.trace(
        m.graphdef, m.params, tokens, lengths, policy=policy, chunk=512, max_new_tokens=8)
    state, _ = prefill.out_info
    decode = kvjax.inference._decode_step.trace(
        m.graphdef, m.params, state, jax.ShapeDtypeStruct((1,), jnp.int32), policy=policy)
    lowered = [traced.lower(lowering_platforms=("cuda",)).as_text() for traced in (prefill, decode)]
    assert tuple(text.count("triton") for text in lowered) == kernels


def test_a_head_dim_triton_cannot_tile_runs_the_reference(monkeypatch):
    """Head dim 24 (not a multiple of 16, tl.dot's smallest side): the reference, not an error."""
    config = ModelConfig(family="llama", vocab_size=256, hidden_size=48, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=24, max_position_embeddings=4096)
    m = init_model(config, seed=0, dtype=jnp.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    tokens, lengths = jnp.zeros((1, 256), jnp.int32), jnp.array([200], jnp.int32)
    prefill = kvjax.inference._prefill.trace(m.graphdef, m.params, tokens, lengths, policy=Full(), chunk=128,
                                             max_new_tokens=8)
    decode = kvjax.inference._decode_step.trace(
        m.graphdef, m.params, prefill.out_info[0], jax.ShapeDtypeStruct((1,), jnp.int32), policy=Full())
    assert all("triton" not in traced.lower(lowering_platforms=("cuda",)).as_text() for traced in (prefill, decode))


@pytest.mark.parametrize("t", [1, 40])  # a decode token; a prefill chunk at an offset
def test_the_triton_kernels_match_the_reference_at_head_dim_96(t):
    """kvjax's dispatch into the same kernels, interpreted (64 + 32 column pieces), gives the
    reference's attention over a slot = position cache."""
    b, kv_heads, group, capacity, start = 2, 2, 3, 128, 50
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (b, t, kv_heads, group, PHI3_HEAD_DIM))
    k = jax.random.normal(keys[1], (b, kv_heads, capacity, PHI3_HEAD_DIM))
    v = jax.random.normal(keys[2], (b, kv_heads, capacity, PHI3_HEAD_DIM))
    slots = jnp.arange(capacity, dtype=jnp.int32)
    ends = jnp.array([start + t, start + t - 7])  # ragged rows: each chunk ends where its row's keys do
    k_pos = jnp.broadcast_to(jnp.where(slots < ends[:, None], slots, -1)[:, None], (b, kv_heads, capacity))
    q_pos = (ends - t)[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    run = lambda impl: kvjax.attention.attend(  # noqa: E731
        q, k, v, k_pos, q_pos, None, PHI3_HEAD_DIM**-0.5, impl, slot_is_position=True)
    assert "pallas_call" in str(jax.make_jaxpr(lambda: run("gpu-interpret"))())
    np.testing.assert_allclose(np.asarray(run("gpu-interpret")), np.asarray(run("reference")), atol=2e-5, rtol=0)
