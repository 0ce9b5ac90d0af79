"""The jnp attention paths the CPU runs: the blocked causal path of slot = position chunks equals the reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.attention import attend, causal_blocks, reference_attention


def _full_layout(seed, batch, capacity, filled, kv_heads=2, group=3, d=16):
    rng = np.random.default_rng(seed)
    k, v = (jnp.asarray(rng.standard_normal((batch, kv_heads, capacity, d)), jnp.float32) for _ in range(2))
    slots = np.arange(capacity)
    pos = np.where(slots[None] < np.asarray(filled)[:, None], slots[None], -1)  # [B, C]: slot = position
    k_pos = jnp.asarray(np.broadcast_to(pos[:, None], (batch, kv_heads, capacity)), jnp.int32)
    return rng, k, v, k_pos


@pytest.mark.parametrize(
    ("capacity", "start", "chunk", "block"),
    [(2176, 0, 512, 512), (2176, 1536, 512, 512), (2176, 2048, 128, 512), (600, 64, 128, 256), (640, 512, 128, 64)],
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
