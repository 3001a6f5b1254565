"""`vm create --cloud-init FILE [--ssh-key FILE] [--network-config FILE] [--meta-data FILE]`: the files are read
here, on the user's machine, and their text is sent with the create request (the controller checks them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from kvmotion.common.errors import CloudInitInvalid
from kvmotion.models.cloudinit import MAX_SMALL_FILE_BYTES, MAX_USER_DATA_BYTES

EMPTY_CLOUD_CONFIG = "#cloud-config\n"


def read_text(path: Path, kind: str, limit: int) -> dict[str, str]:
    """A file's name and text (UTF-8, at most ``limit`` bytes), or a clear error naming it."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CloudInitInvalid(f"{kind} file {str(path)!r} cannot be read: {exc.strerror or exc}",
                               remedy="give the path of a readable file", details={"file": str(path), "kind": kind}
                               ) from None
    if len(data) > limit:
        raise CloudInitInvalid(f"{kind} file {str(path)!r} is larger than {limit >> 10} KiB",
                               remedy="make it smaller", details={"file": str(path), "kind": kind})
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CloudInitInvalid(f"{kind} file {str(path)!r} line {line} is not UTF-8 text",
                               remedy="save the file as UTF-8 text", details={"file": str(path), "kind": kind,
                                                                              "line": line}) from None
    return {"name": path.name, "text": text}


def cloud_init_request(user_data: Optional[Path], ssh_key: Optional[Path], network_config: Optional[Path],
                       meta_data: Optional[Path]) -> dict[str, Any] | None:
    """The create request's ``cloud_init``; None without any file. Without --cloud-init, an empty cloud-config."""
    if user_data is None and ssh_key is None and network_config is None and meta_data is None:
        return None
    out: dict[str, Any] = {"user_data": read_text(user_data, "user-data", MAX_USER_DATA_BYTES) if user_data
                           else {"name": "(empty #cloud-config)", "text": EMPTY_CLOUD_CONFIG}}
    for key, path, kind in (("ssh_key", ssh_key, "ssh-key"), ("network_config", network_config, "network-config"),
                            ("meta_data", meta_data, "meta-data")):
        if path is not None:
            out[key] = read_text(path, kind, MAX_SMALL_FILE_BYTES)
    return out
