"""CSKV with fixed factors: SVD factors are Eckart-Young optimal for W_k, ASVD's follow the authors' rule and
beat SVD on activation-weighted error, fine-tuning lowers the layer-wise loss toward its minimum, full rank is
Full, the cache holds each token's features from the factors, generate, bytes, files, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import init_model
from kvjax.checkpoint import CheckpointError
from kvjax.language_model import LanguageModel
from kvjax.layer_step import LayerContext
from kvjax.policies import CSKV, Full
from kvjax.policies.cskv import (
    FACTORS_FILE,
    FactoredSegment,
    calibration_stats,
    factor_shapes,
    factors_from_stats,
    fit_factors,
    load_factors,
    reconstruction_loss,
    save_factors,
)
from kvjax.rope import rope_tables
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
OUTLIERS = (3, 17, 40)  # input channels the tiny model's norms make 8x larger (what ASVD is for)


@pytest.fixture(scope="module")
def model():
    """Two layers (the second reads its factors at a traced layer index), X = Hkv * D = 64 = E, and a few
    input channels with large activations, as real models have."""
    m = init_model(head_dim_32_config(num_layers=2), seed=0, dtype=jnp.float32)
    module = m.module()
    for block in module.blocks:
        block.input_norm.weight[...] = block.input_norm.weight[...].at[np.asarray(OUTLIERS)].set(8.0)
    graphdef, params = nnx.split(module)
    return LanguageModel(config=m.config, graphdef=graphdef, params=params)


@pytest.fixture(scope="module")
def calibration(model):
    return random_tokens(1, (3, 48), model.config.vocab_size)


@pytest.fixture(scope="module")
def stats(model, calibration):
    return calibration_stats(model, calibration, lengths=[48, 30, 41], batch=2)


@pytest.fixture(scope="module")
def runs(model, stats):
    tokens = random_tokens(0, (2, max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "rank64": CSKV(RESIDUAL, params=factors_from_stats(stats, 64, 64, method="svd")),
        "rank16": CSKV(RESIDUAL, params=factors_from_stats(stats, 16, 32)),
    }
    return (
        tokens,
        policies,
        {name: teacher_forced(model, p, tokens, LENGTHS, NEW, CHUNK) for name, p in policies.items()},
    )


def attention_inputs(model, tokens, lengths) -> list[np.ndarray]:
    """float64[N, E] per layer: the inputs of the K and V projections at the valid tokens (the reference for
    ASVD's statistic), from an eager block-by-block forward checked against the model's own forward."""
    module, cfg = model.module(), model.config
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < jnp.asarray(lengths)[:, None]
    rope = rope_tables(cfg.rope, cfg.head_dim, positions, jnp.int32(t))
    h, out = module.embed[...][jnp.asarray(tokens)], []
    for i, block in enumerate(module.blocks):
        out.append(np.asarray(block.input_norm(h), np.float64)[np.asarray(valid)])
        h, _, _ = block(h, positions, valid, rope, LayerContext(i, None, cfg.head_dim**-0.5), None, None, None)
    final, _, _ = module(jnp.asarray(tokens), positions, valid, seq_len=jnp.int32(t))
    np.testing.assert_allclose(
        np.asarray(module.final_norm(h))[np.asarray(valid)], np.asarray(final)[np.asarray(valid)], atol=1e-5
    )
    return out


def test_svd_factors_reach_the_eckart_young_error_of_w(stats):
    for rank in (8, 16, 40):
        factors = factors_from_stats(stats, rank, rank, method="svd")
        for layer in range(2):
            for kv in "kv":
                w = stats.w_k[layer] if kv == "k" else stats.w_v[layer]
                w = w.astype(np.float64)
                approx = w @ factors[f"{kv}_down"][layer].astype(np.float64) @ factors[f"{kv}_up"][layer]
                sigma = np.linalg.svd(w, compute_uv=False)
                best = np.sqrt(np.sum(sigma[rank:] ** 2))
                assert np.linalg.norm(w - approx) == pytest.approx(best, rel=1e-4)
                # B = V_r^T: orthonormal rows, down its transpose
                up = factors[f"{kv}_up"][layer].astype(np.float64)
                np.testing.assert_allclose(up @ up.T, np.eye(rank), atol=1e-5)
                np.testing.assert_array_equal(factors[f"{kv}_down"][layer], factors[f"{kv}_up"][layer].T)


def test_asvd_factors_follow_the_authors_rule(model, calibration, stats):
    # Reference: the normed inputs recorded in numpy, s = mean |x| ** 0.5 per channel, the SVD of diag(s) W.
    inputs = attention_inputs(model, calibration, [48, 30, 41])
    factors = factors_from_stats(stats, 16, 16, method="asvd")
    for layer, x in enumerate(inputs):
        assert x.shape == (48 + 30 + 41, model.config.hidden_size)
        np.testing.assert_allclose(stats.abs_mean[layer], np.mean(np.abs(x), axis=0), rtol=1e-5)
        s = (np.mean(np.abs(x), axis=0) + 1e-6) ** 0.5
        _, _, vt = np.linalg.svd(s[:, None] * stats.w_k[layer].astype(np.float64))
        projector = factors["k_down"][layer].astype(np.float64) @ factors["k_up"][layer]
        np.testing.assert_allclose(projector, vt[:16].T @ vt[:16], atol=1e-5)
        # the Gram matrix of the keys before RoPE is x W_k's
        keys = x @ stats.w_k[layer].astype(np.float64)
        np.testing.assert_allclose(stats.k_gram[layer], keys.T @ keys, rtol=1e-4, atol=1e-3)


def test_activation_aware_and_fine_tuned_factors_lower_the_activation_weighted_error(model, calibration, stats):
    inputs = attention_inputs(model, calibration, [48, 30, 41])
    svd = factors_from_stats(stats, 16, 16, method="svd")
    asvd = factors_from_stats(stats, 16, 16, method="asvd")
    tuned = factors_from_stats(stats, 16, 16, method="asvd", steps=200, lr=1e-3)
    for layer, x in enumerate(inputs):
        keys = x @ stats.w_k[layer].astype(np.float64)  # [N, X]: x W_k, what the cache must rebuild

        def error(f):  # |x W - x A B| with A = W down, B = up
            return np.linalg.norm(keys - keys @ f["k_down"][layer].astype(np.float64) @ f["k_up"][layer])

        sigma = np.linalg.svd(keys, compute_uv=False)
        optimum = np.sqrt(np.sum(sigma[16:] ** 2))  # the best any rank-16 A B does on these inputs
        assert optimum <= error(tuned) < error(asvd) < 0.9 * error(svd)
        # The Gram form of the loss is the per-entry MSE over the tokens.
        loss = reconstruction_loss(
            jnp.asarray(stats.k_gram[layer]), tuned["k_down"][layer], tuned["k_up"][layer], len(x)
        )
        assert float(loss) == pytest.approx(error(tuned) ** 2 / keys.size, rel=1e-3)


def test_full_rank_is_full_and_a_low_rank_differs(runs):
    _, _, out = runs
    full, exact, shrunk = out["full"][0], out["rank64"][0], out["rank16"][0]
    np.testing.assert_allclose(exact, full, atol=1e-5, rtol=0)
    assert np.max(np.abs(shrunk - full)) > 100 * 1e-5


def test_the_cache_holds_every_tokens_features_and_the_last_residual_exact(model, runs):
    # Reference: the Full cache's keys with RoPE undone in numpy, projected on the factors, per token. Layer 0
    # sees the same tokens in both runs; layer 1 only the same prompt (decoding differs after layer 0).
    tokens, policies, out = runs
    factors = policies["rank16"].params
    for layer in (0, 1):
        (full,), (seg,) = out["full"][2].layers[layer], out["rank16"][2].layers[layer]
        (prefilled,) = out["rank16"][1].layers[layer]
        assert isinstance(seg, FactoredSegment)
        assert seg.k_latent.shape[-1] == 16 and seg.v_latent.shape[-1] == 32
        k = unrotated(np.asarray(full.k, np.float64).swapaxes(1, 2), model.config.rope.theta)  # [B, T, K, D]
        v = np.asarray(full.v, np.float64).swapaxes(1, 2)
        for row, n in enumerate(LENGTHS):
            total = n + NEW
            assert int(prefilled.latent_length[row]) == max(n - RESIDUAL, 0)
            assert int(seg.latent_length[row]) == total - RESIDUAL
            window = np.sort(np.asarray(seg.window.pos[row, 0]))
            np.testing.assert_array_equal(window[window >= 0], np.arange(total - RESIDUAL, total))
            same = total if layer == 0 else n
            for x, kv in ((k, "k"), (v, "v")):
                expected = x[row, :same].reshape(same, -1) @ np.asarray(factors[f"{kv}_down"][layer], np.float64)
                latent = seg.k_latent if kv == "k" else seg.v_latent
                np.testing.assert_allclose(np.asarray(latent[row, 0, :same]), expected, atol=1e-4)
                assert np.all(np.asarray(latent[row, 0, total:]) == 0)
    (full,), (seg,) = out["full"][2].layers[0], out["rank16"][2].layers[0]
    keys, _, pos = seg.assembled(policies["rank16"].layer_factors(0))
    slots = np.arange(pos.shape[-1])
    for row, n in enumerate(LENGTHS):
        total = n + NEW
        np.testing.assert_array_equal(np.asarray(pos[row, 0]), np.where(slots < total, slots, -1))
        exact = slice(total - RESIDUAL, total)  # the window's tokens, exact; the older ones rebuilt
        np.testing.assert_array_equal(np.asarray(keys[row, :, exact]), np.asarray(full.k[row, :, exact]))
        assert np.max(np.abs(np.asarray(keys[row, :, : exact.start] - full.k[row, :, : exact.start]))) > 1e-2


def test_one_chunk_prefill_gives_the_chunked_state(model, runs):
    tokens, policies, out = runs
    lengths = np.asarray(LENGTHS, np.int32)
    whole = kvjax.prefill(
        model, tokens[:, : lengths.max()], policies["rank16"], lengths=lengths, max_new_tokens=NEW, chunk_size=None
    )
    for (a,), (b,) in zip(whole.layers, out["rank16"][1].layers):  # capacities differ with the padding
        np.testing.assert_array_equal(np.asarray(a.latent_length), np.asarray(b.latent_length))
        for row, n in enumerate(LENGTHS):
            for x, y in ((a.k_latent, b.k_latent), (a.v_latent, b.v_latent)):
                np.testing.assert_allclose(np.asarray(x[row, 0, :n]), np.asarray(y[row, 0, :n]), atol=1e-4, rtol=0)
            for win in (a.window, b.window):
                np.testing.assert_array_equal(
                    np.sort(np.asarray(win.pos[row, 0]))[-min(n, RESIDUAL) :], np.arange(max(n - RESIDUAL, 0), n)
                )


@pytest.mark.parametrize("impl", ["gpu-interpret", "tpu-interpret"])
def test_decode_through_the_kernel_equals_the_reference(model, runs, impl):
    tokens, policies, out = runs
    state, policy = out["rank16"][2], policies["rank16"]
    reference, _ = kvjax.decode_step(model, jax.tree.map(jnp.copy, state), tokens[:, 0], policy)
    kernel, _ = kvjax.decode_step(model, jax.tree.map(jnp.copy, state), tokens[:, 0], policy, attention_impl=impl)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(reference), atol=2e-4, rtol=0)


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    tokens, policies, _ = runs
    assert_generate_is_the_greedy_chain(model, policies["rank16"], tokens, LENGTHS, NEW, CHUNK, steps=3)


def test_kv_bytes_is_the_features_and_the_window():
    # A 4K prompt on a Llama-3.1-8B-shaped cache in bf16, half the channels (the authors' density 0.5).
    cfg, n = llama8b_cache_config(), 4096
    x = 8 * 128
    shapes = factor_shapes(cfg, x // 2, x // 2)
    policy = CSKV(params={name: jnp.zeros(s, jnp.float32) for name, s in shapes.items()})

    def decoding(p):
        return jax.eval_shape(
            lambda: p.finalize(
                cfg, p.allocate(cfg, 1, n, 0, 512, jnp.bfloat16).replace(length=jnp.full((1,), n, jnp.int32)), n, 0
            )
        )

    shrunk, full = decoding(policy), jax.eval_shape(lambda: Full().allocate(cfg, 1, n, 0, 512, jnp.bfloat16))
    window = 48 * 8 * (2 * 128 * 2 + 4)  # round_capacity(32 + 1) exact slots per head, bf16 k and v, int32 positions
    per_layer = n * x * 2 + window + 4 + 4  # 512 + 512 features in bf16 per token, the window, 2 lengths
    assert kvjax.kv_bytes(shrunk) == 32 * per_layer + 4
    assert kvjax.kv_bytes(shrunk) < kvjax.kv_bytes(full)


def test_save_and_load_round_trip_and_refuse_other_models(tmp_path, model, stats):
    factors = factors_from_stats(stats, 16, 32)
    save_factors(tmp_path, factors, model.config, {"method": "asvd"})
    loaded, meta = load_factors(tmp_path, model.config)
    assert meta["method"] == "asvd" and (meta["rank_k"], meta["rank_v"]) == (16, 32)
    for name, value in factors.items():
        np.testing.assert_array_equal(np.asarray(loaded[name]), value)
    policy = CSKV.from_file(tmp_path, model.config, residual=8)
    assert policy.residual == 8 and policy.ranks() == (16, 32)
    with pytest.raises(ValueError, match="do not fit"):
        load_factors(tmp_path, head_dim_32_config(num_layers=3))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no cskv_factors.npz"):
        load_factors(tmp_path / "empty", model.config)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_factors(tmp_path / "nothing", model.config)


def test_loading_never_follows_a_link_out_of_the_folder(tmp_path, model, stats):
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "folder"
    save_factors(elsewhere, factors_from_stats(stats, 16, 16), model.config)
    folder.mkdir()
    (folder / FACTORS_FILE).symlink_to(elsewhere / FACTORS_FILE)
    with pytest.raises(CheckpointError, match="outside"):
        load_factors(folder, model.config)


def test_fit_factors_takes_the_authors_densities(model, calibration):
    factors = fit_factors(model, calibration[:1, :16], 0.25, 0.5)  # int(density * D) per head, times Hkv
    assert factors["k_down"].shape == (2, 64, 8 * 2) and factors["v_down"].shape == (2, 64, 16 * 2)


@pytest.mark.parametrize("kwargs", [{"residual": -1}, {"residual": 2.0}, {"residual": True}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="CSKV"):
        CSKV(**kwargs)


def test_missing_or_misfit_factors_raise(model, stats):
    with pytest.raises(ValueError, match="CSKV needs factors"):
        kvjax.prefill(model, random_tokens(0, (1, 8), 256), CSKV())
    with pytest.raises(ValueError, match="do not fit"):
        CSKV(params=factors_from_stats(stats, 8, 8)).check_model(head_dim_32_config(num_layers=3))
    with pytest.raises(ValueError, match="density"):
        fit_factors(model, random_tokens(0, (1, 8), 256), 0.0)
    with pytest.raises(ValueError, match="'svd' or 'asvd'"):
        factors_from_stats(stats, 8, 8, method="pca")


@pytest.mark.slow
def test_fit_cskv_cli_writes_factors_that_eval_loads(tmp_path, capsys):
    # `kvjax fit-cskv` on the bundled model, then the factors as `--policy-file cskv=DIR` builds the policy.
    from kvjax.cli import main
    from kvjax.eval.harness import build_policy

    main(["fit-cskv", "--out", str(tmp_path), "--samples", "2", "--length", "64", "--key-density", "0.25"])
    assert "wrote" in capsys.readouterr().out
    m = kvjax.load(kvjax.cli._default_model(), dtype=jnp.float32)
    policy = build_policy("cskv(residual=8)", m.config, {"cskv": str(tmp_path)})
    d, kh = m.config.head_dim, m.config.num_kv_heads
    assert policy.residual == 8 and policy.ranks() == (int(0.25 * d) * kh, int(0.5 * d) * kh)
    _, meta = load_factors(tmp_path, m.config)
    assert meta["method"] == "asvd" and meta["calibration"].startswith("2 x 64 tokens of prose")
    out = kvjax.generate(m, random_tokens(0, (1, 40), m.config.vocab_size), 4, policy)
    assert out.shape == (1, 4)
