"""kvjax on a GPU at a head dim Triton cannot tile whole (Phi-3's 96): the jitted programs lower to
Triton (cuda_lowering_checks.py, in a process of its own), and the kernels, interpreted, give the
reference's attention through kvjax's dispatch."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from tests.cuda_lowering_checks import PHI3_HEAD_DIM
from tests.support.jaxprs import pallas_calls
from tests.support.own_process import run_in_own_process

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it


def test_prefill_and_decode_lower_to_triton():
    run_in_own_process(Path(__file__).with_name("cuda_lowering_checks.py"))


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
        q, k, v, k_pos, q_pos, None, PHI3_HEAD_DIM**-0.5, impl, slot_is_position=True
    )
    assert len(pallas_calls(jax.make_jaxpr(lambda: run("gpu-interpret"))())) == 1
    np.testing.assert_allclose(np.asarray(run("gpu-interpret")), np.asarray(run("reference")), atol=2e-5, rtol=0)
