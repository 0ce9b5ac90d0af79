"""Wall-clock timers the benchmark scripts share (host-dispatched calls, and calls chained on device), and
the machine and versions every result records.

A decode call takes tens of microseconds on a GPU, about what the host needs to dispatch one jitted
call, so back-to-back calls from Python can measure the host instead of the kernel. kvjax decodes
inside one jitted loop, where no host sits between steps: `chained_seconds` times the same way.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import jax
import jaxlib
import numpy as np


def median_seconds(fn: Callable, *args, repeats: int, inner: int = 1) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back host calls of fn, after one
    warm-up (compile) call. The host's dispatch bounds it from below."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def chain(step: Callable, inner: int) -> Callable:
    """(x, *rest) -> y after `inner` steps y <- x + step(y, *rest) from y = x, as one jitted loop.

    step's output must have x's shape; adding it to the fixed x, not to y, keeps values from growing
    over many steps. Each call reads the previous one's output, so none can be
    merged with or run concurrently with another, as in a decode loop; work in step that does not
    depend on x (on constant lengths, say) may be hoisted out of the loop.
    """
    if inner < 1:
        raise ValueError(f"inner must be at least 1, got {inner}")

    def run(x, *rest):
        def body(_, y):
            return (x + step(y, *rest)).astype(x.dtype)

        return jax.lax.fori_loop(0, inner, body, x)

    return jax.jit(run)


def chained_seconds(step: Callable, x: jax.Array, *rest, repeats: int, inner: int) -> float:
    """Median over `repeats` of the time per step of `chain(step, inner)`: `inner` calls compiled
    into one executable, one host dispatch for them all (after a warm-up, compile, run)."""
    return median_seconds(chain(step, inner), x, *rest, repeats=repeats) / inner


def environment() -> dict:
    """Device, platform, processor and versions, for a benchmark's JSON."""
    return dict(
        device=str(jax.devices()[0]),
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        versions=dict(
            jax=jax.__version__, jaxlib=jaxlib.__version__, numpy=np.__version__, python=platform.python_version()
        ),
    )
