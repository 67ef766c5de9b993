"""A skipped test is a test that did not run: on CI (``CI`` set) every skip fails the run
unless it is on the allow-list below, with the reason it may skip there.

Run locally without ``CI`` and skips are only reported (``-ra``), so a laptop without
Chromium or the wasm32 Rust toolchain can still run the rest.
"""

from __future__ import annotations

import os

import pytest

#: node id (or a prefix of one) -> why it may skip on CI.  Keep it short.
ALLOWED: dict[str, str] = {}

_skipped: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report)


def unexpected(nodeids: list[str], allowed: dict[str, str] = ALLOWED) -> list[str]:
    return [n for n in nodeids if not any(n.startswith(k) for k in allowed)]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get("CI"):
        return
    bad = unexpected([r.nodeid for r in _skipped])
    if bad:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{len(bad)} test(s) skipped on CI and not on tests/skip_gate.py's allow-list:"]
        for r in _skipped:
            if r.nodeid in bad:
                reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
                lines.append(f"  {r.nodeid}: {reason}")
        if tr is not None:
            tr.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
