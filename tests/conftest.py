"""Shared by every test: the markers by directory (tests/unit: ``unit``, tests/e2e: ``e2e``) and the count of
excused tests. The lab's fixtures are in tests/e2e/conftest.py, its helpers in tests/e2e/labtools.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MARKERS = {"unit": "unit", "e2e": "e2e"}           # folder under tests/ -> marker
EXCUSED_PREFIX = "EXCUSED["
_excused: list[tuple[str, str]] = []          # (test id, reason) of every excused expected failure in this run


def _xfail_reason(report: pytest.TestReport) -> str | None:
    """The reason of an expected failure (pytest.xfail() or an xfail mark whose test failed), else None; an XPASS
    (outcome "passed") excused nothing."""
    if not hasattr(report, "wasxfail") or report.outcome != "skipped":
        return None
    reason = report.wasxfail or ""
    return reason[len("reason: "):] if reason.startswith("reason: ") else reason


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the excused tests (labtools.excuse: an exact, proven QEMU failure signature) of this run."""
    reason = _xfail_reason(report)
    if reason is not None and reason.startswith(EXCUSED_PREFIX):
        _excused.append((report.nodeid, reason))
        _write_excused()


def _write_excused() -> None:
    """The count for CI (``$KVMOTION_EXCUSED_FILE``): written at the start, at each excuse, and at the end."""
    out = os.environ.get("KVMOTION_EXCUSED_FILE")
    if out:
        Path(out).write_text(f"{len(_excused)}\n")


def pytest_sessionstart(session: pytest.Session) -> None:
    _write_excused()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001 - pytest hook
    terminalreporter.write_sep("-", "excused tests (proven QEMU failure signatures)")
    for nodeid, reason in _excused:
        terminalreporter.write_line(f"{nodeid}: {reason}")
    terminalreporter.write_line(f"excused tests: {len(_excused)}")
    _write_excused()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test gets the marker of its folder (``pytest -m unit`` runs tests/unit), unless it carries a ``unit`` or
    ``e2e`` mark of its own: a test in tests/unit that needs root and a namespace is marked ``e2e`` in place."""
    for item in items:
        try:
            folder = Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if folder in MARKERS and not any(item.get_closest_marker(m) for m in MARKERS.values()):
            item.add_marker(MARKERS[folder])
