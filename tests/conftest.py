"""Shared fixtures: tiny random Hugging Face checkpoints, converted once per test session."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

# jaxlib 0.10.2's CPU compiler, as the suite needs it. Its elemental emitters compile the suite's many small
# programs about a third faster than its newer fusion emitters (the same operations). Compiling each module
# as one piece (split count 1) was clean in 3 full runs, where 4 of 4 runs on the same machine lost a worker
# to the crash described at `pytest_handlecrashitem` below (2026-11-24). An XLA that does not know a flag
# refuses to start, so they are set only on the jaxlib they were measured on; the CLI tests' subprocesses
# inherit them.
JAXLIB_010_FLAGS = ("--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
                    if version("jaxlib").startswith("0.10.") else "")
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {JAXLIB_010_FLAGS}")
# No persistent compilation cache, in the workers or in the subprocesses that inherit this: it saves no time
# (runs took 10:33 to 11:19 without it, 10:52 to 11:38 with it), and on jaxlib 0.10.2 writing an entry threw a
# C++ error from `executable.serialize()` (a core dump showed it), one more way into the crash described at
# `pytest_handlecrashitem` below: 5 of 8 runs lost a worker with the cache, about 1 in 5 without.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# Most tests compile many small programs and run each once or twice, where XLA's backend
# optimisation (LLVM's expensive passes) costs more than it saves: about a quarter of the suite's
# CPU time. Tests that run a program long enough for it to matter take `optimized_xla`. A config
# update, not an environment variable: the CLI tests' subprocesses compile as users' do.
jax.config.update("jax_disable_most_optimizations", True)


# The files whose tests take longest (each over two minutes of CPU) go first: `--dist worksteal` splits the
# collection between the xdist workers in order and an idle worker steals from the end of another's share,
# so a long test left near the end would run on after the others finish.
LONGEST_FIRST = ("test_sharding.py", "test_bundled_model.py", "test_policies.py", "test_block_sparse_prefill.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# jaxlib 0.10.2's CPU JIT sometimes unmaps compiled code whose EH frames it left registered with libgcc
# (an LD_PRELOAD probe of `__register_frame`, `__deregister_frame` and `munmap` caught it in 1 of 5 runs of
# the suite); the next C++ exception thrown anywhere in that worker then segfaults inside libgcc's
# `_Unwind_Find_FDE`, in whichever test is running. So a test whose worker dies is run once more on a fresh
# worker, at most twice a session, and the summary names it. A test that kills its worker again, or a third
# such death, fails as before.
MAX_CRASH_RERUNS = 2
_crash_reruns: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """pytest-xdist lost a worker while it ran `crashitem`: schedule it again (see above)."""
    if crashitem in _crash_reruns or len(_crash_reruns) >= MAX_CRASH_RERUNS:
        return None
    _crash_reruns.append(crashitem)
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"
    return True


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    if _crash_reruns:
        terminalreporter.write_sep("=", "run again after their worker died (see tests/conftest.py)", yellow=True)
        for nodeid in _crash_reruns:
            terminalreporter.write_line(nodeid)


@pytest.fixture
def optimized_xla():
    """XLA's full optimisation for what this test compiles (it runs a model long enough to pay)."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """variant -> (HF directory, kvjax directory), built lazily."""
    pytest.importorskip("transformers")
    from checkpoints_convert import convert
    from checkpoints_convert.tiny_checkpoints import build

    root = tmp_path_factory.mktemp("tiny")
    cache: dict = {}

    def get(variant: str):
        if variant not in cache:
            hf = build(variant, root / variant)
            cache[variant] = (hf, convert(hf, root / f"{variant}-kvjax", progress=False))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tiny_model():
    """A small random GQA Llama in float32 (no conversion), for tests of kvjax's own invariants."""
    from kvjax import ModelConfig, init_model

    config = ModelConfig(
        family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
    )
    return init_model(config, seed=0, dtype=jnp.float32)


def run_in_own_process(checks: Path, xla_flags: str = f"--xla_force_host_platform_device_count=1 {JAXLIB_010_FLAGS}"):
    """Runs the pytest module `checks` in a fresh process and asserts that all of it passed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["XLA_FLAGS"] = xla_flags
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        cwd=checks.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def random_tokens(seed: int, shape, vocab: int, low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, vocab, shape).astype(np.int32)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random GQA Llama over the byte tokenizer, in memory and saved as a kvjax checkpoint
    (for the trainers, which load models from disk in their CLI tests)."""
    from flax import nnx

    from kvjax import ModelConfig, init_model
    from kvjax.checkpoint import save_checkpoint
    from kvjax.tokenizer import Tokenizer
    from kvjax.train.byte_tokenizer import write_byte_tokenizer

    root = tmp_path_factory.mktemp("byte-model")
    files = write_byte_tokenizer(root / "tokenizer")
    tokenizer = Tokenizer(root / "tokenizer")
    config = ModelConfig(
        family="llama", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
    )
    model = init_model(config, seed=0, dtype=jnp.float32, tokenizer=tokenizer)
    path = save_checkpoint(root / "model", config, nnx.to_pure_dict(model.params), files)
    return model, path
