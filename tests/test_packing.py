"""Prepacking (`kvjax.packing`): the bin packing, the block-diagonal attention, and packed prefill giving
each prompt the state, logits and tokens of an unpacked prefill."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import inference as gen
from kvjax.attention import attend, causal_blocks, reference_attention
from kvjax.packing import Packing, bin_pack, pack, packed_rows
from kvjax.policies import (
    H2O,
    TOVA,
    AdaKV,
    Full,
    Knorm,
    PyramidKV,
    QuantizedPruning,
    Quest,
    SnapKV,
    SqueezedAttention,
    StreamingLLM,
    ThinK,
    Twilight,
)
from tests.support.random_data import random_tokens


def numpy_packing(lengths, capacity: int, fit: str) -> list[list[int]]:
    """The authors' packer (`binpacking.to_constant_volume`: heaviest first, into the fullest bin it fits,
    the earliest on ties) or textbook first-fit decreasing, over NumPy arrays. Equal lengths are taken
    in index order (a stable sort), where the authors' reversed argsort takes them in an unspecified order."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    bins, fill = [], np.zeros(0)
    for i in order:
        fits = np.flatnonzero(fill + lengths[i] <= capacity)
        if fits.size == 0:
            bins.append([])
            fill = np.append(fill, 0.0)
            b = len(bins) - 1
        else:
            b = fits[np.argmax(fill[fits])] if fit == "best" else fits[0]
        bins[b].append(int(i))
        fill[b] += lengths[i]
    return bins


@pytest.mark.parametrize("fit", ["best", "first"])
def test_bin_pack_matches_numpy_transcription(fit):
    rng = np.random.default_rng(0)
    differ = 0
    for _ in range(200):
        lengths = rng.integers(1, 60, rng.integers(1, 40))
        capacity = int(lengths.max()) + int(rng.integers(0, 40))
        bins = bin_pack(lengths, capacity, fit)
        assert [list(b) for b in bins] == numpy_packing(lengths, capacity, fit)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each prompt once
        assert all(sum(lengths[list(b)]) <= capacity for b in bins)
        differ += bins != bin_pack(lengths, capacity, "first" if fit == "best" else "best")
    assert differ > 0  # the two rules are told apart by these draws


def test_pack_lays_prompts_out_with_restarting_positions():
    lengths = np.array([60, 40, 100, 30], np.int32)
    plan = pack(lengths)  # rows of 100: [100], [60, 40], [30]
    assert plan.rows == ((2,), (0, 1), (3,)) and plan.row_length == 100
    prompts = np.zeros((4, 100), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = 1000 * (i + 1) + np.arange(n)
    tokens, positions, segments = packed_rows(prompts, plan, 128)
    assert tokens.shape == (3, 128)
    for i, n in enumerate(lengths):
        r, o = plan.row_of[i], plan.offset[i]
        np.testing.assert_array_equal(tokens[r, o : o + n], prompts[i, :n])
        np.testing.assert_array_equal(positions[r, o : o + n], np.arange(n))
        assert (segments[r, o : o + n] == i).all()
    assert (segments >= 0).sum() == lengths.sum()  # the rest is padding
    assert plan.padded_tokens(128) == 3 * 128 - 230
    wide = pack(lengths, Packing(row_length=130))  # 100 + 30 share a row
    assert wide.rows == ((2, 3), (0, 1))


def _packed_row(seed: int, lengths: tuple[int, ...], width: int):
    """q [1, W, K, G, D], k and v [1, K, W, D], columns int32[1, W] and segment ids int32[1, W] of one
    packed row holding segments of `lengths` (then padding), slot = column."""
    rng = np.random.default_rng(seed)
    kh, g, d = 2, 2, 8
    q = jnp.asarray(rng.normal(size=(1, width, kh, g, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, kh, width, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, kh, width, d)), jnp.float32)
    segments = np.full((1, width), -1, np.int32)
    start = 0
    for i, n in enumerate(lengths):
        segments[0, start : start + n] = i
        start += n
    columns = np.arange(width, dtype=np.int32)[None]
    k_pos = jnp.broadcast_to(jnp.asarray(np.where(segments >= 0, columns, -1))[:, None], (1, kh, width))
    return q, k, v, k_pos, jnp.asarray(columns), jnp.asarray(segments)


@pytest.mark.parametrize("window", [None, 24])
def test_segment_ids_attend_each_segment_alone(window):
    lengths, width = (70, 50, 40), 192
    q, k, v, k_pos, columns, segments = _packed_row(0, lengths, width)
    out = reference_attention(q, k, v, k_pos, columns, window, 0.3, (segments, segments))
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        alone_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (1, 2, n))
        alone = reference_attention(q[:, s], k[:, :, s], v[:, :, s], alone_pos, jnp.arange(n)[None], window, 0.3)
        np.testing.assert_allclose(np.asarray(out[:, s]), np.asarray(alone), atol=1e-5, rtol=0)
        start += n


def test_causal_blocks_and_kernel_names_take_segment_ids():
    """Over 512 slots a packed chunk runs `causal_blocks` with the segment mask; an `impl` naming a kernel
    runs the jnp path too (no kernel takes segment ids), not a kernel that would ignore them."""
    q, k, v, k_pos, columns, segments = _packed_row(1, (300, 500, 180), 1024)
    ids = (segments, segments)
    want = reference_attention(q, k, v, k_pos, columns, None, 0.3, ids)
    blocks = causal_blocks(q, k, v, k_pos, columns, 0.3, 256, segment_ids=ids)
    np.testing.assert_allclose(np.asarray(blocks), np.asarray(want), atol=1e-5, rtol=0)
    chunk = slice(512, 768)  # a chunk of queries over the whole row
    for impl in ("reference", "tpu-interpret"):
        got = attend(
            q[:, chunk], k, v, k_pos, columns[:, chunk], None, 0.3, impl, slot_is_position=True,
            segment_ids=(segments[:, chunk], segments),
        )  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, chunk]), atol=1e-5, rtol=0)


def _prompts(m, lengths, seed=0):
    return [random_tokens(seed + i, (n,), m.config.vocab_size) for i, n in enumerate(lengths)]


def _assert_same_state(a: kvjax.KVState, b: kvjax.KVState):
    np.testing.assert_array_equal(np.asarray(a.length), np.asarray(b.length))
    assert kvjax.kv_bytes(a) == kvjax.kv_bytes(b)
    assert jax.tree.structure(a.replace(origin=None)) == jax.tree.structure(b.replace(origin=None))
    for layer_a, layer_b in zip(a.layers, b.layers):
        for seg_a, seg_b in zip(layer_a, layer_b):
            np.testing.assert_array_equal(np.asarray(seg_a.pos), np.asarray(seg_b.pos))
            held = np.asarray(seg_a.pos >= 0)[..., None]
            for x, y in ((seg_a.k, seg_b.k), (seg_a.v, seg_b.v)):
                np.testing.assert_allclose(np.where(held, x, 0), np.where(held, y, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [64, None])
def test_packed_prefill_gives_the_unpacked_state_and_logits(tiny_model, chunk_size):
    m = tiny_model
    lengths = (7, 75, 130, 40, 90, 20)
    prompts = _prompts(m, lengths)
    assert pack(np.array(lengths)).num_rows < len(lengths)  # it does pack
    batch = gen._prompt_batch(prompts, None, m.config.vocab_size)
    run = gen.Execution()
    state, last = gen._run_prefill(m, *batch, Full(), chunk_size, 9, run)
    packed_state, packed_last = gen._run_prefill(m, *batch, Full(), chunk_size, 9, run, Packing())
    _assert_same_state(state, packed_state)
    np.testing.assert_allclose(np.asarray(packed_last), np.asarray(last), atol=1e-5, rtol=0)
    public = kvjax.prefill(m, prompts, chunk_size=chunk_size, max_new_tokens=9, packing=True)
    _assert_same_state(kvjax.prefill(m, prompts, chunk_size=chunk_size, max_new_tokens=9), public)
    assert public.origin == kvjax.prefill(m, prompts, chunk_size=chunk_size, max_new_tokens=9).origin


@pytest.mark.parametrize(
    "policy",
    [None, Quest(budget_tokens=32, page=16, dense_layers=0), Twilight(budget_tokens=48, page=16, dense_layers=0)],
    ids=["full", "quest", "twilight"],
)
def test_packed_generate_equals_unpacked(tiny_model, policy):
    m = tiny_model
    prompts = _prompts(m, (33, 150, 64, 97, 12, 120, 70), seed=20)
    kwargs = dict(max_new_tokens=16, policy=policy, eos_token_id=(), chunk_size=64)
    plain = np.asarray(kvjax.generate(m, prompts, **kwargs))
    packings = (True, Packing(row_length=256, fit="first")) if policy is None else (True,)
    for packing in packings:
        np.testing.assert_array_equal(np.asarray(kvjax.generate(m, prompts, packing=packing, **kwargs)), plain)


# Prompt compressors that score the prompt at its end from its keys and last queries (`Policy.packed_tail`).
SCORING = {
    "snapkv": SnapKV(budget_tokens=40, window=8),
    "pyramidkv": PyramidKV(budget_tokens=40, window=8),
    "adakv": AdaKV(base=SnapKV(budget_tokens=40, window=8)),
    "knorm": Knorm(budget_tokens=40, skip_layers=()),
    "think": ThinK(base=SnapKV(budget_tokens=40, window=8), observe=12, recent=4),
    "quantized_pruning": QuantizedPruning(base=SnapKV(budget_tokens=40, window=8), group=16, residual=8),
    "squeezed_attention": SqueezedAttention(recent=16),
}


def _positions(state: kvjax.KVState) -> list[tuple[str, np.ndarray]]:
    """Every int32 leaf of a state (positions, owning heads, kept channels: what it kept), by its path."""
    return [
        (jax.tree_util.keystr(path), np.asarray(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.replace(origin=None))
        if leaf.dtype == jnp.int32
    ]


@pytest.mark.parametrize("name", SCORING)
def test_packed_prefill_keeps_what_scoring_policies_keep_unpacked(tiny_model, name):
    """Each prompt keeps the same positions packed as unpacked, and generates the same tokens: the policy
    scored it from its own last queries over its own keys. A prompt shorter than the tail (5 tokens) takes
    its whole prompt as the tail."""
    m, policy = tiny_model, SCORING[name]
    assert policy.packed_tail == {"knorm": 0, "think": 12, "squeezed_attention": 16}.get(name, 8)
    prompts = _prompts(m, (33, 150, 64, 97, 5, 120, 70), seed=20)
    batch = gen._prompt_batch(prompts, None, m.config.vocab_size)
    run = gen.Execution()
    state, last = gen._run_prefill(m, *batch, policy, 64, 8, run)
    packed_state, packed_last = gen._run_prefill(m, *batch, policy, 64, 8, run, Packing())
    assert kvjax.kv_bytes(packed_state) == kvjax.kv_bytes(state)
    kept = _positions(state)
    assert [path for path, _ in _positions(packed_state)] == [path for path, _ in kept]
    for (path, want), (_, got) in zip(kept, _positions(packed_state)):
        np.testing.assert_array_equal(got, want, err_msg=path)
    np.testing.assert_allclose(np.asarray(packed_last), np.asarray(last), atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=8, policy=policy, eos_token_id=(), chunk_size=64)
    plain = np.asarray(kvjax.generate(m, prompts, **kwargs))
    np.testing.assert_array_equal(np.asarray(kvjax.generate(m, prompts, packing=True, **kwargs)), plain)


@pytest.mark.parametrize(("lengths", "chunk_size"), [((60, 40, 100), 64), ((600, 400, 1000), 512)])
def test_no_attention_crosses_a_segment(tiny_model, lengths, chunk_size):
    """Prompt 1 sits right after prompt 0 in a packed row; changing prompt 0 changes none of prompt 1's
    entries or logits (bit for bit), through the reference (rows of 128) and `causal_blocks` (1024)."""
    m = tiny_model
    plan = pack(np.array(lengths))
    assert plan.row_of[0] == plan.row_of[1] and plan.offset[1] == plan.offset[0] + lengths[0]
    prompts = _prompts(m, lengths, seed=40)
    changed = [prompts[0][::-1].copy(), prompts[1], prompts[2]]
    run = gen.Execution()
    states, lasts = [], []
    for batch in (prompts, changed):
        state, last = gen._run_prefill(
            m, *gen._prompt_batch(batch, None), Full(), chunk_size, 0, run, Packing()
        )  # fmt: skip
        states.append(state)
        lasts.append(np.asarray(last))
    assert not np.array_equal(lasts[0][0], lasts[1][0])  # prompt 0 did change
    np.testing.assert_array_equal(lasts[0][1:], lasts[1][1:])
    for layer_a, layer_b in zip(states[0].layers, states[1].layers):
        for a, b in zip(layer_a, layer_b):
            np.testing.assert_array_equal(np.asarray(a.k)[1:], np.asarray(b.k)[1:])
            np.testing.assert_array_equal(np.asarray(a.v)[1:], np.asarray(b.v)[1:])


def test_packing_refuses_what_it_cannot_do(tiny_model):
    m = tiny_model
    prompts = _prompts(m, (20, 50))
    for policy in (H2O(heavy=8, window=8), TOVA(budget_tokens=16), StreamingLLM(), SnapKV(per_query_head=True)):
        with pytest.raises(ValueError, match=f"packing cannot run {type(policy).__name__}: .* evicts, prunes"):
            kvjax.generate(m, prompts, max_new_tokens=2, policy=policy, packing=True)
    with pytest.raises(ValueError, match="row_length \\(40\\) is shorter than the longest prompt \\(50"):
        kvjax.prefill(m, prompts, packing=Packing(row_length=40))
    with pytest.raises(ValueError, match="packing must be None, a bool"):
        kvjax.prefill(m, prompts, packing="yes")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="row_length must be a positive integer"):
            Packing(row_length=bad)
    with pytest.raises(ValueError, match="fit must be one of"):
        Packing(fit="worst")
    state = kvjax.prefill(m, prompts, max_new_tokens=8)
    with pytest.raises(ValueError, match="packing applies to a new prefill"):
        kvjax.generate(m, prompts, max_new_tokens=2, state=state, packing=True)
