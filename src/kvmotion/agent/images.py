"""Disk image files: create, measure, copy (with progress), compare, export read-only over NBD (always TLS).

Every tool runs as an argument list with a deadline; nothing goes through a shell.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from kvmotion.agent.diskkeys import encrypted_secret_args, master_object, write_master
from kvmotion.agent.nbdtls import NbdCreds, qemu_img_source, qemu_nbd_tls_argv
from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError, QemuStartFailed
from kvmotion.models.agent import DiskCopyRequest, DiskCopyStatus, DiskExport
from kvmotion.models.nbd import parse_nbd

FORMATS = ("qcow2", "raw")
MAX_COPY_JOBS_KEPT = 64


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidInputError(f"disk format {fmt!r} is not supported", remedy="use qcow2 or raw")


def create_image(path: Path, fmt: str, size_mb: int, *, preallocate: bool = False,
                 passphrase: str | None = None) -> None:
    """``qemu-img create``; an encrypted image gets LUKS inside qcow2, its passphrase passed encrypted (under a
    master secret in a private folder off the datastore, removed afterwards)."""
    _check_format(fmt)
    if passphrase is not None and fmt != "qcow2":
        raise InvalidInputError("an encrypted disk must be qcow2 (LUKS inside qcow2)", remedy="use --disk-format qcow2")
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if preallocate:
        argv += ["-o", "preallocation=falloc" if fmt == "raw" else "preallocation=metadata"]
    with tempfile.TemporaryDirectory(prefix="kvmotion-key-") as key_dir:
        if passphrase is not None:
            master_file = Path(key_dir) / "master.key"
            master = write_master(master_file)
            argv += ["--object", master_object(master_file),
                     "--object", encrypted_secret_args("sec0", passphrase, master),
                     "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=200"]
        # LUKS measures PBKDF speed on this CPU; that measurement fails now and then: retry
        for _ in range(6 if passphrase is not None else 1):
            res = subprocess.run(argv + [str(path), f"{size_mb}M"], capture_output=True, text=True,
                                 timeout=120, check=False)
            if res.returncode == 0:
                return
    path.unlink(missing_ok=True)
    raise QemuStartFailed(f"qemu-img create {path} failed: {res.stderr.strip()}",
                          remedy="check free space and permissions on the datastore")


def measure_mb(path: Path, src_fmt: str, dst_fmt: str, preallocate: bool) -> int:
    """MiB a copy of the image in ``dst_fmt`` needs (``qemu-img measure``; works on images in use)."""
    _check_format(dst_fmt)
    argv = ["qemu-img", "measure", "--output=json", "-U", "-f", src_fmt, "-O", dst_fmt, str(path)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise NotFoundError(f"cannot measure {path}: {res.stderr.strip()}", remedy="check that the disk image exists")
    data = json.loads(res.stdout)
    need = data["fully-allocated"] if preallocate else data["required"]
    return (int(need) + (1 << 20) - 1) >> 20


def image_info(path: Path) -> dict[str, object]:
    res = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         timeout=30, check=False)
    if res.returncode != 0:
        raise NotFoundError(f"cannot read {path}: {res.stderr.strip()}", remedy="check that the disk image exists")
    return dict(json.loads(res.stdout))


def check_image(path: Path, fmt: str) -> tuple[bool, str]:
    """``qemu-img check`` (qcow2 only; raw has nothing to check)."""
    if fmt != "qcow2":
        return True, "raw: nothing to check"
    res = subprocess.run(["qemu-img", "check", "-U", "-f", fmt, str(path)], capture_output=True, text=True,
                         timeout=120, check=False)
    return res.returncode == 0, (res.stdout + res.stderr).strip()[-400:]


_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class CopyJob:
    """One ``qemu-img convert -p`` run followed by ``qemu-img compare``; both can be followed and stopped."""

    def __init__(self, req: DiskCopyRequest, target: Path, creds: NbdCreds | None = None) -> None:
        self.req, self.target = req, target
        self.creds = creds            # an NBD source's TLS credentials (a PSK's key file goes when the job ends)
        self.status = DiskCopyStatus(job=uuidlib.uuid4().hex[:12], state="copying", started_at=time.time(),
                                     target=str(target))
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None

    def source(self) -> tuple[list[str], str, str]:
        """(``--object`` arguments, source filename, its format). An NBD source is read over TLS only."""
        if self.req.source_uri:
            if self.creds is None:
                raise InvalidInputError("an NBD source needs its TLS credentials", remedy="NBD never runs plain")
            objects, src = qemu_img_source(self.creds, *parse_nbd(self.req.source_uri))
            return objects, src, "raw"
        assert self.req.source_path
        return [], self.req.source_path, "raw" if self.req.verbatim else self.req.source_format

    def argvs(self) -> tuple[list[str], list[str]]:
        """The ``qemu-img convert`` and ``qemu-img compare`` command lines."""
        objects, src, src_fmt = self.source()
        dst_fmt = "raw" if self.req.verbatim else self.req.format
        convert = ["qemu-img", "convert", "-p", "-U", *objects, "-f", src_fmt, "-O", dst_fmt]
        if self.req.preallocate and not self.req.verbatim:
            convert += ["-o", "preallocation=falloc" if dst_fmt == "raw" else "preallocation=metadata"]
        compare = ["qemu-img", "compare", "-U", *objects, "-f", src_fmt, "-F", dst_fmt, src, str(self.target)]
        return convert + [src, str(self.target)], compare

    async def run(self) -> None:
        try:
            convert, compare = self.argvs()
            self.target.parent.mkdir(parents=True, exist_ok=True)
            rc, err = await self._run(convert, progress=True)
            if rc != 0:
                raise RuntimeError(f"qemu-img convert failed: {err}")
            self.status.state, self.status.percent = "verifying", 100.0
            rc, err = await self._run(compare, progress=False)
            self.status.identical = rc == 0
            if rc != 0:
                raise RuntimeError(f"the copy differs from the source: {err or f'qemu-img compare exit {rc}'}")
            self.status.bytes_total = self.target.stat().st_size
            self.status.state = "done"
        except (RuntimeError, OSError) as exc:
            self.status.state, self.status.error = "failed", str(exc)
            self.target.unlink(missing_ok=True)
        finally:
            self.status.ended_at = time.time()
            if self.creds is not None:
                self.creds.release()

    async def _run(self, argv: list[str], progress: bool) -> tuple[int, str]:
        self.proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tail: collections.deque[bytes] = collections.deque(maxlen=20)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        while True:
            chunk = await self.proc.stdout.read(256)
            if not chunk:
                break
            tail.append(chunk)
            if progress:
                found = _PROGRESS.findall(chunk)
                if found:
                    self.status.percent = float(found[-1])
        err = (await self.proc.stderr.read()).decode(errors="replace").strip()
        rc = await self.proc.wait()
        return rc, err[-400:] or b"".join(tail).decode(errors="replace").strip()[-200:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)


class NbdExport:
    """A read-only ``qemu-nbd`` export of one image, for a cold migration's copy to another host.

    Always over TLS with its credentials (:mod:`kvmotion.agent.nbdtls`); ``stop`` removes a PSK's key file.
    """

    def __init__(self, path: Path, fmt: str, address: str, port: int, verbatim: bool, creds: NbdCreds) -> None:
        self.export_id = uuidlib.uuid4().hex[:12]
        self.path, self.fmt, self.address, self.port = path, fmt, address, port
        self.verbatim, self.creds = verbatim, creds
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return ["qemu-nbd", "--read-only", "--persistent", "--shared=4", "-f", "raw" if self.verbatim else self.fmt,
                "--bind", self.address, "--port", str(self.port), "--export-name", self.export_id,
                *qemu_nbd_tls_argv(self.creds), str(self.path)]

    def start(self) -> DiskExport:
        if not self.path.exists():
            raise NotFoundError(f"disk image {self.path} does not exist", remedy="check the VM's disk paths")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        host = f"[{self.address}]" if ":" in self.address else self.address
        return DiskExport(uri=f"nbd://{host}:{self.port}/{self.export_id}", export_id=self.export_id,
                          pid=self.proc.pid, tls=self.creds.mode)

    def wait_listening(self, deadline_s: float = 10.0) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise QemuStartFailed(f"qemu-nbd exited: {err.strip()[-300:]}", remedy="see the agent's log")
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise ConflictError(f"qemu-nbd did not listen on {self.address}:{self.port} within {deadline_s:.0f}s",
                            remedy="check the migration interface")

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        finally:
            self.creds.release()
