"""kvjax against NVIDIA kvpress (0.5.5) on one tiny random GQA Llama (4 layers, 4 query and 2 KV heads):
the prompt positions each layer and KV head keeps, ThinK's key channels, and DuoAttention's head sets on
the six shipped pattern files. Identical where the algorithms are the same; where they differ, the test
pins the named reason (the authors' rule kvjax follows, or kvpress's own convention).

kvpress runs in its own environment (it pins transformers<5.3, which kvjax's tests cannot use: see
tests/support/kvpress_runner.py), found at $KVPRESS_PYTHON or .venv-kvpress/bin/python (made by .ci/run);
the whole comparison is one subprocess call for the module.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.policies import TOVA, AdaKV, DuoAttention, Full, Knorm, PyramidKV, SnapKV, StreamingLLM, ThinK
from kvjax.policies.adakv import PooledSegment
from kvjax.policies.duo_attention import PATTERNS, pattern_file, quantile_head_sets, read_gates_tsv, released_patterns
from kvjax.policies.streaming_llm import cache_positions
from kvjax.policies.think import ThinKSegment
from kvjax.rope import rotate_at

pytestmark = pytest.mark.slow  # ~35 s on two cores (the kvpress subprocess and a dozen prefills)

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "support" / "kvpress_runner.py"
T = 200  # prompt tokens
RATIO = 0.5  # kvpress compression_ratio: keep int(200 * 0.5) = 100
KEEP = int(T * (1 - RATIO))
WINDOW, KERNEL = 16, 5  # SnapKV's observation window and pooling kernel, both sides
SPARSITIES = (0.25, 0.5, 0.75)
GATES = np.random.default_rng(5).uniform(0, 1, (4, 2))  # DuoAttention gates for the tiny model
DUO_SINK, DUO_RECENT = 8, 32
SNAP = f"SnapKVPress({RATIO}, window_size={WINDOW}, kernel_size={KERNEL})"
PRESSES = {
    "snapkv": SNAP,
    "streaming": f"StreamingLLMPress({RATIO}, n_sink=4)",
    "rerotated": f"KeyRerotationPress(StreamingLLMPress({RATIO}, n_sink=4))",
    "knorm": f"KnormPress({RATIO})",
    "tova": f"TOVAPress({RATIO})",
    "pyramidkv": f"PyramidKVPress({RATIO}, window_size={WINDOW}, kernel_size={KERNEL}, beta=4)",
    "adakv": f"AdaKVPress({SNAP}, alpha_safeguard=0.2)",
    "think": "ThinKPress(key_channel_compression_ratio=0.5, window_size=32)",
    "think_snapkv": f"ComposedPress([{SNAP}, ThinKPress(key_channel_compression_ratio=0.5, window_size=32)])",
    "duo": "DuoAttentionPress(head_compression_ratio=0.5)",
}


def kvpress_python() -> str | None:
    given = os.environ.get("KVPRESS_PYTHON")
    if given:
        return given
    local = ROOT / ".venv-kvpress" / "bin" / "python"
    return str(local) if local.exists() else None


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """(kvjax model, prompt int32[1, T], kvpress's results {name: array})."""
    python = kvpress_python()
    if python is None:
        missing = "no kvpress environment: set KVPRESS_PYTHON or make .venv-kvpress as .ci/run does"
        if os.environ.get("KVJAX_REQUIRE_KVPRESS"):  # CI: the comparison must run
            pytest.fail(missing)
        pytest.skip(missing)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from checkpoints_convert import convert
    from checkpoints_convert.tiny_checkpoints import build_tokenizer

    root = tmp_path_factory.mktemp("kvpress")
    hf = root / "hf"
    hf.mkdir()
    vocab = build_tokenizer(hf)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    m = kvjax.load(convert(hf, root / "kvjax", progress=False), dtype=jnp.float32)
    # distinct tokens: layer 0's values depend on the token alone, and the runner finds kept positions by value
    tokens = np.random.default_rng(9).permutation(vocab)[None, :T].astype(np.int32)
    spec = {
        "model": str(hf),
        "tokens": tokens.tolist(),
        "out": str(root / "kvpress.npz"),
        "presses": [
            {
                "name": name,
                "expr": expr,
                **({"duo": {"sink": DUO_SINK, "recent": DUO_RECENT, "gates": GATES.tolist()}} if name == "duo" else {}),
                **({"keys": True} if name == "rerotated" else {}),
            }
            for name, expr in PRESSES.items()
        ],
        "patterns": [
            {"name": f"{model}@{s}", "dir": str(PATTERNS / model), "sparsity": s}
            for model in released_patterns()
            for s in SPARSITIES
        ],
    }
    run = subprocess.run(
        [python, str(RUNNER)], input=json.dumps(spec), capture_output=True, text=True, timeout=600, env=_clean_env()
    )
    assert run.returncode == 0, run.stderr[-4000:]
    with np.load(spec["out"]) as saved:
        return m, tokens, dict(saved)


def _clean_env() -> dict:
    """The environment for kvpress's interpreter: without this test process's JAX/XLA settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "PYTHONPATH"))}


def kept(m, tokens, policy, **kwargs) -> np.ndarray:
    """bool[L, Hkv, T]: the prompt positions kvjax's state holds per layer and KV head after the prompt."""
    state = kvjax.prefill(m, tokens, policy, **kwargs)
    out = np.zeros((m.config.num_layers, m.config.num_kv_heads, T), bool)
    for layer, segments in enumerate(state.layers):
        for seg in segments:
            if isinstance(seg, PooledSegment):
                pos = np.asarray(seg.head_positions())[0]  # [K, C]
                heads = range(m.config.num_kv_heads)
            elif isinstance(seg, ThinKSegment):
                pos = np.asarray(seg.positions())[0]
                heads = seg.heads
            else:
                pos = np.asarray(seg.pos)[0]
                heads = seg.heads
            for row, head in zip(pos, heads):
                out[layer, head, row[(row >= 0) & (row < T)]] = True
    return out


def test_snapkv_streaming_and_knorm_keep_the_same_positions(parity):
    m, tokens, theirs = parity
    np.testing.assert_array_equal(kept(m, tokens, SnapKV(KEEP, WINDOW, KERNEL, "avg")), theirs["snapkv/kept"])
    # kvpress compresses once after the prompt: one chunk (chunk_size=None) for kvjax's evict-as-you-go StreamingLLM
    for shift in (False, True):  # the position shift changes the rotation, not the kept set
        streaming = StreamingLLM(sink=4, window=KEEP - 4, position_shift=shift)
        np.testing.assert_array_equal(kept(m, tokens, streaming), theirs["streaming/kept"])
    np.testing.assert_array_equal(kept(m, tokens, Knorm(KEEP, skip_layers=())), theirs["knorm/kept"])


def test_streaming_position_shift_rotates_keys_as_kvpress_rerotation(parity):
    """kvpress's KeyRerotationPress re-rotates the kept keys at 0..n-1, what StreamingLLM's authors do and
    kvjax's position shift computes from its unrotated keys."""
    m, tokens, theirs = parity
    state = kvjax.prefill(m, tokens, StreamingLLM(sink=4, window=KEEP - 4))
    for layer, (seg,) in enumerate(state.layers):
        held = np.asarray(seg.pos)[0, 0] >= 0
        ranks = cache_positions(seg.pos)[0]  # [K, C]
        k = rotate_at(m.config.rope, m.config.head_dim, seg.k[0][:, :, None, :], ranks, jnp.int32(KEEP))[:, :, 0]
        np.testing.assert_allclose(np.asarray(k)[:, held], theirs["rerotated/keys"][layer], atol=1e-4)


def test_tova_differs_only_by_kvpress_keeping_the_last_token(parity):
    """Named difference: kvpress's TOVAPress always keeps the prompt's last token; TOVA's authors
    (schwartz-lab-NLP/TOVA, tova_cache.py) rank it with the others by the last query's attention, as kvjax.
    So the sets agree where kvjax keeps it, and otherwise kvpress swaps it in for one kvjax kept."""
    m, tokens, theirs = parity
    ours, press = kept(m, tokens, TOVA(KEEP)), theirs["tova/kept"]
    assert press[..., T - 1].all()
    for a, b in zip(ours.reshape(-1, T), press.reshape(-1, T)):
        if a[T - 1]:
            np.testing.assert_array_equal(a, b)
        else:
            assert (b & ~a).nonzero()[0].tolist() == [T - 1] and (a & ~b).sum() == 1


def test_pyramidkv_scores_as_kvpress_with_the_authors_budgets(parity):
    """PyramidKV's selection is SnapKV's at each layer's budget, as in kvpress; the budgets differ by a named
    reason: kvpress derives them from compression_ratio (round(), always compressing), kvjax follows the
    authors' schedule from budget_tokens. At kvpress's own per-layer counts kvjax's selection is kvpress's."""
    m, tokens, theirs = parity
    press = theirs["pyramidkv/kept"]
    counts = press.sum(-1)[:, 0]  # kvpress's per-layer budgets (every head the same)
    for layer, budget in enumerate(counts):
        ours = kept(m, tokens, SnapKV(int(budget), WINDOW, KERNEL, "avg"))[layer]
        np.testing.assert_array_equal(ours, press[layer])
    # kvpress's budget rule (its get_layer_budget), and the authors' that kvjax's PyramidKV follows:
    capacity = WINDOW + T * (1 - RATIO)
    low = (capacity - WINDOW) / 4
    high = min((capacity - WINDOW) * 2 - low, T - WINDOW)
    low = (capacity - WINDOW) * 2 - high
    steps = (high - low) / 3
    assert counts.tolist() == [round(high - layer * steps) for layer in range(4)]
    ours = PyramidKV(budget_tokens=int(capacity), window=WINDOW, kernel=KERNEL, pooling="avg", beta=4)
    assert list(ours.budgets_for(4, [T])[:, 0]) != counts.tolist()


def test_adakv_kvpress_safeguard_keeps_the_same_positions(parity):
    """AdaKV(safeguard="kvpress") is kvpress's AdaKVPress; the default is the authors' (FFY0/AdaKV), a
    different rule (tests/test_scoring_policies.py pins both)."""
    m, tokens, theirs = parity
    policy = AdaKV(SnapKV(KEEP, WINDOW, KERNEL, "avg"), alpha=0.2, safeguard="kvpress")
    np.testing.assert_array_equal(kept(m, tokens, policy), theirs["adakv/kept"])


def test_think_keeps_the_same_channels_and_tokens(parity):
    m, tokens, theirs = parity
    for name, base in (("think", Full()), ("think_snapkv", SnapKV(KEEP, WINDOW, KERNEL, "avg"))):
        policy = ThinK(base, ratio=0.5, observe=32)
        state = kvjax.prefill(m, tokens, policy)
        channels = np.zeros_like(theirs[f"{name}/channels"])
        for layer, (seg,) in enumerate(state.layers):
            for head, chosen in enumerate(np.asarray(seg.channels)[0]):
                channels[layer, head, chosen] = True
        np.testing.assert_array_equal(channels, theirs[f"{name}/channels"])
        np.testing.assert_array_equal(kept(m, tokens, policy), theirs[f"{name}/kept"])


def test_duoattention_from_gates_keeps_the_same_positions(parity):
    m, tokens, theirs = parity
    policy = DuoAttention.from_gates(GATES, 0.5, sink=DUO_SINK, recent=DUO_RECENT)
    np.testing.assert_array_equal(kept(m, tokens, policy), theirs["duo/kept"])


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_duoattention_head_sets_on_the_shipped_patterns(parity, sparsity):
    """kvpress streams the round(N s) lowest gates, the authors N - ceil(s (N - 1)) after U(0, 1e-6) noise
    (kvjax's count): equal on all six files at 0.25/0.5/0.75. The sets are identical except among heads
    tied at the cut, which each side breaks its own way (named: kvpress by numpy's argsort order, the
    authors at random, kvjax keeping the earlier (layer, head))."""
    _, _, theirs = parity
    for model in released_patterns():
        gates = np.clip(read_gates_tsv(pattern_file(model)), 0, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sets = quantile_head_sets(gates, sparsity)
        ours = np.zeros(gates.shape, bool)
        for layer, heads in enumerate(sets):
            ours[layer, list(heads)] = True
        press = theirs[f"{model}@{sparsity}/retrieval"]
        n = gates.size
        assert ours.sum() == press.sum() == n - math.ceil(sparsity * (n - 1)) == n - round(n * sparsity)
        cut = np.sort(gates.reshape(-1))[::-1][ours.sum() - 1]
        assert np.all(gates[ours != press] == cut), model  # only ties at the cut differ


def test_runner_uses_kvpress_own_environment():
    """The suite never imports kvpress here: the runner is its own program (no kvjax import)."""
    source = RUNNER.read_text()
    assert "import kvjax" not in source and "from kvjax" not in source
    assert "kvpress" not in sys.modules
