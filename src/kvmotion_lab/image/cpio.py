"""Minimal deterministic writer for the ``newc`` cpio format (initramfs).

Written in Python rather than shelling out to ``cpio`` so that device nodes
(``/dev/console``) can be added without ``mknod`` privileges and so the output
is byte-for-byte reproducible (fixed mtime/uid/gid/inode numbering).
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass, field

_MAGIC = b"070701"


@dataclass
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


@dataclass
class CpioArchive:
    """An in-memory newc archive; parent directories are created implicitly."""

    mtime: int = 0
    _entries: dict[str, _Entry] = field(default_factory=dict)

    @staticmethod
    def _norm(path: str) -> str:
        name = path.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"invalid archive path: {path!r}")
        return name

    def _add(self, entry: _Entry) -> None:
        parts = entry.name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self._entries:
                self._entries[parent] = _Entry(parent, stat.S_IFDIR | 0o755)
        self._entries[entry.name] = entry

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._add(_Entry(self._norm(path), stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(_Entry(self._norm(path), stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(_Entry(self._norm(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(_Entry(self._norm(path), stat.S_IFCHR | perm, b"", major, minor))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def to_bytes(self) -> bytes:
        out = bytearray()
        # sorted order puts every directory before its contents
        for ino, name in enumerate(sorted(self._entries), start=1):
            e = self._entries[name]
            out += self._header(ino, e.mode, len(e.data), name, e.rdev_major, e.rdev_minor)
            out += e.data + _pad4(len(e.data))
        out += self._header(0, 0, 0, "TRAILER!!!", 0, 0)
        return bytes(out)

    def _header(self, ino: int, mode: int, size: int, name: str, rmaj: int, rmin: int) -> bytes:
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, self.mtime, size, 0, 0, rmaj, rmin, len(name) + 1, 0)
        head = _MAGIC + b"".join(b"%08x" % v for v in fields) + name.encode() + b"\0"
        return head + _pad4(len(head))

    def to_gzip(self, level: int = 9) -> bytes:
        return gzip.compress(self.to_bytes(), compresslevel=level, mtime=0)
