"""Running a pytest module in a fresh process (its own XLA flags: a device count, jaxlib's compile flags)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# jaxlib 0.10.2's CPU compiler, as the suite needs it: its elemental emitters compile the suite's many small
# programs faster than its fusion emitters, and compiling each module in one piece avoided worker crashes
# (see tests/support/crash_rerun.py). An XLA that does not know a flag refuses to start, so they are set only
# on the jaxlib they were measured on.
JAXLIB_010_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
    if version("jaxlib").startswith("0.10.")
    else ""
)
REPO = Path(__file__).resolve().parents[2]


def run_in_own_process(checks: Path, xla_flags: str = f"--xla_force_host_platform_device_count=1 {JAXLIB_010_FLAGS}"):
    """Runs the pytest module `checks` in a fresh process and asserts that all of it passed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["XLA_FLAGS"] = xla_flags
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
