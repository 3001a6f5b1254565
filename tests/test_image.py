"""Tests for kvmotion.image: unit tests plus real TCG boots of the built guest."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmotion.image import (
    BASE_CMDLINE,
    GuestImage,
    ImageBuildError,
    build_image,
    cached_image,
    default_cache_dir,
    kernel_cmdline,
)
from kvmotion.image.cpio import CpioArchive
from kvmotion.image.kernel import is_static_elf, mod_name

QEMU = "qemu-system-x86_64"
READY_RE = re.compile(r"^KVMOTION-READY ip=(\S+)$")
HEARTBEAT_RE = re.compile(r"^KVMOTION-HEARTBEAT seq=(\d+) uptime=(\d+\.\d+) boot_id=([0-9a-f-]{36})$")
DIRTIER_RE = re.compile(r"^KVMOTION-DIRTIER rate=(\S+) region=(\d+) chunk=(\d+)$")
BOOT_DEADLINE = 60.0


# --------------------------------------------------------------------------- unit tests


def test_kernel_cmdline_full() -> None:
    line = kernel_cmdline(ip="198.18.2.3/24", gateway="198.18.2.1", dirty_mb_s=20.0,
                          dirty_region_mb=32, extra=" kvmotion.hostname=vm1 ")
    assert line == ("kvmotion.ip=198.18.2.3/24 kvmotion.gw=198.18.2.1 kvmotion.dirty=20 "
                    "kvmotion.dirty_region=32 kvmotion.hostname=vm1")


def test_kernel_cmdline_defaults_and_normalisation() -> None:
    assert kernel_cmdline() == "kvmotion.dirty=0 kvmotion.dirty_region=64"
    assert kernel_cmdline(ip="198.19.7.9", dirty_mb_s=2.5).split() == [
        "kvmotion.ip=198.19.7.9/24", "kvmotion.dirty=2.5", "kvmotion.dirty_region=64"]
    full = f"{BASE_CMDLINE} {kernel_cmdline(ip='198.18.0.2/16')}"
    assert full.startswith("console=ttyS0 quiet panic=-1 kvmotion.ip=198.18.0.2/16 ")


@pytest.mark.parametrize("kwargs", [
    {"ip": "198.18.0.300/24"}, {"ip": "198.18.0.1/33"}, {"gateway": "nope"},
    {"dirty_mb_s": -1.0}, {"dirty_mb_s": float("nan")}, {"dirty_mb_s": float("inf")},
    {"dirty_region_mb": 0}, {"dirty_region_mb": 1.5},
])
def test_kernel_cmdline_rejects_bad_input(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        kernel_cmdline(**kwargs)  # type: ignore[arg-type]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KVMOTION_IMAGE_DIR", raising=False)
    assert default_cache_dir() == Path("/var/lib/kvmotion/image")
    monkeypatch.setenv("KVMOTION_IMAGE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_image_build_error_is_exception() -> None:
    assert issubclass(ImageBuildError, Exception)


def test_cached_image_none_when_empty(tmp_path: Path) -> None:
    assert cached_image(tmp_path) is None
    assert cached_image(tmp_path / "missing") is None


def test_mod_name() -> None:
    assert mod_name("kernel/drivers/net/virtio_net.ko.xz") == "virtio_net"
    assert mod_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert mod_name("a/b/foo.ko.zst") == "foo"


def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    out: dict[str, tuple[int, bytes, int, int]] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos: pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, rmaj, rmin)


def test_cpio_writer_roundtrip() -> None:
    arc = CpioArchive()
    arc.add_file("etc/x/hello.txt", b"hello", 0o640)
    arc.add_symlink("bin/sh", "/bin/busybox")
    arc.add_chardev("dev/console", 5, 1)
    blob = arc.to_gzip()
    assert blob == arc.to_gzip()  # deterministic
    entries = _parse_newc(gzip.decompress(blob))
    assert entries["etc/x/hello.txt"][0] == 0o100640 and entries["etc/x/hello.txt"][1] == b"hello"
    assert entries["etc"][0] == 0o040755 and entries["etc/x"][0] == 0o040755
    assert entries["bin/sh"][0] == 0o120777 and entries["bin/sh"][1] == b"/bin/busybox"
    assert entries["dev/console"][0] == 0o020600 and entries["dev/console"][2:] == (5, 1)
    with pytest.raises(ValueError):
        arc.add_file("../evil", b"")


# --------------------------------------------------------------------------- built image


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(log=lambda msg: print(f"[image] {msg}"))


def test_build_is_cached_and_valid(image: GuestImage) -> None:
    t0 = time.monotonic()
    again = build_image(log=lambda msg: None)
    assert time.monotonic() - t0 < 10
    assert again == image
    assert cached_image() == image
    assert image.kernel.stat().st_size > 1_000_000
    assert image.version and image.kernel.parent.name == image.version
    man = json.loads((image.kernel.parent / "manifest.json").read_text())
    assert man["version"] == image.version
    assert {"virtio", "virtio_ring", "virtio_pci", "virtio_net", "virtio_blk"} <= set(
        man["modules"]) | set(man["builtin_skipped"])
    entries = _parse_newc(gzip.decompress(image.initrd.read_bytes()))
    assert entries["init"][0] & 0o111
    assert entries["www/cgi-bin/heartbeat"][0] & 0o111
    assert entries["bin/sh"][1] == b"/bin/busybox"
    assert entries["dev/console"][2:] == (5, 1)
    listed = entries["etc/kvmotion/modules"][1].decode().split()
    assert listed == [f"{m}.ko" for m in man["modules"]]
    assert all(f"lib/modules/{m}" in entries for m in listed)
    busybox_tmp = Path(tempfile.mkdtemp()) / "busybox"
    try:
        busybox_tmp.write_bytes(entries["bin/busybox"][1])
        assert is_static_elf(busybox_tmp)
    finally:
        shutil.rmtree(busybox_tmp.parent)


def test_cached_image_rejects_corruption(image: GuestImage, tmp_path: Path) -> None:
    shutil.copytree(image.kernel.parent, tmp_path / image.version)
    copy = cached_image(tmp_path)
    assert copy is not None and copy.initrd == tmp_path / image.version / "initrd.img"
    with (tmp_path / image.version / "initrd.img").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"corrupt")
    assert cached_image(tmp_path) is None


def test_build_uses_cache_when_apt_cannot_resolve(image: GuestImage, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With empty/unusable apt lists, build_image falls back to a valid cached image."""
    from kvmotion.image import kernel

    shutil.copytree(image.kernel.parent, tmp_path / image.version)
    monkeypatch.setattr(kernel, "query_kernel_package", lambda meta=kernel.META_PACKAGE: None)

    def no_update(log: object) -> None:
        raise AssertionError("apt-get update must not run when a cached image exists")

    monkeypatch.setattr(kernel, "apt_update", no_update)
    got = build_image(tmp_path, log=lambda msg: None)
    assert got.initrd == tmp_path / image.version / "initrd.img"


# --------------------------------------------------------------------------- TCG boots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    serial: Path
    qmp: Path
    port: int
    started: float

    def lines(self) -> list[str]:
        try:
            text = self.serial.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        # only complete lines; tolerate \r\n
        return [ln.rstrip("\r") for ln in text.split("\n")[:-1]]

    def wait_for(self, pattern: re.Pattern[str], deadline: float, count: int = 1) -> list[re.Match[str]]:
        while True:
            found = [m for ln in self.lines() if (m := pattern.match(ln))]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}); serial:\n" + "\n".join(self.lines()))
            if time.monotonic() > deadline:
                pytest.fail(f"timeout waiting for {pattern.pattern}; serial:\n" + "\n".join(self.lines()))
            time.sleep(0.1)

    def http(self, path: str) -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
            return resp.headers.get("Content-Type", ""), resp.read().decode()

    def heartbeat(self) -> dict[str, Any]:
        ctype, body = self.http("/cgi-bin/heartbeat")
        assert ctype.startswith("application/json")
        data = json.loads(body)
        assert isinstance(data, dict)
        return data

    def qmp_cmd(self, execute: str, **arguments: object) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp))
            f = s.makefile("rw")

            def reply() -> dict[str, Any]:
                while True:
                    msg: dict[str, Any] = json.loads(f.readline())
                    if "event" not in msg:
                        return msg

            reply()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": execute, "arguments": arguments}):
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                ans = reply()
                assert "return" in ans, ans
            ret: dict[str, Any] = ans["return"]
            return ret


@contextmanager
def boot(image: GuestImage, append: str) -> Iterator[Guest]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (apt-get install qemu-system-x86)")
    workdir = Path(tempfile.mkdtemp(prefix="kvimg-", dir="/tmp"))  # short path for the QMP socket
    port = _free_port()
    serial, qmp = workdir / "serial.log", workdir / "qmp.sock"
    cmd = [QEMU, "-accel", "tcg", "-machine", "pc-q35-7.2", "-m", "256", "-smp", "1",
           "-nodefaults", "-display", "none", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
           "-append", f"{BASE_CMDLINE} {append}", "-serial", f"file:{serial}",
           "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
           "-netdev", f"user,id=n0,net=198.18.250.0/24,host=198.18.250.2,dhcpstart=198.18.250.15,hostfwd=tcp:127.0.0.1:{port}-:80",
           "-qmp", f"unix:{qmp},server=on,wait=off"]
    with (workdir / "qemu.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Guest(proc, serial, qmp, port, time.monotonic())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def test_boot_static_ip_heartbeat_http_and_dirtier(image: GuestImage) -> None:
    append = kernel_cmdline(ip="198.18.250.15/24", gateway="198.18.250.2", dirty_mb_s=20)
    with boot(image, append) as g:
        deadline = g.started + BOOT_DEADLINE
        ready = g.wait_for(READY_RE, deadline)[0]
        print(f"KVMOTION-READY after {time.monotonic() - g.started:.2f}s")
        assert ready.group(1) == "198.18.250.15"
        dirtier = g.wait_for(DIRTIER_RE, deadline)[0]
        assert (dirtier.group(1), dirtier.group(2)) == ("20", "64")

        beats = g.wait_for(HEARTBEAT_RE, time.monotonic() + 15, count=2)
        (s1, _, b1), (s2, _, b2) = beats[0].groups(), beats[1].groups()
        assert int(s2) > int(s1) and b1 == b2

        first = g.heartbeat()
        assert set(first) >= {"seq", "uptime", "boot_id", "hostname", "dirty_mb_s"}
        assert first["boot_id"] == b1 and first["hostname"] == "kvmotion-guest"
        assert first["dirty_mb_s"] == 20 and first["ip"] == "198.18.250.15"
        assert isinstance(first["seq"], int) and isinstance(first["uptime"], float)
        _, static = g.http("/heartbeat")
        assert json.loads(static)["boot_id"] == b1
        _, index = g.http("/")
        assert "kvmotion guest" in index and "/cgi-bin/heartbeat" in index

        # host-side measurement that guest RAM really gets dirtied
        g.qmp_cmd("calc-dirty-rate", **{"calc-time": 2})
        time.sleep(2.2)
        for _ in range(40):
            res = g.qmp_cmd("query-dirty-rate")
            if res.get("status") == "measured":
                break
            time.sleep(0.25)
        second = g.heartbeat()
        elapsed = float(second["uptime"]) - float(first["uptime"])
        assert second["boot_id"] == b1 and int(second["seq"]) > int(first["seq"])
        rate = (int(second["dirtied_mb"]) - int(first["dirtied_mb"])) / elapsed
        print(f"guest-reported dirty rate {rate:.1f} MB/s, QMP page-sampling {res}")
        assert 12 <= rate <= 28
        assert res.get("status") == "measured" and int(res["dirty-rate"]) >= 4


def test_boot_dhcp_no_dirtier(image: GuestImage) -> None:
    with boot(image, kernel_cmdline(extra="kvmotion.hostname=dhcp-guest")) as g:
        ready = g.wait_for(READY_RE, g.started + BOOT_DEADLINE)[0]
        assert ready.group(1) == "198.18.250.15"  # slirp's DHCP server
        g.wait_for(HEARTBEAT_RE, time.monotonic() + 15, count=1)
        hb = g.heartbeat()
        assert hb["hostname"] == "dhcp-guest" and hb["dirty_mb_s"] == 0 and hb["dirtied_mb"] == 0
        assert not any(DIRTIER_RE.match(ln) for ln in g.lines())
