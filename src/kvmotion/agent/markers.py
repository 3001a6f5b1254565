"""Datastore markers: the identity file (``DATASTORE_ID_FILE``) at the top of a datastore.

A marker is created once (on one host, for a shared datastore) and never replaced: it is written to a temporary
file and hard-linked into place, so two hosts initialising the same shared folder at once end with one marker,
and a reader never sees half of one. The marker is opened relative to the datastore's directory, symlinks refused
(:mod:`kvmotion.common.confined`).
"""
from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path

from pydantic import ValidationError

from kvmotion.agent import mounts
from kvmotion.agent.config import DATASTORE_ID_FILE, DatastoreKind, DatastoreMarker
from kvmotion.common import confined
from kvmotion.common.errors import ConflictError, InvalidInputError, NotConfined, NotFoundError

MARKER_MAX_BYTES = 64 * 1024
DOCS = "docs/storage.md, 'Datastore markers'"


def new_marker(name: str, shared: bool, kind: DatastoreKind = "directory") -> DatastoreMarker:
    """A fresh identity (a random UUID); an invalid name is an ``InvalidInputError`` with the rule."""
    try:
        return DatastoreMarker(uuid=str(uuidlib.uuid4()), name=name, shared=shared, kind=kind)
    except ValidationError:
        raise InvalidInputError(f"datastore name {name!r} is not valid",
                                remedy="use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
                                details={"name": name}) from None


def _open_dir(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise NotFoundError(f"datastore directory {path} does not exist",
                            remedy="create it (mkdir -p) or mount the shared file system there first",
                            details={"path": str(path)}) from None
    except NotADirectoryError:
        raise InvalidInputError(f"datastore {path} is not a directory", remedy="give the datastore's mount point",
                                details={"path": str(path)}) from None
    except PermissionError:
        raise InvalidInputError(f"cannot open datastore {path}: permission denied",
                                remedy="run as root (the agent's user)", details={"path": str(path)}) from None


def read_marker(path: Path) -> DatastoreMarker | None:
    """The marker of the datastore at ``path``; None when it has none. A marker that is a symlink, not a regular
    file, or not a marker is an ``InvalidInputError``."""
    marker_file = path / DATASTORE_ID_FILE
    remedy = f"correct it ({DOCS}) or remove it and run `kvmotion-agent datastore init` again"
    os.close(_open_dir(path))       # a missing or unusable datastore folder has its own error
    try:
        raw = confined.read_in(path, DATASTORE_ID_FILE, MARKER_MAX_BYTES)
    except FileNotFoundError:
        return None
    except (NotConfined, ConflictError) as exc:         # a symbolic link, not a regular file, too large
        raise InvalidInputError(exc.message, remedy=remedy, details={"path": str(path)}) from None
    except OSError as exc:
        raise InvalidInputError(f"{marker_file} is unreadable ({exc.strerror})", remedy=remedy,
                                details={"path": str(path)}) from None
    try:
        return DatastoreMarker.model_validate_json(raw)
    except ValueError as exc:       # pydantic's ValidationError is a ValueError
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise InvalidInputError(f"{marker_file} is not a kvmotion datastore marker ({first})", remedy=remedy,
                                details={"path": str(path)}) from None


def _link_in(path: Path, marker: DatastoreMarker) -> bool:
    """Put ``marker`` in place unless one exists (True: ours is in place, False: another one was first)."""
    tmp = f"{DATASTORE_ID_FILE}.{os.getpid()}.{uuidlib.uuid4().hex[:8]}.tmp"
    dir_fd = _open_dir(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(marker.model_dump_json(indent=1) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, DATASTORE_ID_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
    except OSError as exc:
        raise InvalidInputError(f"cannot write the marker of datastore {path}: {exc.strerror}",
                                remedy="check that the file system is mounted read-write and supports hard links",
                                details={"path": str(path)}) from None
    finally:
        os.close(dir_fd)


def _check_same(path: Path, found: DatastoreMarker, name: str, shared: bool, kind: DatastoreKind) -> None:
    """Refuse a marker of another name or sharing, explaining how to keep or rename it."""
    marker_file = path / DATASTORE_ID_FILE
    details = {"path": str(path), "name": found.name, "uuid": found.uuid, "shared": found.shared}
    if found.name != name:
        raise ConflictError(
            f"{path} is already datastore {found.name!r} (uuid {found.uuid})", details=details,
            remedy=f"to keep it, pass --name {found.name}; to rename it, first move every VM and image off it "
                   f"(kvmotion vm migrate VM --datastore OTHER), then remove {marker_file} on one host, run this "
                   f"command again (a new UUID) and restart the agents that mount it")
    if found.shared != shared:
        flag = "with --shared" if found.shared else "without --shared"
        raise ConflictError(
            f"{path} is datastore {found.name!r}, marked shared={str(found.shared).lower()}", details=details,
            remedy=f"run it {flag}; to change the flag, edit \"shared\" in {marker_file} on one host (keep the uuid) "
                   f"and restart the agents that mount it")
    if found.kind != kind:
        flag = "with --nfs" if found.kind == "nfs" else "without --nfs"
        raise ConflictError(
            f"{path} is datastore {found.name!r} of kind {found.kind}", details=details,
            remedy=f"run it {flag}; to change the kind, edit \"kind\" in {marker_file} on one host (keep the uuid) "
                   f"and restart the agents that mount it")


def ensure_marker(path: Path, name: str, shared: bool,
                  kind: DatastoreKind = "directory") -> tuple[DatastoreMarker, bool]:
    """The datastore's marker, written when it has none (True) or found with this name and sharing (False).
    Kind nfs: only on an NFS mount (else the marker would land on the empty mount point below it)."""
    marker = new_marker(name, shared, kind)
    if kind == "nfs":
        _, problem = mounts.nfs_problem(path)
        if problem is not None:
            raise InvalidInputError(f"datastore {name!r} of kind nfs: {problem}",
                                    remedy=f"mount the export on {path} first (and in /etc/fstab), then run this again",
                                    details={"path": str(path)})
    found = read_marker(path)
    if found is None:
        if _link_in(path, marker):
            return marker, True
        found = read_marker(path)       # another host was first: theirs counts, if it agrees
        if found is None:
            raise ConflictError(f"the marker of {path} appeared and vanished while it was written",
                                remedy="run the command again", details={"path": str(path)})
    _check_same(path, found, name, shared, kind)
    return found, False
