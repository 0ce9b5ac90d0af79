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
from tests.support.page_reference import PAGE, DecodeCase, attend, on_pages, page_bounds, quest_pages, visible_slots
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    head_dim_32_config,
    llama8b_cache_config,
    teacher_forced,
)
from tests.support.random_data import random_tokens

LENGTHS = (300, 170, 40)  # the last row's prompt and answer fit in 4 pages: a 64-token budget reads them all
NEW = 16
CHUNK = 128


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=3), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(2, (len(LENGTHS), max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "every_page": Quest(budget_tokens=1024),
        "sparse": Quest(budget_tokens=64, dense_layers=1),
    }
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


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
                lo, hi = page_bounds(np.asarray(seg.kv.k[b, h]), np.asarray(seg.kv.pos[b, h]))
                np.testing.assert_array_equal(np.asarray(seg.k_min[b, h]), lo)
                np.testing.assert_array_equal(np.asarray(seg.k_max[b, h]), hi)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("impl", ["reference", "gpu-interpret", "tpu-interpret"])
def test_decode_attends_exactly_over_the_top_pages(impl, window):
    case = DecodeCase.random(len(impl) + (window or 0))
    lo, hi = case.bounds()
    seg = PagedSegment(kv=case.segment(), k_min=jnp.asarray(lo), k_max=jnp.asarray(hi))
    policy = Quest(budget_tokens=48, page=PAGE)  # 3 of 10 (or 6) pages
    scale = case.q.shape[-1] ** -0.5
    out, new_seg = case.step(policy, seg, window, scale, impl)
    b, _, h, _, _ = case.q.shape
    for i in range(b):
        for j in range(h):
            k, v, pos = case.row(i, j)
            chosen = quest_pages(case.q[i, 0, j], k, pos, case.held[i], 3, window)
            assert len(chosen) == 3
            attended = on_pages(chosen, len(pos)) & visible_slots(pos, case.held[i], window)
            np.testing.assert_allclose(out[i, 0, j], attend(case.q[i, 0, j], k, v, attended, scale), atol=2e-6)
            lo, hi = page_bounds(k, pos)
            np.testing.assert_array_equal(np.asarray(new_seg.k_min[i, j]), lo)
            np.testing.assert_array_equal(np.asarray(new_seg.k_max[i, j]), hi)


@pytest.mark.parametrize("budget", [16, 48])
def test_decode_reads_the_current_page_and_at_least_three(budget):
    """The authors' kernel always reads the last page (the one the query lands in) and their evaluation reads
    max(3, budget // page) pages: a one-page budget reads 3, the current page among them even where its
    bound ranks low."""
    case = DecodeCase.random(7, held=(150, 93, 40, 130))
    lo, hi = case.bounds()
    seg = PagedSegment(kv=case.segment(), k_min=jnp.asarray(lo), k_max=jnp.asarray(hi))
    policy = Quest(budget_tokens=budget, page=PAGE)
    assert policy.pages_read == 3
    scale = case.q.shape[-1] ** -0.5
    out, _ = case.step(policy, seg, None, scale, "reference")
    b, _, h, _, _ = case.q.shape
    forced = 0
    for i in range(b):
        for j in range(h):
            k, v, pos = case.row(i, j)
            chosen = quest_pages(case.q[i, 0, j], k, pos, case.held[i], 3, None)
            assert len(chosen) == 3 and case.held[i] // PAGE in chosen
            lo_ij, hi_ij = page_bounds(k, pos)
            q = case.q[i, 0, j]
            bound = np.maximum(q[:, None] * hi_ij[None], q[:, None] * lo_ij[None]).sum(-1).mean(0)  # [P]
            bound = np.where(np.arange(len(bound)) <= case.held[i] // PAGE, bound, -np.inf)
            forced += case.held[i] // PAGE not in np.argsort(-bound)[:3]  # the bound alone would skip it
            attended = on_pages(chosen, len(pos)) & visible_slots(pos, case.held[i], None)
            np.testing.assert_allclose(out[i, 0, j], attend(case.q[i, 0, j], k, v, attended, scale), atol=2e-6)
    assert forced > 0  # the rule was exercised


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
    slots = -(-(prompt + new) // 128) * 128  # Full's layout: whole 128-slot kernel blocks, so whole pages
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
