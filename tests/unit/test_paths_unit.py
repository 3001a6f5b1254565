"""Datastore-relative paths on the agent (disks and ISOs), and no shell. Unit tests only: no lab, no QEMU.

The path tests build real datastores in tmp_path, with real symbolic links that lead out of them, and call the
agent's path functions directly. Each refusal must be a 4xx error that says what was wrong, and must leave
everything outside the datastore untouched.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmotion.agent.hv.qemu import mirror
from kvmotion.agent.context import HostContext, safe_path, vm_folder
from kvmotion.agent.hv.qemu.argv import build_argv, cdrom_node, iso_file
from kvmotion.agent.hv.qemu.driver import QemuHypervisor
from kvmotion.agent.storage import AgentStorage, disk_file, lease_files, source_file
from kvmotion.common.errors import ConflictError, InvalidInputError, KvmotionError, NotFoundError
from kvmotion.models.agent import CdromSpec, DiskCopyRequest, DiskSpec, DiskTarget

from test_input_unit import spec      # one VM spec for both files

SRC = Path(__file__).resolve().parents[2] / "src" / "kvmotion"


# ---------------------------------------------------------------------------------------------------------------
# datastore-relative paths on the agent: real datastores, real symbolic links
# ---------------------------------------------------------------------------------------------------------------

class Box(SimpleNamespace):
    ctx: HostContext
    ds: Path
    other: Path
    outside: Path
    secret: Path


@pytest.fixture
def box(tmp_path: Path) -> Box:
    ds, other, outside = tmp_path / "ds", tmp_path / "other", tmp_path / "outside"
    for d in (ds / "vm1", ds / "iso", other / "iso", outside / "vm1"):
        d.mkdir(parents=True)
    secret = outside / "secret.txt"
    secret.write_text("outside the datastore")
    (outside / "vm1" / "vm1.qcow2").write_text("not yours")
    os.utime(secret, (1_000_000_000, 1_000_000_000))
    (ds / "vm1" / "vm1.qcow2").write_text("disk")
    (ds / "iso" / "tools.iso").write_bytes(b"\0" * 4096)
    (other / "iso" / "other.iso").write_bytes(b"\0" * 4096)
    (ds / "escape").symlink_to(outside, target_is_directory=True)       # a folder that leads out
    (ds / "vm1" / "link.qcow2").symlink_to(secret)                       # a file that leads out
    (ds / "iso" / "passwd.iso").symlink_to("/etc/passwd")                # an ISO that leads out
    (ds / "vm1" / "alias.qcow2").symlink_to("vm1.qcow2")                 # a link that stays inside
    (ds / "loop1").symlink_to(ds / "loop2")
    (ds / "loop2").symlink_to(ds / "loop1")
    os.mkfifo(ds / "iso" / "pipe.iso")
    ctx = HostContext(host_name="h1", accelerator="tcg", datastore_paths={"ds": ds, "other": other}, bridges={})
    return Box(ctx=ctx, ds=ds, other=other, outside=outside, secret=secret)


def snapshot(root: Path) -> dict[str, tuple[int, float, bytes]]:
    """Everything under ``root``: size, mtime and content of each file (a change anywhere shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_size, st.st_mtime, p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
    return out


def assert_4xx(exc: pytest.ExceptionInfo[KvmotionError], *words: str) -> None:
    err = exc.value
    assert 400 <= err.http_status < 500, (err.http_status, err)
    assert err.remedy, err
    for w in words:
        assert w in err.message, (w, err.message)


ESCAPES = [("../outside/secret.txt", "'..'"), ("vm1/../../outside/secret.txt", "'..'"), ("/etc/passwd", "absolute"),
           ("escape/secret.txt", "symbolic link"), ("escape/vm1/vm1.qcow2", "symbolic link"),
           ("vm1/link.qcow2", "symbolic link"), ("iso/passwd.iso", "symbolic link"),
           ("vm1/alias.qcow2", "symbolic link"),                  # even a link that stays inside: never followed
           ("escape", "symbolic link"), ("loop1/x", "symbolic link"), ("a\x00b", "NUL byte"),
           ("", "is empty"), (".", "datastore itself"), ("vm1", "is a directory"), ("iso/", "is a directory"),
           ("x" * 300, "longer than 255 bytes")]


@pytest.mark.parametrize("rel,words", ESCAPES, ids=[repr(r[:24]) for r, _ in ESCAPES])
def test_safe_path_refuses(box: Box, rel: str, words: str) -> None:
    before = snapshot(box.outside)
    with pytest.raises(InvalidInputError) as exc:
        safe_path(box.ctx, "ds", rel)
    assert_4xx(exc, words)
    assert exc.value.http_status == 422
    assert snapshot(box.outside) == before


def test_safe_path_accepts_paths_inside(box: Box) -> None:
    assert safe_path(box.ctx, "ds", "vm1/vm1.qcow2") == (box.ds / "vm1" / "vm1.qcow2").resolve()
    assert safe_path(box.ctx, "ds", "vm1/new.qcow2") == (box.ds / "vm1" / "new.qcow2").resolve()    # need not exist
    assert safe_path(box.ctx, "ds", "vm1", directory=True) == (box.ds / "vm1").resolve()
    with pytest.raises(InvalidInputError) as exc:
        safe_path(box.ctx, "ds", "vm1/vm1.qcow2", directory=True)
    assert_4xx(exc, "is a file, not a directory")
    with pytest.raises(ConflictError) as exc2:          # an unknown datastore: 409, not a 500
        safe_path(box.ctx, "nope", "vm1/vm1.qcow2")
    assert_4xx(exc2, "nope")


@pytest.mark.parametrize("rel,words", ESCAPES, ids=[repr(r[:24]) for r, _ in ESCAPES])
def test_disk_paths_refused_everywhere(box: Box, rel: str, words: str) -> None:
    """disk_file, the QEMU command line and a mirror target all go through the same check."""
    disk = DiskSpec(datastore="ds", path=rel)
    for call in (lambda: disk_file(box.ctx, disk),
                 lambda: build_argv(spec(disks=[disk]), box.ctx, box.ds / "run", incoming=False),
                 lambda: mirror.target_blockdev(SimpleNamespace(ctx=box.ctx), disk,
                                                DiskTarget(disk_id="disk0", datastore="ds", path=rel), "d0-m1")):
        with pytest.raises(InvalidInputError) as exc:
            call()
        assert_4xx(exc, words)


FOLDER_ESCAPES = [("../outside", "'..'"), ("escape", "symbolic link"), ("escape/vm1", "symbolic link"),
                  ("/tmp", "absolute"), ("", "is empty"), (".", "datastore itself"), ("vm1/vm1.qcow2", "is a file")]


@pytest.mark.parametrize("folder,words", FOLDER_ESCAPES, ids=[repr(f) for f, _ in FOLDER_ESCAPES])
def test_vm_folder_refuses(box: Box, folder: str, words: str) -> None:
    s = spec(folder=folder)
    for call in (lambda: vm_folder(box.ctx, s), lambda: lease_files(box.ctx, s),
                 lambda: build_argv(s, box.ctx, box.ds / "run", incoming=False)):
        with pytest.raises(InvalidInputError) as exc:
            call()
        assert_4xx(exc, "VM folder", words)


# -- ISO images (CD/DVD local media) ----------------------------------------------------------------------------------

ISO_ESCAPES = [("/etc/passwd", "absolute"), ("../outside/secret.txt", "'..'"), ("escape/secret.txt", "symbolic link"),
               ("iso/passwd.iso", "symbolic link"), ("a\x00b", "NUL byte"), ("iso", "is a directory"),
               (".", "datastore itself"), ("iso/pipe.iso", "not a regular file"), ("loop2/x.iso", "symbolic link")]


@pytest.mark.parametrize("path,words", ISO_ESCAPES, ids=[repr(p) for p, _ in ISO_ESCAPES])
def test_iso_paths_go_through_the_same_check(box: Box, path: str, words: str) -> None:
    cd = CdromSpec(media="local", path=path)
    for call in (lambda: iso_file(box.ctx, cd, "ds"), lambda: cdrom_node(cd, box.ctx, "ds"),
                 lambda: build_argv(spec(cdroms=[cd]), box.ctx, box.ds / "run", incoming=False)):
        with pytest.raises(InvalidInputError) as exc:
            call()
        assert_4xx(exc, "ISO image", words)


def test_iso_paths_inside_a_datastore(box: Box) -> None:
    node = cdrom_node(CdromSpec(media="local", path="iso/tools.iso"), box.ctx, "ds")
    assert node is not None and node["file"]["filename"] == str((box.ds / "iso" / "tools.iso").resolve())
    assert node["read-only"] and node["file"]["read-only"]
    other = cdrom_node(CdromSpec(media="local", path="iso/other.iso", datastore="other"), box.ctx, "ds")
    assert other is not None and other["file"]["filename"] == str((box.other / "iso" / "other.iso").resolve())
    argv = build_argv(spec(cdroms=[CdromSpec(media="local", path="iso/tools.iso")]), box.ctx, box.ds / "run", False)
    assert any(str(box.ds / "iso" / "tools.iso") in a for a in argv)
    with pytest.raises(NotFoundError) as exc:                       # missing image: 404 naming it
        iso_file(box.ctx, CdromSpec(media="local", path="iso/missing.iso"), "ds")
    assert_4xx(exc, "iso/missing.iso", "does not exist")
    with pytest.raises(ConflictError):                              # a datastore this host does not mount: 409
        iso_file(box.ctx, CdromSpec(media="local", path="iso/x.iso", datastore="elsewhere"), "ds")
    assert cdrom_node(CdromSpec(), box.ctx, "ds") is None
    client = cdrom_node(CdromSpec(media="client", nbd="nbd://198.18.0.1:10809/tools"), box.ctx, "ds")
    assert client is not None and client["file"]["server"] == {"type": "inet", "host": "198.18.0.1", "port": "10809"}
    assert client["file"]["export"] == "tools"
    with pytest.raises(InvalidInputError) as exc:                   # a bad port used to be a ValueError: a 500
        cdrom_node(CdromSpec(media="client", nbd="nbd://198.18.0.1:99999/tools"), box.ctx, "ds")
    assert_4xx(exc, "not a valid address")


# -- what the agent does with those paths: nothing outside the datastore changes ---------------------------------------

class FakeAgent(AgentStorage):
    def __init__(self, ctx: HostContext) -> None:
        self.cfg = SimpleNamespace(name="h1")  # type: ignore[assignment]
        self.hv = QemuHypervisor("h1", ctx.datastore_paths["ds"] / "state")
        self.copies, self.nbd_exports = {}, {}
        self._ctx = ctx

    def context(self) -> HostContext:
        return self._ctx


@pytest.mark.parametrize("rel", ["../outside/secret.txt", "escape/secret.txt", "vm1/link.qcow2", "/etc/passwd",
                                 "escape/vm1/vm1.qcow2", "vm1", "a\x00b"])
def test_remove_files_never_deletes_outside(box: Box, rel: str) -> None:
    agent = FakeAgent(box.ctx)
    before, inside = snapshot(box.outside), snapshot(box.ds)
    s = spec(disks=[DiskSpec(datastore="ds", path="vm1/vm1.qcow2"), DiskSpec(id="disk1", node="d1", datastore="ds", path=rel)])
    with pytest.raises(InvalidInputError) as exc:
        agent.remove_files(s, ["disk0", "disk1"], home=False)
    assert_4xx(exc)
    assert snapshot(box.outside) == before and snapshot(box.ds) == inside      # refused as a whole: nothing deleted
    assert box.secret.read_text() == "outside the datastore"


@pytest.mark.parametrize("folder", ["escape", "escape/vm1", "../outside", "/tmp", "."])
def test_remove_home_never_deletes_outside(box: Box, folder: str) -> None:
    agent = FakeAgent(box.ctx)
    before, inside = snapshot(box.outside), snapshot(box.ds)
    with pytest.raises(InvalidInputError):
        agent.remove_files(spec(folder=folder, disks=[]), [], home=True)
    with pytest.raises(InvalidInputError):
        agent.put_home(spec(folder=folder), {"vmlinuz": "", "initrd.img": ""})
    assert snapshot(box.outside) == before and snapshot(box.ds) == inside


def test_remove_files_inside_still_works(box: Box) -> None:
    agent = FakeAgent(box.ctx)
    before = snapshot(box.outside)
    removed = agent.remove_files(spec(), ["disk0"], home=True)
    assert str((box.ds / "vm1" / "vm1.qcow2").resolve()) in removed and not (box.ds / "vm1").exists()
    assert snapshot(box.outside) == before


@pytest.mark.parametrize("source", ["/etc/passwd", "OUTSIDE/secret.txt", "DS/escape/secret.txt", "DS/vm1/link.qcow2",
                                    "DS/../outside/secret.txt", "relative/path", "", "DS/vm1\x00", "DS/vm1"])
def test_disk_copy_reads_only_from_datastores(box: Box, source: str) -> None:
    agent = FakeAgent(box.ctx)
    source = source.replace("OUTSIDE", str(box.outside)).replace("DS", str(box.ds))
    before, inside = snapshot(box.outside), snapshot(box.ds)
    with pytest.raises(InvalidInputError) as exc:
        agent.disk_copy(DiskCopyRequest(source_path=source or None, datastore="other", path="vm1/copy.qcow2"))
    assert_4xx(exc)
    assert snapshot(box.outside) == before and snapshot(box.ds) == inside
    assert not (box.other / "vm1").exists() and agent.copies == {}


@pytest.mark.parametrize("rel", ["../outside/new.qcow2", "escape/new.qcow2", "/tmp/new.qcow2", "vm1", "a\x00b"])
def test_disk_copy_writes_only_into_datastores(box: Box, rel: str) -> None:
    agent = FakeAgent(box.ctx)
    before = snapshot(box.outside)
    with pytest.raises(InvalidInputError) as exc:
        agent.disk_copy(DiskCopyRequest(source_path=str(box.ds / "vm1" / "vm1.qcow2"), datastore="ds", path=rel))
    assert_4xx(exc)
    with pytest.raises(InvalidInputError):
        agent.create_disks(spec(disks=[DiskSpec(datastore="ds", path=rel)]), ["disk0"], {})
    assert snapshot(box.outside) == before and not (box.outside / "new.qcow2").exists()


def test_copy_source_inside_a_datastore(box: Box) -> None:
    assert source_file(box.ctx, str(box.ds / "vm1" / "vm1.qcow2")) == (box.ds / "vm1" / "vm1.qcow2").resolve()
    with pytest.raises(InvalidInputError) as refused:          # a link, even one that stays inside: not followed
        source_file(box.ctx, str(box.ds / "vm1" / "alias.qcow2"))
    assert_4xx(refused, "symbolic link")
    with pytest.raises(NotFoundError) as exc:
        source_file(box.ctx, str(box.ds / "vm1" / "gone.qcow2"))
    assert_4xx(exc, "does not exist")


# ---------------------------------------------------------------------------------------------------------------
# no shell: QEMU and every other program run from argument lists
# ---------------------------------------------------------------------------------------------------------------

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("asyncio", "create_subprocess_shell"), ("pty", "spawn"), ("commands", "getoutput")}
ARGV_CALLS = {"run", "Popen", "call", "check_call", "check_output", "create_subprocess_exec"}


def shell_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"line {node.lineno}: shell={ast.unparse(kw.value)}")
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in SHELL_CALLS:
                found.append(f"line {node.lineno}: {f.value.id}.{f.attr}()")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in ("subprocess", "asyncio") \
                    and f.attr in ARGV_CALLS and node.args and (isinstance(node.args[0], ast.JoinedStr) or (
                        isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))):
                found.append(f"line {node.lineno}: {f.value.id}.{f.attr}() with a command string, not a list")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            if mod in ("os", "subprocess", "asyncio") and {n for _, n in SHELL_CALLS if _ == mod} & set(names):
                found.append(f"line {node.lineno}: imports a shell helper from {mod}")
    return found


def test_scanner_finds_shell_use() -> None:
    bad = ("import os, subprocess, asyncio\nos.system('qemu')\nos.popen('x')\nsubprocess.run('ls -l', shell=True)\n"
           "subprocess.Popen(f'qemu {x}')\nasyncio.create_subprocess_shell('x')\nfrom os import system\n")
    assert len(shell_uses(ast.parse(bad))) == 7
    good = "import subprocess\nsubprocess.run(['qemu-img', 'info', path], shell=False)\n"
    assert shell_uses(ast.parse(good)) == []


def test_no_shell_anywhere_in_kvmotion() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    found = {str(p.relative_to(SRC)): uses for p in files if (uses := shell_uses(ast.parse(p.read_text(), str(p))))}
    assert found == {}
    for p in files:                                  # and not even spelled out in a string or a comment
        text = p.read_text()
        for needle in ("shell=True", "os.system(", "os.popen(", "create_subprocess_shell"):
            assert needle not in text, f"{p.relative_to(SRC)} contains {needle}"


def test_qemu_command_line_is_an_argument_list(box: Box) -> None:
    argv = build_argv(spec(name="odd.name_1", cdroms=[CdromSpec(media="local", path="iso/tools.iso")]), box.ctx,
                      box.ds / "run", incoming=True)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[0] == "qemu-system-x86_64" and "-incoming" in argv
    assert argv[argv.index("-name") + 1] == "guest=odd.name_1,debug-threads=on"
