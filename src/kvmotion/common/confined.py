"""Files below a trusted root, reached without following symbolic links (``openat`` with ``O_NOFOLLOW``).

The agent runs as root and a datastore is shared: whoever can write to it could plant a symbolic link where the
agent expects a file (``VM/vmlinuz -> /etc/shadow``) or a folder (``VM -> /etc``). So kvmotion never follows a link
below a root (a datastore's mount path, the controller's key folder): each component is opened with
``openat(parent_fd, name, O_NOFOLLOW)`` from the root down, folders with ``O_DIRECTORY``, so a link met anywhere,
placed before the call or during it, is refused rather than followed. The root itself is configuration and is
opened as configured.

Refused with :class:`~kvmotion.common.errors.NotConfined` (HTTP 422; ``details``: path, reason): an absolute path or
one with '..', a symbolic link anywhere, a file where a folder belongs, anything but a regular file where a file is
wanted (checked before opening, and opened non-blocking: a planted FIFO cannot hang the caller), and a file with
other hard links where one is written. A missing file is ``FileNotFoundError``, as for ``os.open``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from kvmotion.common.errors import ConflictError, NotConfined

Rel = str | PurePosixPath
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MODES = {"rb": os.O_RDONLY, "r+b": os.O_RDWR, "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
         "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL}
PROBLEMS = {      # reason -> (what is wrong, the fix); {root} is the trusted root
    "symlink": ("is a symbolic link: kvmotion does not follow links inside a datastore (nor in its own state folders)",
                "replace the link with the file or folder it points to (a copy, not a link)"),
    "not-directory": ("is not a folder", "remove or rename the file that stands where a folder belongs"),
    "not-regular": ("is not a regular file (a folder, device, FIFO or socket)",
                    "replace it with a regular file, or name another path"),
    "hardlink": ("has other hard links: kvmotion does not write to a file that has other names",
                 "give the file a single name (copy it with cp instead of linking it with ln)"),
    "parent": ("contains '..'", "give a path inside {root}, without '..'"),
    "absolute": ("is absolute where a path relative to {root} is wanted", "give a path relative to {root}"),
    "nul": ("contains a NUL byte", "give a path without NUL bytes"),
    "empty": ("names {root} itself, not a file in it", "name a file inside {root}"),
}


def refusal(root: Path, shown: str, reason: str) -> NotConfined:
    problem, remedy = PROBLEMS[reason]
    return NotConfined(f"{shown} {problem.format(root=root)}", remedy=remedy.format(root=root),
                       details={"path": shown, "reason": reason})


def restated(exc: NotConfined, prefix: str, **details: str) -> NotConfined:
    """``exc`` told about what was being opened: ``prefix`` before its message, its remedy kept."""
    return NotConfined(f"{prefix}: {exc.message}", remedy=exc.remedy, details={**exc.details, **details})


def _refuse(root: Path, parts: tuple[str, ...], reason: str) -> NotConfined:
    return refusal(root, str(root.joinpath(*parts)), reason)


def split(root: Path, rel: Rel) -> tuple[str, ...]:
    """The components of ``rel`` (none: the root itself); refuses an absolute path, '..' and NUL bytes."""
    text = str(rel)
    if "\x00" in text:
        raise refusal(root, repr(text), "nul")
    if text.startswith("/"):
        raise refusal(root, repr(text), "absolute")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise refusal(root, repr(text), "parent")
    return parts


def _file_parts(root: Path, rel: Rel) -> tuple[str, ...]:
    parts = split(root, rel)
    if not parts:
        raise refusal(root, repr(str(rel)), "empty")
    return parts


def _missing(root: Path, parts: tuple[str, ...]) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(root.joinpath(*parts)))


def _kind(dir_fd: int, root: Path, upto: tuple[str, ...], reason: str) -> NotConfined:
    """The refusal for ``upto`` that ELOOP or ENOTDIR hinted at: a link, or else ``reason``."""
    st = os.stat(upto[-1], dir_fd=dir_fd, follow_symlinks=False)
    return _refuse(root, upto, "symlink" if stat.S_ISLNK(st.st_mode) else reason)


def _child_dir(dir_fd: int, root: Path, upto: tuple[str, ...], create: int | None) -> int:
    try:
        return os.open(upto[-1], DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create is None:
            raise _missing(root, upto) from None
        try:
            os.mkdir(upto[-1], create, dir_fd=dir_fd)
        except FileExistsError:
            pass                                  # made meanwhile: opened (and checked) below like any other
        return _child_dir(dir_fd, root, upto, None)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _kind(dir_fd, root, upto, "not-directory") from None
        raise


def open_dir(root: Path, rel: Rel = ".", *, create: int | None = None) -> int:
    """A file descriptor of the folder ``root/rel``, each component opened without following a link; missing
    folders are made with mode ``create`` when it is given (else FileNotFoundError)."""
    parts = split(root, rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i in range(len(parts)):
            child = _child_dir(fd, root, parts[:i + 1], create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_last(dir_fd: int, root: Path, parts: tuple[str, ...], flags: int, mode: int, regular: bool) -> int:
    name = parts[-1]
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        before = None
    if before is not None and stat.S_ISLNK(before.st_mode):
        raise _refuse(root, parts, "symlink")
    if before is not None and regular and not stat.S_ISREG(before.st_mode):
        raise _refuse(root, parts, "not-regular")          # a device is never opened, not even to look at it
    try:
        fd = os.open(name, (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _missing(root, parts) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(root, parts, "symlink") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise _refuse(root, parts, "not-regular") from None
        raise
    try:
        st = os.fstat(fd)
        if regular and not stat.S_ISREG(st.st_mode):
            raise _refuse(root, parts, "not-regular")
        if flags & (os.O_WRONLY | os.O_RDWR) and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise _refuse(root, parts, "hardlink")
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)                   # only now: after the checks
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_in(root: Path, rel: Rel, flags: int, mode: int = 0o600, *, regular: bool = True) -> int:
    """``os.open(root/rel, flags, mode)`` without following a link anywhere below ``root`` (see the module)."""
    parts = _file_parts(root, rel)
    dir_fd = open_dir(root, PurePosixPath(*parts[:-1]))
    try:
        return _open_last(dir_fd, root, parts, flags, mode, regular)
    finally:
        os.close(dir_fd)


def open_file(root: Path, rel: Rel, mode: str = "rb", perm: int = 0o600) -> BinaryIO:
    """A binary file object of ``root/rel``; ``mode``: rb, r+b, wb (create or truncate) or xb (create, never over
    an existing file)."""
    fd = open_in(root, rel, MODES[mode], perm)
    return os.fdopen(fd, mode.replace("x", "w"))


def read_in(root: Path, rel: Rel, limit: int) -> bytes:
    """The content of the regular file ``root/rel``, refused (ConflictError) when larger than ``limit`` bytes."""
    with open_file(root, rel) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        path = root.joinpath(*split(root, rel))
        raise ConflictError(f"{path} is larger than {limit} bytes: it is not a file kvmotion wrote there",
                            remedy="check the file, then remove it or put the right one in its place",
                            details={"path": str(path), "limit": limit})
    return data


def write_in(root: Path, rel: Rel, data: bytes, mode: int = 0o600, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``root/rel`` (created, or truncated unless ``exclusive``); its mode becomes ``mode``."""
    with open_file(root, rel, "xb" if exclusive else "wb", mode) as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def copy_in(src: Path, root: Path, rel: Rel, mode: int = 0o600) -> None:
    """Copy ``src`` (a trusted path, outside any datastore) to a new file ``root/rel``, never over an existing one."""
    with open(src, "rb") as fin, open_file(root, rel, "xb", mode) as fout:
        shutil.copyfileobj(fin, fout, 4 << 20)


def stat_in(root: Path, rel: Rel) -> os.stat_result | None:
    """``lstat`` of ``root/rel``; None when it (or a folder on the way) does not exist. A link is refused."""
    parts = split(root, rel)
    if not parts:
        return os.stat(root)
    try:
        dir_fd = open_dir(root, PurePosixPath(*parts[:-1]))
    except FileNotFoundError:
        return None
    try:
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(root, parts, "symlink")
    return st


def listdir_in(root: Path, rel: Rel = ".") -> list[str]:
    """The names in the folder ``root/rel`` ([] when it does not exist)."""
    try:
        fd = open_dir(root, rel)
    except FileNotFoundError:
        return []
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def make_dirs(root: Path, rel: Rel, mode: int = 0o755) -> None:
    """``mkdir -p root/rel``, never through a link."""
    os.close(open_dir(root, rel, create=mode))


def _in_parent(root: Path, rel: Rel) -> tuple[tuple[str, ...], int] | None:
    """(the parts of ``rel``, an fd of its folder), or None when that folder does not exist."""
    parts = _file_parts(root, rel)
    try:
        return parts, open_dir(root, PurePosixPath(*parts[:-1]))
    except FileNotFoundError:
        return None


def _remove(root: Path, rel: Rel, how: str) -> bool:
    """Remove ``root/rel``: a file (``how="file"``; a link there is removed itself), an empty folder ("dir") or a
    folder and everything in it ("tree"); False when absent."""
    found = _in_parent(root, rel)
    if found is None:
        return False
    parts, dir_fd = found
    try:
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        if how == "file":
            if stat.S_ISDIR(st.st_mode):
                raise _refuse(root, parts, "not-regular")
            os.unlink(parts[-1], dir_fd=dir_fd)
        elif not stat.S_ISDIR(st.st_mode):
            raise _refuse(root, parts, "symlink" if stat.S_ISLNK(st.st_mode) else "not-directory")
        elif how == "tree":
            shutil.rmtree(parts[-1], dir_fd=dir_fd)      # by descriptor: a link swapped in is not followed either
        else:
            os.rmdir(parts[-1], dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)


def unlink_in(root: Path, rel: Rel) -> bool:
    """Remove the file ``root/rel`` (a link there is removed itself, never followed); False when absent."""
    return _remove(root, rel, "file")


def rmdir_in(root: Path, rel: Rel) -> bool:
    """Remove the empty folder ``root/rel``; False when absent (OSError when not empty)."""
    return _remove(root, rel, "dir")


def rmtree_in(root: Path, rel: Rel) -> bool:
    """Remove the folder ``root/rel`` and everything in it (links inside are removed, never followed); False when
    absent."""
    return _remove(root, rel, "tree")


def replace_in(root: Path, src: Rel, dst: Rel) -> None:
    """Rename ``root/src`` to ``root/dst`` (one folder) through that folder's descriptor."""
    a, b = _file_parts(root, src), _file_parts(root, dst)
    if a[:-1] != b[:-1]:
        raise ValueError(f"{src} and {dst} are not in one folder")
    dir_fd = open_dir(root, PurePosixPath(*a[:-1]))
    try:
        os.replace(a[-1], b[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Place:
    """A path below a trusted root; its methods are the functions above, opened from that root."""

    root: Path
    rel: PurePosixPath

    @classmethod
    def of(cls, root: Path, rel: Rel = ".") -> Place:
        return cls(root, PurePosixPath(*split(root, rel)))

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.rel.parts)

    @property
    def name(self) -> str:
        return self.rel.name

    @property
    def parent(self) -> Place:
        return Place(self.root, self.rel.parent)

    def __truediv__(self, name: str) -> Place:
        return Place.of(self.root, self.rel / name)

    def with_name(self, name: str) -> Place:
        return Place.of(self.root, self.rel.with_name(name))

    def __str__(self) -> str:
        return str(self.path)

    def open(self, flags: int, mode: int = 0o600) -> int:
        return open_in(self.root, self.rel, flags, mode)

    def open_file(self, mode: str = "rb", perm: int = 0o600) -> BinaryIO:
        return open_file(self.root, self.rel, mode, perm)

    def read(self, limit: int) -> bytes:
        return read_in(self.root, self.rel, limit)

    def write(self, data: bytes, mode: int = 0o600) -> None:
        write_in(self.root, self.rel, data, mode)

    def stat(self) -> os.stat_result | None:
        return stat_in(self.root, self.rel)

    def listdir(self) -> list[str]:
        return listdir_in(self.root, self.rel)

    def unlink(self) -> bool:
        return unlink_in(self.root, self.rel)

    def make_dirs(self, mode: int = 0o755) -> None:
        make_dirs(self.root, self.rel, mode)

    def rmtree(self) -> bool:
        return rmtree_in(self.root, self.rel)


def locate(file: str, roots: list[Path]) -> Place | None:
    """``file`` (a plain absolute path: no '..', no '//' or trailing '/') as a place below the first of ``roots``
    that holds it; None when it is no such path."""
    if not file.startswith("/") or "\x00" in file or os.path.normpath(file) != file:
        return None
    path = Path(file)
    root = next((r for r in roots if r in path.parents), None)
    return None if root is None else Place(root, PurePosixPath(path.relative_to(root)))
