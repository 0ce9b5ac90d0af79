"""Invariants of the forward paths: cache vs no cache, chunking, ragged batches, sampling, compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import inference as gen
from kvjax.sampling import SamplingParams, filtered_logits, sample
from tests.support.random_data import random_tokens


def test_prefill_then_decode_equals_full_forward(tiny_model):
    m = tiny_model
    tokens = random_tokens(0, (2, 70), m.config.vocab_size)
    full = np.asarray(kvjax.logits(m, tokens))  # [B, 70, V]
    prompt = 50
    state = kvjax.prefill(m, tokens[:, :prompt], max_new_tokens=20, chunk_size=16)
    for t in range(prompt, 70):
        step_logits, state = kvjax.decode_step(m, state, tokens[:, t])
        np.testing.assert_allclose(np.asarray(step_logits), full[:, t], atol=1e-5, rtol=0)
    assert np.asarray(state.length).tolist() == [70, 70]


@pytest.mark.parametrize(
    "policy", [kvjax.policies.Full(), kvjax.policies.PyramidKV(budget_tokens=24, window=4)], ids=["full", "pyramidkv"]
)
def test_scanned_and_unrolled_layers_give_the_same_logits(tiny_model, policy):
    """Every layer-scan setting (the default scans prefill and unrolls decode; True and False force one for
    both) gives the same prefill state and decode logits; PyramidKV's per-layer budgets make one run per layer."""
    m = tiny_model
    tokens = random_tokens(9, (2, 60), m.config.vocab_size)
    out = {}
    for scan in (None, True, False):
        state = kvjax.prefill(m, tokens[:, :48], policy, max_new_tokens=12, chunk_size=16, scan_layers=scan)
        logits = []
        for t in range(48, 60):
            step, state = kvjax.decode_step(m, state, tokens[:, t], policy, scan_layers=scan)
            logits.append(np.asarray(step))
        out[scan] = np.stack(logits)
    for scan in (True, False):
        np.testing.assert_allclose(out[scan], out[None], atol=1e-5, rtol=0)
    assert gen.Execution().scans(decoding=True) is False and gen.Execution().scans(decoding=False) is True
    with pytest.raises(ValueError, match="scan_layers must be None, True or False"):
        gen.Execution(scan_layers="yes")


@pytest.mark.parametrize("shift", [True, False], ids=["position-shift", "no-shift"])
def test_one_chunk_eviction_prefill_attends_as_the_full_forward(tiny_model, shift):
    """A prompt prefilled as one chunk (chunk_size=None) by a policy that evicts as it prefills attends at
    slot = position through the causal key blocks (over 512 tokens): its last logits are the full forward's,
    on a ragged batch, and it keeps exactly the sink and the most recent window."""
    m, sink, window = tiny_model, 4, 100
    tokens = random_tokens(11, (2, 700), m.config.vocab_size)
    lengths = np.array([700, 613])
    policy = kvjax.policies.StreamingLLM(sink=sink, window=window, position_shift=shift)
    state, last = gen._run_prefill(m, tokens, lengths, policy, 704, 0, gen.Execution())
    full = np.asarray(kvjax.logits(m, tokens))
    np.testing.assert_allclose(np.asarray(last), full[[0, 1], lengths - 1], atol=1e-5, rtol=0)
    for row, n in enumerate(lengths):
        kept = np.asarray(state.layers[0][0].pos)[row]  # [heads, capacity]
        expected = set(range(sink)) | set(range(n - window, n))
        assert all(set(head[head >= 0].tolist()) == expected for head in kept)


def test_prefill_last_logits_equal_full_forward(tiny_model):
    m = tiny_model
    tokens = random_tokens(1, (2, 90), m.config.vocab_size)
    _, last = gen._run_prefill(m, *gen._prompt_batch(tokens, None), None, 32, 0, gen.Execution())
    np.testing.assert_allclose(np.asarray(last), np.asarray(kvjax.logits(m, tokens))[:, -1], atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_shot(tiny_model):
    m = tiny_model
    tokens = random_tokens(2, (2, 300), m.config.vocab_size)
    one_shot = kvjax.prefill(m, tokens, chunk_size=512, max_new_tokens=8)
    chunked = kvjax.prefill(m, tokens, chunk_size=64, max_new_tokens=8)
    for seg_a, seg_b in zip(jax.tree.leaves(one_shot.layers), jax.tree.leaves(chunked.layers)):
        a, b = np.asarray(seg_a)[:, :, :300], np.asarray(seg_b)[:, :, :300]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    pos = np.asarray(chunked.layers[0][0].pos)
    assert (pos[:, :, :300] == np.arange(300)).all() and (pos[:, :, 300:] == -1).all()


def test_ragged_batch_equals_each_prompt_alone(tiny_model):
    m = tiny_model
    prompts = [random_tokens(10 + i, (n,), m.config.vocab_size).tolist() for i, n in enumerate((7, 75, 130))]
    batched = np.asarray(kvjax.generate(m, prompts, max_new_tokens=12, eos_token_id=(), chunk_size=64))
    for row, prompt in zip(batched, prompts):
        alone = np.asarray(kvjax.generate(m, [prompt], max_new_tokens=12, eos_token_id=(), chunk_size=64))[0]
        np.testing.assert_array_equal(row, alone)
    states = kvjax.prefill(m, prompts, chunk_size=64)
    assert np.asarray(states.length).tolist() == [7, 75, 130]
    assert (np.asarray(states.layers[1][0].pos)[0, :, 7:] == -1).all()  # padding is never stored


def test_greedy_is_argmax_chain(tiny_model):
    m = tiny_model
    prompt = random_tokens(3, (1, 33), m.config.vocab_size)
    out = np.asarray(kvjax.generate(m, prompt, max_new_tokens=6, eos_token_id=()))[0]
    seq = prompt[0].tolist()
    for token in out:
        assert token == int(np.argmax(np.asarray(kvjax.logits(m, np.array([seq])))[0, -1]))
        seq.append(int(token))


def test_eos_stops_each_row_and_pads(tiny_model):
    m = tiny_model
    prompts = random_tokens(4, (2, 20), m.config.vocab_size)
    free = np.asarray(kvjax.generate(m, prompts, max_new_tokens=10, eos_token_id=()))
    eos = int(free[0, 3])  # row 0 emits this at step 3 (first time or earlier)
    first = int(np.argmax(free[0] == eos))
    out = np.asarray(kvjax.generate(m, prompts, max_new_tokens=10, eos_token_id=eos))
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == eos).all()  # pad id falls back to the EOS id for this config
    hits = np.flatnonzero(free[1] == eos)
    end = hits[0] + 1 if hits.size else 10
    np.testing.assert_array_equal(out[1, :end], free[1, :end])


def test_changing_sampling_values_or_prompt_contents_does_not_recompile(tiny_model):
    m = tiny_model
    prompt = random_tokens(5, (2, 40), m.config.vocab_size)
    kvjax.generate(m, prompt, max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, seed=0)
    sizes = (gen._prefill._cache_size(), gen._decode._cache_size(), gen._start_loop._cache_size())
    kvjax.generate(m, prompt[::-1], max_new_tokens=8, temperature=1.3, top_k=50, top_p=0.5, seed=7)
    kvjax.generate(m, random_tokens(6, (2, 41), m.config.vocab_size), max_new_tokens=8, temperature=0.0, seed=3)
    assert (gen._prefill._cache_size(), gen._decode._cache_size(), gen._start_loop._cache_size()) == sizes


def test_seeded_sampling_is_reproducible_and_varies_with_seed(tiny_model):
    m = tiny_model
    prompt = random_tokens(7, (1, 16), m.config.vocab_size)
    a = np.asarray(kvjax.generate(m, prompt, 16, temperature=1.5, seed=1, eos_token_id=()))
    b = np.asarray(kvjax.generate(m, prompt, 16, temperature=1.5, seed=1, eos_token_id=()))
    c = np.asarray(kvjax.generate(m, prompt, 16, temperature=1.5, seed=2, eos_token_id=()))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]] * 3, jnp.float32))
    params = SamplingParams.create(3, temperature=1.0, top_k=jnp.array([2, 0, 0]), top_p=jnp.array([1.0, 0.75, 0.69]))
    ranked, order = filtered_logits(logits, params)
    kept = [set(np.asarray(order[i])[np.isfinite(np.asarray(ranked[i]))].tolist()) for i in range(3)]
    assert kept == [{1, 3}, {1, 3, 4}, {1, 3}]  # 0.4+0.3 = 0.7 < 0.75 needs the third; 0.69 does not
    draws = jax.vmap(lambda k: sample(logits, params, k))(jax.random.split(jax.random.key(0), 2000))
    for i in range(3):
        assert set(np.asarray(draws[:, i]).tolist()) == kept[i]
    freq = np.mean(np.asarray(draws[:, 0]) == 1)
    assert abs(freq - 0.4 / 0.7) < 0.04  # renormalised over the kept pair


def test_bad_inputs_raise_clear_errors(tiny_model):
    m = tiny_model
    with pytest.raises(ValueError, match="longer than the model's context"):
        kvjax.generate(m, random_tokens(8, (1, 4090), m.config.vocab_size), max_new_tokens=10)
    with pytest.raises(ValueError, match="longer than the model's context"):
        kvjax.logits(m, np.zeros((1, 5000), np.int32))
    with pytest.raises(ValueError, match="at least one token"):
        kvjax.prefill(m, [[1, 2], []])
    with pytest.raises(ValueError, match="temperature"):
        kvjax.generate(m, [[1, 2, 3]], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvjax.generate(m, [[1, 2, 3]], 0)


def test_kv_bytes_counts_what_the_state_holds(tiny_model):
    m = tiny_model
    state = kvjax.prefill(m, random_tokens(9, (2, 100), m.config.vocab_size), max_new_tokens=28)
    cfg = m.config
    capacity = 160  # prompt padded to the 64-token bucket, plus 28 for decoding, rounded up to 16
    per_layer = 2 * (2 * cfg.num_kv_heads * capacity * cfg.head_dim * 4) + 2 * cfg.num_kv_heads * capacity * 4
    assert kvjax.kv_bytes(state) == cfg.num_layers * per_layer + 2 * 4
    abstract = jax.eval_shape(lambda: state)
    assert kvjax.kv_bytes(abstract) == kvjax.kv_bytes(state)
