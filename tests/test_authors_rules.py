"""Each method against its authors' code, rule by rule (issue 46): the authors' formula written out in numpy
here, kvjax's policy beside it. Fast: no model, or the tiny one."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import kvjax
from kvjax.policies import AdaKV, DuoAttention, QuantizedPruning, RazorAttention, SnapKV, ThinK
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
