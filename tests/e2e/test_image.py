"""Tests for kvmotion_lab.image: unit tests plus real TCG boots of the built guest."""

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

from kvmotion_lab.image import (
    BASE_CMDLINE,
    GuestImage,
    ImageBuildError,
    build_image,
    cached_image,
    default_cache_dir,
    kernel_cmdline,
)
from kvmotion_lab.image import guest_init
from kvmotion_lab.image.cpio import CpioArchive
from kvmotion_lab.image.kernel import is_static_elf, mod_name
from labtools import record_figure

QEMU = "qemu-system-x86_64"
READY_RE = re.compile(r"^KVMOTION-READY ip=(\S+)$")
HEARTBEAT_RE = re.compile(r"^KVMOTION-HEARTBEAT seq=(\d+) uptime=(\d+\.\d+) boot_id=([0-9a-f-]{36})$")
DIRTIER_RE = re.compile(r"^KVMOTION-DIRTIER rate=(\S+) region=(\d+) chunk=(\d+)$")
BOOT_DEADLINE = 60.0
GUEST_UUID = "6f1c3a52-9d0e-4b7a-8c21-5e4f3d2b1a09"
GUEST_SERIAL = "kvm-serial.test_42"
GUEST_MAC = "52:54:00:12:34:56"


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
    record_figure("guest image build, cached", time.monotonic() - t0, "s")
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


def _script_function(name: str) -> str:
    """The text of one shell function of the guest's /init, from ``name() {`` to its closing ``}``."""
    m = re.search(rf"^{name}\(\) {{.*?^}}\n", guest_init.INIT_SCRIPT, re.S | re.M)
    assert m, f"no function {name} in INIT_SCRIPT"
    return m.group(0)


@pytest.fixture(scope="module")
def guest_sh(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The image's own busybox (what runs /init in the guest) and a scratch dir standing in for / of the guest."""
    work = tmp_path_factory.mktemp("guest-sh")
    busybox = work / "busybox"
    busybox.write_bytes(_parse_newc(gzip.decompress(image.initrd.read_bytes()))["bin/busybox"][1])
    busybox.chmod(0o755)
    (work / "run").mkdir()
    (work / "www").mkdir()
    yield busybox, work


def _in_scratch(text: str, root: Path) -> str:
    return text.replace("/run/kvmotion/", f"{root}/run/").replace("/www/", f"{root}/www/")


STATE_VARS = ("SEQ=0; DMB=0; RACK=0; _u=1.00; BOOT_ID=b00t; KHOST=h; KDIRTY=20; ADDR=none; "
              f"SMUUID={GUEST_UUID}; SMSERIAL={GUEST_SERIAL}; MACS='\"{GUEST_MAC}\", \"52:54:00:00:00:02\"'")


def test_heartbeat_keeps_the_last_counters_when_a_file_is_empty_or_garbage(guest_sh: tuple[Path, Path]) -> None:
    """write_state() never turns a counter file that is being rewritten (empty) or garbled into 0."""
    busybox, root = guest_sh
    script = f"""{_in_scratch(_script_function("write_state"), root)}
{STATE_VARS}
echo 7 > {root}/run/dirtied_mb; echo 3 > {root}/run/records_acked; write_state; cat {root}/www/heartbeat
: > {root}/run/dirtied_mb; : > {root}/run/records_acked; write_state; cat {root}/www/heartbeat
echo x1 > {root}/run/dirtied_mb; echo 9z > {root}/run/records_acked; write_state; cat {root}/www/heartbeat
rm {root}/run/dirtied_mb {root}/run/records_acked; write_state; cat {root}/www/heartbeat
echo 8 > {root}/run/dirtied_mb; echo 4 > {root}/run/records_acked; write_state; cat {root}/www/heartbeat
"""
    res = subprocess.run([str(busybox), "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    beats = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [(b["dirtied_mb"], b["records_acked"]) for b in beats] == [(7, 3), (7, 3), (7, 3), (7, 3), (8, 4)]
    assert beats[0]["smbios_uuid"] == GUEST_UUID and beats[0]["smbios_serial"] == GUEST_SERIAL
    assert beats[0]["macs"] == [GUEST_MAC, "52:54:00:00:00:02"]


def test_dirtied_mb_never_goes_backwards_under_concurrent_updates(guest_sh: tuple[Path, Path]) -> None:
    """The dirtier's way of publishing its counter (taken from /init) racing write_state() (also from /init):
    1500 heartbeats, none may show a smaller dirtied_mb than the one before (a truncate-then-write publisher
    showed an empty file, i.e. 0, dozens of times in 3000 on the development machine)."""
    busybox, root = guest_sh
    publish = [ln.strip() for ln in _script_function("dirtier").splitlines()
               if "/run/kvmotion/dirtied_mb" in ln and not ln.strip().startswith("#")]
    assert publish, "the dirtier no longer publishes /run/kvmotion/dirtied_mb"
    script = f"""{_in_scratch(_script_function("write_state"), root)}
{STATE_VARS}
echo 0 > {root}/run/dirtied_mb; echo 0 > {root}/run/records_acked
( wkb=0; while :; do wkb=$((wkb + 1024)); {_in_scratch("; ".join(publish), root)}; done ) &
W=$!
last=0; back=0; top=0; i=0
while [ $i -lt 1500 ]; do
    write_state
    read -r line < {root}/www/heartbeat
    v=${{line#*dirtied_mb?: }}; v=${{v%%,*}}
    [ "$v" -lt "$last" ] && back=$((back + 1))
    [ "$v" -gt "$top" ] && top=$v
    last=$v; i=$((i + 1))
done
kill $W
echo "back=$back top=$top"
"""
    res = subprocess.run([str(busybox), "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    m = re.search(r"back=(\d+) top=(\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert int(m.group(2)) > 0, "the publisher never ran"
    assert int(m.group(1)) == 0, f"dirtied_mb went backwards {m.group(1)} times in 1500 heartbeats"


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
    from kvmotion_lab.image import kernel

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
           "-smbios", f"type=1,manufacturer=kvmotion,product=kvmotion-vm,serial={GUEST_SERIAL},uuid={GUEST_UUID}",
           "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
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
        record_figure("guest boot to KVMOTION-READY (TCG, 256 MiB)", time.monotonic() - g.started, "s")
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
        assert (first["smbios_uuid"], first["smbios_serial"], first["macs"]) == (GUEST_UUID, GUEST_SERIAL,
                                                                                 [GUEST_MAC])
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
        # the counters as a client sees them: read over and over, dirtied_mb never goes back
        seen = [first]
        end = time.monotonic() + 5
        while time.monotonic() < end:
            seen.append(g.heartbeat())
        second = seen[-1]
        dmb = [int(b["dirtied_mb"]) for b in seen]
        assert all(b <= a for b, a in zip(dmb, dmb[1:])), f"dirtied_mb went backwards: {dmb}"
        assert all(b["boot_id"] == b1 for b in seen)
        assert all(b["smbios_uuid"] == GUEST_UUID and b["macs"] == [GUEST_MAC] for b in seen)
        elapsed = float(second["uptime"]) - float(first["uptime"])
        assert int(second["seq"]) > int(first["seq"]) and elapsed > 0
        rate = (dmb[-1] - dmb[0]) / elapsed
        print(f"{len(seen)} heartbeats; guest-reported dirty rate {rate:.1f} MB/s, QMP page-sampling {res}")
        record_figure("guest dirtier, guest-reported rate (asked for 20 MB/s)", rate, "MB/s")
        assert rate > 0, "the dirtier's counter did not increase"
        assert res.get("status") == "measured", res
        record_figure("guest dirtier, QMP calc-dirty-rate sample (asked for 20 MB/s)", float(res["dirty-rate"]),
                      "MB/s")


def test_boot_dhcp_no_dirtier(image: GuestImage) -> None:
    with boot(image, kernel_cmdline(extra="kvmotion.hostname=dhcp-guest")) as g:
        ready = g.wait_for(READY_RE, g.started + BOOT_DEADLINE)[0]
        assert ready.group(1) == "198.18.250.15"  # slirp's DHCP server
        g.wait_for(HEARTBEAT_RE, time.monotonic() + 15, count=1)
        hb = g.heartbeat()
        assert hb["hostname"] == "dhcp-guest" and hb["dirty_mb_s"] == 0 and hb["dirtied_mb"] == 0
        assert (hb["smbios_uuid"], hb["smbios_serial"], hb["macs"]) == (GUEST_UUID, GUEST_SERIAL, [GUEST_MAC])
        assert not any(DIRTIER_RE.match(ln) for ln in g.lines())
