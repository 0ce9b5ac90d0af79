"""`kvjax bench` and the scripts in benchmarks/: the decode loops they time, the report's memory and ratios, the files."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.eval.speed import BenchConfig, run_bench
from kvjax.inference import greedy_decode
from tests.support.random_data import random_tokens

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it


def _script(name: str, monkeypatch) -> types.ModuleType:
    """benchmarks/<name>.py as a module, with benchmarks/ first on sys.path as `python benchmarks/...` puts it."""
    scripts = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_greedy_decode_continues_exactly_as_generate(tiny_model):
    """The loop the benchmark times is generate's: fed generate's first token after the same prefill,
    it produces generate's remaining greedy tokens (no EOS stop on either side)."""
    prompts, policy = random_tokens(3, (2, 150), 256), kvjax.policies.StreamingLLM(sink=4, window=60)
    out = np.asarray(kvjax.generate(tiny_model, prompts, 9, policy, eos_token_id=()))
    state = kvjax.prefill(tiny_model, prompts, policy, max_new_tokens=9)
    np.testing.assert_array_equal(np.asarray(greedy_decode(tiny_model, state, out[:, 0], 8, policy)), out[:, 1:])
    fixed = kvjax.policies.StreamingLLM(sink=4, window=60, position_shift=False)  # positions grow: context-bound
    with pytest.raises(ValueError, match="context"):
        greedy_decode(tiny_model, kvjax.prefill(tiny_model, prompts, fixed), out[:, 0], 4000, fixed)


def test_greedy_decode_reuses_generates_compiled_loop(byte_model):
    """At generate's own shapes it runs generate's compiled loop, so the eval's timed decode compiles
    nothing (a loaded model: its parameters, hence generate's loop carry, are committed to a device)."""
    m = kvjax.load(byte_model[1], jnp.float32)
    prompts, policy = random_tokens(4, (2, 90), m.config.vocab_size), kvjax.policies.StreamingLLM(sink=4, window=44)
    out = np.asarray(kvjax.generate(m, prompts, 7, policy, eos_token_id=()))
    compiled = kvjax.inference._decode._cache_size()
    state = kvjax.prefill(m, prompts, policy, max_new_tokens=7)
    again = np.asarray(greedy_decode(m, state, out[:, 0], 7, policy))
    assert kvjax.inference._decode._cache_size() == compiled
    np.testing.assert_array_equal(again[:, :6], out[:, 1:])


def test_report_measures_each_policy_against_full(tiny_model):
    P = kvjax.policies
    policies = {"streaming": P.StreamingLLM(sink=4, window=60)}
    config = BenchConfig(lengths=(200, 320), batch_size=2, new_tokens=3, repeats=2, chunk_size=128)
    messages = []
    report = run_bench(tiny_model, policies, config, progress=False, log=messages.append)
    assert report["device"] == jax.devices()[0].device_kind and report["shapes"]["kv_heads"] == 2 and not messages
    assert report["config"]["lengths"] == (200, 320) and report["mesh"] is None
    rows = report["rows"]
    assert [(r["length"], r["policy"]) for r in rows] == [
        (n, p) for n in (200, 320) for p in ("full", "streaming")
    ]  # Full added, measured first
    for r in rows:
        policy = P.Full() if r["policy"] == "full" else policies[r["policy"]]
        prompts = np.zeros((2, r["length"]), np.int32)
        expected = kvjax.kv_bytes(kvjax.prefill(tiny_model, prompts, policy, chunk_size=128, max_new_tokens=3))
        assert r["kv_bytes"] == r["kv_bytes_per_device"] == expected, r["policy"]  # shapes only; one device
        full = next(f for f in rows if f["policy"] == "full" and f["length"] == r["length"])
        assert r["full_kv_bytes"] == full["kv_bytes"]
        assert r["compression_ratio"] == pytest.approx(full["kv_bytes"] / r["kv_bytes"], rel=1e-12)
        assert len(r["prefill_s_repeats"]) == len(r["decode_s_per_token_repeats"]) == 2
        assert r["prefill_ms"] == pytest.approx(1e3 * np.median(r["prefill_s_repeats"]))
        assert r["decode_speedup"] == pytest.approx(full["decode_ms_per_token"] / r["decode_ms_per_token"])
        assert r["prefill_speedup"] == pytest.approx(full["prefill_ms"] / r["prefill_ms"])
        assert r["decode_tokens_per_s"] == pytest.approx(2e3 / r["decode_ms_per_token"])
        assert r["prefill_tokens_per_s"] == pytest.approx(2e3 * r["length"] / r["prefill_ms"])
    full_320 = rows[2]
    assert full_320["compression_ratio"] == full_320["prefill_speedup"] == full_320["decode_speedup"] == 1.0
    assert rows[3]["compression_ratio"] > 3  # 64 (+ spare, rounded) slots of 323 per KV head
    with pytest.raises(ValueError, match="context of 4096"):
        run_bench(tiny_model, policies, BenchConfig(lengths=(4090,), new_tokens=8), progress=False)
    with pytest.raises(ValueError, match="repeats"):
        BenchConfig(repeats=0)


def test_kvjax_bench_writes_report_and_plot(byte_model, tmp_path, capsys):
    import matplotlib.image

    from kvjax.cli import main

    _, path = byte_model
    out = tmp_path / "bench"
    rc = main(
        [
            "bench",
            "--model",
            str(path),
            "--policies",
            "streaming",
            "--budgets",
            "64",
            "--lengths",
            "256",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--dtype",
            "float32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "decode_x" in printed and "streaming@64" in printed
    report = json.loads((out / "bench.json").read_text())
    assert [r["policy"] for r in report["rows"]] == ["full", "streaming@64"]
    assert report["dtype"] == "float32" and all(r["kv_bytes"] > 0 for r in report["rows"])
    assert matplotlib.image.imread(out / "bench.png").ndim == 3

    too_long = tmp_path / "too-long"
    assert main(["bench", "--model", str(path), "--lengths", "4k", "--out", str(too_long), "--no-progress"]) == 2
    assert "exceeds the model's context of 2048" in capsys.readouterr().err
    assert not too_long.exists()  # nothing written


def test_decode_roofline_script_runs_on_a_state_shaped_as_prefill_leaves_it(tiny_model, monkeypatch):
    """benchmarks/bench_decode.py times decode over a randomly filled state instead of a prefill (an 8B
    model's 32K prefill is not what it measures): at a bucket multiple, as its contexts are, that state must
    hold what a prefill would."""
    script = _script("bench_decode", monkeypatch)
    filled = script.filled_state(tiny_model.config, 2, 128, 5, tiny_model.dtype)
    prefilled = kvjax.prefill(tiny_model, random_tokens(0, (2, 128), 256), max_new_tokens=5)
    assert kvjax.kv_bytes(filled) == kvjax.kv_bytes(prefilled)
    np.testing.assert_array_equal(filled.length, prefilled.length)
    for got, want in zip(jax.tree.leaves(filled), jax.tree.leaves(prefilled)):
        assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(filled.layers[0][0].pos, prefilled.layers[0][0].pos)  # same slots in use
    assert script.time_decode(tiny_model, 2, 128, 2, 1) > 0
    quest = kvjax.policies.Quest(budget_tokens=64, dense_layers=0)  # its bounds come from finalize
    filled = script.filled_state(tiny_model.config, 2, 128, 5, tiny_model.dtype, quest)
    prefilled = kvjax.prefill(tiny_model, random_tokens(0, (2, 128), 256), quest, max_new_tokens=5)
    assert jax.tree.structure(filled) == jax.tree.structure(prefilled.replace(origin=None))  # hand-built
    assert kvjax.kv_bytes(filled) == kvjax.kv_bytes(prefilled)
    seg = filled.layers[0][0]
    pages = seg.kv.k[:, :, :128].reshape(2, 2, 8, 16, -1)  # [B, Hkv, pages, page, D]: the 128 filled slots
    np.testing.assert_array_equal(seg.k_max[:, :, :8], pages.max(3))
    assert script.time_decode(tiny_model, 2, 128, 2, 1, quest) > 0
    policies = (
        kvjax.policies.Twilight(budget_tokens=64, dense_layers=0),
        kvjax.policies.PromptSVD(),
        kvjax.policies.SqueezedAttention(recent=32),
        kvjax.policies.SqueezedAttention(recent=32, hierarchical=True),
    )
    for policy in policies:  # 4-bit keys; features; clusters; clusters of clusters
        filled = script.filled_state(tiny_model.config, 2, 128, 5, tiny_model.dtype, policy)
        prefilled = jax.eval_shape(
            lambda p=policy: kvjax.prefill(tiny_model, random_tokens(0, (2, 128), 256), p, max_new_tokens=5)
        )
        assert jax.tree.structure(filled) == jax.tree.structure(prefilled.replace(origin=None))  # hand-built
        assert kvjax.kv_bytes(filled) == kvjax.kv_bytes(prefilled)


def test_chained_timing_runs_each_call_on_the_previous_output(monkeypatch):
    """benchmarks/timing.py's device-chained timer: `inner` calls in one executable, each reading the last
    one's output (x <- x0 + step(x)), so no call can be hoisted or merged and none is skipped."""
    timing = _script("timing", monkeypatch)
    x0, c = jnp.array([1.0, 2.0]), jnp.float32(0.5)
    x = x0
    for _ in range(3):
        x = x0 + c * x
    np.testing.assert_allclose(timing.chain(lambda y, c: c * y, 3)(x0, c), x, rtol=1e-6)  # 1.875, 3.75
    assert timing.chained_seconds(lambda y, c: c * y, x0, c, repeats=2, inner=3) > 0
    with pytest.raises(ValueError, match="inner"):
        timing.chain(lambda y: y, 0)


def test_block_sparse_decode_benchmark_reports_both_timings(tmp_path, monkeypatch):
    """benchmarks/bench_block_sparse.py --smoke (kernels interpreted): each decode row is timed chained on
    device and dispatched by the host, against the same baselines, and the kernel it times matches the
    dense reference."""
    script = _script("bench_block_sparse", monkeypatch)
    report = script.main(["--smoke", "--sections", "decode", "--out", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(report))
    rows = report["results"]
    assert [(r["name"], r["timing"]) for r in rows] == [
        (name, timing)
        for timing in ("chained", "dispatched")
        for name in ("decode_top_k_pages_kernel_only", "decode_top_k_pages_with_selection")
    ]
    for r in rows:
        assert r["kernel_ms"] > 0 and r["max_abs_diff_vs_reference"] < 1e-2  # bf16 output
        assert r["speedup"]["xla_full_cache"] == pytest.approx(r["baselines_ms"]["xla_full_cache"] / r["kernel_ms"])


def test_op_profile_counts_each_operation_once_by_module_op_and_kind(monkeypatch):
    """benchmarks/op_profile.py: an event whose span holds the next one on its thread (a CPU while around
    its body) is not counted besides its contents; GPU kernels are attributed through XLA's annotation;
    times are summed per step by operation and by kernel kind (numeric suffix dropped)."""
    op_profile = _script("op_profile", monkeypatch)
    kernel_note = {"annotation": "Thunk:#hlo_op=custom-call.1,hlo_module=jit_f,program_id=2#"}

    def event(name, start, end, **stats):
        return types.SimpleNamespace(name=name, start_ns=start, end_ns=end, stats=list(stats.items()))

    line = [
        event("while.5", 0, 100, hlo_op="while.5", hlo_module="m"),
        event("sine", 10, 50, hlo_op="sine", hlo_module="m"),
        event("add.2", 60, 90, hlo_op="add.2"),
        event("block_sparse_decode_gpu", 100, 130, **kernel_note),
    ]
    assert list(op_profile._outermost_removed(line)) == [
        ("m", "sine", "sine", 40),
        ("", "add.2", "add.2", 30),
        ("jit_f", "custom-call.1", "block_sparse_decode_gpu", 30),
    ]
    events = [
        ("m", "fusion.3", "loop_fusion.3", 300),
        ("m", "fusion.4", "loop_fusion.4", 100),
        ("m", "custom-call.1", "block_sparse_decode_gpu", 600),
    ]
    got = op_profile.summarize(events, steps=2, top=2)
    assert got["busy_us_per_step"] == pytest.approx(0.5) and got["modules"] == [
        {"module": "m", "calls_per_step": 1.5, "us_per_step": pytest.approx(0.5), "share": 1.0}
    ]
    assert [(o["op"], o["us_per_step"], o["share"]) for o in got["ops"]] == [
        ("custom-call.1", pytest.approx(0.3), pytest.approx(0.6)),
        ("fusion.3", pytest.approx(0.15), pytest.approx(0.3)),
    ]
    assert [(k["kind"], k["calls_per_step"], k["share"]) for k in got["kinds"]] == [
        ("block_sparse_decode_gpu", 0.5, pytest.approx(0.6)),
        ("loop_fusion", 1.0, pytest.approx(0.4)),
    ]


def test_decode_profile_attributes_each_token_s_device_time(tiny_model, monkeypatch):
    """bench_decode.py --profile-top: one traced decode loop, its operations summed per token. Each op of the
    loop body runs once per token (per layer its own ops), and the shares account for all the busy time."""
    script = _script("bench_decode", monkeypatch)
    steps = 2
    assert script.time_decode(tiny_model, 2, 128, steps, 1) > 0  # compiles the loop the profile runs
    got = script.profile_decode(tiny_model, 2, 128, steps, top=10_000)
    ops, kinds = got["ops"], got["kinds"]
    assert got["busy_us_per_step"] > 0 and got["wall_us_per_step"] > 0
    assert sum(o["share"] for o in ops) == pytest.approx(1.0) and sum(k["share"] for k in kinds) == pytest.approx(1.0)
    assert sum(o["calls_per_step"] for o in ops) == pytest.approx(sum(k["calls_per_step"] for k in kinds))
    assert [o["us_per_step"] for o in ops] == sorted((o["us_per_step"] for o in ops), reverse=True)
    assert {o["module"] for o in ops} == {"jit__decode"}  # the loop's executable, not the eager checks
    assert got["modules"][0]["module"] == "jit__decode"  # and it takes the most time
    # Once per token (the body), once per token and once more (the loop's condition), once (the rest):
    assert {o["calls_per_step"] for o in ops} == {1.0, (steps + 1) / steps, 1 / steps}
    per_token = [o for o in ops if o["calls_per_step"] == 1.0]
    assert len(per_token) >= 2 * tiny_model.config.num_layers  # each layer's own ops


def _peer_config(**kw):
    from kvjax.eval.peer_bench import PeerBenchConfig

    return PeerBenchConfig(**{"new_tokens": 3, "repeats": 1, "bandwidth_mb": 8, **kw})


def _check_side(side: dict, batch: int, length: int, param_bytes: int, bandwidth: float):
    assert len(side["prefill_s_repeats"]) == len(side["decode_s_per_token_repeats"]) == 1
    assert side["prefill_s"] == pytest.approx(np.median(side["prefill_s_repeats"]))
    assert side["decode_ms_per_token"] == pytest.approx(1e3 * np.median(side["decode_s_per_token_repeats"]))
    assert side["prefill_tokens_per_s"] == pytest.approx(batch * length / side["prefill_s"])
    assert side["decode_tokens_per_s"] == pytest.approx(1e3 * batch / side["decode_ms_per_token"])
    assert side["kv_bytes"] > 0 and side["decode_bytes_per_step"] == param_bytes + side["kv_bytes"]
    assert side["roofline_fraction"] == pytest.approx(side["decode_gb_per_s"] / bandwidth)
    assert side["decode_gb_per_s"] == pytest.approx(side["decode_bytes_per_step"] / side["decode_ms_per_token"] / 1e6)


def test_bench_against_transformers_writes_the_peer_report(tmp_path, capsys):
    """`kvjax bench --against transformers` on the bundled model: the JSON's schema (no timing asserted), the
    transformers copy of the weights giving kvjax's logits, skipped cells listed, and the plot."""
    pytest.importorskip("torch", reason="the transformers comparison needs torch (the [compare] extra)")
    pytest.importorskip("transformers", reason="the transformers comparison needs transformers (the [compare] extra)")
    import matplotlib.image

    from kvjax.cli import main

    out = tmp_path / "peer"
    argv = ["bench", "--against", "transformers", "--model", "needle-llama", "--lengths", "192,256"]
    argv += ["--batch-sizes", "1,2", "--max-batch-tokens", "400", "--new-tokens", "3", "--repeats", "1"]
    argv += ["--dtype", "float32", "--bandwidth-mb", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prefill x" in printed and "transformers" in printed
    report = json.loads((out / "peer.json").read_text())
    assert set(report["versions"]) >= {"jax", "jaxlib", "torch", "transformers", "kvpress"}
    assert report["versions"]["kvpress"] is None or "kvpress" in report["versions"]
    assert report["dtype"] == "float32" and report["cpu_count"] >= 1 and len(report["loadavg"]) == 3
    assert report["cells_run"] == [[192, 1], [192, 2], [256, 1]] and report["cells_skipped"] == [[256, 2]]
    bandwidths = report["bandwidth"]  # before the run, before each cell, after it
    assert len(bandwidths) == 2 + len(report["cells_run"])
    assert all(b["one_core_gb_s"] > 0 and b["all_cores_gb_s"] == max(b["all_cores_repeats_gb_s"]) for b in bandwidths)
    assert report["roofline_bandwidth_gb_s"] == max(b["all_cores_gb_s"] for b in bandwidths)
    assert report["one_core_bandwidth_gb_s"] == max(b["one_core_gb_s"] for b in bandwidths)
    assert report["parity"]["max_abs_logit_diff"] < 1e-4 and report["parity"]["argmax_agreement"] == 1.0
    param_bytes = report["shapes"]["param_bytes"]
    assert param_bytes == sum(
        x.size * 4 for x in jax.tree.leaves(kvjax.load("needle-llama", jnp.float32).params)
    )  # untied: lm_head counted
    rows = report["rows"]
    assert [(r["method"], r["peer"], r["length"], r["batch_size"]) for r in rows] == [
        ("full", "transformers", 192, 1),
        ("full", "transformers", 192, 2),
        ("full", "transformers", 256, 1),
    ]
    for r in rows:
        for side in (r["kvjax"], r["peer_result"]):
            _check_side(side, r["batch_size"], r["length"], param_bytes, report["roofline_bandwidth_gb_s"])
        ours, peer = r["kvjax"], r["peer_result"]
        assert r["prefill_ratio"] == pytest.approx(ours["prefill_tokens_per_s"] / peer["prefill_tokens_per_s"])
        assert r["decode_ratio"] == pytest.approx(ours["decode_tokens_per_s"] / peer["decode_tokens_per_s"])
        assert r["peer_cache"] == "static" and len(r["loadavg_before"]) == len(r["loadavg_after"]) == 3
        assert r["kvjax_execution"] == {"scan_layers": None, "attention_impl": "auto"}  # decode unrolled
        other = r["kvjax_other_scan"]  # Full's decode again with the layers scanned
        assert other["scan_layers"] is True and len(other["decode_s_per_token_repeats"]) == 1
        assert other["kv_bytes"] == ours["kv_bytes"] and other["decode_tokens_per_s"] > 0
        assert other["roofline_fraction"] == pytest.approx(other["decode_gb_per_s"] / report["roofline_bandwidth_gb_s"])
        # transformers' static cache holds prompt + new - 1 (the last token is never fed); kvjax's state holds
        # room for all new tokens, rounded up, and positions
        per_token = 2 * 3 * 2 * 32 * 4  # K and V, layers, KV heads, head dim, float32
        assert peer["kv_bytes"] == r["batch_size"] * (r["length"] + 2) * per_token
        assert peer["kv_bytes"] < ours["kv_bytes"] < 1.2 * peer["kv_bytes"]
    targets = report["targets"]
    assert set(targets["prefill_ratio_vs_transformers (target >= 1.5)"]) == {"192x1", "192x2", "256x1"}
    assert targets["snapkv_4k_batch8_speedup_fraction (target >= 0.8)"] is None
    assert matplotlib.image.imread(out / "peer.png").ndim == 3


def test_bench_against_kvpress_compares_the_same_presses(tiny_model):
    """SnapKV and StreamingLLM against kvpress's presses at the same kept share: both sides' caches shrink
    to it, and each compressed row carries kvjax's decode speedup over Full against what its bytes allow."""
    pytest.importorskip("kvpress", reason="kvpress is not installed (it pins transformers<5.3: its own venv)")
    from kvjax.eval.peer_bench import run_peer_bench

    config = _peer_config(against=("kvpress",), lengths=(512,), batch_sizes=(2,), keep=0.25)
    report = run_peer_bench(tiny_model, config, log=lambda _: None)
    rows = report["rows"]
    assert [(r["method"], r["peer"]) for r in rows] == [("snapkv", "kvpress"), ("streaming", "kvpress")]
    for r in rows:
        assert r["peer_cache"] == "dynamic" and "compression_ratio=0.75" in r["peer_method"]
        assert r["peer_result"]["kv_bytes"] == 2 * 128 * 2 * 2 * 2 * 16 * 4  # 128 of 512 tokens kept
        assert r["kvjax"]["kv_bytes"] < r["kvjax_full_kv_bytes"] / 3
        assert r["decode_speedup_fraction"] == pytest.approx(
            r["decode_speedup_vs_full"] / r["decode_speedup_bytes_allow"]
        )
        assert r["decode_speedup_bytes_allow"] == pytest.approx(
            (report["shapes"]["param_bytes"] + r["kvjax_full_kv_bytes"]) / r["kvjax"]["decode_bytes_per_step"]
        )


def test_bench_against_names_the_extra_when_a_peer_is_missing(monkeypatch, capsys):
    """Without torch (CI installs `.[test]`, a user may not have it) the comparison fails in one line naming the
    extra, before any model loads; unknown peers are refused."""
    from kvjax.cli import main

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert main(["bench", "--against", "transformers", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs torch" in err and '".[compare]"' in err
    assert main(["bench", "--against", "vllm"]) == 2
    assert "--against takes transformers, kvpress" in capsys.readouterr().err


def test_peer_bench_lengths_and_cells():
    from kvjax.eval.peer_bench import PeerBenchConfig, memory_bandwidth, parse_lengths

    assert parse_lengths("1k, 4k,max", 8192, 32) == (1024, 4096, 8160)
    config = PeerBenchConfig(lengths=(1024, 4096, 8160), batch_sizes=(1, 8), max_batch_tokens=32768)
    assert config.cells() == (
        [(1024, 1), (1024, 8), (4096, 1), (4096, 8), (8160, 1)],
        [(8160, 8)],
    )
    with pytest.raises(ValueError, match="keep"):
        PeerBenchConfig(keep=1.0)
    with pytest.raises(ValueError, match="against takes"):
        PeerBenchConfig(against=("vllm",))
    got = memory_bandwidth(4, repeats=2, threads=2)
    assert got["threads"] == 2 and len(got["one_core_repeats_gb_s"]) == 2 and got["one_core_gb_s"] > 0
