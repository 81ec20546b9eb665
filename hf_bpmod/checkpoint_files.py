"""Reading a checkpoint's files safely.

- :func:`read_regular_file`: a file is read only if it is a regular file (not a named pipe, a device, or a link to
  one, which could block the read or never end it) no larger than a bound given by the caller, checked before a byte
  is read.
"""

from __future__ import annotations

import json
import os
import stat

TRAINER_STATE = "trainer_state.json"
#: The largest trainer_state.json read here (its log history grows with the run; the Trainer reads it whole too).
MAX_TRAINER_STATE_BYTES = 2**30
_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


class UnreadableFileError(OSError):
    """A file that is not read: not a regular file, or larger than its bound (``problem`` says which)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular_file(path: str, max_bytes: int | None, bound: str = "allowed") -> bytes:
    """The bytes of ``path`` if it is a regular file (or a link to one) of at most ``max_bytes`` (``None``: any size;
    ``bound`` says where the bound comes from); else :class:`UnreadableFileError`, before anything is read.
    ``FileNotFoundError`` if it does not exist."""
    mode = os.stat(path).st_mode  # follows links: a link to /dev/zero is a character device
    if not stat.S_ISREG(mode):
        raise UnreadableFileError(path, f"not a regular file ({_kind(mode)}); a state file is never one")
    # O_NONBLOCK: were it swapped for a named pipe since, opening it would not wait for a writer
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(path, f"not a regular file ({_kind(info.st_mode)}); a state file is never one")
        if max_bytes is not None and info.st_size > max_bytes:
            raise UnreadableFileError(
                path, f"the file is {info.st_size} bytes, more than the {max_bytes} bytes {bound}"
            )
        limit = info.st_size if max_bytes is None else max_bytes
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise UnreadableFileError(path, f"the file grew past {limit} bytes while it was read")
    return data


def checkpoint_global_step(checkpoint: str) -> int | None:
    """The ``global_step`` the checkpoint's trainer_state.json records; ``None`` where it has none to read."""
    try:
        state = json.loads(read_regular_file(os.path.join(checkpoint, TRAINER_STATE), MAX_TRAINER_STATE_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
