"""Sharding over 8 CPU devices: the checks live in sharded_checks.py and run in a process of their own,
because the host device count is fixed when JAX starts (and 8 devices slow every other test by ~15%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.own_process import JAXLIB_010_FLAGS, run_in_own_process

pytestmark = pytest.mark.slow  # over ~20 s of a core; `-m "not slow"` skips it


def test_sharded_inference_on_eight_cpu_devices():
    run_in_own_process(
        Path(__file__).with_name("sharded_checks.py"),
        xla_flags=f"--xla_force_host_platform_device_count=8 {JAXLIB_010_FLAGS}",
    )
