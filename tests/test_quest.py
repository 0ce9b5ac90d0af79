"""Quest: per-page key bounds kept exact through prefill and decoding, and each decode query attending
exactly over the pages with the highest bound, by the jnp reference and by the block-sparse decode
kernels (interpreted), against a numpy reading of the paper's formula."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import init_model
from kvjax.kv_state import KVSegment
from kvjax.policies import Full, Quest
from kvjax.policies.quantized_pruning import decode_state_bytes
from kvjax.policies.quest import PagedSegment
from tests.conftest import random_tokens
from tests.quantized_fixtures import (
    assert_generate_is_the_greedy_chain, head_dim_32_config, llama8b_cache_config, teacher_forced,
)

LENGTHS = (300, 170, 40)  # the last row's prompt and answer fit in 4 pages: a 64-token budget reads them all
NEW = 16
CHUNK = 128
PAGE = 16


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=3), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(2, (len(LENGTHS), max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {"full": Full(), "every_page": Quest(budget_tokens=1024),
                "sparse": Quest(budget_tokens=64, dense_layers=1)}
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


def _numpy_bounds(k: np.ndarray, pos: np.ndarray, page: int) -> tuple[np.ndarray, np.ndarray]:
    """Per page of one row's slots, each channel's min and max over the held keys (+inf / -inf if none)."""
    held = (pos >= 0)[:, None]
    lo = np.where(held, k, np.inf).reshape(-1, page, k.shape[-1]).min(1)
    hi = np.where(held, k, -np.inf).reshape(-1, page, k.shape[-1]).max(1)
    return lo, hi


@pytest.mark.parametrize("phase", [1, 2], ids=["prefilled", "decoded"])
def test_page_bounds_are_each_pages_key_min_and_max(model, runs, phase):
    _, results = runs
    state = results["sparse"][phase]
    (dense,) = state.layers[0]
    assert isinstance(dense, KVSegment)  # below dense_layers: Full's segment, no bounds
    for layer in state.layers[1:]:
        (seg,) = layer
        assert isinstance(seg, PagedSegment) and seg.kv.capacity % PAGE == 0
        for b, length in enumerate(LENGTHS):
            held = np.asarray(seg.kv.pos[b, 0])
            np.testing.assert_array_equal(held >= 0, np.arange(seg.kv.capacity) < length + (NEW if phase == 2 else 0))
            for h in range(model.config.num_kv_heads):
                lo, hi = _numpy_bounds(np.asarray(seg.kv.k[b, h]), np.asarray(seg.kv.pos[b, h]), PAGE)
                np.testing.assert_array_equal(np.asarray(seg.k_min[b, h]), lo)
                np.testing.assert_array_equal(np.asarray(seg.k_max[b, h]), hi)


def _numpy_quest_attention(q, k, v, pos, position, pages_read, window, scale):
    """One (sequence, KV head) decode query group q [G, D] over a row k, v [C, D] (new token included):
    the pages_read visible pages with the largest mean-over-G bound sum_d max(q_d M_d, q_d m_d)."""
    lo, hi = _numpy_bounds(k, pos, PAGE)
    first = np.arange(len(lo)) * PAGE
    visible_page = (pos.reshape(-1, PAGE) >= 0).any(-1) & (first <= position)
    if window is not None:
        visible_page &= first + PAGE - 1 > position - window
    bound = np.maximum(q[:, None] * hi[None], q[:, None] * lo[None]).sum(-1).mean(0)  # [P]
    bound = np.where(visible_page, bound, -np.inf)
    chosen = np.argsort(-bound, kind="stable")[:pages_read]
    chosen = chosen[np.isfinite(bound[chosen])]
    slot_chosen = np.isin(np.arange(len(pos)) // PAGE, chosen)
    visible = slot_chosen & (pos >= 0) & (pos <= position)
    if window is not None:
        visible &= pos > position - window
    logits = q @ k[visible].T * scale  # [G, n]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v[visible], chosen


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("impl", ["reference", "gpu-interpret", "tpu-interpret"])
def test_decode_attends_exactly_over_the_top_pages(impl, window):
    rng = np.random.default_rng(len(impl) + (window or 0))
    b, h, g, d, c = 2, 2, 3, 32, 160
    held = np.array([150, 93])  # the new tokens land at these positions
    slots = np.arange(c)
    pos = np.broadcast_to(np.where(slots < held[:, None], slots, -1)[:, None], (b, h, c)).astype(np.int32)
    k = np.where(pos[..., None] >= 0, rng.normal(size=(b, h, c, d)), 0.0).astype(np.float32)
    v = np.where(pos[..., None] >= 0, rng.normal(size=(b, h, c, d)), 0.0).astype(np.float32)
    lo, hi = (np.stack([[_numpy_bounds(k[i, j], pos[i, j], PAGE)[n] for j in range(h)] for i in range(b)])
              for n in (0, 1))
    seg = PagedSegment(kv=KVSegment(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), heads=(0, 1)),
                       k_min=jnp.asarray(lo), k_max=jnp.asarray(hi))
    q = rng.normal(size=(b, 1, h, g, d)).astype(np.float32)
    k_new, v_new = (rng.normal(size=(b, 1, h, d)).astype(np.float32) for _ in range(2))
    q_pos = held[:, None].astype(np.int32)
    policy = Quest(budget_tokens=48, page=PAGE, attention_impl=impl)  # 3 of 10 (or 6) pages
    scale = d**-0.5
    out, (new_seg,) = policy.cache_step(
        policy.dense_layers, (seg,), jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new),
        jnp.asarray(q_pos), jnp.asarray(q_pos), window, scale,
    )
    out = np.asarray(out)
    for i in range(b):
        for j in range(h):
            row_k, row_v, row_pos = k[i, j].copy(), v[i, j].copy(), pos[i, j].copy()
            row_k[held[i]], row_v[held[i]], row_pos[held[i]] = k_new[i, 0, j], v_new[i, 0, j], held[i]
            want, chosen = _numpy_quest_attention(q[i, 0, j], row_k, row_v, row_pos, held[i], 3, window, scale)
            assert len(chosen) == 3
            np.testing.assert_allclose(out[i, 0, j], want, atol=2e-6)
            lo, hi = _numpy_bounds(row_k, row_pos, PAGE)
            np.testing.assert_array_equal(np.asarray(new_seg.k_min[i, j]), lo)
            np.testing.assert_array_equal(np.asarray(new_seg.k_max[i, j]), hi)


def test_budget_covering_every_page_is_full_attention_and_a_small_one_is_not(runs):
    _, results = runs
    full, every, sparse = results["full"][0], results["every_page"][0], results["sparse"][0]
    np.testing.assert_allclose(every, full, atol=1e-5)
    np.testing.assert_allclose(sparse[2], full[2], atol=1e-5)  # 56 tokens: 4 pages, all of them read
    assert np.abs(sparse[:2] - full[:2]).max() > 1e-2


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, _ = runs
    assert_generate_is_the_greedy_chain(model, Quest(budget_tokens=64, dense_layers=1), tokens, LENGTHS, 6, CHUNK)


def test_kv_bytes_keep_every_token_plus_two_bounds_per_page():
    # Llama-3.1-8B shape, 32K prompt, 64 new tokens, bf16: every slot (k, v: 2 x 128 x 2 bytes, pos: 4),
    # and in the 30 sparse layers a bf16 min and max per page of 16 slots: 6.25% more than the keys and values.
    cfg, prompt, new = llama8b_cache_config(), 32768, 64
    slots = -(-(prompt + new) // PAGE) * PAGE
    per_head = slots * (2 * 128 * 2 + 4)
    bounds = (slots // PAGE) * 2 * 128 * 2
    expected = cfg.num_layers * cfg.num_kv_heads * per_head + (cfg.num_layers - 2) * cfg.num_kv_heads * bounds + 4
    got = decode_state_bytes(Quest(), cfg, prompt, new)
    assert got == expected
    assert got < 1.06 * decode_state_bytes(Full(), cfg, prompt, new)


@pytest.mark.parametrize("kwargs", [{"page": 8}, {"page": 24}, {"budget_tokens": 15}, {"dense_layers": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="Quest"):
        Quest(**kwargs)
