"""Shared fixtures: a real lab (namespaces, controller, agents, QEMU guests), always torn down."""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

LAB_ROOT_BASE = Path("/tmp/kvmotion-tests")
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


def leftovers(prefix: str, root: Path) -> dict[str, list[str]]:
    """Namespaces and QEMU processes that belong to the lab (prefix, root) and still exist."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    ours_ns = [n for n in ns if n.startswith(prefix + "-")]
    qemus = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"qemu-system") and str(root).encode() in cmd:
            qemus.append(pid)
    return {"namespaces": ours_ns, "qemu_pids": qemus}


@pytest.fixture(scope="session")
def guest_image():
    from kvmotion_lab.image.build import build_image

    return build_image(log=lambda m: None)


@contextlib.contextmanager
def running_lab(image, hosts: int, ipv6_hosts: frozenset[str] = frozenset(), link: str | None = None) -> Iterator:
    """A lab for one test module. Torn down at the end, also when a test fails; nothing may be left."""
    from kvmotion_lab import lab as lab_mod

    prefix = "kt" + secrets.token_hex(2)
    root = LAB_ROOT_BASE / prefix
    info = lab_mod.up(hosts, root, prefix=prefix, image_dir=image.kernel.parent.parent, ipv6_hosts=set(ipv6_hosts),
                      log=lambda m: None, link=link)
    old_token = os.environ.get("KVMOTION_TOKEN_FILE")
    os.environ["KVMOTION_TOKEN_FILE"] = str(lab_mod.admin_token_path(root))   # the Client and the CLI use it
    try:
        yield info
    finally:
        if old_token is None:
            os.environ.pop("KVMOTION_TOKEN_FILE", None)
        else:
            os.environ["KVMOTION_TOKEN_FILE"] = old_token
        lab_mod.down(root)
        left = leftovers(prefix, root)
        assert left == {"namespaces": [], "qemu_pids": []}, f"the lab left things behind: {left}"


@pytest.fixture(scope="module")
def lab(guest_image):
    with running_lab(guest_image, 2) as info:
        yield info
