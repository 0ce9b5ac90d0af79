"""Each method against its authors' code, rule by rule (issue 46): the authors' formula written out in numpy
here, kvjax's policy beside it. Fast: no model, or the tiny one."""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.kv_state import count
from kvjax.policies import (
    H2O,
    TOVA,
    AdaKV,
    DuoAttention,
    Full,
    Locret,
    QuantizedPruning,
    RazorAttention,
    SnapKV,
    StreamingLLM,
    ThinK,
)
from kvjax.policies.duo_attention import pattern_file, quantile_head_sets, read_gates_tsv, released_patterns
from tests.support.random_data import random_tokens

# ------------------------------------------------------------------------------------------------
# DuoAttention: the authors' `sparsify_attention_heads` and `load_attn_pattern`
# ------------------------------------------------------------------------------------------------


def _authors_sparsify(gates: np.ndarray, sparsity: float, seed: int) -> np.ndarray:
    """duo_attn.utils.sparsify_attention_heads (mit-han-lab/duo-attention), written out: U(0, 1e-6) noise
    breaks ties, then retrieval iff gate >= quantile(gates, sparsity). bool[L, Hkv]."""
    noisy = np.clip(gates, 0, 1) + np.random.default_rng(seed).uniform(0, 1e-6, gates.shape)
    return noisy >= np.quantile(noisy, sparsity)


def _as_mask(sets, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for layer, heads in enumerate(sets):
        mask[layer, list(heads)] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("model", released_patterns())
def test_duo_head_sets_meet_the_authors_count_on_every_shipped_pattern(model, sparsity):
    """The authors' noisy quantile keeps exactly N - ceil(s (N - 1)) retrieval heads; kvjax keeps the same
    count and the same heads, up to which of the heads within the noise (1e-6) of the cut stream: the
    authors' noise decides that at random. Before issue 46, ties kept every tied head: Llama-2-7B-32K at 0.25 streamed none."""
    gates = np.clip(read_gates_tsv(pattern_file(model)), 0, 1)
    n = gates.size - math.ceil(sparsity * (gates.size - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _as_mask(quantile_head_sets(gates, sparsity), gates.shape)
    assert ours.sum() == n
    cut = np.sort(gates.reshape(-1))[::-1][n - 1]  # the gate value at the cut
    for seed in range(3):
        theirs = _authors_sparsify(gates, sparsity, seed)
        assert theirs.sum() == n
        assert np.all(np.abs(gates[ours != theirs] - cut) < 1e-6)  # only heads the noise can reorder differ


def test_duo_warns_when_ties_decide_and_not_otherwise():
    gates = read_gates_tsv(pattern_file("Llama-2-7B-32K-Instruct"))
    with pytest.warns(UserWarning, match="ties decide"):
        sets = quantile_head_sets(gates, 0.25)
    assert sum(map(len, sets)) == 768  # 256 of 1024 heads stream, not 0
    distinct = np.random.default_rng(0).uniform(0, 1, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(map(len, quantile_head_sets(distinct, 0.5))) == 32 - math.ceil(0.5 * 31)
    every_tie = quantile_head_sets(gates, 0.25, break_ties=False)  # the old rule, still available
    assert sum(map(len, every_tie)) == 1024


def test_duo_from_tsv_reads_the_config_beside_it(tmp_path):
    """`load_attn_pattern` reads sink_size and recent_size from config.json beside the gates (128 and 256 in
    every release); arguments given explicitly still win, and a folder without a config keeps the defaults."""
    for model in released_patterns():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy = DuoAttention.from_tsv(pattern_file(model), sparsity=0.5)
        assert (policy.sink, policy.recent) == (128, 256), model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert DuoAttention.from_tsv(pattern_file(released_patterns()[0]), 0.5, sink=64).sink == 64
    gates = np.random.default_rng(1).uniform(0, 1, (2, 4))
    np.savetxt(tmp_path / "full_attention_heads.tsv", gates, delimiter="\t")
    assert DuoAttention.from_tsv(tmp_path / "full_attention_heads.tsv") == DuoAttention.from_gates(gates, 0.5, 64, 256)
    (tmp_path / "config.json").write_text('{"sink_size": 16, "recent_size": 48, "sparsity": 0.75}')
    stored = DuoAttention.from_tsv(tmp_path / "full_attention_heads.tsv")
    assert stored == DuoAttention.from_gates(gates, 0.75, 16, 48)


def test_wrappers_refuse_a_base_that_selects_per_query_head():
    """SnapKV(per_query_head=True) keeps one set per query head; the wrappers pool, thin or quantize one set
    per KV head."""
    base = SnapKV(per_query_head=True)
    for wrap in (AdaKV, ThinK, QuantizedPruning):
        with pytest.raises(ValueError, match="per query head"):
            wrap(base)


# ------------------------------------------------------------------------------------------------
# RazorAttention: the paper's buffer, L = max(S0, N / C)
# ------------------------------------------------------------------------------------------------


def test_razor_buffer_is_the_papers_max_of_floor_and_share(tiny_model):
    """Algorithm 1 of the paper: a non-retrieval head keeps its N0 sink tokens and the latest
    L = max(S0, N / C) of an N-token prompt (S0 = 4000, C = 5 by default), each row by its own N; the
    window then slides while decoding, every evicted token folded into the compensation token."""
    assert RazorAttention(((),)).buffer(100_000) == 20_000 and RazorAttention(((),)).buffer(1000) == 4000
    assert RazorAttention(((),), recent=256).buffer(100_000) == 256  # a fixed buffer stays available
    m = tiny_model
    policy = RazorAttention(((),) * 2, sink=4, buffer_floor=16, buffer_ratio=4)
    tokens = random_tokens(3, (2, 203), m.config.vocab_size)
    lengths = [200, 40]
    state = kvjax.prefill(m, tokens[:, :200], policy, lengths=lengths, max_new_tokens=3, chunk_size=64)
    buffers = [max(16, n // 4) for n in lengths]  # 50 and 16
    for layer in state.layers:
        (seg,) = layer
        for row, (n, buffer) in enumerate(zip(lengths, buffers)):
            pos = np.asarray(seg.pos[row])
            for h in range(pos.shape[0]):
                assert set(pos[h][pos[h] >= 0].tolist()) == set(range(4)) | set(range(n - buffer, n))
            np.testing.assert_array_equal(np.asarray(seg.n_dropped[row]), n - 4 - buffer)
    for t in range(3):  # row 0 decodes positions 200-202, row 1 positions 40-42
        step = np.array([tokens[0, 200 + t], tokens[1, 40 + t]])
        _, state = kvjax.decode_step(m, state, step, policy)
    for row, (n, buffer) in enumerate(zip(lengths, buffers)):
        pos = np.asarray(state.layers[1][0].pos[row, 0])
        assert set(pos[pos >= 0].tolist()) == set(range(4)) | set(range(n + 3 - buffer, n + 3))


# ------------------------------------------------------------------------------------------------
# StreamingLLM: the authors' position shift (streaming_llm/pos_shift)
# ------------------------------------------------------------------------------------------------


def _short_context(m, layers: int, context: int):
    """The tiny model cut to its first `layers` layers, with a `context`-token context."""
    from kvjax import init_model

    config = dataclasses.replace(m.config, num_layers=layers, max_position_embeddings=context)
    return init_model(config, seed=0, dtype=jnp.float32)


def test_streaming_position_shift_rotates_keys_at_their_place_in_the_cache(tiny_model):
    """The authors' pos-shift attention: cached keys stored before RoPE and rotated at their index in the
    cache, the query at its own. In a one-layer model a cached key and value depend on their token only,
    so a decode step must equal a full causal forward of just the tokens the step sees (sinks + window +
    itself) at positions 0, 1, ...: checked up to 4.5x the model's 64-token context."""
    m = _short_context(tiny_model, 1, 64)
    policy = StreamingLLM(sink=4, window=28)
    tokens = random_tokens(5, (1, 300), m.config.vocab_size)
    state = kvjax.prefill(m, tokens[:, :20], policy, max_new_tokens=280)
    for t in range(20, 300):
        logits, state = kvjax.decode_step(m, state, tokens[:, t], policy)
        if t % 40 == 0 or t == 299:
            seen = np.concatenate([tokens[0, :4], tokens[0, t - 28 : t + 1]])  # the cache before eviction, + itself
            ref = np.asarray(kvjax.logits(m, seen[None]))[0, -1]
            np.testing.assert_allclose(np.asarray(logits)[0], ref, atol=1e-4, rtol=0)


def test_streaming_position_shift_decodes_past_the_context(tiny_model):
    """With the position shift, RoPE never sees a position beyond budget + one chunk, so generate runs for
    4x the model's context (64 tokens), its logits as spread at the end as at the start; without it the
    context check refuses, as for any policy that rotates at original positions."""
    m = _short_context(tiny_model, 2, 64)
    prompt = random_tokens(6, (1, 40), m.config.vocab_size)
    shifted = StreamingLLM(sink=4, window=20)  # positions below 24 + one 32-token chunk < 64
    out = np.asarray(kvjax.generate(m, prompt, 256, shifted, eos_token_id=(), chunk_size=32))
    assert out.shape == (1, 256)
    state = kvjax.prefill(m, prompt, shifted, max_new_tokens=256, chunk_size=32)
    entropy = []
    for t in range(256):
        logits, state = kvjax.decode_step(m, state, out[:, t], shifted)
        p = jax.nn.softmax(np.asarray(logits, np.float64)[0])
        entropy.append(float(-(p * np.log(p)).sum()))
    early, late = np.array(entropy[:24]), np.array(entropy[-64:])
    assert np.all(np.isfinite(late)) and late.min() > 0.5 * early.min() and late.max() < 2 * early.max()
    with pytest.raises(ValueError, match="context"):
        kvjax.generate(m, prompt, 256, dataclasses.replace(shifted, position_shift=False), chunk_size=32)
    with pytest.raises(ValueError, match="context"):
        kvjax.generate(m, prompt, 256, Full(), chunk_size=32)


# ------------------------------------------------------------------------------------------------
# chunk_size=None: evict-as-you-go policies see the whole prompt, as in their papers
# ------------------------------------------------------------------------------------------------


def _kept(state) -> list:
    return [
        np.sort(np.where(np.asarray(layer[0].pos) >= 0, np.asarray(layer[0].pos), -1), axis=-1)
        for layer in state.layers
    ]


def test_chunk_size_none_prefills_evict_as_you_go_policies_in_one_chunk(tiny_model):
    """H2O, A2SF, VATP and TOVA score the whole prompt before evicting in their papers: chunk_size=None (the
    default) gives them one chunk, the same state as a chunk covering the prompt, where eviction after every
    64-token chunk keeps other tokens. Prompt compressors keep the default chunk, Locret its authors' 3072;
    beyond ONE_CHUNK_BYTES of attention weights the default chunk runs too."""
    m = tiny_model
    tokens = random_tokens(1, (2, 200), m.config.vocab_size)  # padded to 256: one chunk, not 2 x 128
    for policy in (H2O(heavy=40, window=24), TOVA(budget_tokens=50), StreamingLLM(sink=4, window=60)):
        default = kvjax.prefill(m, tokens, policy)
        one = kvjax.prefill(m, tokens, policy, chunk_size=256)
        for a, b in zip(_kept(default), _kept(one)):
            np.testing.assert_array_equal(a, b)
        if not isinstance(policy, StreamingLLM):  # the window keeps the same tokens whatever the chunk
            chunked = kvjax.prefill(m, tokens, policy, chunk_size=64)
            assert any(not np.array_equal(a, b) for a, b in zip(_kept(chunked), _kept(one)))
    config = m.config
    assert H2O().prefill_chunk(config, 1000) == 1000 and StreamingLLM().prefill_chunk(config, 4096) == 4096
    assert H2O().prefill_chunk(config, 16384) is None  # 4 heads x 16K x 17K float32 > 1 GiB: the default chunk
    assert SnapKV().prefill_chunk(config, 1000) is None and Locret().prefill_chunk(config, 1000) == 3072
    assert DuoAttention(((0,), (1,))).prefill_chunk(config, 1000) is None


def test_streaming_position_shift_in_prefill_chunks(tiny_model):
    """A chunk's queries sit after what the cache kept of the earlier chunks: in a one-layer model the last
    prompt token's logits equal a full forward of the sinks, the window the previous chunk left, and the
    last chunk's tokens (chunks of 32 over 100 tokens: the last chunk holds positions 96-99)."""
    m = _short_context(tiny_model, 1, 4096)
    policy = StreamingLLM(sink=4, window=20)
    tokens = random_tokens(7, (1, 100), m.config.vocab_size)
    run = kvjax.inference.Execution()
    _, logits = kvjax.inference._run_prefill(m, tokens, np.array([100], np.int32), policy, 32, 0, run)
    seen = np.concatenate([tokens[0, :4], tokens[0, 76:100]])
    np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(kvjax.logits(m, seen[None]))[0, -1], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Locret: huangyuxiang03/Locret's inference (infer.py, their modeling_llama.py)
# ------------------------------------------------------------------------------------------------


def test_locret_rotates_the_compressed_cache_contiguously_and_decoding_appends(tiny_model):
    """The authors' cache holds keys before RoPE and rotates the whole compressed cache at 0, 1, ... on every
    forward, and their decoding appends without evicting. In a one-layer, one-KV-head model a decode step
    must then equal a full forward of the kept tokens, in order, followed by the generated ones."""
    from kvjax import init_model
    from kvjax.policies.locret import random_retaining_heads

    config = dataclasses.replace(tiny_model.config, num_layers=1, num_kv_heads=1)
    m = init_model(config, seed=0, dtype=jnp.float32)
    policy = Locret(budget_tokens=24, stabilizers=8, local_len=4, params=random_retaining_heads(config, 16, seed=1))
    assert (Locret().position_shift, Locret().decode_evicts, Locret().prefill_chunk(config, 9000)) == (
        True,
        False,
        3072,
    )
    tokens = random_tokens(8, (1, 110), m.config.vocab_size)
    state = kvjax.prefill(m, tokens[:, :100], policy, max_new_tokens=10, chunk_size=32)
    pos = np.asarray(state.layers[0][0].pos)[0, 0]
    kept = sorted(pos[pos >= 0].tolist())
    assert len(kept) == 28  # budget + local tokens: something was evicted
    for t in range(100, 110):
        logits, state = kvjax.decode_step(m, state, tokens[:, t], policy)
        seen = np.concatenate([tokens[0, kept], tokens[0, 100 : t + 1]])
        np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(kvjax.logits(m, seen[None]))[0, -1], atol=1e-4)
    assert int(count(state.layers[0][0])[0, 0]) == 38  # decoding appended all ten


def test_locret_training_loss_is_the_authors(tiny_model):
    """locret/train/train.py: per layer, SmoothL1 averaged over tokens, summed over KV heads and layers and
    divided by their count, + 0.0025 x the per-layer MSE of neighbouring predictions summed over layers."""
    from kvjax.policies.locret.training import locret_loss

    rng = np.random.default_rng(0)
    layers, t, kh = 3, 12, 2
    pred, target = rng.normal(size=(2, layers, 1, t, kh)).astype(np.float32)
    total, count_, smooth = 0.0, 0, 0.0
    for s, std in zip(pred[:, 0].transpose(0, 2, 1), target[:, 0].transpose(0, 2, 1)):  # [K, T] per layer
        d = np.abs(s - std)
        total += np.where(d < 1, 0.5 * d * d, d - 0.5).mean(-1).sum()
        count_ += kh
        smooth += np.mean((s[:, :-1] - s[:, 1:]) ** 2)
    expected = total / count_ + 0.0025 * smooth
    got, _ = locret_loss(jnp.asarray(pred), jnp.asarray(target), jnp.ones((1, t), bool), 0.0025)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_locret_optimizer_is_the_authors_adamw_with_value_clipping():
    """torch AdamW (weight decay 0.01 by default), clip_grad_value_(0.5) and transformers'
    get_linear_schedule_with_warmup stepped after each update, as the authors train: the same parameters
    after five steps as kvjax's optax chain."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvjax.policies.locret.training import LocretHeadConfig, make_optimizer

    config = LocretHeadConfig(steps=5, warmup=2, lr=0.1)
    assert (config.weight_decay, config.clip, config.clip_by) == (0.01, 0.5, "value")
    grads = np.random.default_rng(1).normal(scale=2.0, size=(5, 4))
    start = np.array([1.0, -2.0, 0.5, 0.1])
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([p], lr=config.lr, betas=(config.b1, config.b2))
    sched = transformers.get_linear_schedule_with_warmup(opt, config.warmup, config.steps)
    for g in grads:
        p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_value_([p], config.clip)
        opt.step()
        sched.step()
    import optax

    ours = jnp.asarray(start, jnp.float32)
    tx = make_optimizer(config)
    state = tx.init(ours)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, ours)
        ours = optax.apply_updates(ours, updates)
    np.testing.assert_allclose(np.asarray(ours), p.detach().numpy(), rtol=1e-5, atol=1e-6)
