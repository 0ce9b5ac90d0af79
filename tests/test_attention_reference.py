"""The jnp attention paths the CPU runs: the blocked causal path of slot = position chunks equals the reference,
and so do the attention votes it sums block by block."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import attend, attention_probs, causal_blocks, causal_votes, reference_attention
from kvjax.policies.token_eviction import query_votes


def _full_layout(seed, batch, capacity, filled, kv_heads=2, group=3, d=16):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, capacity, d)), jnp.float32) for _ in range(2))
    slots = np.arange(capacity)
    pos = np.where(slots[None] < np.asarray(filled)[:, None], slots[None], -1)  # [B, C]: slot = position
    k_pos = jnp.asarray(np.broadcast_to(pos[:, None], (batch, kv_heads, capacity)), jnp.int32)
    return rng, k, v, k_pos


@pytest.mark.parametrize(
    ("capacity", "start", "chunk", "block"),
    [
        (2176, 0, 512, 512),
        (2176, 1536, 512, 512),
        (2176, 2048, 128, 512),
        (600, 64, 128, 256),
        (640, 512, 128, 64),
        (640, 0, 640, 128),  # a whole prompt: five query blocks, each over the key blocks up to its end
        (600, 0, 512, 128),  # four query blocks, the last key block clamped to the cache's end
    ],
)
def test_causal_blocks_equal_the_reference(capacity, start, chunk, block):
    """Every block up to the chunk's last query, the last one clamped to the cache's end (2176 = 4 x 512 +
    128) with its repeated slots hidden; rows whose right padding (pos -1) ends inside the chunk."""
    batch, kv_heads, group, d = 2, 2, 3, 16
    filled = [start + chunk, start + chunk // 2]  # row 1: the chunk's second half is padding
    rng, k, v, k_pos = _full_layout(0, batch, capacity, filled, kv_heads, group, d)
    q = jnp.asarray(rng.standard_normal((batch, chunk, kv_heads, group, d)), jnp.float32)
    q_pos = jnp.asarray(np.broadcast_to(start + np.arange(chunk), (batch, chunk)), jnp.int32)
    want = np.asarray(reference_attention(q, k, v, k_pos, q_pos, None, 0.25))
    got = np.asarray(causal_blocks(q, k, v, k_pos, q_pos, 0.25, block))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    via_attend = attend(q, k, v, k_pos, q_pos, None, 0.25, "reference", slot_is_position=True)
    np.testing.assert_allclose(np.asarray(via_attend), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("capacity", "start", "chunk", "block"), [(640, 0, 640, 128), (600, 0, 512, 128), (640, 512, 128, 64)]
)
def test_causal_votes_sum_the_reference_weights_over_weighted_queries(capacity, start, chunk, block):
    """H2O's, SnapKV's and A2SF's prefill score: the weights each entry receives, summed over queries with
    per-query weights (zero for padding) and averaged over the group, from the log-sum-exp of `causal_blocks`."""
    batch, kv_heads, group, d = 2, 2, 3, 16
    filled = [start + chunk, start + chunk // 2]
    rng, k, v, k_pos = _full_layout(1, batch, capacity, filled, kv_heads, group, d)
    q = jnp.asarray(rng.standard_normal((batch, chunk, kv_heads, group, d)), jnp.float32)
    q_pos = jnp.asarray(np.broadcast_to(start + np.arange(chunk), (batch, chunk)), jnp.int32)
    real = start + np.arange(chunk)[None] < np.asarray(filled)[:, None]
    weights = jnp.asarray(rng.random((batch, chunk)) * real, jnp.float32)
    _, lse = causal_blocks(q, k, v, k_pos, q_pos, 0.25, block, with_lse=True)
    got = np.asarray(causal_votes(q, k, k_pos, q_pos, lse, weights, 0.25, block))
    want = np.asarray(query_votes(attention_probs(q, k, k_pos, q_pos, None, 0.25), weights))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    assert np.all(got[1, :, filled[1] :] == 0)  # nothing votes for the padding
