"""One training run at a time in an ``output_dir``.

Two runs in one folder would overwrite each other's checkpoints and mix their refresh logs, so ``train()`` takes an
exclusive lock on ``<output_dir>/_bpmod_training.lock`` (the leading ``_`` keeps it out of what the Trainer pushes to
the Hub) before any work and releases it when it ends, also when it raises. A second run that finds the folder
locked is refused with :class:`OutputDirInUseError`.

The lock is an OS lock on the open file (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows), which the OS
releases when the process ends: a run that crashed or was killed never leaves the folder locked. The file names the
holder (process id, host, start time) for the error message and is removed when the lock is released (on Windows
it stays, empty of meaning once unlocked). Where neither is available, training runs without the lock, with a
warning. A symbolic link at the lock's name is refused (:mod:`hf_bpmod._files`): the lock would truncate the file it
points to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from typing import Any

from ._files import open_no_follow

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

LOCK_NAME = "_bpmod_training.lock"
#: Windows locks byte ranges that others cannot read: lock one far past the holder's description.
_WINDOWS_LOCK_OFFSET = 1 << 30


class OutputDirInUseError(RuntimeError):
    """Another training run holds the ``output_dir``."""


class RunLock:
    """The exclusive training lock of ``folder`` (see the module's rules); a context manager."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: int | None = None
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputDirInUseError` at once if another run holds it."""
        if self._fd is not None:
            return
        self._pid = os.getpid()
        if fcntl is None and msvcrt is None:
            warnings.warn(
                f"No file locking on this platform: nothing stops a second run from training in {self.folder} at "
                "the same time; make sure each run has its own `output_dir`.",
                stacklevel=3,
            )
            return
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(fd)
            except OSError:
                os.close(fd)
                raise OutputDirInUseError(self._in_use_message()) from None
            if fcntl is None or _same_file(fd, self.path):
                break
            # the previous holder removed the file between our open and our lock: lock the file now at the path
            os.close(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        self._fd = fd

    def release(self) -> None:
        """Release the lock (and remove the file, where the OS allows it while open). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:
            return  # a forked child (a data loader worker) neither removes nor unlocks its parent's lock
        try:
            if fcntl is not None:  # removed while still locked, so no other run can lock the old file meanwhile
                with contextlib.suppress(OSError):
                    os.remove(self.path)
            else:
                _unlock(fd)
        finally:
            os.close(fd)

    def _in_use_message(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                holder = f.readline().strip()
        except OSError:
            holder = ""
        holder = f" ({holder})" if holder else ""
        return (
            f"Another training run is using output_dir {self.folder!r}{holder}: two runs in one folder would overwrite "
            "each other's checkpoints and mix their offset refresh logs. Give this run another `output_dir`, or wait "
            f"for the other run to end (or stop it) and start again. The lock {self.path} is released as soon as "
            "that process ends, also if it crashed."
        )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _unlock(fd: int) -> None:
    os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _same_file(fd: int, path: str) -> bool:
    try:
        at_path = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def training_lock(args: Any) -> contextlib.AbstractContextManager:
    """The lock of ``args.output_dir``, taken by the main process of the run (``process_index`` 0) only, so that the
    processes of one run (also with ``save_on_each_node`` on a shared file system) never lock each other out."""
    return RunLock(args.output_dir) if args.process_index == 0 else contextlib.nullcontext()
