"""`kvjax eval` on a tiny random model: policy specs, budget mapping, and the files it writes."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import kvjax
from kvjax.eval.harness import (
    EvalConfig,
    PolicySpec,
    build_policy,
    parse_length,
    resolve_policies,
    run_eval,
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 1-layer GQA Llama over the byte tokenizer, saved as a kvjax checkpoint."""
    from kvjax.checkpoint import save_checkpoint
    from kvjax.train.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, write_byte_tokenizer
    from kvjax.train.lm import ModelSize, model_config

    root = tmp_path_factory.mktemp("eval-model")
    files = write_byte_tokenizer(root / "tok")
    size = ModelSize(layers=1, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=128, max_positions=4096)
    m = kvjax.init_model(model_config(size, 259, BOS_ID, EOS_ID, PAD_ID), seed=0, dtype=jnp.float32)
    return save_checkpoint(root / "model", m.config, nnx.to_pure_dict(m.params), files, {"note": "random"})


def test_policy_specs_name_a_class_and_its_fields():
    assert isinstance(build_policy("SnapKV"), kvjax.policies.SnapKV)
    assert build_policy("streaming") == kvjax.policies.StreamingLLM()
    assert build_policy("kivi(bits=2)") == kvjax.policies.KIVI(bits=2)
    spec = PolicySpec.parse(" snapkv(window=64, pooling='max') ")
    assert spec.options == (("window", 64), ("pooling", "max")) and spec.label == "snapkv(window=64,pooling=max)"
    assert build_policy(spec) == kvjax.policies.SnapKV(window=64, pooling="max")
    nested = build_policy("quantizedpruning(base=snapkv(window=16), bits=2)")
    assert nested == kvjax.policies.QuantizedPruning(base=kvjax.policies.SnapKV(window=16), bits=2)
    for bad, match in (
        ("magic", "unknown policy"),
        ("quantizedpruning(base=magic)", "unknown policy 'magic'"),
        ("snapkv(64)", "FIELD=VALUE"),
        ("snapkv(windw=3)", "windw"),
        ("snapkv(", "cannot read"),
        ("duoattention", "--policy-file duoattention=PATH"),
    ):
        with pytest.raises(ValueError, match=match):
            build_policy(bad)
    with pytest.raises(ValueError, match="not built from a file"):
        build_policy("full", files={"full": "x.tsv"})


def test_budgets_map_onto_each_policy():
    P = kvjax.policies
    assert P.StreamingLLM().with_budget(256) == P.StreamingLLM(sink=4, window=252)
    assert P.H2O().with_budget(256) == P.H2O(heavy=128, window=128)
    assert P.A2SF().with_budget(255) == P.A2SF(heavy=127, window=128)
    assert P.SnapKV().with_budget(256) == P.SnapKV(budget_tokens=256)
    assert P.SnapKV().with_budget(16) == P.SnapKV(budget_tokens=16, window=8)  # window must stay < budget
    assert P.Quest().with_budget(256) == P.Quest(budget_tokens=256)
    assert P.Twilight().with_budget(256) == P.Twilight(budget_tokens=256)  # the candidates before top-p
    assert P.AdaKV().with_budget(128) == P.AdaKV(base=P.SnapKV(budget_tokens=128))  # a wrapper: its base's
    assert P.ThinK(base=P.Full()).with_budget(128) is None
    assert P.DuoAttention(((0, 1),)).with_budget(100) == P.DuoAttention(((0, 1),), sink=64, recent=36)
    for policy in (P.Full(), P.KIVI(), P.CSKV(), P.PromptSVD(), P.SqueezedAttention()):
        assert policy.with_budget(256) is None
    with pytest.raises(ValueError, match="sink"):
        P.StreamingLLM().with_budget(4)
    with pytest.raises(ValueError, match="positive"):
        P.H2O().with_budget(0)
    messages = []
    runs = resolve_policies(["full", "streaming", "kivi(bits=2)"], [64, 128], log=messages.append)
    assert [r.label for r in runs] == ["full", "streaming@64", "streaming@128", "kivi(bits=2)"]
    assert [r.budget for r in runs] == [None, 64, 128, None]
    assert runs[3].policy == P.KIVI(bits=2)
    assert messages == [
        "kivi(bits=2): no token budget to set; --budgets/--compression-ratio ignored, running its settings"
    ]
    assert parse_length("2k") == 2048 and parse_length("1.5k") == 1536 and parse_length("300") == 300
    with pytest.raises(ValueError, match="bad length"):
        parse_length("lots")


def test_kvjax_eval_writes_results_csv_and_plots(tiny_checkpoint, tmp_path, capsys):
    import matplotlib.image

    from kvjax.cli import main
    from kvjax.policies.duo_attention import write_gates_tsv

    out, gates = tmp_path / "eval", tmp_path / "full_attention_heads.tsv"
    write_gates_tsv(gates, [[0.9, 0.1]])  # 1 layer, 2 KV heads: head 0 retrieves, head 1 streams
    rc = main(
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--policies",
            "full,streaming,duoattention",
            "--budgets",
            "96",
            "--policy-file",
            f"duoattention={gates}",
            "--lengths",
            "512",
            "--tasks",
            "niah_single",
            "--samples",
            "2",
            "--dtype",
            "float32",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "streaming@96" in printed and "kv_reduction" in printed
    results = json.loads((out / "results.json").read_text())
    meta, rows = results["metadata"], results["rows"]
    assert meta["model"] == "model" and meta["dtype"] == "float32" and meta["backend"] == "cpu"
    assert meta["command"].startswith("kvjax ") and meta["jax"] and meta["date"].endswith("+00:00")
    assert [r["policy"] for r in rows] == ["full", "streaming@96", "duoattention@96"]
    for r in rows:
        assert {"policy", "task", "length", "accuracy", "kv_bytes"} <= set(r)
        assert r["task"] == "niah_single" and r["length"] == 512 and 0.0 <= r["accuracy"] <= 1.0
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
    full, streaming, duo = rows
    assert full["kv_reduction_x"] == 1.0 and streaming["kv_bytes"] < full["kv_bytes"]
    assert streaming["kv_reduction_x"] > 3  # 96 slots (+ spare, rounding) instead of ~512 + answer
    assert "retrieval_heads=((0,),), sink=64, recent=32" in duo["policy_repr"]  # the gates' split, the budget
    assert 1.3 < duo["kv_reduction_x"] < 2  # one head of two keeps everything, the other 96 slots
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["policy"] for t in table] == ["full", "streaming@96", "duoattention@96"]
    assert float(table[1]["kv_bytes"]) > 0
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 6 and all("prediction" in s for s in samples)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "accuracy_vs_compression.png",
        "heatmap_duoattention_96__niah_single.png",
        "heatmap_full__niah_single.png",
        "heatmap_streaming_96__niah_single.png",
    ]
    run = out / "runs" / "niah_single__model__streaming_96"  # kvpress's leaderboard layout
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.json", "predictions.csv"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["budget"] == 96 and config["lengths"] == [512] and config["commit"] == meta["commit"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["niah_single"]["512"]["string_match_all"] == streaming["accuracy"]
    with open(run / "predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    assert [p["prediction"] for p in predictions] == [s["prediction"] for s in samples if s["policy"] == "streaming@96"]
    for name in pngs:
        assert matplotlib.image.imread(out / name).ndim == 3


def test_python_api_takes_policy_objects(tiny_checkpoint):
    from kvjax.checkpoint import load

    m = load(tiny_checkpoint, dtype=jnp.float32)
    policies = {"tight": kvjax.policies.StreamingLLM(sink=4, window=60)}
    config = EvalConfig(tasks=("passkey",), lengths=(400,), samples=1, timing=False)
    rows, samples = run_eval(m, policies, config, progress=False)
    assert rows[0]["policy"] == "tight" and rows[0]["samples"] == 1 and rows[0]["prefill_ms"] is None
    assert samples[0]["answers"] and isinstance(samples[0]["prediction"], str)
    with pytest.raises(ValueError, match="context"):
        run_eval(m, policies, dataclasses.replace(config, lengths=(5000,)), progress=False)


def test_eval_without_a_model_fails_clearly(monkeypatch, capsys):
    import kvjax.cli

    monkeypatch.setattr(kvjax.cli, "bundled_models", lambda: [])
    assert kvjax.cli.main(["eval", "--out", "unused"]) == 2
    assert "no bundled model" in capsys.readouterr().err


def test_duoattention_without_gates_fails_clearly(tiny_checkpoint, capsys):
    from kvjax.cli import main

    assert main(["eval", "--model", str(tiny_checkpoint), "--policies", "full,duoattention", "--out", "unused"]) == 2
    assert "--policy-file duoattention=PATH" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_checkpoint),
                "--policies",
                "full",
                "--policy-file",
                "nothing=x",
                "--out",
                "unused",
            ]
        )
        == 2
    )
    assert "NAME=PATH with a policy name" in capsys.readouterr().err


def test_kvjax_generate_under_a_policy(tiny_checkpoint, capsys):
    """`kvjax generate --policy NAME --budget N` prints what `kvjax.generate` gives under that policy."""
    import numpy as np

    from kvjax.checkpoint import load
    from kvjax.cli import main

    m = load(tiny_checkpoint, dtype=jnp.float32)
    prompt = "The needle hides in the haystack; find it. " * 8  # 352 bytes, far past the 64-token budget
    ids = [m.tokenizer.encode(prompt)]

    def text(policy):
        out = np.asarray(kvjax.generate(m, ids, 6, policy=policy))[0]
        stop = next((i for i, t in enumerate(out) if int(t) in m.config.eos_token_ids), len(out))
        return m.tokenizer.decode(out[:stop])

    expected = text(kvjax.policies.StreamingLLM(sink=4, window=60))
    assert expected != text(None)  # so printing Full's completion would fail the check below
    args = [
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--dtype",
        "float32",
    ]
    assert main([*args, "--policy", "streaming", "--budget", "64"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*args, "--policy", "streaming", "--budget", "64,128"]) == 2
    assert "one policy and one budget" in capsys.readouterr().err
    assert main([*args, "--policy", "duoattention"]) == 2
    assert "--policy-file duoattention=PATH" in capsys.readouterr().err


def test_batches_are_sorted_balanced_and_topped_up():
    from kvjax.eval.harness import plan_batches

    lengths = [50, 30, 90, 10, 70]
    batches = plan_batches(lengths, 2)
    assert [len(idx) for idx, _ in batches] == [2, 2, 2]  # one shape: one compile
    real = [i for idx, n in batches for i in idx[:n]]
    assert sorted(real) == list(range(5)) and [lengths[i] for i in real] == sorted(lengths)
    assert batches[-1] == ([2, 2], 1)  # the short last batch repeats its prompt as filler
    assert [len(idx) for idx, _ in plan_batches(lengths, 4)] == [3, 3]  # balanced: not 4 + 1
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(lengths, 0)


def _compiles_per_group(monkeypatch, *jitted):
    """[(each jitted path's compiled programs)] recorded as run_eval releases them after each (task, length)."""
    from kvjax.eval import harness

    seen, release = [], harness.release_compiled
    release()  # what earlier tests compiled

    def recording():
        seen.append(tuple(fn._cache_size() for fn in jitted))
        release()

    monkeypatch.setattr(harness, "release_compiled", recording)
    return seen


def test_batched_eval_answers_as_batch_one_with_one_compile(tiny_checkpoint, monkeypatch):
    from kvjax.checkpoint import load
    from kvjax.inference import _prefill

    m = load(tiny_checkpoint, dtype=jnp.float32)
    policies = {"full": kvjax.policies.Full(), "snapkv": kvjax.policies.SnapKV(budget_tokens=96, window=8)}
    config = EvalConfig(
        tasks=("niah_single",), lengths=(300,), samples=3, timing=False, batch_size=1, share_prefill=False
    )
    compiles = _compiles_per_group(monkeypatch, _prefill)
    rows_1, samples_1 = run_eval(m, policies, config, progress=False)
    rows_2, samples_2 = run_eval(m, policies, dataclasses.replace(config, batch_size=2), progress=False)
    assert compiles == [(2,), (2,)]  # one shape (batch, one bucket) per policy, whatever the batch size
    assert [s["prediction"] for s in samples_2] == [s["prediction"] for s in samples_1]
    assert [(r["accuracy"], r["digits"], r["kv_bytes"]) for r in rows_2] == [
        (r["accuracy"], r["digits"], r["kv_bytes"]) for r in rows_1
    ]
    assert [r["batch_size"] for r in rows_2] == [2, 2]


def test_policies_that_prefill_as_full_share_one_forward_with_the_same_answers(tiny_checkpoint, monkeypatch):
    from kvjax.checkpoint import load
    from kvjax.inference import _prefill, _prefill_shared

    m = load(tiny_checkpoint, dtype=jnp.float32)
    policies = {
        "full": kvjax.policies.Full(),
        "snapkv": kvjax.policies.SnapKV(budget_tokens=96, window=8),
        "h2o": kvjax.policies.H2O(compression_ratio=0.5),
        "streaming": kvjax.policies.StreamingLLM(compression_ratio=0.75),
        "promptsvd": kvjax.policies.PromptSVD(),  # attends to low-rank keys as it prefills: on its own
    }
    config = EvalConfig(tasks=("niah_single",), lengths=(300,), samples=3, timing=False, batch_size=3)
    compiles = _compiles_per_group(monkeypatch, _prefill, _prefill_shared)
    rows_alone, samples_alone = run_eval(m, policies, dataclasses.replace(config, share_prefill=False), progress=False)
    rows, samples = run_eval(m, policies, config, progress=False)
    assert compiles == [(5, 0), (1, 1)]  # shared: one forward for the four, PromptSVD's own prefill
    assert [s["prediction"] for s in samples] == [s["prediction"] for s in samples_alone]
    assert [(r["policy"], r["accuracy"], r["digits"], r["kv_bytes"]) for r in rows] == [
        (r["policy"], r["accuracy"], r["digits"], r["kv_bytes"]) for r in rows_alone
    ]


def test_packed_eval_gives_the_same_answers(tiny_checkpoint, monkeypatch):
    """EvalConfig(packing=True) prefills each policy's batches packed (the packed prefill compiles), timing
    included, and every row and sample answers as without packing."""
    from kvjax.checkpoint import load
    from kvjax.inference import _packed_prefill

    m = load(tiny_checkpoint, dtype=jnp.float32)
    policies = {"full": kvjax.policies.Full(), "snapkv": kvjax.policies.SnapKV(budget_tokens=96, window=8)}
    config = EvalConfig(
        tasks=("niah_single",), lengths=(300,), samples=3, timing=False, batch_size=3, share_prefill=False
    )
    compiles = _compiles_per_group(monkeypatch, _packed_prefill)
    rows, samples = run_eval(m, policies, config, progress=False)
    packed_rows, packed_samples = run_eval(
        m, policies, dataclasses.replace(config, packing=True, timing=True), progress=False
    )
    assert compiles == [(0,), (4,)]  # per policy, the answer's and the timing's (other room)
    assert [s["prediction"] for s in packed_samples] == [s["prediction"] for s in samples]
    assert [(r["policy"], r["accuracy"], r["digits"], r["kv_bytes"]) for r in packed_rows] == [
        (r["policy"], r["accuracy"], r["digits"], r["kv_bytes"]) for r in rows
    ]
    assert all(r["prefill_ms"] > 0 for r in packed_rows)


def test_default_batch_size_follows_free_memory():
    from kvjax.eval.harness import batch_size_for_memory

    config = kvjax.load("needle-llama").config
    one = batch_size_for_memory(config, 2048, 16, 512, 4, free=10**12)
    assert batch_size_for_memory(config, 2048, 16, 512, 4, free=10**12 // 4) in range(one // 4 - 1, one // 4 + 2)
    assert batch_size_for_memory(config, 8192, 16, 512, 4, free=10**12) < one  # longer prompts: fewer
    assert batch_size_for_memory(config, 2048, 16, 512, 4, free=1) == 1  # never zero


def test_shared_forward_groups_follow_memory_per_policy():
    from kvjax.eval.harness import shared_group_size

    config = kvjax.load("needle-llama").config
    slots = 2048 + 16
    cache = config.num_layers * config.num_kv_heads * slots * (2 * config.head_dim * 4 + 4)
    per_policy = 2 * cache + 3 * config.num_heads * 512 * slots * 4  # one sequence's states and block weights
    assert shared_group_size(config, 2048, 16, 10, 4, free=7 * 10 * per_policy + 1) == 7
    assert shared_group_size(config, 2048, 16, 10, 4, free=7 * 10 * per_policy - 1) == 6
    assert shared_group_size(config, 4096, 16, 10, 4, free=7 * 10 * per_policy) < 6  # longer prompts: fewer
    assert shared_group_size(config, 2048, 16, 10, 4, free=1) == 1  # never zero


def test_eval_compresses_the_context_without_the_question_unless_asked(tiny_checkpoint):
    from kvjax.checkpoint import load
    from kvjax.eval.harness import split_prompt
    from kvjax.eval.tasks import get_task, make_samples

    m = load(tiny_checkpoint, dtype=jnp.float32)
    sample = make_samples(get_task("niah_single"), m.tokenizer, 300, 1)[0]
    context, question = split_prompt(m.tokenizer, sample, query_aware=False)
    assert m.tokenizer.decode(question).startswith(sample.question)  # the question comes after
    assert sample.question.strip() not in m.tokenizer.decode(context)
    assert split_prompt(m.tokenizer, sample, query_aware=True) == (m.tokenizer.encode(sample.prompt), [])
    policies = {"snapkv": kvjax.policies.SnapKV(budget_tokens=64, window=8)}
    config = EvalConfig(tasks=("niah_single",), lengths=(300,), samples=2, timing=False)
    rows, samples = run_eval(m, policies, config, progress=False)
    by_hand = []
    for s in make_samples(get_task("niah_single"), m.tokenizer, 300, 2):
        c, q = split_prompt(m.tokenizer, s, query_aware=False)
        state = kvjax.prefill(m, [c], policies["snapkv"], max_new_tokens=len(q) + 16)
        out = np.asarray(kvjax.generate(m, [q], 16, policies["snapkv"], state=state))[0].tolist()
        eos = set(m.config.eos_token_ids)
        by_hand.append(m.tokenizer.decode(out[: next((i for i, t in enumerate(out) if t in eos), 16)]))
    assert [s["prediction"] for s in samples] == by_hand and rows[0]["query_aware"] is False
    aware, _ = run_eval(m, policies, dataclasses.replace(config, query_aware=True), progress=False)
    assert aware[0]["query_aware"] is True and aware[0]["kv_bytes"] < rows[0]["kv_bytes"]  # no room for a question


def _eval_args(model, out, policies, tasks="niah_single", samples="2"):
    return ["eval", "--model", str(model), "--policies", policies, "--budgets", "96", "--lengths", "512"] + [
        "--tasks", tasks, "--samples", samples, "--dtype", "float32", "--no-timing", "--out", str(out), "--no-progress"
    ]  # fmt: skip


def test_resume_skips_saved_cells_and_an_interrupted_run_goes_on(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from kvjax.cli import main
    from kvjax.eval import harness

    fresh, out = tmp_path / "fresh", tmp_path / "resumed"
    assert main(_eval_args(tiny_checkpoint, fresh, "full,streaming", "niah_single,passkey")) == 0
    expected = json.loads((fresh / "results.json").read_text())["rows"]

    evaluate = harness._evaluate

    def killed_at_passkey(m, run, task, *rest):
        if task == "passkey":
            raise KeyboardInterrupt
        return evaluate(m, run, task, *rest)

    monkeypatch.setattr(harness, "_evaluate", killed_at_passkey)
    with pytest.raises(KeyboardInterrupt):
        main(_eval_args(tiny_checkpoint, out, "full,streaming", "niah_single,passkey") + ["--resume"])
    saved = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["policy"]) for r in saved["rows"]] == [
        ("niah_single", "full"),
        ("niah_single", "streaming@96"),
    ]
    saved["rows"][0]["accuracy"] = 0.125  # a marker: a resumed run must keep, not recompute, a saved cell
    (out / "results.json").write_text(json.dumps(saved))
    monkeypatch.setattr(harness, "_evaluate", evaluate)

    assert main(_eval_args(tiny_checkpoint, out, "full,streaming", "niah_single,passkey") + ["--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert rows[0]["accuracy"] == 0.125 and rows[1:] == expected[1:]
    assert len(results["metadata"]["earlier_runs"]) == 1 and "--resume" in results["metadata"]["command"]
    fresh_samples = json.loads((fresh / "samples.json").read_text())
    resumed_samples = json.loads((out / "samples.json").read_text())
    assert [s["prediction"] for s in resumed_samples] == [s["prediction"] for s in fresh_samples]
    import matplotlib.image

    assert matplotlib.image.imread(out / "accuracy_by_task.png").ndim == 3  # two tasks: a panel each
    runs = sorted(p.name for p in (out / "runs").iterdir())  # the one-task folders of the killed run replaced
    assert runs == ["niah_single_passkey__model__full", "niah_single_passkey__model__streaming_96"]


def test_resume_refuses_results_it_cannot_extend(tiny_checkpoint, tmp_path, capsys):
    from kvjax.cli import main

    out = tmp_path / "eval"
    assert main(_eval_args(tiny_checkpoint, out, "full")) == 0
    before = (out / "results.json").read_text()
    assert main(_eval_args(tiny_checkpoint, out, "full", samples="3") + ["--resume"]) != 0
    assert "its settings is" in capsys.readouterr().err
    assert main(_eval_args(tiny_checkpoint, out, "full") + ["--resume", "--overwrite"]) != 0
    assert "pass one" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_resume_refuses_a_label_that_names_another_policy():
    from kvjax.eval.results import check_same_policies

    rows = [{"policy": "duoattention@96", "policy_repr": "DuoAttention(retrieval_heads=((0,),))"}]
    check_same_policies(rows, {"duoattention@96": "DuoAttention(retrieval_heads=((0,),))", "full": "Full()"})
    with pytest.raises(ValueError, match="duoattention@96 in the saved results"):
        check_same_policies(rows, {"duoattention@96": "DuoAttention(retrieval_heads=((1,),))"})


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts the process's memory mappings (Linux)")
def test_eval_releases_each_groups_compiled_programs(tiny_checkpoint):
    """Each compiled program holds memory mappings (65,530 per process by default): an eval must not keep
    every (task, length, policy)'s programs, or a long study stops with 'Cannot allocate memory'."""
    m = kvjax.load(str(tiny_checkpoint), dtype=jnp.float32)

    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    kvjax.generate(m, [[1, 2, 3]], 2)  # the imports' and the runtime's own mappings
    before = mappings()
    config = EvalConfig(tasks=("niah_single",), lengths=(384, 448), samples=1, timing=False)
    policies = {"full": kvjax.policies.Full(), "streaming": kvjax.policies.StreamingLLM(sink=4, window=32)}
    run_eval(m, {**policies, "h2o": kvjax.policies.H2O(40)}, config, progress=False)
    grown = mappings() - before
    kvjax.generate(m, [[1, 2, 3]], 2, kvjax.policies.StreamingLLM(sink=4, window=32))
    one_policy = mappings() - before - grown  # what one more policy's programs hold
    assert one_policy > 50 and grown < 2 * one_policy  # six cells compiled; at most one group's worth kept
