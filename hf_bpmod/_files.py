"""The files the package writes in an ``output_dir``: written whole or not at all, and never through a symbolic link.

A link planted at the name of a file we write (the lock, the refresh log, a temporary file, a checkpoint's state, the
model card) would make the write change the file it points to, anywhere the user can write. Such a path is refused
with :class:`SymlinkRefusedError`, naming it and saying to remove it; files are opened with ``O_NOFOLLOW``, so a link
planted between the check and the open is refused too.
"""

from __future__ import annotations

import contextlib
import errno
import os

#: Open flags: never follow a link at the last component (POSIX); binary mode (Windows).
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class SymlinkRefusedError(OSError):
    """A file hf_bpmod would write is a symbolic link."""


def symlink_message(path: str) -> str:
    """Why a link at ``path`` is refused, and what to do."""
    try:
        target = f" to {os.readlink(path)}"
    except OSError:
        target = ""
    return (
        f"{path} is a symbolic link{target}: hf_bpmod never writes through a link, which would change the file it "
        "points to. Remove the link (or give the run another `output_dir`) and start again."
    )


def refuse_symlink(path: str) -> None:
    """Raise :class:`SymlinkRefusedError` if ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise SymlinkRefusedError(symlink_message(path))


def open_no_follow(path: str, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags, mode)`` that refuses a symbolic link at ``path`` (:func:`refuse_symlink`)."""
    refuse_symlink(path)
    try:
        return os.open(path, flags | _NO_FOLLOW, mode)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):  # planted since the check
            raise SymlinkRefusedError(symlink_message(path)) from None
        raise


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file that replaces it once synced: a crash leaves the old file
    or the new one, never half of either. Neither ``path`` nor the temporary may be a symbolic link; a temporary
    left by a crashed process is replaced."""
    refuse_symlink(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    refuse_symlink(tmp)
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    fd = open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
