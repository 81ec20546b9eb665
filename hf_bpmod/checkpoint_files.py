"""Reading a checkpoint's files safely, and choosing the checkpoint to resume from.

- :func:`read_regular_file`: a file is read only if it is a regular file (not a named pipe, a device, or a link to
  one, which could block the read or never end it) no larger than a bound given by the caller, checked before a byte
  is read.
- :func:`newest_complete_checkpoint`: ``resume_from_checkpoint=True`` (the example's ``last``) takes the newest
  ``checkpoint-N`` folder that holds everything a resume reads. A folder that lacks some of it is what a kill during
  a save leaves; it is skipped with a warning naming it, and left as it is.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE = "trainer_state.json"
#: The largest trainer_state.json read here (its log history grows with the run; the Trainer reads it whole too).
MAX_TRAINER_STATE_BYTES = 2**30
#: Any of these holds the model's weights (full, sharded or a peft adapter; safetensors or torch).
MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
OPTIMIZER_FILE = "optimizer.pt"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
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


def incomplete(checkpoint: str, state_files: tuple[str, ...]) -> str | None:
    """What ``checkpoint`` lacks of a resumable checkpoint (the model's weights, the optimizer's state, one of
    ``state_files``, and a readable trainer_state.json, which the Trainer writes last), as ``"lacks ..."``;
    ``None`` if it lacks nothing."""

    def present(name: str) -> bool:
        return os.path.isfile(os.path.join(checkpoint, name))

    lacks = []
    if not any(map(present, MODEL_FILES)):
        lacks.append("the model's weights")
    if not present(OPTIMIZER_FILE):
        lacks.append(OPTIMIZER_FILE)
    if not any(map(present, state_files)):
        lacks.append(state_files[0])
    if not present(TRAINER_STATE):
        lacks.append(TRAINER_STATE)
    elif checkpoint_global_step(checkpoint) is None:
        lacks.append(f"a {TRAINER_STATE} that is readable JSON with a `global_step`")
    return f"lacks {', '.join(lacks)}" if lacks else None


def newest_complete_checkpoint(
    output_dir: str, flag: str, state_files: tuple[str, ...], warn: Callable[[str], None]
) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that :func:`incomplete` finds complete; ``None`` if
    there is no checkpoint folder at all. Each newer, incomplete one is skipped with ``warn`` naming it and what it
    lacks, and left as it is; if none is complete, ``FileNotFoundError`` names each and what it lacks (``flag``:
    how the user asked, e.g. ``resume_from_checkpoint=True``)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted(
        (int(m[1]), name)
        for name in names
        if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    skipped = []
    for _, name in reversed(steps):
        checkpoint = os.path.join(output_dir, name)
        lacks = incomplete(checkpoint, state_files)
        if lacks is None:
            for torn, what in skipped:
                warn(
                    f"{flag}: {torn} is not a complete checkpoint (it {what}, as a save cut short leaves it); "
                    f"resuming from {checkpoint}, the newest complete one. {torn} is left as it is."
                )
            return checkpoint
        skipped.append((checkpoint, lacks))
    if not skipped:
        return None
    listed = "; ".join(f"{torn} {what}" for torn, what in skipped)
    raise FileNotFoundError(
        f"{flag}: {output_dir} holds no complete checkpoint to resume from ({listed}). A save was cut short, or the "
        f"checkpoints were saved with `save_only_model=True`. Start a new run instead (without {flag}); the folders "
        "are left as they are."
    )
