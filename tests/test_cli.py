"""The command line's surface: --version, defaults in every --help, --tasks choices, long prompts from a file or
standard input, one spelling of --max-new-tokens, --attention-impl passed through, stdout for results only."""

from __future__ import annotations

import argparse
import io
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import kvjax.eval.harness
import kvjax.eval.results
import kvjax.eval.speed
from kvjax import cli
from kvjax.cli import main, parser
from kvjax.eval.tasks import default_tasks


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.fixture(scope="module")
def byte_checkpoint(tmp_path_factory):
    """A random 1-layer GQA Llama over the byte tokenizer, saved as a kvjax checkpoint."""
    from kvjax.checkpoint import save_checkpoint
    from kvjax.train.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, write_byte_tokenizer
    from kvjax.train.lm import ModelSize, model_config

    root = tmp_path_factory.mktemp("cli-model")
    files = write_byte_tokenizer(root / "tok")
    size = ModelSize(layers=1, hidden=64, heads=4, kv_heads=2, head_dim=32, intermediate=128, max_positions=4096)
    m = kvjax.init_model(model_config(size, 259, BOS_ID, EOS_ID, PAD_ID), seed=0, dtype=jnp.float32)
    return save_checkpoint(root / "model", m.config, nnx.to_pure_dict(m.params), files, {"note": "random"})


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"kvjax \S+ \(jax \S+, jaxlib \S+\)\n", capsys.readouterr().out)


def test_every_help_shows_every_default():
    """Each option of each command has help text, and every option that is not an off-by-default flag says
    its default (argparse's "(default: X)", or in words where a None default means something)."""
    for name, sub in _subparsers().items():
        formatter, groups = sub._get_formatter(), sub._mutually_exclusive_groups
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"kvjax {name} {action.dest}: no help"
            required = action.required or any(g.required and action in g._group_actions for g in groups)
            if not action.option_strings or action.default is False or required:  # positionals, flags
                continue
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text, f"kvjax {name} {action.option_strings[0]}: {text!r}"
        assert sub.formatter_class is cli._HelpFormatter, name


def test_tasks_choices_are_listed_and_checked(tmp_path, capsys):
    names = tuple(default_tasks())
    commands = _subparsers()
    for name in ("eval", "train-lm", "train-gates"):
        assert all(task in " ".join(commands[name].format_help().split()) for task in names), name
    assert parser().parse_args(["eval"]).tasks == ",".join(names)
    assert main(["eval", "--tasks", "niah_single,needle", "--model", "nowhere", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        "--tasks takes comma-separated names from niah_single, niah_multikey" in err and "'niah_single,needle'" in err
    )


def test_max_new_tokens_is_spelled_the_same_everywhere():
    p = parser()
    assert p.parse_args(["generate", "--prompt", "x", "--max-new-tokens", "5"]).max_new_tokens == 5
    assert p.parse_args(["eval", "--max-new-tokens", "5"]).max_new_tokens == 5
    assert p.parse_args(["bench", "--max-new-tokens", "5"]).new_tokens == 5
    assert p.parse_args(["bench", "--new-tokens", "5"]).new_tokens == 5  # the old spelling, hidden
    assert "--new-tokens" not in _subparsers()["bench"].format_help()


def test_attention_impl_reaches_the_api(monkeypatch, byte_checkpoint, tmp_path, capsys):
    """--attention-impl reaches kvjax.generate, EvalConfig and BenchConfig; results go to stdout, notes
    ("wrote PATH") to stderr."""
    seen = {}

    def generate(m, ids, **kwargs):
        seen["generate"] = kwargs["attention_impl"]
        return np.full((1, 4), m.tokenizer.encode("ok")[-1], np.int32)

    monkeypatch.setattr(kvjax, "generate", generate)
    common = ["--model", str(byte_checkpoint), "--dtype", "float32", "--attention-impl", "reference"]
    assert main(["generate", "--prompt", "hi", *common]) == 0
    assert seen["generate"] == "reference"

    def run_eval(m, runs, config, progress, log, **resume):
        seen["eval"] = config.attention_impl
        return [{"policy": "full", "task": "passkey", "length": 512, "accuracy": 1.0}], []

    def run_bench(m, runs, config, progress, log):
        seen["bench"] = config.attention_impl
        return {"device": "cpu", "backend": "cpu", "rows": [{"policy": "full", "length": 512}]}

    def write(*args):
        return [str(tmp_path / "written.json")]

    monkeypatch.setattr(kvjax.eval.harness, "run_eval", run_eval)
    monkeypatch.setattr(kvjax.eval.results, "write_results", write)
    monkeypatch.setattr(kvjax.eval.speed, "run_bench", run_bench)
    monkeypatch.setattr(kvjax.eval.speed, "write_bench", write)
    capsys.readouterr()
    assert main(["eval", *common, "--tasks", "passkey", "--out", str(tmp_path / "eval")]) == 0
    out, err = capsys.readouterr()
    assert "passkey" in out and "wrote" not in out and f"wrote {tmp_path / 'written.json'}" in err
    assert main(["bench", *common, "--out", str(tmp_path / "bench")]) == 0
    out, err = capsys.readouterr()
    assert "full" in out and "wrote" not in out and "wrote" in err
    assert seen == {"generate": "reference", "eval": "reference", "bench": "reference"}


def test_packing_reaches_eval_and_bench_and_refuses_what_cannot_pack(monkeypatch, byte_checkpoint, tmp_path, capsys):
    """--packing reaches EvalConfig and BenchConfig; a policy that cannot pack is refused by name before any
    prompt runs (run_eval and run_bench are never called)."""
    seen = {}

    def run_eval(m, runs, config, progress, log, **resume):
        seen["eval"] = config.packing
        return [{"policy": "snapkv", "task": "passkey", "length": 512, "accuracy": 1.0}], []

    def run_bench(m, runs, config, progress, log):
        seen["bench"] = config.packing
        return {"device": "cpu", "backend": "cpu", "rows": [{"policy": "snapkv", "length": 512}]}

    monkeypatch.setattr(kvjax.eval.harness, "run_eval", run_eval)
    monkeypatch.setattr(kvjax.eval.results, "write_results", lambda *args: [])
    monkeypatch.setattr(kvjax.eval.speed, "run_bench", run_bench)
    monkeypatch.setattr(kvjax.eval.speed, "write_bench", lambda *args: [])
    common = ["--model", str(byte_checkpoint), "--dtype", "float32", "--packing"]
    assert main(["eval", *common, "--policies", "full,snapkv", "--tasks", "passkey", "--out", str(tmp_path / "e")]) == 0
    assert main(["bench", *common, "--policies", "snapkv", "--out", str(tmp_path / "b")]) == 0
    assert seen == {"eval": True, "bench": True}
    seen.clear()
    capsys.readouterr()
    for command in ("eval", "bench"):
        assert main([command, *common, "--policies", "snapkv,h2o", "--out", str(tmp_path / "x")]) == 2
        assert "packing cannot run H2O" in capsys.readouterr().err
    assert main(["bench", *common, "--against", "kvpress", "--out", str(tmp_path / "x")]) == 2
    assert "--packing applies to kvjax's own bench" in capsys.readouterr().err
    assert seen == {}


def test_prompt_from_a_file_or_standard_input(monkeypatch, byte_checkpoint, tmp_path, capsys):
    """--prompt-file PATH and --prompt - (stdin) generate exactly what --prompt TEXT does; one final
    newline is dropped; an empty prompt and both options at once are refused."""
    prompt = "The needle hides in the haystack; find it. " * 40  # a long prompt, awkward on a command line
    args = ["generate", "--model", str(byte_checkpoint), "--max-new-tokens", "4", "--dtype", "float32"]
    assert main([*args, "--prompt", prompt]) == 0
    expected = capsys.readouterr().out
    path = tmp_path / "prompt.txt"
    path.write_text(prompt + "\n", encoding="utf-8")
    assert main([*args, "--prompt-file", str(path)]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.setattr("sys.stdin", io.StringIO(prompt + "\n"))
    assert main([*args, "--prompt", "-"]) == 0
    assert capsys.readouterr().out == expected
    path.write_text("\n", encoding="utf-8")
    assert main([*args, "--prompt-file", str(path)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main([*args, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["generate", "--prompt", "a", "--prompt-file", str(path)])
    with pytest.raises(SystemExit):
        parser().parse_args(["generate"])
    assert cli._prompt_text(argparse.Namespace(prompt="as typed\n", prompt_file=None)) == "as typed\n"
