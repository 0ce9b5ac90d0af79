"""Sharding over 8 CPU devices: the checks live in sharded_checks.py and run in a process of their own,
because the host device count is fixed when JAX starts (and 8 devices slow every other test by ~15%)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST_COMPILE_FLAGS


def test_sharded_inference_on_eight_cpu_devices():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}"
    checks = Path(__file__).with_name("sharded_checks.py")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        cwd=checks.parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
