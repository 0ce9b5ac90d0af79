"""ThinK: the channels the paper's score picks, thin keys stored thin, exact attention over both parts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import init_model
from kvjax.attention import reference_attention
from kvjax.kv_state import KVSegment
from kvjax.policies import H2O, KIVI, Full, Knorm, SnapKV, ThinK
from kvjax.policies.quantized_pruning import decode_state_bytes
from kvjax.policies.think import ThinKSegment, attend_thin_keys
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    eager_queries_and_keys,
    head_dim_32_config,
    llama8b_cache_config,
    teacher_forced,
)
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

LENGTHS = (450, 200)
NEW = 24
CHUNK = 128
OBSERVE = RECENT = 32


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=2), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(1, (2, max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "snapkv": SnapKV(128, window=32),
        "knorm": Knorm(300, skip_layers=()),
        "think_full": ThinK(Full()),
        "think_snapkv": ThinK(SnapKV(128, window=32)),
        "think_knorm": ThinK(Knorm(300, skip_layers=())),
        "think_full_0": ThinK(Full(), ratio=0.0),
        "think_snapkv_0": ThinK(SnapKV(128, window=32), ratio=0.0),
    }
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


def _kept(seg: KVSegment, b: int, h: int) -> np.ndarray:
    pos = np.asarray(seg.pos[b, h])
    return pos[pos >= 0]


@pytest.mark.parametrize("base", ["full", "snapkv", "knorm"])
def test_channels_are_the_papers_score_over_the_bases_kept_keys(model, runs, base):
    # Reference: score[c] = mean over the last 32 prompt queries and the group of q^2, times the mean of
    # k^2 over the entries the base kept; the top D - floor(0.4 D) channels, from an eager forward.
    tokens, results = runs
    seen = eager_queries_and_keys(model, tokens, LENGTHS)
    base_state, think_state = results[base][1], results[f"think_{base}"][1]
    d = model.config.head_dim
    keep = d - int(0.4 * d)
    for layer, (q, k) in enumerate(seen):
        (seg,), (thin,) = base_state.layers[layer], think_state.layers[layer]
        assert isinstance(thin, ThinKSegment) and thin.thin.k.shape[-1] == keep
        for b, length in enumerate(LENGTHS):
            for h in range(model.config.num_kv_heads):
                kept = _kept(seg, b, h)
                q_energy = np.mean(q[b, length - OBSERVE : length, h] ** 2, axis=(0, 1))  # [D]
                k_energy = np.mean(k[b, kept, h] ** 2, axis=0)  # [D]
                expected = np.sort(np.argsort(-(q_energy * k_energy))[:keep])
                np.testing.assert_array_equal(np.asarray(thin.channels[b, h]), expected)


@pytest.mark.parametrize("base", ["full", "snapkv", "knorm"])
@pytest.mark.parametrize("phase", [1, 2], ids=["prefilled", "decoded"])
@pytest.mark.parametrize("layer", [0, 1])
def test_thin_and_full_keys_hold_the_bases_entries(runs, base, phase, layer):
    # The base's kept positions split into thin keys (all but the last 32, kept channels only, exact)
    # and full keys (the last 32, then every generated token, all channels); values untouched.
    _, results = runs
    base_seg = results[base][phase].layers[layer][0]
    seg = results[f"think_{base}"][phase].layers[layer][0]
    for b in range(2):
        for h in range(2):
            kept = _kept(base_seg, b, h)
            n_thin = len(kept) - (RECENT + (NEW if phase == 2 else 0))
            thin_pos, full_pos = _kept(seg.thin, b, h), _kept(seg.full, b, h)
            np.testing.assert_array_equal(np.concatenate([thin_pos, full_pos]), kept)
            assert len(thin_pos) == n_thin
            slots = np.flatnonzero(np.asarray(base_seg.pos[b, h]) >= 0)
            k, v = np.asarray(base_seg.k[b, h]), np.asarray(base_seg.v[b, h])
            channels = np.asarray(seg.channels[b, h])
            np.testing.assert_array_equal(np.asarray(seg.thin.k[b, h, :n_thin]), k[slots[:n_thin]][:, channels])
            np.testing.assert_array_equal(np.asarray(seg.thin.v[b, h, :n_thin]), v[slots[:n_thin]])
            # Generated tokens' entries past layer 0 differ from the base's (layer 0 attended thinner keys).
            n = len(full_pos) if layer == 0 else RECENT
            np.testing.assert_allclose(np.asarray(seg.full.k[b, h, :n]), k[slots[n_thin:]][:n], atol=1e-6)
            np.testing.assert_allclose(np.asarray(seg.full.v[b, h, :n]), v[slots[n_thin:]][:n], atol=1e-6)


@pytest.mark.parametrize("base", ["full", "snapkv"])
def test_ratio_zero_reproduces_the_base_and_ratio_04_moves_logits(runs, base):
    _, results = runs
    reference = results[base][0]
    np.testing.assert_allclose(results[f"think_{base}_0"][0], reference, atol=1e-5)
    assert np.abs(results[f"think_{base}"][0] - reference).max() > 1e-2  # the pruning really acts


def _segments(rng, b, h, d, keep, c_thin, c_full, n_thin, n_full):
    """A random ThinKSegment with ragged valid prefixes and its dense equivalent (dropped channels zero)."""
    k_full_thin = rng.normal(size=(b, h, c_thin, d)).astype(np.float32)
    channels = np.sort(np.stack([[rng.permutation(d)[:keep] for _ in range(h)] for _ in range(b)]), -1)
    masked = np.zeros_like(k_full_thin)
    for i in range(b):
        for j in range(h):
            masked[i, j][:, channels[i, j]] = k_full_thin[i, j][:, channels[i, j]]
    thin_k = np.take_along_axis(k_full_thin, channels[:, :, None, :], axis=3)
    slots_t, slots_f = np.arange(c_thin), np.arange(c_full)
    pos_t = np.where(slots_t < n_thin[:, None, None], slots_t * 3, -1).astype(np.int32)  # spread positions
    pos_f = np.where(slots_f < n_full[:, None, None], 3 * c_thin + slots_f, -1).astype(np.int32)
    pos_t, pos_f = np.broadcast_to(pos_t, (b, h, c_thin)), np.broadcast_to(pos_f, (b, h, c_full))
    v_t = rng.normal(size=(b, h, c_thin, d)).astype(np.float32)
    k_f, v_f = (rng.normal(size=(b, h, c_full, d)).astype(np.float32) for _ in range(2))
    seg = ThinKSegment(
        thin=KVSegment(k=jnp.asarray(thin_k), v=jnp.asarray(v_t), pos=jnp.asarray(pos_t), heads=tuple(range(h))),
        channels=jnp.asarray(channels, jnp.int32),
        full=KVSegment(k=jnp.asarray(k_f), v=jnp.asarray(v_f), pos=jnp.asarray(pos_f), heads=tuple(range(h))),
    )
    dense = (np.concatenate([masked, k_f], 2), np.concatenate([v_t, v_f], 2), np.concatenate([pos_t, pos_f], 2))
    return seg, dense


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("t", [1, 5])
def test_attention_equals_dense_attention_with_dropped_channels_zeroed(t, window):
    rng = np.random.default_rng(0)
    b, h, g, d = 2, 2, 3, 16
    seg, (k, v, pos) = _segments(rng, b, h, d, 10, 48, 32, np.array([40, 7]), np.array([20, 32]))
    q = jnp.asarray(rng.normal(size=(b, t, h, g, d)).astype(np.float32))
    q_pos = jnp.asarray(np.array([[150] * t, [100] * t]) + np.arange(t), jnp.int32)
    got = attend_thin_keys(q, seg, q_pos, window, d**-0.5)
    want = reference_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), q_pos, window, d**-0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, _ = runs
    assert_generate_is_the_greedy_chain(model, ThinK(SnapKV(128, window=32)), tokens, LENGTHS, 12, CHUNK)


@pytest.mark.parametrize("base", [SnapKV(1024), Full()], ids=["snapkv", "full"])
def test_kv_bytes_store_thin_keys(base):
    # Llama-3.1-8B shape, 32K prompt, 64 new tokens, bf16: the thin keys keep 77 of 128 channels.
    cfg, prompt, new = llama8b_cache_config(), 32768, 64
    kept = min(base.budget_tokens if isinstance(base, SnapKV) else prompt, prompt)
    thin, full = -(-(kept - RECENT) // 16) * 16, -(-(RECENT + new) // 16) * 16
    per_head = thin * (77 * 2 + 128 * 2 + 4) + 77 * 4 + full * (2 * 128 * 2 + 4)
    expected = cfg.num_layers * cfg.num_kv_heads * per_head + 4
    assert decode_state_bytes(ThinK(base), cfg, prompt, new) == expected
    assert decode_state_bytes(ThinK(base), cfg, prompt, new) < 0.83 * decode_state_bytes(
        base, cfg, prompt, new
    )  # ideal: (77 + 128) / 256 = 0.80


@pytest.mark.parametrize("base", [H2O(), KIVI()], ids=lambda p: type(p).__name__)
def test_bases_it_cannot_stack_on_raise(base):
    with pytest.raises(ValueError, match="ThinK stacks on Full or"):
        ThinK(base)


@pytest.mark.parametrize("kwargs", [{"ratio": 1.0}, {"ratio": -0.1}, {"observe": 0}, {"recent": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="ThinK"):
        ThinK(**kwargs)
