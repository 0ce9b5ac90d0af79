"""PromptSVD: full rank is Full, the features are the prompt's top singular subspace (Eckart-Young), decoded
tokens leave the exact window onto the prompt's bases, generate, bytes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import init_model
from kvjax.config import RopeConfig
from kvjax.policies import Full, PromptSVD
from kvjax.policies.prompt_svd import LowRankSegment
from kvjax.rope import apply_rope, rope_tables, rotate_at
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    head_dim_32_config,
    llama8b_cache_config,
    teacher_forced,
    unrotated,
)
from tests.support.random_data import random_tokens

LENGTHS = (70, 20)  # row 1 starts shorter than the exact window and grows past it while decoding
NEW = 12
CHUNK = 32
RESIDUAL = 24


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(0, (2, max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {"full": Full(), "rank64": PromptSVD(1.0, 1.0, RESIDUAL), "rank16": PromptSVD(0.25, 0.5, RESIDUAL)}
    return tokens, {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()}


def projector(basis) -> np.ndarray:
    u = np.asarray(basis, np.float64)
    return u @ u.T


def test_full_rank_is_full_and_a_low_rank_differs(runs):
    _, out = runs
    full, exact, shrunk = out["full"][0], out["rank64"][0], out["rank16"][0]
    np.testing.assert_allclose(exact, full, atol=2e-4, rtol=0)
    # A random model's keys are not low-rank: a quarter of the key channels moves the logits far past it.
    assert np.max(np.abs(shrunk - full)) > 50 * 2e-4


def test_features_are_the_prompts_top_singular_subspace(model, runs):
    # Reference: the Full cache's rotated keys and values, RoPE undone in numpy, one SVD per row.
    _, out = runs
    policy = PromptSVD(0.25, 0.5, RESIDUAL)
    rank_k, rank_v = policy.ranks(model.config)
    assert (rank_k, rank_v) == (16, 32)
    (full,), (seg,) = out["full"][1].layers[0], out["rank16"][1].layers[0]
    assert isinstance(seg, LowRankSegment)
    k = unrotated(np.asarray(full.k, np.float64).swapaxes(1, 2), model.config.rope.theta)  # [B, T, K, D]
    v = np.asarray(full.v, np.float64).swapaxes(1, 2)
    for row, n in enumerate(LENGTHS):
        latent = max(n - RESIDUAL, 0)
        assert int(seg.latent_length[row]) == latent
        for x, basis, feats, rank in ((k, seg.k_basis, seg.k_latent, rank_k), (v, seg.v_basis, seg.v_latent, rank_v)):
            x = x[row, :n].reshape(n, -1)  # [n, X]
            if n <= rank:  # fewer tokens than features: the bases span them all
                np.testing.assert_allclose(x @ projector(basis[row, 0]), x, atol=1e-4)
                continue
            _, sigma, vt = np.linalg.svd(x, full_matrices=False)
            assert sigma[rank - 1] > 1.01 * sigma[rank]  # a well-defined subspace
            np.testing.assert_allclose(projector(basis[row, 0]), vt[:rank].T @ vt[:rank], atol=1e-4)
            # Eckart-Young: the stored features rebuild the tokens with the least possible error.
            rebuilt = np.asarray(feats[row, 0, :latent], np.float64) @ np.asarray(basis[row, 0], np.float64).T
            np.testing.assert_allclose(rebuilt, x[:latent] @ vt[:rank].T @ vt[:rank], atol=1e-4)
            best = np.sqrt(np.sum(sigma[rank:] ** 2))
            assert np.linalg.norm(x - x @ vt[:rank].T @ vt[:rank]) == pytest.approx(best, rel=1e-6)
        np.testing.assert_array_equal(np.asarray(seg.latent_positions()[row, :latent]), np.arange(latent))
        assert np.all(np.asarray(seg.latent_positions()[row, latent:]) == -1)
        window = np.sort(np.asarray(seg.window.pos[row, 0]))
        np.testing.assert_array_equal(window[window >= 0], np.arange(latent, n))
        np.testing.assert_allclose(  # the window holds the model's rotated keys, exact
            np.asarray(seg.window.k[row, :, : n - latent]), np.asarray(full.k[row, :, latent:n]), atol=0
        )


def test_decoded_tokens_leave_the_window_onto_the_prompts_bases(model, runs):
    tokens, out = runs
    (full,), (seg,) = out["full"][2].layers[0], out["rank16"][2].layers[0]
    (prefilled,) = out["rank16"][1].layers[0]
    k = unrotated(np.asarray(full.k, np.float64).swapaxes(1, 2), model.config.rope.theta)
    for row, n in enumerate(LENGTHS):
        total = n + NEW
        assert int(seg.latent_length[row]) == total - RESIDUAL
        window = np.sort(np.asarray(seg.window.pos[row, 0]))
        np.testing.assert_array_equal(window[window >= 0], np.arange(total - RESIDUAL, total))
        # The bases are the prompt's; every feature written while decoding is its token's key projected on them.
        np.testing.assert_array_equal(np.asarray(seg.k_basis[row]), np.asarray(prefilled.k_basis[row]))
        start = max(n - RESIDUAL, 0)
        moved = slice(start, total - RESIDUAL)
        basis = np.asarray(seg.k_basis[row, 0], np.float64)
        expected = k[row, moved].reshape(total - RESIDUAL - start, -1) @ basis
        np.testing.assert_allclose(np.asarray(seg.k_latent[row, 0, moved]), expected, atol=1e-4)
        # and the prompt's own features are untouched.
        np.testing.assert_array_equal(
            np.asarray(seg.k_latent[row, 0, :start]), np.asarray(prefilled.k_latent[row, 0, :start])
        )


@pytest.mark.parametrize("impl", ["gpu-interpret", "tpu-interpret"])
def test_decode_reads_the_full_layout_through_the_kernel(model, runs, impl):
    # Attention sees the features rebuilt and the window after them with slot = position, a prefix of
    # every row (the decode kernel's invariant), and the kernel's step equals the reference's.
    tokens, out = runs
    (seg,), (full,) = out["rank16"][2].layers[0], out["full"][2].layers[0]
    keys, _, pos = seg.assembled()
    slots = np.arange(pos.shape[-1])
    for row, n in enumerate(LENGTHS):
        total = n + NEW
        for head_pos in np.asarray(pos[row]):
            np.testing.assert_array_equal(head_pos, np.where(slots < total, slots, -1))
        window = slice(total - RESIDUAL, total)  # the exact tokens, where the rebuilt ones are approximate
        np.testing.assert_array_equal(np.asarray(keys[row, :, window]), np.asarray(full.k[row, :, window]))
    state = jax.tree.map(jnp.copy, out["rank16"][2])
    token = tokens[:, 0]
    reference, _ = kvjax.decode_step(model, jax.tree.map(jnp.copy, state), token, PromptSVD(0.25, 0.5, RESIDUAL))
    kernel, _ = kvjax.decode_step(model, state, token, PromptSVD(0.25, 0.5, RESIDUAL), attention_impl=impl)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(reference), atol=2e-4, rtol=0)


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, _ = runs
    assert_generate_is_the_greedy_chain(model, PromptSVD(0.25, 0.5, RESIDUAL), tokens, LENGTHS, NEW, CHUNK, steps=3)


def test_inverse_rotation_undoes_the_model_rotation_with_longrope_gain():
    rope = RopeConfig(
        theta=10000.0,
        kind="longrope",
        original_max_position_embeddings=64,
        short_factor=(1.0,) * 8,
        long_factor=(2.0,) * 8,
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3, 16)), jnp.float32)
    pos = jnp.asarray([[0, 7, 80, 100, 127], [3, 4, 5, 6, 7]], jnp.int32)
    for seq_len in (32, 128):  # short and long factors; the long ones scale cos and sin by 1.2
        rotated = apply_rope(x, *rope_tables(rope, 16, pos, jnp.int32(seq_len)))
        np.testing.assert_allclose(rotate_at(rope, 16, rotated, pos, jnp.int32(seq_len), inverse=True), x, atol=1e-5)
        np.testing.assert_allclose(rotate_at(rope, 16, x, pos, jnp.int32(seq_len)), rotated, atol=1e-6)


def test_kv_bytes():
    # A 4K prompt on a Llama-3.1-8B-shaped cache in bf16 (abstract shapes, nothing allocated).
    cfg, n = llama8b_cache_config(), 4096

    def decoding(policy):
        return jax.eval_shape(
            lambda: policy.finalize(
                cfg, policy.allocate(cfg, 1, n, 0, 512, jnp.bfloat16).replace(length=jnp.full((1,), n, jnp.int32)), n, 0
            )
        )

    shrunk, full = decoding(PromptSVD()), jax.eval_shape(lambda: Full().allocate(cfg, 1, n, 0, 512, jnp.bfloat16))
    x = 8 * 128
    window = 48 * 8 * (2 * 128 * 2 + 4)  # round_capacity(32 + 1) exact slots per head
    per_layer = n * x * 2 + 2 * x * 512 * 2 + window + 4 + 4  # features, bases, window, 2 lengths
    assert kvjax.kv_bytes(shrunk) == 32 * per_layer + 4
    # Half the channels (2048 bytes per token against Full's 4128 with positions), plus the bases (2 MB per
    # layer and sequence) and the window: 1.58x smaller at 4K, tending to 2.02x as the prompt grows.
    assert 1.55 < kvjax.kv_bytes(full) / kvjax.kv_bytes(shrunk) < 1.61


@pytest.mark.parametrize(
    "kwargs", [{"key_density": 0.0}, {"value_density": 1.5}, {"key_density": True}, {"residual": -1}, {"residual": 2.0}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="PromptSVD"):
        PromptSVD(**kwargs)
