"""Private local state: directories 0700, files 0600, and a refusal of shared ones.

A key's local state is the workflow's data; on a shared host nobody but the
worker's user may read or change it. Directories are created ``0700`` and files
``0600`` (narrowed further by a stricter umask, never widened). A worker refuses
a node directory owned by another user, or one that others may write to, and a
state directory that others may write to (unless it has the sticky bit, as
``/tmp`` does): another user could otherwise swap the database under it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from typing import Any

import diskcache

from ..errors import StateDirError

DIR_MODE = 0o700
FILE_MODE = 0o600
#: The database files diskcache (SQLite) keeps in a cache directory.
DATABASE_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from /proc where possible: setting it is racy)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def private(mode: int) -> int:
    """``mode`` narrowed by the umask (a stricter umask wins)."""
    return mode & ~current_umask()


def make_private_dir(path: str) -> None:
    """Create ``path`` (and missing parents) as ``0700`` directories."""
    missing = []
    head = os.path.abspath(path)
    while head and not os.path.isdir(head):
        missing.append(head)
        parent = os.path.dirname(head)
        if parent == head:
            break
        head = parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, DIR_MODE)
            os.chmod(directory, private(DIR_MODE))  # mkdir's mode is narrowed by umask only


def check_private_dir(path: str, *, owned: bool) -> None:
    """Refuse ``path`` when others may write to it (or, ``owned``, when another user owns it).

    Raises :class:`StateDirError` with a one-line reason.
    """
    info = os.stat(path)
    if owned and info.st_uid != os.geteuid():
        raise StateDirError(
            f"sticky_state_dir: {path!r} is owned by uid {info.st_uid}, not by this worker's "
            f"user (uid {os.geteuid()}): refusing to keep state there"
        )
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise StateDirError(
            f"sticky_state_dir: {path!r} is writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):04o}): refusing to keep state there; "
            f"chmod o-w {path}"
        )


def make_private_files(directory: str) -> None:
    """Narrow the database files of a cache directory to ``0600``."""
    mode = private(FILE_MODE)
    for name in DATABASE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(os.path.join(directory, name), mode)


class PrivateDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's Disk, writing value files ``0600`` in ``0700`` directories."""

    def _write(self, full_path: str, iterator: Any, mode: str, encoding: str | None = None) -> Any:
        full_dir = os.path.dirname(full_path)
        if not os.path.isdir(full_dir):
            with contextlib.suppress(OSError):
                make_private_dir(full_dir)
        size = super()._write(full_path, iterator, mode, encoding)
        with contextlib.suppress(OSError):
            os.chmod(full_path, private(FILE_MODE))
        return size
