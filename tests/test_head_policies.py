"""Head-split policies (DuoAttention, RazorAttention) and the head detectors behind them."""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.config import ModelConfig
from kvjax.heads import razor_heads, retrieval_score
from kvjax.kv_state import count, empty_segment
from kvjax.policies import DuoAttention, Full, RazorAttention, StreamingLLM
from kvjax.policies.duo_attention import pattern_file, quantile_head_sets, read_gates_tsv, write_gates_tsv
from kvjax.policies.razor_attention import compensated, compensated_attention
from tests.support.jaxprs import pallas_calls
from tests.support.policy_reference import causal_probs, layer_queries_keys
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it

LLAMA31_TSV = pattern_file("Meta-Llama-3.1-8B-Instruct")


def kept_positions(state, layer: int) -> dict[int, list[set[int]]]:
    """KV head -> per sequence, the set of positions it holds."""
    out = {}
    for seg in state.layers[layer]:
        pos = np.asarray(seg.pos)  # [B, Hs, C]
        for i, head in enumerate(seg.heads):
            out[head] = [set(row[row >= 0].tolist()) for row in pos[:, i]]
    return out


def decode_logits(m, policy, tokens, prompt, chunk=32, attention_impl="auto"):
    """Logits of every decode step after prefilling tokens[:, :prompt], and the final state."""
    state = kvjax.prefill(
        m,
        tokens[:, :prompt],
        policy,
        max_new_tokens=tokens.shape[1] - prompt,
        chunk_size=chunk,
        attention_impl=attention_impl,
    )
    logits = []
    for t in range(prompt, tokens.shape[1]):
        step, state = kvjax.decode_step(m, state, tokens[:, t], policy, attention_impl=attention_impl)
        logits.append(np.asarray(step))
    return np.stack(logits), state


# ------------------------------------------------------------------------------------------------
# DuoAttention
# ------------------------------------------------------------------------------------------------


def test_duo_all_retrieval_equals_full(tiny_model):
    m = tiny_model
    tokens = random_tokens(10, (2, 130), m.config.vocab_size)
    policy = DuoAttention(((0, 1),) * m.config.num_layers, sink=4, recent=16)
    ref, _ = decode_logits(m, Full(), tokens, 100)
    got, _ = decode_logits(m, policy, tokens, 100)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_duo_all_streaming_equals_streaming_llm(tiny_model):
    m = tiny_model
    tokens = random_tokens(11, (2, 140), m.config.vocab_size)
    ref, ref_state = decode_logits(m, StreamingLLM(sink=4, window=28, position_shift=False), tokens, 100)
    got, state = decode_logits(m, DuoAttention(((),) * m.config.num_layers, sink=4, recent=28), tokens, 100)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    for layer in range(m.config.num_layers):
        assert kept_positions(state, layer) == kept_positions(ref_state, layer)
        assert kept_positions(state, layer)[0] == [set(range(4)) | set(range(112, 140))] * 2


def test_duo_retrieval_heads_prefill_through_the_pallas_kernel(tiny_model):
    """Retrieval heads (slot = position) prefill through the block-sparse prefill kernel, streaming
    heads through the reference; the last logits and every kept entry equal the reference path's."""
    m = tiny_model
    heads = ((0,), (1,))
    policy = DuoAttention(heads, sink=4, recent=16)
    kernel, reference = kvjax.inference.Execution("gpu-interpret"), kvjax.inference.Execution("reference")
    tokens, lengths = random_tokens(12, (2, 60), m.config.vocab_size), np.array([60, 33], np.int32)
    run = lambda t, n: kvjax.inference._prefill(  # noqa: E731
        m.graphdef, m.params, None, t, n, policy=policy, chunk=24, max_new_tokens=4, run=kernel
    )
    padded = np.pad(tokens, ((0, 0), (0, 12)))  # three chunks of 24
    traced = jax.make_jaxpr(run)(jnp.asarray(padded), jnp.asarray(lengths))
    assert len(pallas_calls(traced)) == m.config.num_layers  # one retrieval segment per layer
    fast, fast_logits = kvjax.inference._run_prefill(m, tokens, lengths, policy, 24, 4, kernel)
    slow, slow_logits = kvjax.inference._run_prefill(m, tokens, lengths, policy, 24, 4, reference)
    np.testing.assert_allclose(np.asarray(fast_logits), np.asarray(slow_logits), atol=2e-5, rtol=0)
    for fast_layer, slow_layer in zip(fast.layers, slow.layers):
        for fast_seg, slow_seg in zip(fast_layer, slow_layer):
            held = np.asarray(slow_seg.pos) >= 0
            np.testing.assert_array_equal(np.asarray(fast_seg.pos), np.asarray(slow_seg.pos))
            for a, b in ((fast_seg.k, slow_seg.k), (fast_seg.v, slow_seg.v)):
                np.testing.assert_allclose(np.asarray(a)[held], np.asarray(b)[held], atol=2e-5, rtol=0)


def test_duo_mixed_heads_keep_what_their_class_keeps(tiny_model):
    """Retrieval heads hold every position, streaming heads sink + recent; prefill never holds more
    than sink + recent + one chunk for streaming heads; shapes stay static while decoding."""
    m = tiny_model
    tokens = random_tokens(12, (2, 200), m.config.vocab_size)
    policy = DuoAttention(((1,), (0,)), sink=4, recent=28)
    layout = policy.layout(m.config, 192, 8, 32)
    assert [[(s.heads, s.budget) for s in layer] for layer in layout] == [
        [((1,), None), ((0,), 32)],
        [((0,), None), ((1,), 32)],
    ]
    assert all(layer[1].capacity == 32 + 32 for layer in layout)
    state = kvjax.prefill(m, tokens[:, :192], policy, lengths=[192, 150], max_new_tokens=8, chunk_size=32)
    shapes = jax.tree.map(jnp.shape, state.replace(origin=None))  # the origin counts down the room left
    for t in range(192, 200):
        _, state = kvjax.decode_step(m, state, tokens[:, t], policy)
        assert jax.tree.map(jnp.shape, state.replace(origin=None)) == shapes
    for layer, (ret, stream) in enumerate([(1, 0), (0, 1)]):
        kept = kept_positions(state, layer)
        assert kept[ret] == [set(range(200)), set(range(158))]  # row 1 decodes from position 150
        assert kept[stream][0] == set(range(4)) | set(range(172, 200))
        assert int(jnp.max(count(state.layers[layer][1]))) <= 32


def _quantile_rule(gates: np.ndarray, sparsity: float) -> list[list[int]]:
    """DuoAttention's deployment rule, written out independently."""
    gates = np.clip(gates, 0, 1)
    threshold = np.quantile(gates.flatten(), sparsity)
    return [[h for h in range(gates.shape[1]) if gates[layer, h] >= threshold] for layer in range(gates.shape[0])]


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_official_llama31_pattern_gives_the_quantile_head_set(sparsity):
    gates = np.loadtxt(LLAMA31_TSV, delimiter="\t")
    assert gates.shape == (32, 8)
    every_tie = DuoAttention.from_tsv(LLAMA31_TSV, sparsity=sparsity, break_ties=False)
    assert [list(h) for h in every_tie.retrieval_heads] == _quantile_rule(gates, sparsity)
    n = sum(map(len, every_tie.retrieval_heads))
    assert n >= 256 - math.ceil(sparsity * 255)  # ties at the threshold are all kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties decide at some sparsities (tests/test_authors_rules.py)
        exact = DuoAttention.from_tsv(LLAMA31_TSV, sparsity=sparsity)
    assert sum(map(len, exact.retrieval_heads)) == 256 - math.ceil(sparsity * 255)  # the authors' count
    assert all(set(e) <= set(p) for e, p in zip(exact.retrieval_heads, every_tie.retrieval_heads))


def test_gate_file_round_trip(tmp_path):
    gates = np.random.default_rng(0).uniform(-0.01, 1.01, (6, 4))
    gates[2, 1] = 1.0 / 3.0
    path = tmp_path / "full_attention_heads.tsv"
    write_gates_tsv(path, gates)
    assert len(path.read_text().splitlines()) == 6 and path.read_text().splitlines()[0].count("\t") == 3
    np.testing.assert_array_equal(read_gates_tsv(path), gates)  # savetxt's %.18e round-trips float64
    assert DuoAttention.from_tsv(path, 0.5) == DuoAttention.from_gates(gates, 0.5)
    assert quantile_head_sets(gates, 1.0) == ((),) * 6 and quantile_head_sets(gates, 0.0) == ((0, 1, 2, 3),) * 6
    with pytest.raises(ValueError, match="L x Hkv"):
        (tmp_path / "bad.tsv").write_text("0.5\tnan\n")
        read_gates_tsv(tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="layers"):
        DuoAttention(((0,),)).layout(ModelConfig("llama", 8, 8, 8, 2, 2, 2, 4, 64), 16, 0, 16)


def test_duo_half_retrieval_heads_halve_the_cache_at_32k():
    """Llama-3.1-8B shapes (32 layers, 8 KV heads, D 128, bf16), 32K prompt: abstract shapes only."""
    cfg = ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072)
    policy = DuoAttention(((0, 2, 4, 6),) * 32)

    def size(p):
        state = jax.eval_shape(lambda: p.finalize(cfg, p.allocate(cfg, 1, 32768, 256, 4096, jnp.bfloat16), 32768, 256))
        return kvjax.kv_bytes(state)

    ratio = size(policy) / size(Full())
    assert 0.5 < ratio < 0.51, ratio
    prefill_peak = kvjax.kv_bytes(jax.eval_shape(lambda: policy.allocate(cfg, 1, 32768, 256, 4096, jnp.bfloat16)))
    assert prefill_peak / size(Full()) < 0.57  # streaming heads hold sink + recent + one chunk


def test_duo_half_retrieval_heads_halve_a_real_cache(tiny_model):
    m = tiny_model
    tokens = random_tokens(13, (1, 1024), m.config.vocab_size)
    full = kvjax.kv_bytes(kvjax.prefill(m, tokens, chunk_size=256))
    duo = kvjax.kv_bytes(kvjax.prefill(m, tokens, DuoAttention(((0,), (1,)), sink=4, recent=44), chunk_size=256))
    assert 0.5 < duo / full < 0.535, duo / full  # (1024 + 64 slots) / (2 x 1024)


# ------------------------------------------------------------------------------------------------
# RazorAttention
# ------------------------------------------------------------------------------------------------


def test_compensation_token_matches_its_closed_form():
    rng = np.random.default_rng(0)
    b, h, c, d, g, t = 2, 3, 6, 8, 2, 3
    keys, values = rng.normal(size=(b, h, c, d)), rng.normal(size=(b, h, c, d))
    dropped_k, dropped_v = rng.normal(size=(b, h, 5, d)), rng.normal(size=(b, h, 5, d))
    n_d = np.array([[5, 2, 0], [1, 5, 3]], np.float32)  # how many of the 5 each row dropped
    live = np.arange(5) < n_d[..., None]  # [B, H, 5]
    seg = compensated(empty_segment(b, (0, 1, 2), c, d, jnp.float32, budget=c))
    pos = np.tile(np.arange(100, 100 + c), (b, h, 1))
    pos[0, 1, -1] = -1  # an empty slot
    seg = seg.replace(
        k=jnp.asarray(keys, jnp.float32),
        v=jnp.asarray(values, jnp.float32),
        pos=jnp.asarray(pos, jnp.int32),
        k_dropped=jnp.asarray((dropped_k * live[..., None]).sum(2), jnp.float32),
        v_dropped=jnp.asarray((dropped_v * live[..., None]).sum(2), jnp.float32),
        n_dropped=jnp.asarray(n_d),
    )
    q = rng.normal(size=(b, t, h, g, d))
    q_pos = np.tile(np.arange(110, 110 + t), (b, 1))
    out = np.asarray(compensated_attention(jnp.asarray(q, jnp.float32), seg, jnp.asarray(q_pos, jnp.int32), None, 0.3))
    for bi, hi, gi, ti in np.ndindex(b, h, g, t):
        qv, held = q[bi, ti, hi, gi], pos[bi, hi] >= 0
        w = np.exp(0.3 * keys[bi, hi, held] @ qv)  # kept entries
        num, den = w @ values[bi, hi, held], w.sum()
        if n_d[bi, hi] > 0:
            k_hat = dropped_k[bi, hi, live[bi, hi]].mean(0)
            v_hat = dropped_v[bi, hi, live[bi, hi]].mean(0)
            e = n_d[bi, hi] * np.exp(0.3 * qv @ k_hat)
            num, den = num + e * v_hat, den + e
        np.testing.assert_allclose(out[bi, ti, hi, gi], num / den, rtol=1e-5, atol=1e-6)


def test_razor_maintains_compensation_through_chunked_prefill_and_decode(tiny_model):
    """Layer 0's keys depend on tokens only, so its running sums must equal the sums of the keys
    of exactly the positions evicted so far (prefill chunks, end of prompt, every decode step)."""
    m = tiny_model
    tokens = random_tokens(14, (2, 120), m.config.vocab_size)
    policy = RazorAttention(((1,), ()), sink=4, recent=20)
    _, state = decode_logits(m, policy, tokens, 100)
    _, k, v = layer_queries_keys(m, tokens)[0]  # post-RoPE keys, values [B, T, K, D]
    seg = state.layers[0][1]
    assert seg.heads == (0,)
    held = kept_positions(state, 0)[0]
    for bi in range(2):
        assert held[bi] == set(range(4)) | set(range(100, 120))
        gone = sorted(set(range(120)) - held[bi])
        assert float(seg.n_dropped[bi, 0]) == len(gone) == 96
        np.testing.assert_allclose(np.asarray(seg.k_dropped[bi, 0]), k[bi, gone, 0].sum(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(seg.v_dropped[bi, 0]), v[bi, gone, 0].sum(0), rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(state.layers[1][0].n_dropped) == 96)  # layer 1: both heads compensated
    assert kept_positions(state, 0)[1] == [set(range(120))] * 2  # the retrieval head keeps everything


@pytest.mark.parametrize("impl", ["gpu-interpret", "tpu-interpret"])
def test_razor_decode_through_the_pallas_kernel_matches_the_reference(tiny_model, impl):
    """Each decode step runs the block-sparse decode kernel over every segment (retrieval heads and
    compensated ones: the kernel's log-sum-exp lets the compensation token join) and gives the
    reference's logits; the compensation sums stay the reference's."""
    m = tiny_model
    heads = ((1,), ())  # layer 0: one retrieval and one compensated head; layer 1: both compensated
    policy = RazorAttention(heads, sink=4, recent=20)
    tokens = random_tokens(16, (2, 60), m.config.vocab_size)
    state = kvjax.prefill(m, tokens[:, :50], policy, max_new_tokens=10, chunk_size=32, attention_impl=impl)
    run = kvjax.inference.Execution(impl)
    traced = jax.make_jaxpr(lambda s, t: kvjax.inference._forward_token(m.module(), policy, s, t, run))(
        state, tokens[:, 50]
    )
    assert len(pallas_calls(traced)) == 3  # 2 segments in layer 0, 1 in layer 1
    fast, fast_state = decode_logits(m, policy, tokens, 50, attention_impl=impl)
    slow, slow_state = decode_logits(m, policy, tokens, 50, attention_impl="reference")
    assert float(slow_state.layers[1][0].n_dropped.min()) > 0  # the token really takes part
    np.testing.assert_allclose(fast, slow, atol=2e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(fast_state), jax.tree.leaves(slow_state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-4, rtol=0)


def test_razor_limits(tiny_model):
    """All heads retrieval = Full; no retrieval heads and no compensation = StreamingLLM."""
    m = tiny_model
    tokens = random_tokens(15, (1, 100), m.config.vocab_size)
    full, _ = decode_logits(m, Full(), tokens, 90)
    razor_full, _ = decode_logits(m, RazorAttention(((0, 1),) * 2, sink=4, recent=16), tokens, 90)
    np.testing.assert_allclose(razor_full, full, atol=1e-5, rtol=0)
    streaming, _ = decode_logits(m, StreamingLLM(sink=4, window=16, position_shift=False), tokens, 90)
    plain, _ = decode_logits(m, RazorAttention(((),) * 2, sink=4, recent=16, compensate=False), tokens, 90)
    np.testing.assert_allclose(plain, streaming, atol=1e-5, rtol=0)
    razor, _ = decode_logits(m, RazorAttention(((),) * 2, sink=4, recent=16), tokens, 90)
    assert np.abs(razor - streaming).max() > 1e-3  # the compensation token does change the output


def _numpy_probe_scores(m, tokens):
    """Echo / induction scores per (layer, query head) from full causal softmax weights in numpy."""
    t = len(tokens)
    earlier = np.array([[j < i and tokens[j] == tokens[i] for j in range(t)] for i in range(t)])
    follows = np.array([[1 <= j <= i and tokens[j - 1] == tokens[i] for j in range(t)] for i in range(t)])
    counted = earlier.any(-1)
    echo, ind = [], []
    for q, k, _ in layer_queries_keys(m, tokens[None]):
        p = causal_probs(q, k, m.config.group_size)[0].reshape(m.config.num_heads, t, t)  # [H, T, T]
        echo.append((p * earlier).sum(-1)[:, counted].mean(-1))
        ind.append((p * follows).sum(-1)[:, counted].mean(-1))
    return np.array(echo), np.array(ind)


def test_probe_scores_match_numpy(tiny_model):
    m = tiny_model
    tokens = razor_heads.probe_tokens(m.config.vocab_size, num_tokens=40, repeats=3, seed=1, bos_id=1)
    assert len(tokens) == 121 and tokens[0] == 1 and (tokens[1:41] == tokens[41:81]).all()
    echo, ind = razor_heads.probe_scores(m, tokens, query_block=32)  # several blocks, one padded
    ref_echo, ref_ind = _numpy_probe_scores(m, tokens)
    np.testing.assert_allclose(echo, ref_echo, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ind, ref_ind, rtol=1e-4, atol=1e-6)
    heads = razor_heads.identify_retrieval_heads(m, num_tokens=40, repeats=3, echo_frac=0.25, induction_frac=0.25)
    assert len(heads) == 2 and 1 <= sum(map(len, heads)) <= 2


def test_planted_echo_and_induction_heads_are_found():
    """20 heads over a probe: head 7 attends to earlier copies, head 13 to what followed them."""
    tokens = razor_heads.probe_tokens(50, num_tokens=30, repeats=4, seed=2, bos_id=0)
    t = len(tokens)
    causal = np.tril(np.ones((t, t)))
    probs = np.tile(causal / causal.sum(-1, keepdims=True), (20, 1, 1))  # uniform heads [20, T, T]
    earlier = np.array([[j < i and tokens[j] == tokens[i] for j in range(t)] for i in range(t)], float)
    follows = np.array([[1 <= j <= i and tokens[j - 1] == tokens[i] for j in range(t)] for i in range(t)], float)
    for head, target in ((7, earlier), (13, follows)):
        rows = target.sum(-1, keepdims=True)
        probs[head] = np.where(rows > 0, target / np.maximum(rows, 1), probs[head])
    echo, ind, n = razor_heads.echo_induction_mass(
        jnp.asarray(probs, jnp.float32)[None, :, None], jnp.asarray(tokens)[None], jnp.arange(t)
    )
    echo, ind = np.asarray(echo[0, :, 0] / n[0]), np.asarray(ind[0, :, 0] / n[0])
    assert echo[7] == pytest.approx(1.0) and ind[13] == pytest.approx(1.0, abs=0.02)
    heads = razor_heads.select_retrieval_heads(echo.reshape(4, 5), ind.reshape(4, 5), 5, 0.05, 0.05)
    assert heads == ((), (2,), (3,), ())  # flat heads 7 and 13
    # GQA: a KV head scores the max of its query group; default fractions give ~15% of KV heads.
    rng = np.random.default_rng(3)
    heads = razor_heads.select_retrieval_heads(rng.random((32, 32)), rng.random((32, 32)), 8)
    assert 36 <= sum(map(len, heads)) <= 39  # ceil(1% of 256) + ceil(14% of 256), minus overlap


# ------------------------------------------------------------------------------------------------
# Retrieval score (Retrieval Head paper)
# ------------------------------------------------------------------------------------------------


def test_retrieval_score_matches_numpy(tiny_model):
    """Greedy tokens and each step's top-1 attended positions match a numpy recomputation from a
    full causal forward; the copy-paste score matches its definition on planted hits."""
    m = tiny_model
    hay = random_tokens(16, (60,), m.config.vocab_size).tolist()
    test = retrieval_score.needle_test(hay, list(range(5, 17)), [9, 10], 0.5)  # needle at [30, 42)
    scores, out, tops = retrieval_score.per_test_scores(m, test, max_new_tokens=6)
    prompt, t = np.asarray(test.prompt), len(test.prompt)
    seq = np.concatenate([prompt, out[:-1]])  # everything fed to the model
    assert out == np.argmax(np.asarray(kvjax.logits(m, seq[None]))[0, t - 1 :], -1).tolist()
    ref_tops = np.zeros_like(tops)
    for layer, (q, k, _) in enumerate(layer_queries_keys(m, seq[None])):
        p = causal_probs(q, k, m.config.group_size)[0].reshape(m.config.num_heads, len(seq), len(seq))
        ref_tops[:, layer] = p[:, t - 1 : t - 1 + len(out)].argmax(-1).T  # [S, H]
    np.testing.assert_array_equal(tops, ref_tops)
    np.testing.assert_allclose(scores, retrieval_score.copy_paste_scores(tops, out, prompt, 30, 42))
    # Planted: 3 steps, 2 layers x 2 heads; needle [2, 6) of the prompt.
    planted = np.array([[[2, 9], [5, 3]], [[3, 3], [0, 4]], [[6, 5], [2, 2]]])  # [S, L, H]
    prompt = np.array([7, 7, 11, 12, 11, 13, 11, 7])
    got = retrieval_score.copy_paste_scores(planted, [11, 12, 13], prompt, 2, 6)
    # step 0 (11): (0,0)->2 holds 11 hit; (0,1)->9 outside; (1,0)->5 holds 13 miss; (1,1)->3 holds 12 miss
    # step 1 (12): (0,0)->3 hit; (0,1)->3 hit; (1,0)->0 outside; (1,1)->4 holds 11 miss
    # step 2 (13): (0,0)->6 outside the needle; (0,1)->5 hit; (1,0)->2 miss; (1,1)->2 miss
    np.testing.assert_allclose(got, [[2 / 4, 2 / 4], [0, 0]])
    correct = retrieval_score.needle_test(hay, [3] * 12, [4, 4], 0.1, answer=out[:2])
    wrong = retrieval_score.needle_test(hay, [3] * 12, [4, 4], 0.1, answer=[999])
    one, gen, _ = retrieval_score.per_test_scores(m, correct, 6)
    avg = retrieval_score.retrieval_scores(m, [correct, wrong], 6)
    np.testing.assert_allclose(avg, one if correct.correct(gen) else 0 * one)  # wrong answers don't count
    assert correct.correct([out[1], 0, out[0]]) and not correct.correct([999, 999])
    assert retrieval_score.retrieval_heads(np.array([[0.05, 0.2], [0.11, 0.1]])) == ((1,), (0,))
    assert retrieval_score.kv_head_sets(((1, 3), ()), 4, 2) == ((0, 1), ())


def test_haystack_tests_place_the_needle(tmp_path):
    (tmp_path / "PaulGrahamEssays").mkdir()  # the layout of the public haystack, with text of our own
    for i in range(2):
        (tmp_path / "PaulGrahamEssays" / f"{i}.txt").write_text(f"Essay {i} talks about many things at length. " * 40)
    needles = [
        {
            "needle": f"The secret word {i} is pebble{i}.",
            "question": f"What is secret word {i}?",
            "real_needle": f"pebble{i}",
        }
        for i in range(3)
    ]
    (tmp_path / "retrieval_head_needles.jsonl").write_text("\n".join(json.dumps(n) for n in needles))
    encode = lambda text: list(text.encode("utf-8"))  # noqa: E731  a byte "tokenizer"
    tests = retrieval_score.haystack_tests(encode, [600], [0.0, 0.5, 1.0], root=tmp_path, bos=[1])
    assert len(tests) == 9
    for test in tests:
        assert len(test.prompt) == 600 and test.prompt[0] == 1
        needle = bytes(test.prompt[test.needle_start : test.needle_end]).decode()
        assert needle.strip().endswith(".") and bytes(test.answer).decode().lower() in needle.lower()
