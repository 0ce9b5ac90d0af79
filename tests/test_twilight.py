"""Twilight: Quest's candidate pages pruned to the fewest whose attention, estimated from 4-bit keys,
reaches top_p for each query head; exact attention over the kept pages by the jnp reference and the
block-sparse decode kernels (interpreted), against a numpy reading of the paper's select-then-prune."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import init_model
from kvjax.policies import Full, Quest, Twilight
from kvjax.policies.quantized_pruning import decode_state_bytes
from kvjax.policies.twilight import EstimatedPagedSegment, smallest_covering
from pallas_kernels import kv_quant
from tests.support.page_reference import PAGE, DecodeCase, attend, on_pages, quest_pages, visible_slots
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    head_dim_32_config,
    llama8b_cache_config,
    teacher_forced,
)
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

LENGTHS = (300, 170, 40)
NEW = 12
CHUNK = 128


def _numpy_smallest_covering(mass: np.ndarray, p: float) -> np.ndarray:
    """One row: the indices of the fewest largest entries summing to >= p (all nonzero ones if none do)."""
    order = np.argsort(-mass, kind="stable")
    reached = np.flatnonzero(np.cumsum(mass[order]) >= p)
    n = reached[0] + 1 if len(reached) else int((mass > 0).sum())
    return np.sort(order[:n])


@pytest.mark.parametrize("p", [0.3, 0.85, 0.99])
def test_smallest_covering_is_the_shortest_prefix_of_the_sorted_mass(p):
    rng = np.random.default_rng(int(p * 100))
    mass = rng.dirichlet(np.full(40, 0.3), size=(3, 5)).astype(np.float32)  # [3, 5, 40] rows summing to 1
    mass[0, 0, 10:] = 0.0  # a row whose nonzero entries sum to less than p keeps all of them
    mass[0, 0, :10] *= 0.25
    got = np.asarray(smallest_covering(jnp.asarray(mass), p))
    for index in np.ndindex(mass.shape[:-1]):
        np.testing.assert_array_equal(np.flatnonzero(got[index]), _numpy_smallest_covering(mass[index], p))
    assert got.sum(-1).min() >= 1 and got.sum(-1).max() < 40


def _estimated_segment(case: DecodeCase, bits: int) -> EstimatedPagedSegment:
    lo, hi = case.bounds()
    codes, scale, zero = kv_quant.quantize_tokens(jnp.asarray(case.k), bits, case.k.shape[-1], jnp.bfloat16)
    return EstimatedPagedSegment(
        kv=case.segment(),
        k_min=jnp.asarray(lo),
        k_max=jnp.asarray(hi),
        k_codes=codes,
        k_scale=scale,
        k_zero=zero,
        bits=bits,
    )


def _estimate_keys(seg: EstimatedPagedSegment) -> np.ndarray:
    """[B, H, C, D]: every slot's estimate key, dequantized."""
    return np.asarray(kv_quant.dequantize_tokens(seg.k_codes, seg.k_scale, seg.k_zero, seg.bits, seg.kv.k.shape[-1]))


def _numpy_twilight_pages(q, k_hat, pos, position, candidates, window, p, scale) -> np.ndarray:
    """The union over the group q [G, D] of each head's fewest candidate pages covering p of its softmax
    over the candidates' visible slots, with logits from the estimate keys k_hat [C, D]."""
    seen = on_pages(candidates, len(pos)) & visible_slots(pos, position, window)
    kept = set()
    for qg in q:
        logits = np.where(seen, k_hat @ qg * scale, -np.inf)
        w = np.exp(logits - logits.max())
        page_mass = (w / w.sum()).reshape(-1, PAGE).sum(-1)[candidates]
        kept |= set(candidates[_numpy_smallest_covering(page_mass, p)])
    return np.array(sorted(kept))


@pytest.mark.parametrize(
    "impl,window", [("reference", None), ("reference", 40), ("gpu-interpret", 40), ("tpu-interpret", None)]
)  # each kernel's window path is test_quest's
def test_decode_attends_exactly_over_the_pages_covering_p_of_the_estimate(impl, window):
    case = DecodeCase.random(7 + len(impl) + (window or 0))
    policy = Twilight(budget_tokens=128, page=PAGE, top_p=0.6)  # 8 of 10 (or 6) pages
    scale = case.q.shape[-1] ** -0.5
    out, new_seg = case.step(policy, _estimated_segment(case, policy.bits), window, scale, impl)
    k_hat = _estimate_keys(new_seg)
    b, _, h, _, _ = case.q.shape
    pruned = []
    for i in range(b):
        for j in range(h):
            k, v, pos = case.row(i, j)
            held = pos >= 0
            # every held key, the new one included, within half a 4-bit step of its token's range
            step = (k.max(-1) - k.min(-1)) / 15 + 2**-7 * np.abs(k).max(-1)
            assert np.all(np.abs(k_hat[i, j] - k)[held] <= 0.5 * step[held, None] + 1e-6)
            candidates = quest_pages(case.q[i, 0, j], k, pos, case.held[i], 8, window)
            kept = _numpy_twilight_pages(
                case.q[i, 0, j], k_hat[i, j], pos, case.held[i], candidates, window, policy.top_p, scale
            )
            pruned.append(len(candidates) - len(kept))
            attended = on_pages(kept, len(pos)) & visible_slots(pos, case.held[i], window)
            np.testing.assert_allclose(out[i, 0, j], attend(case.q[i, 0, j], k, v, attended, scale), atol=2e-6)
    assert max(pruned) > 0 and min(pruned) >= 0


def test_a_query_aimed_at_one_key_reads_that_keys_page_alone():
    case = DecodeCase.random(3, held=(150,), heads=1)
    target = 37  # page 2
    q = np.broadcast_to(4.0 * case.k[0, 0, target], case.q.shape).astype(np.float32)
    policy = Twilight(budget_tokens=160, page=PAGE)  # every page a candidate (Quest's bound may miss page 2)
    q_pos = jnp.asarray([[150]], jnp.int32)

    @jax.jit
    def choose(seg, q, k, v):
        seg = policy.append(seg, k, v, q_pos, q_pos)
        return (
            Quest.choose_pages(policy, q, seg, q_pos, None, 32**-0.5),
            policy.choose_pages(q, seg, q_pos, None, 32**-0.5),
        )

    candidates, table = choose(
        _estimated_segment(case, policy.bits), jnp.asarray(q), jnp.asarray(case.k_new), jnp.asarray(case.v_new)
    )
    assert int(candidates.counts[0, 0]) == 10
    assert int(table.counts[0, 0]) == 1 and int(table.kv_blocks[0, 0, 0]) == target // PAGE


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=2), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(4, (len(LENGTHS), max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "quest": Quest(budget_tokens=64, dense_layers=1),
        "whole": Twilight(budget_tokens=1024, top_p=1.0, dense_layers=1),
        "pruned": Twilight(budget_tokens=64, top_p=0.3, dense_layers=1),
    }
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


def test_top_p_one_over_every_page_is_full_attention_and_a_low_one_reads_less_than_quest(runs):
    _, results = runs
    full, quest, whole, pruned = (results[n][0] for n in ("full", "quest", "whole", "pruned"))
    np.testing.assert_allclose(whole, full, atol=1e-5)
    assert np.abs(pruned - quest).max() > 1e-2  # Quest reads all 4 candidate pages, Twilight fewer


def test_decoded_estimate_keys_are_the_cache_keys_quantized(model, runs):
    _, results = runs
    (seg,) = results["pruned"][2].layers[1]
    assert isinstance(seg, EstimatedPagedSegment)
    k, pos = np.asarray(seg.kv.k), np.asarray(seg.kv.pos)
    step = (k.max(-1) - k.min(-1)) / 15 + 2**-7 * np.abs(k).max(-1)  # [B, H, C]
    held = pos >= 0
    assert held.sum() == model.config.num_kv_heads * (sum(LENGTHS) + len(LENGTHS) * NEW)
    assert np.all(np.abs(_estimate_keys(seg) - k)[held] <= 0.5 * step[held][:, None] + 1e-6)


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, _ = runs
    assert_generate_is_the_greedy_chain(
        model, Twilight(budget_tokens=64, top_p=0.5, dense_layers=1), tokens, LENGTHS, 6, CHUNK
    )


def test_kv_bytes_add_a_4_bit_key_per_token_to_quests():
    # Llama-3.1-8B shape, 32K prompt, 64 new tokens, bf16: Quest's state, and in the 30 sparse layers
    # each slot's key again as 64 bytes of 4-bit codes plus a bf16 scale and zero: +26.6% of the keys.
    cfg, prompt, new = llama8b_cache_config(), 32768, 64
    slots = -(-(prompt + new) // 128) * 128  # Full's layout: whole 128-slot kernel blocks, so whole pages
    estimate = (cfg.num_layers - 2) * cfg.num_kv_heads * slots * (128 * 4 // 8 + 2 * 2)
    assert decode_state_bytes(Twilight(), cfg, prompt, new) == decode_state_bytes(Quest(), cfg, prompt, new) + estimate


@pytest.mark.parametrize("kwargs", [{"top_p": 0.0}, {"top_p": 1.5}, {"bits": 3}, {"bits": 8}, {"page": 8}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="Twilight"):
        Twilight(**kwargs)
