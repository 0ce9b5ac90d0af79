"""MiKV: nothing evicted is lost, demoted entries are the quantized originals, mixed precision beats eviction."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import init_model
from kvjax.policies import H2O, KIVI, Full, MiKV, SnapKV, StreamingLLM
from kvjax.policies.mikv import MixedSegment
from kvjax.policies.quantized_pruning import decode_state_bytes
from pallas_kernels import kv_quant
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    head_dim_32_config,
    llama8b_cache_config,
    rms,
    teacher_forced,
)
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

LENGTHS = (450, 200)
NEW = 20
CHUNK = 128
HEAVY = WINDOW = 32


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=2), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(2, (2, max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "h2o": H2O(HEAVY, WINDOW),
        "mikv4": MiKV(H2O(HEAVY, WINDOW), 4),
        "mikv2": MiKV(H2O(HEAVY, WINDOW), 2),
        "streaming": MiKV(StreamingLLM(4, 60), 4),
    }
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


def _held(pos) -> np.ndarray:
    pos = np.asarray(pos)
    return pos[pos >= 0]


@pytest.mark.parametrize("name", ["mikv4", "mikv2", "streaming"])
@pytest.mark.parametrize("phase", [1, 2], ids=["prefilled", "decoded"])
def test_no_token_left_behind(runs, name, phase):
    # Every position seen is held exactly once; the base's budget at full precision, its recent window
    # among them (H2O never evicts it; StreamingLLM keeps its sink and window).
    _, results = runs
    for layer in results[name][phase].layers:
        (seg,) = layer
        assert isinstance(seg, MixedSegment)
        for b, length in enumerate(LENGTHS):
            seen = length + (NEW if phase == 2 else 0)
            for h in range(2):
                high, low = _held(seg.high.pos[b, h]), _held(seg.low.pos[b, h])
                np.testing.assert_array_equal(np.sort(np.concatenate([high, low])), np.arange(seen))
                assert len(high) == min(seen, seg.high.budget)
                recent = 60 if name == "streaming" else WINDOW
                assert set(range(seen - recent, seen)) <= set(high.tolist())
                if name == "streaming":
                    np.testing.assert_array_equal(np.sort(high), np.r_[0:4, seen - 60 : seen])


@pytest.mark.parametrize("name", ["mikv4", "mikv2"])
def test_demoted_entries_are_the_originals_quantized_per_token(runs, name):
    # Layer 0's keys and values depend on the tokens only, so Full's are the originals: every demoted
    # entry dequantizes to within half its group's scale of them; full-precision entries are exact.
    _, results = runs
    full = results["full"][2].layers[0][0]
    seg = results[name][2].layers[0][0]
    k_low, v_low = (np.asarray(x) for x in seg.low.dequantize(jnp.float32))
    for b in range(2):
        for h in range(2):
            slots = np.flatnonzero(np.asarray(seg.low.pos[b, h]) >= 0)
            pos = np.asarray(seg.low.pos[b, h])[slots]
            for got, original, scale in ((k_low, full.k, seg.low.k_scale), (v_low, full.v, seg.low.v_scale)):
                bound = np.repeat(np.asarray(scale[b, h], np.float32)[slots], seg.low.group, -1) / 2 + 1e-5
                err = np.abs(got[b, h][slots] - np.asarray(original[b, h])[pos])
                assert (err <= bound).all() and err.max() > 0
            high_slots = np.flatnonzero(np.asarray(seg.high.pos[b, h]) >= 0)
            np.testing.assert_allclose(
                np.asarray(seg.high.k[b, h])[high_slots],
                np.asarray(full.k[b, h])[np.asarray(seg.high.pos[b, h])[high_slots]],
                atol=1e-6,
            )


def test_mixed_precision_stays_far_closer_to_full_than_eviction(runs):
    # The paper's point: demoting instead of evicting keeps the output near Full's. Measured on this
    # model: H2O 0.27, MiKV int4 0.015, int2 0.085 (rms logit error over 20 decode steps).
    _, results = runs
    reference = results["full"][0]
    evicted = rms(results["h2o"][0], reference)
    assert rms(results["mikv4"][0], reference) < 0.15 * evicted
    assert rms(results["mikv2"][0], reference) < 0.5 * evicted
    assert rms(results["mikv4"][0], reference) < rms(results["mikv2"][0], reference)


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, _ = runs
    assert_generate_is_the_greedy_chain(model, MiKV(H2O(HEAVY, WINDOW), 4), tokens, LENGTHS, 8, CHUNK, steps=7)


@pytest.mark.parametrize("bits", [4, 2])
def test_kv_bytes_hold_the_budget_at_full_precision_and_the_rest_packed(bits):
    # Llama-3.1-8B shape, 32K prompt, 64 new tokens, bf16, H2O(512, 512).
    cfg = llama8b_cache_config()
    prompt, new, budget = 32768, 64, 1024
    high = -(-(budget + 1) // 16) * 16 * (2 * 128 * 2 + 4 + 4)  # k, v, position, H2O's score
    low = -(-(prompt + new - budget + 1) // 16) * 16 * (2 * 128 * bits // 8 + 4 * 2 * 128 // 32 + 4)
    expected = cfg.num_layers * cfg.num_kv_heads * (high + low) + 4
    policy = MiKV(H2O(512, 512), bits)
    assert decode_state_bytes(policy, cfg, prompt, new) == expected
    ratio = decode_state_bytes(policy, cfg, prompt, new) / decode_state_bytes(Full(), cfg, prompt, new)
    assert ratio < {4: 0.35, 2: 0.22}[bits]


@pytest.mark.parametrize("base", [SnapKV(), KIVI()], ids=lambda p: type(p).__name__)
def test_bases_that_do_not_evict_as_they_go_raise(base):
    with pytest.raises(ValueError, match="MiKV demotes"):
        MiKV(base)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="bits"):
        MiKV(bits=3)
    with pytest.raises(ValueError, match="divide the head dim"):
        MiKV(group=64).allocate(head_dim_32_config(), 1, 100, 0, 100, jnp.float32)


def test_per_token_codes_round_trip_within_half_a_scale_and_own_their_bytes():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7, 64)).astype(np.float32))
    for bits in (4, 2):
        codes, scale, zero = kv_quant.quantize_tokens(x, bits, 32)
        assert codes.shape == (2, 3, 7, 64 * bits // 8) and scale.shape == (2, 3, 7, 2)
        err = np.abs(np.asarray(kv_quant.dequantize_tokens(codes, scale, zero, bits, 32)) - np.asarray(x))
        assert (err <= np.repeat(np.asarray(scale, np.float32), 32, -1) / 2 + 1e-6).all()
        one, _, _ = kv_quant.quantize_tokens(x[:, :, 3:4], bits, 32)  # a token alone: the same bytes
        np.testing.assert_array_equal(np.asarray(one[:, :, 0]), np.asarray(codes[:, :, 3]))
