"""Sharded inference on 8 CPU devices (run by test_sharding.py in its own process: the device count
must be fixed before JAX starts). A sharded model must give what one device gives, hold its
parameters and KV cache split as documented, and run kernels per device under shard_map."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kvjax
from kvjax import ModelConfig, init_model
from kvjax.checkpoint import save_checkpoint
from kvjax.policies import (
    D2O,
    KIVI,
    DuoAttention,
    Full,
    LazyLLM,
    LServe,
    MiniCache,
    PromptSVD,
    PyramidInfer,
    SnapKV,
    SqueezedAttention,
    Twilight,
)
from kvjax.policies.lserve import SelectedPagesSegment
from kvjax.policies.minicache import MergedSegment
from kvjax.policies.prefill_pruning import PrefillPruning
from kvjax.policies.prompt_svd import LowRankSegment
from kvjax.policies.quest import PagedSegment
from kvjax.policies.squeezed_attention import ClusteredSegment
from kvjax.quantized_segment import QuantizedSegment
from kvjax.sharding import device_kv_bytes, make_mesh, param_shardings, shard_model
from tests.support.jaxprs import kernel_calls
from tests.support.random_data import random_tokens

CONFIG = ModelConfig(
    family="llama",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=16,
    max_position_embeddings=4096,
)


def test_eight_devices():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


@pytest.fixture(scope="module")
def model():
    return init_model(CONFIG, seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module")
def sharded(model):
    return shard_model(model, make_mesh(model=4, data=2))


@pytest.fixture(scope="module")
def prompts():
    return [random_tokens(s, (n,), CONFIG.vocab_size).tolist() for s, n in ((1, 150), (2, 97))]


def _leaves(params) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_parameters_are_split_megatron_style(sharded):
    """Column-parallel projections split their output heads or width, row-parallel ones their input,
    the vocabulary is split, norms are replicated; each device holds 1/4 of a split parameter."""
    leaves = _leaves(sharded.params)
    expected = {
        "q_proj": (P(None, "model", None), (64, 2, 16)),
        "k_proj": (P(None, "model", None), (64, 1, 16)),
        "v_proj": (P(None, "model", None), (64, 1, 16)),
        "o_proj": (P("model", None, None), (2, 16, 64)),
        "gate_proj": (P(None, "model"), (64, 32)),
        "up_proj": (P(None, "model"), (64, 32)),
        "down_proj": (P("model", None), (32, 64)),
        "embed": (P("model", None), (64, 64)),
        "lm_head": (P(None, "model"), (64, 64)),
        "input_norm": (P(), (64,)),
    }
    for name, (spec, shard_shape) in expected.items():
        found = [x for path, x in leaves.items() if f"'{name}'" in path]
        assert found, name
        for x in found:
            assert x.sharding.spec == spec, (name, x.sharding.spec)
            assert x.addressable_shards[0].data.shape == shard_shape, name


def test_heads_the_mesh_does_not_divide_stay_replicated(model):
    """8 query heads split over 8 devices; 4 KV heads cannot, so k_proj and v_proj are replicated."""
    leaves = _leaves(shard_model(model, make_mesh(model=8)).params)
    q = next(x for p, x in leaves.items() if "'q_proj'" in p)
    k = next(x for p, x in leaves.items() if "'k_proj'" in p)
    assert q.sharding.spec == P(None, "model", None) and q.addressable_shards[0].data.shape == (64, 1, 16)
    assert k.sharding.spec == P(None, None, None) and k.addressable_shards[0].data.shape == (64, 4, 16)


def test_make_mesh_refuses_impossible_shapes():
    with pytest.raises(ValueError, match="data=3 must be a positive divisor of the 8 devices"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="a 2 x 8 mesh needs 16 devices; 8 available"):
        make_mesh(model=8, data=2)


POLICIES = {
    "full": Full(),
    "snapkv": SnapKV(budget_tokens=64, window=8),
    "kivi": KIVI(bits=4, group=16, residual=32),
    # 1 and 3 heads, not divisible by 4; the streaming heads run StreamingLLM's own step and finalize
    "duo": DuoAttention(((0,), (1, 2, 3)), sink=4, recent=32),
    # Quest's page choice and Twilight's pruning of it: layer 1 decodes over at most 2 pages per head
    "twilight": Twilight(budget_tokens=32, top_p=0.9, dense_layers=1),
    # features shared by all KV heads (replicated over "model"), an exact window split by head
    "promptsvd": PromptSVD(0.5, 0.5, residual=16),
    # clusters of each KV head's context keys; decode reads the pages holding selected keys, masked per slot
    "squeezed": SqueezedAttention(recent=32),
    # per-sequence layer shares and merge threshold: means over the KV heads split across devices
    "d2o": D2O(heavy=16, window=8),
    # both layers merged as one pair: directions shared by the layers (the state's `shared`), norms per layer
    "minicache": MiniCache(start_layer=0),
    # 1 retrieval and 3 streaming heads (80 slots, more than a page): one decode launch over both buffers
    "lserve": LServe(((0,), (1, 2, 3)), sink=4, local=64, prefill_local=64, token_budget=64, reuse=2),
    # tokens pruned between layers 0 and 1 by the last token's attention, a mean over the heads split across
    # devices (PyramidInfer never prunes after a model's first layer, so a 2-layer model shows nothing of it)
    "lazyllm": LazyLLM(depths=(0.5,), percentiles=(0.5,)),
    # the generation stage: blocks of 2 generated entries judged by the head-mean attention (heads split
    # across devices) of the queries after them; no recent window, so 3 blocks come due in 6 steps
    "pyramidinfer": PyramidInfer(recent_ratio=0.0, gen_interval=2),
}


# Full's step runs in DuoAttention's retrieval heads and under Twilight's pages; Full alone is left to the kernels test.
@pytest.mark.parametrize("name", [n for n in POLICIES if n != "full"])
def test_sharded_generate_and_state_match_one_device(model, sharded, prompts, name):
    """Same greedy tokens and the same kept entries as on one device; every KV buffer split by
    sequence over "data" and by KV head over "model" where the head count allows."""
    policy = POLICIES[name]
    chunk = None if isinstance(policy, PrefillPruning) else 64  # pruning between layers takes the whole prompt
    one = np.asarray(kvjax.generate(model, prompts, 6, policy=policy, chunk_size=chunk))
    many = np.asarray(kvjax.generate(sharded, prompts, 6, policy=policy, chunk_size=chunk))
    np.testing.assert_array_equal(many, one)
    state = kvjax.prefill(sharded, prompts, policy, chunk_size=chunk, max_new_tokens=6)
    reference = kvjax.prefill(model, prompts, policy, chunk_size=chunk, max_new_tokens=6)
    assert kvjax.kv_bytes(state) == kvjax.kv_bytes(reference)
    assert state.length.sharding.spec == P("data")
    for layer, ref_layer in zip(state.layers, reference.layers):
        for seg, ref in zip(layer, ref_layer):
            kv = seg.kv if isinstance(seg, (PagedSegment, ClusteredSegment, SelectedPagesSegment)) else seg
            keys = kv.window.k if isinstance(kv, (QuantizedSegment, LowRankSegment, MergedSegment)) else kv.k
            split = len(seg.heads) % 4 == 0
            assert keys.sharding.spec == (P("data", "model") if split else P("data")), (seg.heads, keys.sharding)
            # PromptSVD's bases come from an eigensolver, whose rounding differs with the partitioning (4e-5 seen)
            atol = 2e-4 if isinstance(seg, LowRankSegment) else 1e-5
            for a, b in zip(jax.tree.leaves(seg), jax.tree.leaves(ref)):
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=0)
            if isinstance(seg, LowRankSegment):
                assert seg.k_latent.sharding.spec in (P("data"), P("data", None)), seg.k_latent.sharding
    for a, b in zip(jax.tree.leaves(state.shared), jax.tree.leaves(reference.shared), strict=True):  # MiniCache's
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    if name == "snapkv":  # every leaf but the [B] lengths split 8 ways: each device holds 1/8
        assert device_kv_bytes(state) == (kvjax.kv_bytes(state) - 8) // 8 + 4


@pytest.mark.parametrize("name", ["full", "kivi", "twilight", "squeezed"])
def test_kernels_run_per_device_under_shard_map(model, sharded, prompts, name):
    """On the kernel path (interpreted here) the prefill, decode, page-selecting (Quest, Twilight; Squeezed
    Attention's with its per-slot mask) and quantized decode kernels run inside shard_map, one call per
    layer, and give one device's logits."""
    policy, impl = POLICIES[name], "gpu-interpret"
    state = kvjax.prefill(sharded, prompts, policy, chunk_size=64, max_new_tokens=4, attention_impl=impl)
    reference = kvjax.prefill(model, prompts, policy, chunk_size=64, max_new_tokens=4, attention_impl=impl)
    token = jnp.asarray([p[-1] for p in prompts], jnp.int32)
    # Layers unrolled, so each layer's kernel calls appear in the program once (a scanned run of layers
    # traces its body once); then the default, scanned, once per run of layers.
    for scan_layers, layers in ((False, CONFIG.num_layers), (True, 1)):
        run = kvjax.inference.Execution(impl, scan_layers)
        decode = lambda s, t, run=run: kvjax.inference._decode_step(  # noqa: E731
            model.graphdef, model.params, None, s, t, policy=policy, run=run
        )
        _, one_device = kernel_calls(jax.make_jaxpr(decode)(reference, token).jaxpr)
        with jax.set_mesh(sharded.mesh):
            assert kernel_calls(jax.make_jaxpr(decode)(state, token).jaxpr) == (one_device, one_device)
        assert one_device >= layers  # the kernel path is taken at all
        if name == "full":  # prefill chunks over slot = position take the prefill kernel, per device too
            prefill = lambda t, n, run=run: kvjax.inference._prefill(  # noqa: E731
                model.graphdef, model.params, None, t, n, policy=policy, chunk=64, max_new_tokens=4, run=run
            )
            tokens, lengths = kvjax.inference.batch_prompts(prompts)
            args = jnp.asarray(np.pad(tokens, ((0, 0), (0, 42)))), jnp.asarray(lengths)  # three chunks of 64
            with jax.set_mesh(sharded.mesh):
                assert kernel_calls(jax.make_jaxpr(prefill)(*args).jaxpr) == (layers,) * 2
    for _ in range(3):
        many_logits, state = kvjax.decode_step(sharded, state, token, policy, attention_impl=impl)
        one_logits, reference = kvjax.decode_step(model, reference, token, policy, attention_impl=impl)
        np.testing.assert_allclose(np.asarray(many_logits), np.asarray(one_logits), atol=2e-5, rtol=0)
        token = jnp.asarray(np.argmax(np.asarray(one_logits), -1), jnp.int32)


def test_load_reads_each_device_its_shard(model, tmp_path):
    """`kvjax.load(..., mesh=)` places every parameter as `param_shardings` says, with the values saved."""
    directory = save_checkpoint(tmp_path / "ckpt", CONFIG, nnx.to_pure_dict(model.params))
    mesh = make_mesh(model=4, data=2)
    loaded = kvjax.load(directory, jnp.float32, mesh=mesh)
    assert loaded.mesh is mesh
    want = _leaves(param_shardings(mesh, loaded.params))
    for path, x in _leaves(loaded.params).items():
        assert x.sharding == want[path], path
    tokens = random_tokens(3, (2, 40), CONFIG.vocab_size)
    np.testing.assert_allclose(
        np.asarray(kvjax.logits(loaded, tokens)), np.asarray(kvjax.logits(model, tokens)), atol=2e-5, rtol=0
    )


def test_cli_mesh_option(byte_model, capsys):
    """`--mesh 1x2` prints the completion one device prints; impossible or malformed meshes exit 2."""
    from kvjax.cli import main

    _, path = byte_model
    args = [
        "generate",
        "--model",
        str(path),
        "--prompt",
        "Find the needle. " * 12,
        "--max-new-tokens",
        "5",
        "--dtype",
        "float32",
        "--policy",
        "streaming",
        "--budget",
        "64",
    ]
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert main([*args, "--mesh", "1x2"]) == 0
    assert capsys.readouterr().out == expected
    assert main([*args, "--mesh", "1x16"]) == 2
    assert "a 1 x 16 mesh needs 16 devices; 8 available" in capsys.readouterr().err
    assert main([*args, "--mesh", "8"]) == 2
    assert "--mesh must be DATAxMODEL" in capsys.readouterr().err


def test_bench_reports_the_mesh_and_bytes_per_device(sharded):
    """On a 2 x 4 mesh the report names the mesh, and Full's 4 KV heads and batch of 2 leave each
    device an eighth of the cache (plus its share of the [B] lengths)."""
    from kvjax.eval.speed import BenchConfig, run_bench

    config = BenchConfig(lengths=(128,), batch_size=2, new_tokens=2, repeats=1, chunk_size=64)
    report = run_bench(sharded, {}, config, progress=False)
    assert report["mesh"] == {"data": 2, "model": 4}
    (row,) = report["rows"]
    assert row["kv_bytes_per_device"] == (row["kv_bytes"] - 8) // 8 + 4


def test_locret_heads_run_on_a_sharded_model(model, sharded, prompts, tmp_path):
    """Locret's retaining heads (the policy's parameters, in memory or loaded from their files) run with a
    sharded model, and its sharded generate and kept entries equal one device's."""
    from kvjax.policies import Locret
    from kvjax.policies.locret import random_retaining_heads, save_retaining_heads

    heads = random_retaining_heads(CONFIG, hidden=32, seed=1)
    save_retaining_heads(tmp_path / "heads", heads, CONFIG)
    hyper = dict(budget_tokens=48, stabilizers=16, local_len=8)
    policy = Locret(**hyper, params=heads)
    one = np.asarray(kvjax.generate(model, prompts, 5, policy=policy, chunk_size=64))
    for many_policy in (policy, Locret.from_pretrained(tmp_path / "heads", CONFIG, **hyper)):
        np.testing.assert_array_equal(
            np.asarray(kvjax.generate(sharded, prompts, 5, policy=many_policy, chunk_size=64)), one
        )
    state = kvjax.prefill(sharded, prompts, policy, chunk_size=64, max_new_tokens=5)
    reference = kvjax.prefill(model, prompts, policy, chunk_size=64, max_new_tokens=5)
    for (seg,), (ref,) in zip(state.layers, reference.layers):
        assert seg.k.sharding.spec == P("data", "model"), seg.k.sharding
        for a, b in zip(jax.tree.leaves(seg), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
