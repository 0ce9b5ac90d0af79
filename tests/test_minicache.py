"""MiniCache: SLERP merge and reconstruction against numpy, the retained set against a numpy transcription
of the rule, retaining everything is Full, bytes, a long ragged decode, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import init_model
from kvjax.kv_state import KVSegment, position_capacity, round_capacity
from kvjax.policies import Full, MiniCache
from kvjax.policies.minicache import MergedPairs, MergedSegment, rebuilt, slerp_merge
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    head_dim_32_config,
    llama8b_cache_config,
    teacher_forced,
)
from tests.support.random_data import random_tokens

LENGTHS = (70, 20)  # ragged: row 1's prompt ends three chunks before row 0's
NEW = 12
CHUNK = 32
PADDED = 96  # the prompt length the layout sees: 70 in chunks of 32
# Five layers: layers 0-1 Full, (2, 3) one merged pair, layer 4 left over (Full).
CAPPED = MiniCache(gamma=0.5, max_retained=0.1)  # 16 retained slots, fewer than the rule picks on row 0
EVERYTHING = MiniCache(gamma=1.0, max_retained=1.0)


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=5), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(0, (2, max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {"full": Full(), "default": MiniCache(), "capped": CAPPED, "everything": EVERYTHING}
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


def np_slerp(xa: np.ndarray, xb: np.ndarray, t: float):
    """The paper's merge in float64 numpy: (direction, |xa|, |xb|, angle / pi) per vector of [..., D]."""
    na, nb = np.linalg.norm(xa, axis=-1), np.linalg.norm(xb, axis=-1)
    ua, ub = xa / na[..., None], xb / nb[..., None]
    angle = np.arccos(np.clip(np.sum(ua * ub, -1), -1, 1))
    e = (np.sin((1 - t) * angle) * ua.T + np.sin(t * angle) * ub.T).T / np.sin(angle)[..., None]
    return e, na, nb, angle / np.pi


def test_slerp_merge_restores_norms_with_the_analytic_error():
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(2, 50, 16)) * rng.uniform(0.1, 5, size=(2, 50, 1))
    for t in (0.0, 0.25, 0.6, 1.0):
        e, na, nb, d = (np.asarray(x, np.float64) for x in slerp_merge(jnp.asarray(xa), jnp.asarray(xb), t))
        ref_e, ref_na, ref_nb, ref_d = np_slerp(xa, xb, t)
        np.testing.assert_allclose(e, ref_e, atol=2e-5)
        np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)  # a unit direction
        np.testing.assert_allclose(na, ref_na, rtol=1e-6)
        np.testing.assert_allclose(nb, ref_nb, rtol=1e-6)
        np.testing.assert_allclose(d, ref_d, atol=1e-6)
        # Each layer is rebuilt as its own norm times e, which lies at t W from xa and (1 - t) W from xb:
        # the chord errors |x| * 2 sin(angle / 2).
        w = d * np.pi
        np.testing.assert_allclose(np.linalg.norm(na[:, None] * e - xa, axis=-1), na * 2 * np.sin(t * w / 2), atol=2e-4)
        np.testing.assert_allclose(
            np.linalg.norm(nb[:, None] * e - xb, axis=-1), nb * 2 * np.sin((1 - t) * w / 2), atol=2e-4
        )
    # Parallel vectors of different lengths merge exactly; a zero vector is rebuilt as zero.
    e, na, nb, d = slerp_merge(jnp.asarray(xa[:3]), jnp.asarray(3.0 * xa[:3]), 0.6)
    np.testing.assert_allclose(np.asarray(nb)[:, None] * np.asarray(e), 3.0 * xa[:3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-3)
    e, na, _, _ = slerp_merge(jnp.zeros((1, 16)), jnp.asarray(xb[:1]), 0.6)
    assert np.all(np.isfinite(np.asarray(e))) and float(na[0]) == 0.0


def np_retained(dk: np.ndarray, dv: np.ndarray, n: int, gamma: float, capacity: int) -> set[int]:
    """The retention rule per (sequence, KV head) row over its n prompt tokens: keys' or values' angular
    distance in the top gamma of the row's [d_min, d_max]; the `capacity` most distant of those."""
    best = np.full(n, -np.inf)
    for d in (dk[:n], dv[:n]):
        normalised = (d - d.min()) / (d.max() - d.min())
        best = np.maximum(best, np.where(normalised >= 1 - gamma, normalised, -np.inf))
    picked = [i for i in np.argsort(-best, kind="stable")[:capacity] if best[i] > -np.inf]
    return set(int(i) for i in picked)


@pytest.mark.parametrize("name", ["capped", "default"])
def test_merge_and_retention_match_numpy(model, runs, name):
    _, out = runs
    policy = {"capped": CAPPED, "default": MiniCache()}[name]
    full, state = out["full"][1], out[name][1]
    assert policy.start(model.config) == 2 and policy.pairs(model.config) == 1
    for layer in (0, 1, 4):  # unmerged layers hold exactly Full's entries
        np.testing.assert_array_equal(np.asarray(state.layers[layer][0].k), np.asarray(full.layers[layer][0].k))
    shared = state.shared
    assert isinstance(shared, MergedPairs) and shared.k_dir.shape == (2, 1, 2, PADDED, 32)
    capacity = policy.retained_capacity(PADDED)
    (a,), (b,) = full.layers[2], full.layers[3]
    picked_some = False
    for row, n in enumerate(LENGTHS):
        for h in range(2):
            ka, kb, va, vb = (np.asarray(x, np.float64)[row, h, :n] for x in (a.k, b.k, a.v, b.v))
            k_dir, ka_n, kb_n, dk = np_slerp(ka, kb, policy.t)
            v_dir, va_n, vb_n, dv = np_slerp(va, vb, policy.t)
            # One direction per pair (shared), each layer its own norms: Full's prefill entries, merged.
            np.testing.assert_allclose(np.asarray(shared.k_dir[row, 0, h, :n]), k_dir, atol=3e-5)
            np.testing.assert_allclose(np.asarray(shared.v_dir[row, 0, h, :n]), v_dir, atol=3e-5)
            kept = np_retained(dk, dv, n, policy.gamma, capacity)
            picked_some |= bool(kept)
            for layer, norms, exact in ((2, (ka_n, va_n), (ka, va)), (3, (kb_n, vb_n), (kb, vb))):
                seg = state.layers[layer][0]
                assert isinstance(seg, MergedSegment)
                np.testing.assert_allclose(np.asarray(seg.k_norm[row, h, :n]), norms[0], rtol=1e-5)
                np.testing.assert_allclose(np.asarray(seg.v_norm[row, h, :n]), norms[1], rtol=1e-5)
                pos = np.asarray(seg.retained.pos[row, h])
                assert set(pos[pos >= 0].tolist()) == kept
                # Rebuilt: norm x direction, the retained entries exact.
                k, v, rebuilt_pos = (np.asarray(x[row, h]) for x in rebuilt(seg, shared, layer))
                expected_k, expected_v = norms[0][:, None] * k_dir, norms[1][:, None] * v_dir
                rows = sorted(kept)
                expected_k[rows], expected_v[rows] = exact[0][rows], exact[1][rows]
                np.testing.assert_allclose(k[:n], expected_k, atol=1e-4)
                np.testing.assert_allclose(v[:n], expected_v, atol=1e-4)
                np.testing.assert_array_equal(rebuilt_pos, np.where(np.arange(PADDED) < n, np.arange(PADDED), -1))
    assert picked_some
    if name == "capped":  # the cap binds on the long row: the rule alone picks more than 16
        dk = np_slerp(*(np.asarray(x, np.float64)[0, 0, :70] for x in (a.k, b.k)), 0.6)[3]
        dv = np_slerp(*(np.asarray(x, np.float64)[0, 0, :70] for x in (a.v, b.v)), 0.6)[3]
        assert len(np_retained(dk, dv, 70, 0.5, 70)) > capacity == 16


def test_retaining_everything_is_full(model, runs):
    tokens, out = runs
    np.testing.assert_allclose(out["everything"][0], out["full"][0], atol=1e-5, rtol=0)
    # whereas the default merge moves the logits (a random model's adjacent layers are far apart)
    assert np.max(np.abs(out["default"][0] - out["full"][0])) > 1e-2
    # chunk_size=None (one 512-token chunk) prefill gives the same state as chunks of 32
    prompts, lengths = tokens[:, : max(LENGTHS)], np.asarray(LENGTHS)
    one = kvjax.prefill(model, prompts, EVERYTHING, lengths=lengths, max_new_tokens=NEW)
    logits, _ = kvjax.decode_step(model, one, tokens[np.arange(2), lengths], EVERYTHING)
    np.testing.assert_allclose(np.asarray(logits), out["full"][0][:, 0], atol=1e-5, rtol=0)


def test_unrolled_layers_decode_as_the_scanned_ones(model, runs):
    # Pair indices come from a traced layer index inside the scan and from a Python int when unrolled.
    tokens, out = runs
    state, token = out["default"][1], tokens[np.arange(2), np.asarray(LENGTHS)]
    scanned, _ = kvjax.decode_step(model, jax.tree.map(jnp.copy, state), token, MiniCache(), scan_layers=True)
    unrolled, _ = kvjax.decode_step(model, jax.tree.map(jnp.copy, state), token, MiniCache(), scan_layers=False)
    np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(scanned), out["default"][0][:, 0], atol=1e-5, rtol=0)


def test_long_ragged_decode(model):
    # 60 decoded tokens per row land in each merged layer's exact window; the merged prompt is untouched.
    new = 60
    tokens = random_tokens(1, (2, 40 + new), model.config.vocab_size)
    policy = MiniCache()
    assert_generate_is_the_greedy_chain(model, policy, tokens, (40, 9), new, CHUNK, steps=2)
    out = teacher_forced(model, policy, tokens, (40, 9), new, CHUNK)
    prefilled, decoded = out[1], out[2]
    for layer in (2, 3):
        seg, before = decoded.layers[layer][0], prefilled.layers[layer][0]
        assert seg.window.capacity == round_capacity(new)
        for row, n in enumerate((40, 9)):
            pos = np.asarray(seg.window.pos[row, 0])
            np.testing.assert_array_equal(pos[:new], np.arange(n, n + new))
            assert np.all(pos[new:] == -1)
        np.testing.assert_array_equal(np.asarray(seg.k_norm), np.asarray(before.k_norm))
    np.testing.assert_array_equal(np.asarray(decoded.shared.k_dir), np.asarray(prefilled.shared.k_dir))
    # Continuing the state with ragged rows (a question after a compressed context) writes what decode steps
    # write: every shared array is per sequence, so finished rows keep theirs.
    rows = [tokens[0, 40:45], tokens[1, 9:12]]
    continued = kvjax.prefill(model, rows, policy, state=jax.tree.map(jnp.copy, prefilled))
    state = jax.tree.map(jnp.copy, prefilled)
    for i in range(5):
        step = np.asarray([tokens[0, 40 + i], tokens[1, 9 + min(i, 2)]])
        _, new_state = kvjax.decode_step(model, jax.tree.map(jnp.copy, state), step, policy)
        keep = np.asarray([True, i < 3])
        pick = lambda n, o: jnp.where(keep.reshape((2,) + (1,) * (n.ndim - 1)), n, o)  # noqa: E731
        parts = jax.tree.map(pick, (new_state.layers, new_state.shared), (state.layers, state.shared))
        state = new_state.replace(layers=parts[0], shared=parts[1])
    for a, b in zip(jax.tree.leaves(continued.layers[3]), jax.tree.leaves(state.layers[3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(continued.length), [45, 12])


def test_kv_bytes():
    # A 4K prompt on a Llama-3.1-8B-shaped cache in bf16 (abstract shapes, nothing allocated): layers 0-15 Full,
    # eight pairs from layer 16 on, each storing one direction per entry and both layers' norms.
    cfg, n, new = llama8b_cache_config(), 4096, 64
    policy = MiniCache()

    def decoding(p):
        state = p.allocate(cfg, 1, n, new, 512, jnp.bfloat16).replace(length=jnp.full((1,), n, jnp.int32))
        return jax.eval_shape(lambda: p.finalize(cfg, state, n, new))

    shrunk, full = decoding(policy), decoding(Full())
    entry = 8 * (2 * 128 * 2 + 4)  # per slot: k and v of 8 KV heads in bf16, int32 positions
    full_layer = position_capacity(n + new) * entry
    assert kvjax.kv_bytes(full) == 32 * full_layer + 4
    retained = policy.retained_capacity(n)
    assert retained == round_capacity(math.ceil(0.05 * n)) == 208
    per_pair = (
        n * 8 * 128 * 2 * 2  # keys' and values' directions, once
        + 2 * n * 8 * 2 * 2  # both layers' key and value norms
        + 2 * retained * entry  # both layers' exact entries beside the merge
        + 2 * round_capacity(new) * entry  # both layers' decode windows
    )
    assert kvjax.kv_bytes(shrunk) == 16 * full_layer + 8 * per_pair + 4 + 4
    # The second layer of a pair holds no direction: only its norms, retained entries and window.
    leaves = jax.tree.leaves(shrunk.layers[17])
    assert sum(x.size for x in leaves) < 0.2 * n * 8 * 128
    assert 1.25 < kvjax.kv_bytes(full) / kvjax.kv_bytes(shrunk) < 1.3  # 4/3 at most, from half the layers


def test_no_pairs_is_full_and_start_layer_counts(model):
    cfg = model.config
    assert MiniCache(start_layer=4).pairs(cfg) == 0 and MiniCache(start_layer=0).pairs(cfg) == 2
    state = Full().allocate(cfg, 1, 32, 0, 32, jnp.float32)
    assert MiniCache(start_layer=5).finalize(cfg, state, 32, 0) is state
    with pytest.raises(ValueError, match="past the model"):
        MiniCache(start_layer=6).check_model(cfg)
    merged = MiniCache(start_layer=0).finalize(cfg, state.replace(length=jnp.ones((1,), jnp.int32)), 32, 0)
    assert [type(layer[0]) for layer in merged.layers] == [MergedSegment] * 4 + [KVSegment]


@pytest.mark.parametrize(
    "kwargs",
    [{"t": 1.5}, {"t": True}, {"gamma": -0.1}, {"max_retained": 2.0}, {"start_layer": -1}, {"start_layer": 1.0}],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="MiniCache"):
        MiniCache(**kwargs)
