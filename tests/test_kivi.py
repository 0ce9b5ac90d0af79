"""KIVI: logits against Full, exact storage of what is kept, bytes, generate, ragged batches, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import ModelConfig, init_model
from kvjax import inference as gen
from kvjax.layer_step import Decode, LayerContext, Prefill, StepInputs
from kvjax.policies import KIVI, Full
from pallas_kernels import kv_quant
from tests.support.quantized_fixtures import head_dim_32_config, llama8b_cache_config, rms, teacher_forced
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

G, R = 32, 128
LENGTHS = (250, 100)  # row 0 quantizes (and flushes 3 groups in one chunk); row 1 never leaves R + G
NEW = 30  # teacher-forced decode steps: row 0 crosses a flush at length 256
CHUNK = 128


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(), seed=0, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _ScaledSlab(KIVI):
    """An injected bug: attention dequantizes the slab with every scale multiplied by `factor`."""

    factor: float = 1.0

    def segment_step(self, ctx, segment, x, phase):
        slab, f = segment.slab, self.factor
        wrong = slab.replace(k_scale=slab.k_scale * f, v_scale=slab.v_scale * f)
        out, new = super().segment_step(ctx, segment.replace(slab=wrong), x, phase)
        # Groups that were already stored get their true scales back; new groups keep theirs.
        old_k = (jnp.arange(slab.k_scale.shape[2]) < segment.slab_length[:, None] // G)[:, None, :, None]
        old_v = (jnp.arange(slab.capacity) < segment.slab_length[:, None])[:, None, None, :]
        fixed = new.slab.replace(
            k_scale=jnp.where(old_k, slab.k_scale, new.slab.k_scale),
            v_scale=jnp.where(old_v, slab.v_scale, new.slab.v_scale),
        )
        return out, new.replace(slab=fixed)


def _run(m, policy, tokens):
    return teacher_forced(m, policy, tokens, LENGTHS, NEW, CHUNK)


@pytest.fixture(scope="module")
def runs(model):
    tokens = random_tokens(0, (2, max(LENGTHS) + NEW), model.config.vocab_size)
    policies = {
        "full": Full(),
        "kivi4": KIVI(4),
        "kivi2": KIVI(2),
        "no_window": KIVI(4, residual=0),  # bug: "forgot the residual window"
        "scale": _ScaledSlab(4, factor=16 / 15),  # bug: scale = range / 2^b instead of / (2^b - 1)
    }
    return tokens, {name: _run(model, p, tokens) for name, p in policies.items()}


# Tolerances on the RMS logit error over the decode steps of row 0 (logits have std ~1 here). The
# error of min/max quantization is proportional to its step, range / (2^b - 1), so KIVI-2's bound is
# KIVI-4's times 15 / 3. Measured (JAX 0.10.2, CPU): KIVI-4 0.0076, KIVI-2 0.044; bugs at 4 bits:
# quantizing the residual window too 0.0124, scales off by one level (16/15) 0.075.
TOL4 = 0.010
TOL2 = TOL4 * 15 / 3


def test_logits_close_to_full_and_tolerance_catches_bugs(runs):
    _, out = runs
    full = out["full"][0][0]

    assert np.std(full) > 0.5  # the tolerances are relative to logits of this scale
    assert rms(out["kivi4"][0][0], full) < TOL4
    assert rms(out["kivi2"][0][0], full) < TOL2
    assert rms(out["kivi4"][0][0], full) < rms(out["kivi2"][0][0], full) / 2
    assert rms(out["no_window"][0][0], full) > TOL4
    assert rms(out["scale"][0][0], full) > TOL4


def test_short_prompt_equals_full(runs):
    # Row 1 stays below R + G tokens, so nothing is quantized: exactly Full (ragged batch included).
    _, out = runs
    for name in ("kivi4", "kivi2"):
        np.testing.assert_allclose(out[name][0][1], out["full"][0][1], atol=1e-5, rtol=0)


@jax.jit
def _dequantize(slab):
    return kv_quant.dequantize_kv(slab)


@jax.jit
def _round_trip4(k, v):
    return kv_quant.dequantize_kv(kv_quant.quantize_kv(k, v, 4, G))


@jax.jit
def _round_trip2(k, v):
    return kv_quant.dequantize_kv(kv_quant.quantize_kv(k, v, 2, G))


def _check_storage(kivi_state, full_state, policy: KIVI):
    """Layer 0's keys and values depend on the tokens only, so they can be checked exactly: the slab
    holds quantize(Full's entries) for positions [0, Q), the window Full's entries for [Q, L)."""
    seg, full = kivi_state.layers[0][0], full_state.layers[0][0]
    assert seg.slab.bits == policy.bits and seg.slab.group_size == G
    lengths = np.asarray(kivi_state.length)
    slab_k, slab_v = (np.asarray(x) for x in _dequantize(seg.slab))
    round_trip = _round_trip4 if policy.bits == 4 else _round_trip2
    for b, n in enumerate(lengths):
        q = G * (max(n - R, 0) // G)
        assert int(seg.slab_length[b]) == q
        assert R <= n - q < R + G or (q == 0 and n < R + G)
        pos = np.asarray(seg.window.pos[b])  # [K, W]
        assert (pos[:, : n - q] == np.arange(q, n)).all() and (pos[:, n - q :] == -1).all()
        slab_pos = np.asarray(seg.positions()[b])[:, : seg.slab.capacity]
        assert (slab_pos[:, :q] == np.arange(q)).all() and (slab_pos[:, q:] == -1).all()
        for got, ref in ((seg.window.k, full.k), (seg.window.v, full.v)):
            np.testing.assert_allclose(np.asarray(got[b, :, : n - q]), np.asarray(ref[b, :, q:n]), atol=1e-6)
        if q:
            exp_k, exp_v = round_trip(full.k[b : b + 1, :, :q], full.v[b : b + 1, :, :q])
            np.testing.assert_allclose(slab_k[b, :, :q], np.asarray(exp_k[0]), atol=1e-6)
            np.testing.assert_allclose(slab_v[b, :, :q], np.asarray(exp_v[0]), atol=1e-6)


@pytest.mark.parametrize("name", ["kivi4", "kivi2"])
def test_window_holds_exactly_the_most_recent_tokens(runs, name):
    _, out = runs
    policy = KIVI(4 if name == "kivi4" else 2)
    (_, prefilled, decoded), (_, full_prefilled, full_decoded) = out[name], out["full"]
    assert np.asarray(prefilled.length).tolist() == list(LENGTHS)
    _check_storage(prefilled, full_prefilled, policy)  # row 0: 96 quantized, 154 exact
    _check_storage(decoded, full_decoded, policy)  # row 0 after a decode flush: 128 and 152


def test_decode_kernel_path_matches_reference(model, runs):
    # The Pallas TPU kernel (interpreted on CPU) against the jnp reference, from the same state.
    tokens, out = runs
    _, prefilled, _ = out["kivi4"]
    lengths = np.asarray(LENGTHS)
    state_ref, state_ker = (jax.tree.map(jnp.copy, prefilled) for _ in range(2))  # both donated
    for i in range(1):
        token = tokens[np.arange(2), lengths + i]
        ref, state_ref = kvjax.decode_step(model, state_ref, token, KIVI(4))
        ker, state_ker = kvjax.decode_step(model, state_ker, token, KIVI(4), attention_impl="tpu-interpret")
        np.testing.assert_allclose(np.asarray(ker), np.asarray(ref), atol=1e-4, rtol=0)


def _kivi_bytes(policy: KIVI, cfg: ModelConfig, batch: int, prompt: int, new: int, itemsize: int) -> int:
    """Exact device bytes: packed codes, bf16 scale and zero, slab lengths, window k/v and positions."""
    slab, window = policy.capacities(prompt, new)
    k, d = cfg.num_kv_heads, cfg.head_dim
    codes = 2 * slab * policy.bits // 8 * d  # keys and values
    stats = 2 * 2 * (slab // G * d + d // G * slab)  # (scale, zero) in bf16, keys and values
    per_layer = batch * k * (codes + stats + window * (2 * d * itemsize + 4)) + 4 * batch
    return cfg.num_layers * per_layer + 4 * batch  # + KVState.length


def test_kv_bytes(runs, model):
    _, out = runs
    padded = gen._chunking(max(LENGTHS), CHUNK)[1]  # the prompt length prefill allocated for
    assert kvjax.kv_bytes(out["kivi4"][1]) == _kivi_bytes(KIVI(4), model.config, 2, padded, NEW, 4)
    assert kvjax.kv_bytes(out["kivi2"][1]) == _kivi_bytes(KIVI(2), model.config, 2, padded, NEW, 4)
    # A 4K prompt on a Llama-3-8B-shaped cache in bf16 (abstract shapes, nothing allocated).
    cfg = llama8b_cache_config()
    kivi = jax.eval_shape(lambda: KIVI(4).allocate(cfg, 1, 4096, 0, 512, jnp.bfloat16))
    full = jax.eval_shape(lambda: Full().allocate(cfg, 1, 4096, 0, 512, jnp.bfloat16))
    assert kvjax.kv_bytes(kivi) == _kivi_bytes(KIVI(4), cfg, 1, 4096, 0, 2)
    assert kvjax.kv_bytes(full) == 32 * 8 * 4096 * (2 * 128 * 2 + 4) + 4
    # Per token and head: 516 bytes in Full vs 160 quantized (128 code bytes + 32 of bf16 statistics);
    # the 160-slot full-precision window brings 4K down to ~2.95x (3.2x in the long-context limit).
    assert 2.9 < kvjax.kv_bytes(full) / kvjax.kv_bytes(kivi) < 3.3


def test_generate_ragged_batch_is_the_greedy_chain(model, runs):
    # generate (jitted while_loop) on the ragged prompts equals greedy decode_step by decode_step.
    tokens, _ = runs
    prompts, lengths = tokens[:, : max(LENGTHS)], np.asarray(LENGTHS, np.int32)
    policy = KIVI(4)
    out = np.asarray(kvjax.generate(model, prompts, NEW, policy, lengths=lengths, eos_token_id=(), chunk_size=CHUNK))
    state, logits = gen._run_prefill(model, prompts, lengths, policy, CHUNK, NEW, gen.Execution())
    chain = [np.asarray(jnp.argmax(logits, -1))]
    for _ in range(NEW - 1):
        logits, state = kvjax.decode_step(model, state, chain[-1], policy)
        chain.append(np.asarray(jnp.argmax(logits, -1)))
    np.testing.assert_array_equal(out, np.stack(chain, axis=1))


def test_sliding_window_masks_the_slab():
    # With a 16-token sliding window and R = 32 the slab is never visible: exactly Full, although
    # 32 of the 64 tokens are quantized (attending to them would move the outputs by ~1e-2).
    cfg = head_dim_32_config()
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 70, 2, 2, 32)), jnp.float32)  # [B, T, K, G, D]
    k = jnp.asarray(rng.normal(size=(1, 70, 2, 32)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 70, 2, 32)), jnp.float32)
    pos = jnp.arange(70, dtype=jnp.int32)[None]
    ctx, prompt = LayerContext(0, 16, 32**-0.5), Prefill(jnp.asarray([64], jnp.int32))
    outs = {}
    for name, policy in (("full", Full()), ("kivi", KIVI(4, residual=32))):
        state = policy.allocate(cfg, 1, 64, 6, 64, jnp.float32)

        @jax.jit
        def step(segs, q, k, v, p, policy=policy):  # no RoPE here: q and k stand for the pre-RoPE ones too
            phase = prompt if q.shape[1] > 1 else Decode()  # the 64-token prompt, then one token at a time
            return policy.step(ctx, segs, StepInputs(q, k, v, q, k, p, p), phase)

        segs, res = state.layers[0], []
        for lo, hi in ((0, 64),) + tuple((t, t + 1) for t in range(64, 70)):
            out, segs = step(segs, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], pos[:, lo:hi])
            res.append(np.asarray(out))
        outs[name] = np.concatenate(res, axis=1)
        if name == "kivi":
            assert int(segs[0].slab_length[0]) == 32
    np.testing.assert_allclose(outs["kivi"], outs["full"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3),
        dict(bits=True),
        dict(group=0),
        dict(group=24),
        dict(group=2, bits=2),
        dict(residual=-1),
        dict(residual=1.5),
        dict(group=32.0),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        KIVI(**kwargs)


def test_head_dim_not_a_multiple_of_the_group_raises():
    with pytest.raises(ValueError, match="head dim"):
        KIVI(4, group=64).allocate(head_dim_32_config(), 1, 64, 0, 64, jnp.float32)
