"""pytest plugin: a test whose xdist worker dies runs once more on a fresh worker (jaxlib 0.10 only).

jaxlib 0.10.2's CPU JIT sometimes unmaps compiled code whose EH frames it left registered with libgcc; the
next C++ exception thrown anywhere in that worker then segfaults inside `_Unwind_Find_FDE`, in whichever
test is running. So a test whose worker dies is scheduled again, at most MAX_CRASH_RERUNS times a session,
and the summary names it; a test that kills its worker again, or a further death, fails as before. On any
other jaxlib the plugin does nothing: a dead worker is a failure.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest

MAX_CRASH_RERUNS = 2
ACTIVE = version("jaxlib").startswith("0.10.")
_reruns: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem, report, sched):
    """pytest-xdist lost a worker while it ran `crashitem`: schedule it again (see above)."""
    if not ACTIVE or crashitem in _reruns or len(_reruns) >= MAX_CRASH_RERUNS:
        return None
    _reruns.append(crashitem)
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"
    return True


def pytest_report_teststatus(report):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter):
    if _reruns:
        terminalreporter.write_sep("=", "run again after their worker died (tests/support/crash_rerun.py)", yellow=True)
        for nodeid in _reruns:
            terminalreporter.write_line(nodeid)
