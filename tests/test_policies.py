"""Token-eviction policies keep exactly what their papers' formulas rank highest, within budget."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.kv_state import EvictionSegment, KVSegment, count, empty_segment, keep_top
from kvjax.policies import A2SF, H2O, TOVA, VATP, AdaKV, Full, Knorm, PyramidKV, SnapKV, StreamingLLM
from kvjax.policies.snapkv import pool_1d
from tests.support.jaxprs import pallas_calls, pallas_grids
from tests.support.policy_reference import causal_probs, layer_queries_keys, masked_forward_logits
from tests.support.random_data import random_tokens


def kept_positions(state, layer: int) -> list[list[set[int]]]:
    """Per sequence, per KV head, the set of original positions the state holds."""
    pos = np.asarray(state.layers[layer][0].pos)
    return [[set(row[row >= 0].tolist()) for row in seq] for seq in pos]


def test_streaming_llm_keeps_sinks_and_recent_window(tiny_model):
    m = tiny_model
    tokens = random_tokens(0, (2, 300), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, StreamingLLM(sink=4, window=60), chunk_size=64, lengths=[300, 171])
    for layer in range(m.config.num_layers):
        for seq, n in zip(kept_positions(state, layer), (300, 171)):
            for head in seq:
                assert head == set(range(4)) | set(range(n - 60, n))


def _reference_h2o(m, tokens, heavy, window, layer):
    """Heavy hitters by attention summed over all prompt queries (one chunk = the H2O paper)."""
    q, k, _ = layer_queries_keys(m, tokens)[layer]
    scores = causal_probs(q, k, m.config.group_size).mean(axis=2).sum(axis=2)  # [B, K, T]
    t = tokens.shape[1]
    kept = []
    for seq in scores:
        heads = []
        for s in seq:
            s = s[: t - window]
            heads.append(set(np.argsort(-s, kind="stable")[:heavy].tolist()) | set(range(t - window, t)))
        kept.append(heads)
    return kept, scores


def test_h2o_keeps_exactly_the_heavy_hitters(tiny_model):
    m = tiny_model
    tokens = random_tokens(1, (2, 192), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, H2O(heavy=40, window=24), chunk_size=256)  # one chunk
    for layer in range(m.config.num_layers):
        expected, scores = _reference_h2o(m, tokens, 40, 24, layer)
        assert kept_positions(state, layer) == expected
        seg = state.layers[layer][0]  # the stored scores are the accumulated attention
        held = np.asarray(seg.pos)
        np.testing.assert_allclose(
            np.asarray(seg.score)[held >= 0],
            np.take_along_axis(scores, np.maximum(held, 0), axis=-1)[held >= 0],
            rtol=1e-4,
            atol=1e-6,
        )


def _reference_snapkv(m, tokens, budget, window, kernel, layer, pooling="avg", per_query_head=False):
    """FasterDecoding/SnapKV `SnapKVCluster.update_kv`: the window's summed votes, pooled, top budget - window
    plus the window; per KV head with the GQA group's mean (kvjax's default), or per query head (the
    authors' repeat_kv) with `per_query_head`."""
    q, k, _ = layer_queries_keys(m, tokens)[layer]
    t = tokens.shape[1]
    probs = causal_probs(q, k, m.config.group_size)  # [B, K, G, T, T]
    b, kh, g = probs.shape[:3]
    probs = probs.reshape(b, kh * g, t, t) if per_query_head else probs.mean(axis=2)  # [B, heads, T, T]
    votes = probs[:, :, t - window :, : t - window].sum(axis=2)  # [B, heads, T - window]
    fill = -np.inf if pooling == "max" else 0.0
    padded = np.pad(votes, ((0, 0), (0, 0), (kernel // 2, kernel // 2)), constant_values=fill)
    windows = np.stack([padded[..., i : i + t - window] for i in range(kernel)])
    pooled = windows.max(0) if pooling == "max" else windows.mean(0)
    keep = budget - window
    return [
        [set(np.argsort(-p, kind="stable")[:keep].tolist()) | set(range(t - window, t)) for p in seq] for seq in pooled
    ]


@pytest.mark.parametrize("chunk, pooling", [(256, "avg"), (64, "avg"), (64, "max")])
def test_snapkv_keeps_exactly_the_observation_windows_choice(tiny_model, chunk, pooling):
    """Chunked prefill gives the same choice: the window's votes are softmax over the whole prompt."""
    m = tiny_model
    tokens = random_tokens(2, (2, 256), m.config.vocab_size)
    policy = SnapKV(budget_tokens=72, window=16, kernel=5, pooling=pooling)
    state = kvjax.prefill(m, tokens, policy, chunk_size=chunk)
    for layer in range(m.config.num_layers):
        assert kept_positions(state, layer) == _reference_snapkv(m, tokens, 72, 16, 5, layer, pooling)


def test_snapkv_defaults_are_the_authors_longbench_config():
    """FasterDecoding/SnapKV's released LongBench configs: window 32, kernel 7, max pooling."""
    policy = SnapKV()
    assert (policy.window, policy.kernel, policy.pooling, policy.per_query_head) == (32, 7, "max", False)


def test_snapkv_per_query_head_selects_as_the_authors_and_stores_the_group(tiny_model):
    """`per_query_head=True` is the authors' repeat_kv selection: one kept set per query head (vs one per KV
    head from the group's mean), G = H / Hkv times the entries; decoding then sees exactly each query
    head's own kept prompt positions."""
    m, prompt = tiny_model, 128
    tokens = random_tokens(5, (2, prompt + 4), m.config.vocab_size)
    policy = SnapKV(budget_tokens=40, window=8, kernel=5, per_query_head=True)
    state = kvjax.prefill(m, tokens[:, :prompt], policy, max_new_tokens=4, chunk_size=64)
    for layer in range(m.config.num_layers):
        assert kept_positions(state, layer) == _reference_snapkv(m, tokens[:, :prompt], 40, 8, 5, layer, "max", True)
    grouped = kvjax.prefill(m, tokens[:, :prompt], dataclasses.replace(policy, per_query_head=False), max_new_tokens=4)
    ratio = (kvjax.kv_bytes(state) - 8) / (kvjax.kv_bytes(grouped) - 8)  # less length int32[B]
    assert ratio == m.config.group_size
    logits, state = kvjax.decode_step(m, state, tokens[:, prompt], policy)
    ref, _ = _per_query_head_decode_reference(m, tokens[:, : prompt + 1], state)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=0)


def _per_query_head_decode_reference(m, tokens, state):
    """Logits of the last token when each query head of each layer sees only the positions its own row of
    `state` holds (plus itself): a dense numpy forward with per-query-head masks."""
    from kvjax.rope import apply_rope, rope_tables

    model, cfg = m.module(), m.config
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    rope = rope_tables(cfg.rope, cfg.head_dim, positions, jnp.int32(t))
    x = np.asarray(model.embed[...][tokens], np.float64)
    for block, layer in zip(model.blocks, state.layers):
        pos = np.asarray(layer[0].pos)  # [B, H, C]
        visible = (pos[..., None] == np.arange(t)).any(-2)  # [B, H, T]: what each query head holds
        visible[..., t - 1] = True
        q, k, v = block.attn.project(block.input_norm(jnp.asarray(x, jnp.float32)))
        q, k = np.asarray(apply_rope(q, *rope), np.float64), np.asarray(apply_rope(k, *rope), np.float64)
        k, v = np.repeat(k, cfg.group_size, axis=2), np.repeat(np.asarray(v, np.float64), cfg.group_size, axis=2)
        logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(cfg.head_dim)  # the prompt: exact, causal
        mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), logits.shape).copy()
        mask[:, :, -1] = visible  # the new token: each query head's own kept positions
        logits = np.where(mask, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        heads = np.einsum("bhts,bshd->bthd", p, v)
        x = x + np.einsum("bthd,hde->bte", heads, np.asarray(block.attn.o_proj[...], np.float64))
        x = x + np.asarray(block.mlp(block.post_attention_norm(jnp.asarray(x, jnp.float32))), np.float64)
    hidden = model.final_norm(jnp.asarray(x[:, -1:], jnp.float32))
    return np.asarray(model.logits(hidden), np.float64)[:, 0], None


def test_snapkv_ragged_rows_vote_with_their_own_windows_across_chunks(tiny_model):
    """Only the window's queries are scored (not the chunk's): each row's own last `window` positions,
    wherever the chunks cut them (row 1's window, 184-199, spans two chunks of 64)."""
    m, lengths = tiny_model, [256, 200]
    tokens = random_tokens(4, (2, 256), m.config.vocab_size)
    policy = SnapKV(budget_tokens=72, window=16, kernel=5, pooling="avg")
    state = kvjax.prefill(m, tokens, policy, chunk_size=64, lengths=lengths)
    for layer in range(m.config.num_layers):
        got = kept_positions(state, layer)
        for row, n in enumerate(lengths):
            assert got[row] == _reference_snapkv(m, tokens[row : row + 1, :n], 72, 16, 5, layer)[0], (layer, row)


def test_decoding_over_a_compressed_prompt_sees_exactly_the_kept_tokens(tiny_model):
    """After a real eviction, each decode step's logits equal dense attention masked to the kept prompt
    positions (per layer and KV head) plus the decoded tokens: eviction drops those tokens and no others."""
    m, policy = tiny_model, SnapKV(budget_tokens=40, window=8, kernel=5)
    tokens = random_tokens(5, (2, 140), m.config.vocab_size)
    prompt = 128
    state = kvjax.prefill(m, tokens[:, :prompt], policy, max_new_tokens=12, chunk_size=64)
    kept = []
    for layer in range(m.config.num_layers):
        pos = np.asarray(state.layers[layer][0].pos)  # [B, K, C]
        assert ((pos >= 0).sum(-1) < prompt).all()  # something was evicted in every head
        kept.append((pos[..., None] == np.arange(prompt)).any(-2))  # [B, K, prompt]
    ref = masked_forward_logits(m, tokens, prompt, kept)  # [B, 12, V]
    for i in range(12):
        logits, state = kvjax.decode_step(m, state, tokens[:, prompt + i], policy)
        np.testing.assert_allclose(np.asarray(logits), ref[:, i], atol=2e-4, rtol=0)


def test_keep_top_on_a_hand_built_pattern():
    seg = empty_segment(1, (0, 1), 8, 2, jnp.float32, scored=True, budget=3)
    seg = seg.replace(pos=jnp.array([[[0, 1, 2, 3, 4, 5, -1, -1], [5, 3, 1, 0, 2, 4, -1, -1]]], jnp.int32))
    priority = jnp.array([[[0.1, 0.9, 0.3, jnp.inf, 0.2, 0.5, 9.0, 9.0], [1, 2, 3, 4, 5, 6, 7, 8]]], jnp.float32)
    out = keep_top(seg, priority, keep=3, capacity=5)
    assert np.asarray(out.pos).tolist() == [[[1, 3, 5, -1, -1], [0, 2, 4, -1, -1]]]  # position order


def test_pooling_matches_torch_semantics():
    x = jnp.array([[1.0, 5.0, 2.0, 0.0, 3.0]])
    np.testing.assert_allclose(pool_1d(x, 3, "avg"), [[6 / 3, 8 / 3, 7 / 3, 5 / 3, 3 / 3]], rtol=1e-6)
    np.testing.assert_allclose(pool_1d(x, 3, "max"), [[5, 5, 5, 3, 3]])


@pytest.mark.parametrize(
    "policy",
    [
        StreamingLLM(sink=4, window=28),
        H2O(heavy=16, window=16),
        A2SF(heavy=16, window=16),
        TOVA(budget_tokens=32),
        VATP(heavy=16, window=16),
    ],
)
def test_evicting_budgets_hold_through_a_long_decode(tiny_model, policy):
    m = tiny_model
    tokens = random_tokens(3, (2, 100), m.config.vocab_size)
    state = kvjax.prefill(m, tokens, policy, max_new_tokens=100, chunk_size=32)
    shapes = jax.tree.map(jnp.shape, state)
    token = jnp.asarray(tokens[:, -1])
    for _ in range(100):
        logits, state = kvjax.decode_step(m, state, token, policy)
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        assert jax.tree.map(jnp.shape, state) == shapes  # static capacity
        for layer in state.layers:
            assert (np.asarray(count(layer[0])) == 32).all()  # exactly the budget, every head
    newest = np.asarray(state.layers[1][0].pos).max(-1)
    assert (newest == 199).all()  # the latest token is always held
    if isinstance(policy, StreamingLLM):
        assert all(head == set(range(4)) | set(range(172, 200)) for seq in kept_positions(state, 1) for head in seq)


@pytest.mark.parametrize(
    "policy",
    [
        StreamingLLM(sink=4, window=1000),
        H2O(heavy=500, window=500),
        SnapKV(budget_tokens=1000, window=32),
        A2SF(heavy=500, window=500),
        TOVA(budget_tokens=1000),
        VATP(heavy=500, window=500),
        Knorm(budget_tokens=1000),
        PyramidKV(budget_tokens=4000, window=32),
        AdaKV(SnapKV(budget_tokens=1000, window=32)),
    ],
)
def test_budget_covering_the_context_equals_full(tiny_model, policy):
    """A budget at least as large as prompt + decode keeps everything: Full's logits to 1e-5."""
    m = tiny_model
    tokens = random_tokens(4, (2, 150), m.config.vocab_size)
    ref = kvjax.prefill(m, tokens[:, :120], max_new_tokens=30, chunk_size=32)
    got = kvjax.prefill(m, tokens[:, :120], policy, max_new_tokens=30, chunk_size=32)
    for t in range(120, 150):
        ref_logits, ref = kvjax.decode_step(m, ref, tokens[:, t])
        got_logits, got = kvjax.decode_step(m, got, tokens[:, t], policy)
        np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-5, rtol=0)


def test_only_segments_kept_to_a_budget_carry_budget_and_score(tiny_model):
    """Full's segments are plain `KVSegment`s (no budget, no score); an eviction policy's carry its
    budget, and a score buffer only when the policy keeps a running statistic."""
    m = tiny_model
    tokens = random_tokens(6, (1, 96), m.config.vocab_size)
    full = kvjax.prefill(m, tokens, max_new_tokens=4, chunk_size=32)
    for seg in (s for layer in full.layers for s in layer):
        assert type(seg) is KVSegment
        assert not hasattr(seg, "budget") and not hasattr(seg, "score")
    for policy, scored in ((H2O(heavy=16, window=8), True), (StreamingLLM(sink=4, window=20), False)):
        state = kvjax.prefill(m, tokens, policy, max_new_tokens=4, chunk_size=32)
        _, state = kvjax.decode_step(m, state, tokens[:, -1], policy)
        for layer, segments in enumerate(state.layers):
            (seg,) = segments
            assert isinstance(seg, EvictionSegment) and seg.budget == policy.budget(m.config, layer)  # (a subclass:
            # StreamingLLM's position shift stores unrotated keys)
            assert (seg.score is not None) == scored
            if scored:
                assert seg.score.shape == seg.pos.shape and seg.score.dtype == jnp.float32
    with pytest.raises(ValueError, match="budget"):
        empty_segment(1, (0,), 16, 2, jnp.float32, scored=True)
    plain = empty_segment(1, (0,), 16, 2, jnp.float32, scored=True, budget=8).plain()
    assert type(plain) is KVSegment and len(jax.tree_util.tree_leaves(plain)) == 3


def test_compressed_states_hold_fewer_bytes(tiny_model):
    m = tiny_model
    tokens = random_tokens(5, (1, 1024), m.config.vocab_size)
    full = kvjax.kv_bytes(kvjax.prefill(m, tokens, chunk_size=256))
    snap = kvjax.kv_bytes(kvjax.prefill(m, tokens, SnapKV(budget_tokens=128), chunk_size=256))
    streaming = kvjax.kv_bytes(kvjax.prefill(m, tokens, StreamingLLM(sink=4, window=124), chunk_size=256))
    assert snap < full / 6 and streaming < full / 6


def test_long_caches_are_whole_128_slot_blocks(tiny_model):
    """Kernels read a cache in the largest block dividing its capacity: a 32K prompt with room for
    32 tokens must not be read 32 slots at a time. Short caches waste at most 15 slots."""

    def capacity(prompt, new):
        state = jax.eval_shape(lambda: Full().allocate(tiny_model.config, 1, prompt, new, 512, jnp.bfloat16))
        return state.layers[0][0].capacity

    for prompt, new in ((32768, 32), (2048, 1), (4000, 100)):
        slots = capacity(prompt, new)
        assert slots % 128 == 0 and 0 <= slots - (prompt + new) < 128, (prompt, new, slots)
    for prompt, new in ((100, 3), (1900, 5)):
        slots = capacity(prompt, new)
        assert slots % 16 == 0 and 0 <= slots - (prompt + new) < 16, (prompt, new, slots)


def test_bad_policy_arguments_raise():
    with pytest.raises(ValueError, match="window < budget"):
        SnapKV(budget_tokens=16, window=32)
    with pytest.raises(ValueError, match="odd"):
        SnapKV(kernel=4)
    with pytest.raises(ValueError, match="window >= 1"):
        StreamingLLM(window=0)


@pytest.mark.parametrize("impl", ["tpu-interpret", "gpu-interpret"])
@pytest.mark.parametrize(
    "policy",
    [
        Full(),
        StreamingLLM(sink=4, window=27),  # decode capacity 32
    ],
)
def test_decode_through_the_pallas_kernel_matches_the_reference(tiny_model, impl, policy):
    """The kernel dispatch (what GPU and TPU run) gives the reference's logits on a ragged batch."""
    m = tiny_model
    prompts = [random_tokens(6, (n,), m.config.vocab_size).tolist() for n in (40, 57)]
    fast = kvjax.prefill(m, prompts, policy, max_new_tokens=24, chunk_size=32, attention_impl=impl)
    slow = kvjax.prefill(m, prompts, policy, max_new_tokens=24, chunk_size=32, attention_impl="reference")
    token = jnp.asarray([p[-1] for p in prompts])
    unrolled = kvjax.inference.Execution(impl, scan_layers=False)  # one traced attention per layer
    step = lambda s, t: kvjax.inference._forward_token(m.module(), policy, s, t, unrolled)  # noqa: E731
    assert len(pallas_calls(jax.make_jaxpr(step)(fast, token))) == m.config.num_layers  # the kernel really runs
    for _ in range(4):
        fast_logits, fast = kvjax.decode_step(m, fast, token, policy, attention_impl=impl)
        slow_logits, slow = kvjax.decode_step(m, slow, token, policy, attention_impl="reference")
        np.testing.assert_allclose(np.asarray(fast_logits), np.asarray(slow_logits), atol=2e-5, rtol=0)
        token = jnp.argmax(slow_logits, -1).astype(jnp.int32)


def _prefill_kernel_calls(m, policy, impl, tokens, lengths, chunk, max_new_tokens) -> int:
    """Pallas calls in the traced chunked prefill by `impl` (the chunks' scan body is traced once and
    the layers are unrolled: one per layer's kernel use)."""
    unrolled = kvjax.inference.Execution(impl, scan_layers=False)
    run = lambda t, n: kvjax.inference._prefill(  # noqa: E731
        m.graphdef,
        m.params,
        policy.params,
        t,
        n,
        policy=policy,
        chunk=chunk,
        max_new_tokens=max_new_tokens,
        run=unrolled,
    )
    return len(pallas_calls(jax.make_jaxpr(run)(jnp.asarray(tokens), jnp.asarray(lengths))))


def _assert_same_entries(fast, slow, atol):
    """Equal positions everywhere, equal keys and values wherever an entry is held."""
    for fast_seg, slow_seg in zip(
        (s for layer in fast.layers for s in layer), (s for layer in slow.layers for s in layer)
    ):
        pos = np.asarray(slow_seg.pos)
        np.testing.assert_array_equal(np.asarray(fast_seg.pos), pos)
        for a, b in ((fast_seg.k, slow_seg.k), (fast_seg.v, slow_seg.v)):
            np.testing.assert_allclose(np.asarray(a)[pos >= 0], np.asarray(b)[pos >= 0], atol=atol, rtol=0)


@pytest.mark.parametrize(
    "impl,window,chunk,generate",
    [
        # Two chunks over 80 slots (the interpreted TPU grid is slow). Prefill then decode through the
        # TPU kernels is also test_decode_through_the_pallas_kernel_matches_the_reference's Full case.
        ("tpu-interpret", None, 32, False),
        # Three chunks of 24 (offsets 0, 24, 48) over 80 slots: 16-token key blocks, query blocks of
        # 16 (the chunk padded to 32), so chunks start off the block grid.
        ("gpu-interpret", None, 24, True),
        ("gpu-interpret", 24, 24, True),  # a Mistral-style sliding window on layer 0: the local mask
    ],
)
def test_prefill_through_the_pallas_kernel_matches_the_reference(tiny_model, impl, window, chunk, generate):
    """Full's chunked prefill (slot = position) runs the block-sparse prefill kernel at a traced
    offset per chunk, and gives the reference's last logits, cache and greedy tokens on a ragged
    batch."""
    m = tiny_model
    if window is not None:
        config = dataclasses.replace(m.config, sliding_windows=(window,) + (None,) * (m.config.num_layers - 1))
        m = kvjax.init_model(config, seed=0, dtype=jnp.float32)
    policy, run = Full(), kvjax.inference.Execution
    prompts = [random_tokens(8, (n,), m.config.vocab_size).tolist() for n in (21, 57)]
    tokens, lengths = kvjax.inference._prompt_batch(prompts, None)
    new = 3  # Full's capacity: round_capacity(padded prompt + 3) = 80 slots
    padded = np.pad(tokens, ((0, 0), (0, -tokens.shape[1] % chunk)))
    assert _prefill_kernel_calls(m, policy, impl, padded, lengths, chunk, new) == m.config.num_layers
    fast, fast_logits = kvjax.inference._run_prefill(m, tokens, lengths, policy, chunk, new, run(impl))
    slow, slow_logits = kvjax.inference._run_prefill(m, tokens, lengths, policy, chunk, new, run("reference"))
    np.testing.assert_allclose(np.asarray(fast_logits), np.asarray(slow_logits), atol=2e-5, rtol=0)
    _assert_same_entries(fast, slow, atol=2e-5)
    if generate:
        fast_tokens, slow_tokens = (
            np.asarray(kvjax.generate(m, prompts, new, policy, eos_token_id=(), chunk_size=chunk, attention_impl=i))
            for i in (impl, "reference")
        )
        np.testing.assert_array_equal(fast_tokens, slow_tokens)


@pytest.mark.parametrize(
    "impl,grid",
    [
        ("tpu-interpret", (1, 4, 1, 2)),  # one 512-query block over two 512-key blocks
        ("gpu-interpret", (1, 4, 4)),  # four 128-query blocks, each looping over its key blocks
    ],
)
def test_prefill_chunk_blocks_follow_the_lowering(impl, grid):
    """A chunk of 512 queries at offset 256 over a 1024-slot cache: the TPU kernel takes 512-token
    blocks (a Mosaic grid step costs ~0.35 us, more than a 128 x 128 block's MXU work), the GPU
    kernel 128-token ones; both give the reference's attention."""
    b, t, kv_heads, group, d, capacity, start = 1, 512, 2, 2, 32, 1024, 256
    keys = jax.random.split(jax.random.key(12), 3)
    q = jax.random.normal(keys[0], (b, t, kv_heads, group, d))
    k = jax.random.normal(keys[1], (b, kv_heads, capacity, d))
    v = jax.random.normal(keys[2], (b, kv_heads, capacity, d))
    slots = jnp.arange(capacity, dtype=jnp.int32)
    k_pos = jnp.broadcast_to(jnp.where(slots < start + t, slots, -1), (b, kv_heads, capacity))
    q_pos = (start + jnp.arange(t, dtype=jnp.int32))[None]  # [1, T]
    run = lambda impl: kvjax.attention.attend(  # noqa: E731
        q, k, v, k_pos, q_pos, None, d**-0.5, impl, slot_is_position=True
    )
    np.testing.assert_allclose(np.asarray(run(impl)), np.asarray(run("reference")), atol=2e-5, rtol=0)
    assert pallas_grids(jax.make_jaxpr(lambda: run(impl))()) == [grid]


def test_snapkv_prefill_takes_the_kernel_and_keeps_the_reference_choice(tiny_model):
    """SnapKV holds the prompt at slot = position until the prompt ends, so its chunks attend through
    the block-sparse prefill kernel; only the observation window's weights come from jnp. Ragged rows,
    two chunks of 32, row 0's window (37-44) across them."""
    m, chunk, new = tiny_model, 32, 3
    policy, run = SnapKV(budget_tokens=40, window=8, kernel=5), kvjax.inference.Execution
    prompts = [random_tokens(9, (n,), m.config.vocab_size).tolist() for n in (45, 64)]
    tokens, lengths = kvjax.inference._prompt_batch(prompts, None)
    assert _prefill_kernel_calls(m, policy, "gpu-interpret", tokens, lengths, chunk, new) == m.config.num_layers
    fast, fast_logits = kvjax.inference._run_prefill(m, tokens, lengths, policy, chunk, new, run("gpu-interpret"))
    slow, slow_logits = kvjax.inference._run_prefill(m, tokens, lengths, policy, chunk, new, run("reference"))
    np.testing.assert_allclose(np.asarray(fast_logits), np.asarray(slow_logits), atol=2e-5, rtol=0)
    _assert_same_entries(fast, slow, atol=2e-5)
    for layer in slow.layers:  # both rows were really compressed: the comparison covers a selection
        assert (np.sum(np.asarray(layer[0].pos) >= 0, axis=-1) == 40).all()
