"""pytest plugin of `make gpu` (tools/gpu.py loads it with `-p gpu_pytest`): a deadline and a report.

VITFAST_TEST_DEADLINE (seconds since the epoch): tests that would start after it are not run; each is
reported as NOT-RUN, never as passed or skipped, so the summary says what the time box left out.
VITFAST_TEST_REPORT (a path): one line per test, written as each test ends (a run killed mid-way
keeps the lines so far): `OUTCOME nodeid seconds [message]`, OUTCOME one of PASSED, FAILED, ERROR,
SKIPPED, NOT-RUN.
"""

from __future__ import annotations

import os
import time

import pytest

DEADLINE = float(os.environ.get("VITFAST_TEST_DEADLINE", "inf"))
NOT_RUN = "not run: the time box of make gpu ran out before this test"
_report = None


def pytest_configure(config):
    global _report
    path = os.environ.get("VITFAST_TEST_REPORT")
    if path:
        _report = open(path, "w", buffering=1)


def _write(outcome: str, nodeid: str, seconds: float, message: str = "") -> None:
    if _report is not None:
        first = message.strip().splitlines()[0][:200] if message.strip() else ""
        _report.write(f"{outcome} {nodeid} {seconds:.2f}s{' ' + first if first else ''}\n")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if time.time() > DEADLINE:
        pytest.skip(NOT_RUN)


def pytest_runtest_logreport(report):
    """One line per test: its failure wherever it happened (setup, call, teardown), else its call outcome."""
    if report.when == "setup" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _write("NOT-RUN" if NOT_RUN in reason else "SKIPPED", report.nodeid, report.duration, reason)
    elif report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)     # the `E   ...` line of the traceback
        _write("FAILED" if report.when == "call" else "ERROR", report.nodeid, report.duration,
               crash.message if crash is not None else str(report.longrepr))
    elif report.when == "call":
        _write("SKIPPED" if report.skipped else "PASSED", report.nodeid, report.duration)


def pytest_unconfigure(config):
    if _report is not None:
        _report.close()
