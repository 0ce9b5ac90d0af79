"""LServe: the retrieval heads' hierarchical page selection (logical pages scored by their keys' min/max, a
physical page by its best logical page) against a numpy reading of the authors' selector, the selection
reused for `reuse` decode steps, Full's logits where the budget covers everything, generate on a ragged
batch, and kv_bytes against the analytic figure (streaming heads shrink; selection only adds bounds)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import init_model
from kvjax.inference import DEFAULT_CHUNK, _chunking
from kvjax.kv_state import KVSegment, position_capacity, round_capacity
from kvjax.layer_step import Decode, LayerContext, StepInputs
from kvjax.policies import DuoAttention, Full, LServe
from kvjax.policies.base import Policy
from kvjax.policies.duo_attention import pattern_file, read_gates_tsv, released_patterns
from kvjax.policies.lserve import SelectedPagesSegment
from kvjax.policies.quantized_pruning import decode_state_bytes
from pallas_kernels import block_masks as bm
from tests.support.jaxprs import pallas_calls
from tests.support.page_reference import attend, page_bounds, visible_slots
from tests.support.quantized_fixtures import (
    assert_generate_is_the_greedy_chain,
    head_dim_32_config,
    teacher_forced,
)
from tests.support.random_data import random_tokens

LENGTHS = (300, 170, 40)
NEW = 10
CHUNK = 128
SMOLLM2_TSV = "docs/learned_policies/smollm2/duo/full_attention_heads.tsv"


def lserve_pages(q, k, pos, position, *, page, logical, budget) -> np.ndarray:
    """The physical pages a query group q [G, D] at `position` reads from one row k [C, D], pos [C], as the
    authors' selector (mit-han-lab/omniserve `dynamic_select_topk_pages`): every page while position <=
    budget; else the last page plus the best min(max(3, budget // page), pages) - 1 others, a page scored
    by the max over its logical pages of sum_d max(q_d M_d, q_d m_d) (here mean over G, one set per KV head)."""
    lo, hi = page_bounds(k, pos, logical)  # [Pl, D]
    bound = np.maximum(q[:, :, None] * hi.T[None], q[:, :, None] * lo.T[None]).sum(1).mean(0)  # [Pl]
    bound = np.where(np.arange(len(bound)) * logical <= position, bound, -np.inf)
    physical = bound.reshape(-1, page // logical).max(1)  # [P]
    current = position // page
    if position <= budget:
        return np.arange(current + 1)
    others = np.argsort(-physical[:current], kind="stable")[: max(3, budget // page) - 1]
    return np.sort(np.append(others, current))


def on_pages(pages, capacity: int, page: int) -> np.ndarray:
    return np.isin(np.arange(capacity) // page, pages)


def segment_of(k, v, pos, policy: LServe) -> SelectedPagesSegment:
    """A retrieval segment holding rows k, v [B, H, C, D], pos [B, H, C], before any decode step."""
    b, h = k.shape[:2]
    pairs = [[page_bounds(k[i, j], pos[i, j], policy.logical_page) for j in range(h)] for i in range(b)]
    lo, hi = (np.stack([[pair[n] for pair in row] for row in pairs]) for n in (0, 1))
    kv = KVSegment(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), heads=tuple(range(h)))
    return SelectedPagesSegment(
        kv=kv,
        k_min=jnp.asarray(lo),
        k_max=jnp.asarray(hi),
        pages=jnp.zeros((b, h, policy.width), jnp.int32),
        counts=jnp.zeros((b, h), jnp.int32),
        steps=jnp.zeros((b,), jnp.int32),
    )


def decode_one(policy, seg, q, k_new, v_new, q_pos, impl="reference"):
    """policy.step on one retrieval segment for a decode token per row: (output [B, 1, H, G, D], segment)."""
    ctx = LayerContext(0, None, q.shape[-1] ** -0.5, impl)
    x = StepInputs(q, k_new, v_new, q, k_new, q_pos, q_pos)
    out, (new,) = policy.step(ctx, (seg,), x, Decode())
    return out, new


def random_rows(seed, held, heads=2, head_dim=32, capacity=512):
    rng = np.random.default_rng(seed)
    b = len(held)
    slots = np.arange(capacity)
    pos = np.broadcast_to(np.where(slots < np.asarray(held)[:, None], slots, -1)[:, None], (b, heads, capacity))
    pos = pos.astype(np.int32).copy()
    k, v = (
        np.where(pos[..., None] >= 0, rng.normal(size=(b, heads, capacity, head_dim)), 0).astype(np.float32)
        for _ in "kv"
    )
    return rng, k, v, pos


def write(k, v, pos, k_new, v_new, at):
    """Rows with token (k_new, v_new) [B, 1, H, D] written at slot = position at[b]."""
    k, v, pos = k.copy(), v.copy(), pos.copy()
    for b, a in enumerate(at):
        k[b, :, a], v[b, :, a], pos[b, :, a] = k_new[b, 0], v_new[b, 0], a
    return k, v, pos


@pytest.mark.parametrize("impl", ["reference", "tpu-interpret"])
def test_selection_is_the_hierarchical_rule_and_attention_reads_exactly_it(impl):
    # 8 physical pages of 64 (32 logical pages of 16); a 128-token budget reads 3 pages past the dense start,
    # and the third row (position 100 <= 128) still reads every page it can see.
    policy = LServe(((0, 1),), token_budget=128)
    held = np.array([450, 300, 100])
    rng, k, v, pos = random_rows(3, held)
    q = rng.normal(size=(3, 1, 2, 3, 32)).astype(np.float32)
    k_new, v_new = (rng.normal(size=(3, 1, 2, 32)).astype(np.float32) for _ in "kv")
    out, seg = jax.jit(lambda *a: decode_one(policy, *a, impl=impl))(
        segment_of(k, v, pos, policy), q, k_new, v_new, jnp.asarray(held[:, None].astype(np.int32))
    )
    k, v, pos = write(k, v, pos, k_new, v_new, held)
    for i in range(3):
        for j in range(2):
            want = lserve_pages(q[i, 0, j], k[i, j], pos[i, j], held[i], page=64, logical=16, budget=128)
            assert len(want) == (3 if held[i] > 128 else held[i] // 64 + 1)
            n = int(seg.counts[i, j])
            np.testing.assert_array_equal(np.asarray(seg.pages[i, j, :n]), want)
            attended = on_pages(want, 512, 64) & visible_slots(pos[i, j], held[i], None)
            np.testing.assert_allclose(
                out[i, 0, j], attend(q[i, 0, j], k[i, j], v[i, j], attended, 32**-0.5), atol=2e-6
            )
            lo, hi = page_bounds(k[i, j], pos[i, j])
            np.testing.assert_array_equal(np.asarray(seg.k_min[i, j]), lo)
            np.testing.assert_array_equal(np.asarray(seg.k_max[i, j]), hi)


def test_a_page_scores_by_its_best_logical_page_not_by_its_own_bounds():
    # Hand-built keys, query all ones, query at position 450 (page 7): page 2 holds one logical page of keys
    # 3 (bound 12); page 4 spreads 2 over one channel per logical page (each bound 2; its own 64-key bounds
    # would give 8); page 5 holds keys 1.5 everywhere (bound 6). The best logical page picks pages 2 and 5.
    d, capacity, position = 4, 512, 450
    k = np.zeros((capacity, d), np.float32)
    k[144:160] = 3.0
    for c in range(4):
        k[256 + 16 * c : 272 + 16 * c, c] = 2.0
    k[320:384] = 1.5
    pos = np.where(np.arange(capacity) < position, np.arange(capacity), -1).astype(np.int32)
    q = np.ones((1, 1, 1, 1, d), np.float32)
    policy = LServe(((0,),), token_budget=128)
    seg = segment_of(k[None, None], k[None, None], pos[None, None], policy)
    zero = np.zeros((1, 1, 1, d), np.float32)
    _, seg = jax.jit(lambda *a: decode_one(policy, *a))(seg, q, zero, zero, jnp.asarray([[position]], jnp.int32))
    want = lserve_pages(q[0, 0, 0], k, pos, position, page=64, logical=16, budget=128)
    np.testing.assert_array_equal(want, [2, 5, 7])
    np.testing.assert_array_equal(np.asarray(seg.pages[0, 0, : int(seg.counts[0, 0])]), want)


def test_one_selection_serves_reuse_steps_then_is_made_again():
    # Rows cross into a new page (448) while a selection is reused: that page is read besides the stored ones.
    reuse, steps = 3, 8
    policy = LServe(((0, 1),), token_budget=128, reuse=reuse)
    held = np.array([446, 300])
    rng, k, v, pos = random_rows(5, held)
    seg = segment_of(k, v, pos, policy)
    step = jax.jit(lambda *a: decode_one(policy, *a))
    stored, changed = None, 0
    for s in range(steps):
        q = rng.normal(size=(2, 1, 2, 3, 32)).astype(np.float32)
        k_new, v_new = (rng.normal(size=(2, 1, 2, 32)).astype(np.float32) for _ in "kv")
        at = held + s
        out, seg = step(seg, q, k_new, v_new, jnp.asarray(at[:, None].astype(np.int32)))
        k, v, pos = write(k, v, pos, k_new, v_new, at)
        assert np.all(np.asarray(seg.steps) == s + 1)
        for i in range(2):
            for j in range(2):
                fresh = lserve_pages(q[i, 0, j], k[i, j], pos[i, j], at[i], page=64, logical=16, budget=128)
                got = np.asarray(seg.pages[i, j, : int(seg.counts[i, j])])
                if s % reuse == 0:
                    np.testing.assert_array_equal(got, fresh)
                else:
                    np.testing.assert_array_equal(got, stored[i][j])
                    changed += not np.array_equal(fresh, got)  # a fresh selection would have read other pages
                read = np.union1d(got, [at[i] // 64])
                attended = on_pages(read, 512, 64) & visible_slots(pos[i, j], at[i], None)
                np.testing.assert_allclose(
                    out[i, 0, j], attend(q[i, 0, j], k[i, j], v[i, j], attended, 32**-0.5), atol=2e-6
                )
        stored = [[np.asarray(seg.pages[i, j, : int(seg.counts[i, j])]) for j in range(2)] for i in range(2)]
    assert changed > 0  # reuse was exercised: recomputing every step would have failed above


@pytest.fixture(scope="module")
def model():
    return init_model(head_dim_32_config(num_layers=2), seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def tokens(model):
    return random_tokens(2, (len(LENGTHS), max(LENGTHS) + NEW), model.config.vocab_size)


SPARSE = LServe(((0,), (1,)), sink=4, local=32, prefill_local=64, token_budget=64, reuse=4)


def test_every_head_retrieving_with_a_budget_covering_everything_is_full(model, tokens):
    full, _, _ = teacher_forced(model, Full(), tokens, LENGTHS, NEW, CHUNK)
    every, _, _ = teacher_forced(model, LServe(((0, 1), (0, 1)), token_budget=1024), tokens, LENGTHS, NEW, CHUNK)
    np.testing.assert_allclose(every, full, atol=1e-5)
    sparse, _, state = teacher_forced(model, SPARSE, tokens, LENGTHS, NEW, CHUNK)
    assert np.abs(sparse[:2] - full[:2]).max() > 1e-2
    retrieval, streaming = state.layers[0]
    assert isinstance(retrieval, SelectedPagesSegment) and np.all(np.asarray(retrieval.steps) == NEW)
    assert int(np.max(np.asarray(retrieval.counts))) <= SPARSE.pages_read  # past the dense start


def test_streaming_heads_see_sink_plus_prefill_local_while_prefilling_then_keep_sink_plus_local(model, tokens):
    # Every head streaming. With prefill_local covering the prompt (the authors' 8192 at short prompts) the
    # prompt's keys and values are Full's in every layer; a shorter prefill window changes the later layers'.
    prompts, lengths = tokens[:, : max(LENGTHS)], np.asarray(LENGTHS, np.int32)
    full = kvjax.prefill(model, prompts, Full(), lengths=lengths, chunk_size=CHUNK)
    for prefill_local, same in ((512, True), (64, False)):
        policy = LServe(((), ()), sink=4, local=32, prefill_local=prefill_local)
        state = kvjax.prefill(model, prompts, policy, lengths=lengths, chunk_size=CHUNK)
        for layer, (ref,) in enumerate(full.layers):
            (seg,) = state.layers[layer]
            for b, n in enumerate(LENGTHS):
                pos = np.asarray(seg.pos[b, 0])
                kept = np.sort(pos[pos >= 0])
                np.testing.assert_array_equal(kept, np.union1d(np.arange(min(4, n)), np.arange(max(n - 32, 0), n)))
                order = pos >= 0
                diff = np.abs(np.asarray(seg.k[b][:, order]) - np.asarray(ref.k[b][:, pos[order]])).max()
                assert (diff < 1e-5) if same or layer == 0 or n <= 68 else (diff > 1e-3)


@dataclasses.dataclass(frozen=True)
class TwoLaunches(LServe):
    """LServe attending each segment on its own (`Policy.step`): the streaming and retrieval heads' calls."""

    step = Policy.step


# Streaming buffers of round(4 + 64 + 1) = 80 slots: more than a 64-token page, so decode takes the one launch.
ONE = LServe(((0,), (1,)), sink=4, local=64, prefill_local=64, token_budget=64, reuse=4)


@pytest.mark.parametrize("impl", ["reference", "tpu-interpret", "gpu-interpret"])
def test_one_launch_for_all_heads_is_the_two_launches_result(model, tokens, impl):
    # Five steps: a selection made, reused three times, made again; kv_bytes as the two-launch state's.
    lengths = np.asarray((200, 90), np.int32)
    two = TwoLaunches(**{f.name: getattr(ONE, f.name) for f in dataclasses.fields(LServe) if f.init})
    logits, held = [], []
    for policy in (ONE, two):
        state = kvjax.prefill(model, tokens[:2, :200], policy, lengths=lengths, max_new_tokens=5, attention_impl=impl)
        held.append(kvjax.kv_bytes(state))
        for i in range(5):
            out, state = kvjax.decode_step(model, state, tokens[:2, 200 + i], policy, attention_impl=impl)
            logits.append(np.asarray(out))
        assert kvjax.kv_bytes(state) == held[0]
    np.testing.assert_allclose(logits[:5], logits[5:], atol=1e-5, rtol=0)
    assert held[0] == held[1]


# sink + prefill_local covers LENGTHS' padded prompt (384 at CHUNK): every layer fuses its prefill.
FUSED = LServe(((0,), (1,)), sink=4, local=32, prefill_local=512, token_budget=64, reuse=4)


@dataclasses.dataclass(frozen=True)
class TwoCalls(LServe):
    """LServe prefilling one call per kind of head whatever the prompt (each kind in its own buffer)."""

    def fuses_prefill(self, config, layer, prompt_len):
        return False


def _fields(policy: LServe) -> dict:
    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(LServe) if f.init}


def test_fused_prefill_is_the_two_call_prefill(model, tokens):
    """One buffer and one launch per layer for both kinds of heads leaves the two-call prefill's state (same
    positions, kv_bytes and structure) and its logits through decoding (fp32, 1e-5)."""
    layout = FUSED.layout(model.config, 384, NEW, CHUNK)
    assert all(len(layer) == 1 and layer[0].heads == (0, 1) for layer in layout)
    two = TwoCalls(**_fields(FUSED))
    steps = FUSED.reuse + 1  # a selection made, reused, made again
    fused_logits, fused_state, _ = teacher_forced(model, FUSED, tokens, LENGTHS, steps, CHUNK)
    two_logits, two_state, _ = teacher_forced(model, two, tokens, LENGTHS, steps, CHUNK)
    np.testing.assert_allclose(fused_logits, two_logits, atol=1e-5, rtol=0)
    assert kvjax.kv_bytes(fused_state) == kvjax.kv_bytes(two_state)
    assert jax.tree.structure(fused_state.replace(origin=None)) == jax.tree.structure(two_state.replace(origin=None))
    for a, b in zip(jax.tree.leaves(fused_state), jax.tree.leaves(two_state)):
        if a.dtype == jnp.int32:  # positions, selections, counters
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Past sink + prefill_local the streaming heads evict while prefilling: their own buffer, two calls.
    assert len(SPARSE.layout(model.config, 384, NEW, CHUNK)[0]) == 2


@pytest.mark.parametrize("policy,per_layer", [(FUSED, 1), (TwoCalls(**_fields(FUSED)), 2)])
def test_a_prefill_chunk_launches_one_kernel_per_layer(model, tokens, policy, per_layer):
    run = kvjax.inference.Execution("gpu-interpret", False)  # layers unrolled: each layer's calls appear once
    lengths = jnp.asarray(LENGTHS, jnp.int32)

    def prefill(t):
        return kvjax.inference._prefill(
            model.graphdef, model.params, None, t, lengths, policy=policy, chunk=CHUNK, max_new_tokens=NEW, run=run
        )

    padded = np.pad(tokens[:, : max(LENGTHS)], ((0, 0), (0, 384 - max(LENGTHS))))  # 3 chunks
    calls = pallas_calls(jax.make_jaxpr(prefill)(jnp.asarray(padded)).jaxpr)
    assert len(calls) == per_layer * model.config.num_layers
    assert all(call.params["name"] == "block_sparse_prefill_gpu" for call in calls)


def _lambda_blocks(first: int, chunk: int, block_q: int, block_k: int, nk: int, sink: int, window: int):
    """NumPy: per query block of a chunk of queries at positions [first, first + chunk), the key blocks holding
    a key some query of it sees under the authors' streaming-head rule (k <= q and (k < sink or q - k <
    window); window = every key for a retrieval head)."""
    rows = []
    for q0 in range(first, first + chunk, block_q):
        q = np.arange(q0, q0 + block_q)[:, None]
        k = np.arange(nk * block_k)[None, :]
        seen = (k <= q) & ((k < sink) | (q - k < window))
        rows.append(set(np.flatnonzero(seen.reshape(block_q, nk, block_k).any(axis=(0, 2))).tolist()))
    return rows


def test_the_fused_launchs_table_lists_each_heads_sink_and_local_blocks(model):
    """The table a fused launch hands the kernel (dense causal, chunk mode) lists, for every head and chunk,
    exactly the blocks of the authors' per-head rule (retrieval heads every earlier block, streaming heads
    their sink and prefill_local blocks), a NumPy transcription, for exactly the prompts a layer fuses
    (`fuses_prefill`): past sink + prefill_local (516 here) the rules part, and the prefill keeps two calls."""
    block_q, block_k, chunk = 32, 32, 128
    h, kh = model.config.num_heads, model.config.num_kv_heads
    retrieval = FUSED.retrieval_heads[0]
    for prompt_len in (384, 512, 640):
        kv_len = FUSED.layout(model.config, prompt_len, NEW, chunk)[0][0].capacity  # the retrieval buffer's
        nk = kv_len // block_k
        offsets = np.arange(0, prompt_len, chunk, dtype=np.int32)
        table = bm.prefill_chunk_block_table(
            bm.DenseCausal(), jnp.asarray(offsets), num_heads=h, num_kv_heads=kh, chunk_len=chunk, kv_len=kv_len,
            block_q=block_q, block_k=block_k,
        )  # fmt: skip
        kv_blocks, counts, pattern = (np.asarray(x) for x in (table.kv_blocks, table.counts, table.head_pattern))
        agree = True
        for b, first in enumerate(offsets):
            for head in range(h):
                listed = [
                    set(kv_blocks[b, pattern[head], qb, :n].tolist()) for qb, n in enumerate(counts[b, pattern[head]])
                ]
                assert listed == _lambda_blocks(int(first), chunk, block_q, block_k, nk, 0, kv_len)  # causal
                if head // (h // kh) not in retrieval:
                    agree &= listed == _lambda_blocks(
                        int(first), chunk, block_q, block_k, nk, FUSED.sink, FUSED.prefill_local
                    )
        assert agree == FUSED.fuses_prefill(model.config, 0, prompt_len), prompt_len


@pytest.mark.parametrize("policy,per_layer", [(ONE, 1), (TwoLaunches(((0,), (1,)), sink=4, local=64), 2)])
def test_a_decode_step_launches_one_kernel_per_layer(model, tokens, policy, per_layer):
    lengths = np.asarray((200, 90), np.int32)
    impl = "gpu-interpret"
    state = kvjax.prefill(model, tokens[:2, :200], policy, lengths=lengths, max_new_tokens=2, attention_impl=impl)
    run = kvjax.inference.Execution(impl, False)  # layers unrolled: each layer's calls appear once

    def decode(s, t):
        return kvjax.inference._decode_step(model.graphdef, model.params, None, s, t, policy=policy, run=run)

    calls = pallas_calls(jax.make_jaxpr(decode)(state, jnp.asarray(tokens[:2, 200])).jaxpr)
    assert len(calls) == per_layer * model.config.num_layers
    assert all(call.params["name"] == "block_sparse_decode_gpu" for call in calls)


def test_generate_ragged_batch_is_the_greedy_chain(model, tokens):
    assert_generate_is_the_greedy_chain(model, SPARSE, tokens, LENGTHS, 8, CHUNK, steps=SPARSE.reuse + 2)


@pytest.mark.parametrize("chunk", [CHUNK, None])
def test_kv_bytes_of_a_prefilled_state_is_the_analytic_figure(model, tokens, chunk):
    prompts, lengths = tokens[:, : max(LENGTHS)], np.asarray(LENGTHS, np.int32)
    state = kvjax.prefill(model, prompts, SPARSE, lengths=lengths, max_new_tokens=NEW, chunk_size=chunk)
    b, d = len(LENGTHS), model.config.head_dim
    padded = _chunking(max(LENGTHS), chunk or DEFAULT_CHUNK)[1]  # the prompt length the layout saw
    slots = -(-position_capacity(padded + NEW) // 64) * 64
    retrieval = b * (slots * (2 * d * 4 + 4) + (slots // 16) * 2 * d * 4 + SPARSE.width * 4 + 4) + b * 4
    streaming = b * round_capacity(SPARSE.sink + SPARSE.local + 1) * (2 * d * 4 + 4)
    assert kvjax.kv_bytes(state) == 2 * (retrieval + streaming) + b * 4


def test_kv_bytes_on_smollm2_with_the_shipped_pattern():
    # SmolLM2's shapes (30 layers, 3 KV heads, D 64), bf16, 32K prompt + 64 new tokens: retrieval heads hold
    # every slot plus a min and max per 16-token logical page, the selection and a step counter; streaming
    # heads hold sink + local + 1 slots. The page selection saves reads only, the streaming heads memory.
    cfg = head_dim_32_config(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)
    policy = LServe.from_tsv(SMOLLM2_TSV)
    prompt, new, d = 32768, 64, 64
    retrieval = sum(map(len, policy.retrieval_heads))
    layers_with = sum(1 for heads in policy.retrieval_heads if heads)
    slots = -(-position_capacity(prompt + new) // 64) * 64
    per_retrieval = slots * (2 * d * 2 + 4) + (slots // 16) * 2 * d * 2 + policy.width * 4 + 4
    per_streaming = round_capacity(128 + 256 + 1) * (2 * d * 2 + 4)
    expected = retrieval * per_retrieval + (90 - retrieval) * per_streaming + layers_with * 4 + 4
    got = decode_state_bytes(policy, cfg, prompt, new)
    assert got == expected
    duo = DuoAttention(policy.retrieval_heads, sink=128, recent=256)
    assert got > decode_state_bytes(duo, cfg, prompt, new)  # the bounds: 2 / 16 of the keys' bytes more
    assert got < 0.6 * decode_state_bytes(Full(), cfg, prompt, new)


def test_from_tsv_keeps_the_authors_head_count_at_static_sparsity_half():
    gates = read_gates_tsv(SMOLLM2_TSV)
    n = gates.size
    policy = LServe.from_tsv(SMOLLM2_TSV)
    assert sum(map(len, policy.retrieval_heads)) == n - math.ceil(0.5 * (n - 1))
    assert (policy.sink, policy.local, policy.prefill_local) == (128, 256, 8192)
    assert (policy.page, policy.logical_page, policy.token_budget, policy.reuse) == (64, 16, 4096, 4)
    assert "Llama-3-8B-Instruct-Gradient-1048k" in released_patterns()  # the authors' NIAH pattern ships
    with pytest.warns(UserWarning, match="share the gate"):  # its bf16 gates tie at the cut
        LServe.from_tsv(pattern_file("Llama-3-8B-Instruct-Gradient-1048k"))


def test_with_budget_reads_whole_pages():
    policy = LServe(((0,),))
    assert policy.with_budget(1000).token_budget == 960
    assert policy.with_budget(10).token_budget == 64


@pytest.mark.parametrize(
    "kwargs",
    [
        {"page": 48},
        {"page": 8, "logical_page": 8},
        {"logical_page": 128},
        {"token_budget": 100},
        {"token_budget": 0},
        {"reuse": 0},
        {"reuse": 65},
        {"local": 0},
        {"prefill_local": 100},
        {"sink": -1},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="LServe"):
        LServe(((0,),), **kwargs)
