"""Secret files stay private: mode 0600 at creation, and tightened when an existing one is found looser."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def keep_private(path: Path) -> None:
    """Make an existing regular file mode 0600 if group or others may read it (a symlink is left alone: never
    followed); a missing file is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was mode %o; it holds secrets: now 0600", path, stat.S_IMODE(st.st_mode))


def create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (never through a symlink), then ``keep_private``."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    keep_private(path)


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner may enter (0700): created so, or tightened when found looser. A
    symlink in its place is refused, never followed."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory (a link?): kvmotion keeps its secrets only in a "
                                 "directory of its own")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
        log.warning("%s was mode %o; it holds keys and secrets: now 0700", path, stat.S_IMODE(st.st_mode))
    return path
