"""Device time per XLA operation, from a profiler trace: which kernels and fusions a jitted loop spends on.

`jax.profiler.trace` records each executed HLO operation, named by an `hlo_op` stat (on a GPU's kernels
also by XLA's annotation): a kernel on a GPU's streams, an op on a TPU core, a thunk on the host's
threads on CPU. `profile_ops` runs a function once
under the profiler and sums those records by operation and by kind (the kernel's name without XLA's
numeric suffix), per step of the loop it ran. Kernel times are the profiler's; the gaps between
kernels under tracing can differ from an untraced run, so `busy` against `wall` is only indicative.
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
from jax.profiler import ProfileData

_SUFFIX = re.compile(r"(\.\d+)+$")  # fusion.12, loop_add_fusion.3.1
_ANNOTATION = re.compile(r"hlo_op=([^,#]+)(?:,hlo_module=([^,#]+))?")  # XLA's GPU kernel annotation


def _attribution(stats: dict) -> tuple[str, str]:
    """(module, HLO operation) an event ran, from its stats or the "Thunk:#hlo_op=...,hlo_module=...#"
    annotation XLA's GPU runtime puts on its kernels; op "" where it names none."""
    if "hlo_op" in stats:
        return str(stats.get("hlo_module", "")), str(stats["hlo_op"])
    found = _ANNOTATION.search(str(stats.get("annotation", "")))
    return (found.group(2) or "", found.group(1)) if found else ("", "")


def _outermost_removed(events: list) -> Iterator[tuple[str, str, str, float]]:
    """(module, op, kernel, ns) of one thread's or stream's events, leaving out each event whose span
    holds the next one (a CPU while or conditional around its body): no time is counted twice."""
    spans = sorted(events, key=lambda e: (e.start_ns, -e.end_ns))
    for event, following in zip(spans, [*spans[1:], None]):
        if following is None or following.start_ns >= event.end_ns:
            yield *_attribution(dict(event.stats)), event.name, event.end_ns - event.start_ns


def hlo_events(profile: ProfileData) -> list[tuple[str, str, str, float]]:
    """(module, hlo op, kernel name, duration ns) of the HLO operations a trace recorded: on the device
    planes (GPU, TPU) where they hold any (every device event when none names its operation: it is
    still device time), else the host's (CPU)."""
    for prefix in ("/device:", "/host:"):
        events = []
        for line in (line for plane in profile.planes if plane.name.startswith(prefix) for line in plane.lines):
            named = [e for e in line.events if _attribution(dict(e.stats))[1]]
            events += _outermost_removed(named or (list(line.events) if prefix == "/device:" else []))
        if any(op for _, op, _, _ in events) or events and prefix == "/device:":
            return events
    return []


def summarize(events: Iterable[tuple[str, str, str, float]], steps: int, top: int, module: str | None = None) -> dict:
    """Per step of a loop of `steps`: every module's time, and for `module` (all when None) the busy
    time and the `top` operations (module, op, kernel) and kernel kinds by time, each with its calls,
    time and share of the busy time."""
    calls, times = collections.Counter(), collections.Counter()
    for key in events:
        calls[key[:3]] += 1
        times[key[:3]] += key[3]

    def ranked(keep: Callable[[tuple], bool], group: Callable[[tuple], tuple], names: tuple[str, ...]) -> list[dict]:
        group_calls, group_times = collections.Counter(), collections.Counter()
        for key, ns in times.items():
            if keep(key):
                group_calls[group(key)] += calls[key]
                group_times[group(key)] += ns
        total = sum(group_times.values())
        return [
            {
                **dict(zip(names, key)),
                "calls_per_step": group_calls[key] / steps,
                "us_per_step": ns / steps / 1e3,
                "share": ns / total if total else 0.0,
            }
            for key, ns in group_times.most_common(top)
        ]

    def selected(key: tuple) -> bool:
        return module is None or key[0] == module

    return {
        "modules": ranked(lambda key: True, lambda key: key[:1], ("module",)),
        "busy_us_per_step": sum(ns for key, ns in times.items() if selected(key)) / steps / 1e3,
        "ops": ranked(selected, lambda key: key, ("module", "op", "kernel")),
        "kinds": ranked(selected, lambda key: (_SUFFIX.sub("", key[2]),), ("kind",)),
    }


def profile_ops(run: Callable[[], Any], steps: int = 1, top: int = 20, module: str | None = None) -> dict:
    """`summarize` of one traced call of `run` (already compiled), plus its wall time per step. module:
    the HLO module to break down (e.g. "jit__decode", the loop; not the eager ops around it), where the
    trace names modules at all."""
    if steps < 1 or top < 1:
        raise ValueError(f"steps and top must be at least 1, got {steps} and {top}")
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            jax.block_until_ready(run())
            wall = time.perf_counter() - start
        paths = sorted(Path(trace_dir).rglob("*.xplane.pb"))
        if not paths:
            raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
        events = hlo_events(ProfileData.from_file(str(paths[-1])))
    if not events:
        raise RuntimeError("the trace holds no HLO operation: did `run` execute a jitted function?")
    named = {m for m, *_ in events if m}
    if module is not None and named and module not in named:
        raise RuntimeError(f"the trace holds no operation of module {module!r}; it holds {sorted(named)}")
    return {"wall_us_per_step": wall / steps * 1e6, **summarize(events, steps, top, module if named else None)}
