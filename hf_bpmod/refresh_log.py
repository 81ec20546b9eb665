"""The JSON-lines log of the offset refreshes in an ``output_dir``, kept across the runs trained there.

Rules:

* Every record carries ``run_id`` (a new random id each time ``train()`` starts, a resume included) and
  ``resumed_from_step`` (the global step of the checkpoint the run resumed from; ``None`` for a fresh run).
* A fresh run starts an empty log; a resume keeps the records made before its checkpoint and drops the later ones
  (the resumed run makes them again). Whenever the log is rewritten this way, the file as it was is first kept as
  ``<file>.<n>``, with ``n`` one more than the highest number already there: numbered copies are never overwritten
  or deleted, so every record ever written stays in the folder.
* A line that is not a whole record (a write torn by a crash, or any unparsable line) is dropped from the log with a
  warning naming the file and the line; the original stays in the numbered copy.
* A record is appended as one whole line in one write, flushed to disk.
* The log is never read or written through a symbolic link (:mod:`hf_bpmod._files`): a link at its name is refused,
  and so is a linked folder on its path that leads out of ``output_dir`` once resolved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from typing import Any

from ._files import SymlinkRefusedError, open_no_follow, refuse_symlink, write_atomically

logger = logging.getLogger(__name__)


def _read_record(line: bytes) -> dict[str, Any] | None:
    """The refresh record on ``line``, or ``None`` if it holds none (a torn write, or anything else)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def keep_numbered_copy(path: str) -> str:
    """Copy the file ``path`` to ``<path>.<n>``, ``n`` one more than the highest number in use; returns the copy's
    path. An existing file is never overwritten (the name is taken with exclusive creation)."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(name) + r"\.(\d+)")
    taken = [int(m.group(1)) for entry in os.listdir(folder) if (m := pattern.fullmatch(entry))]
    number = max(taken, default=0) + 1
    with open(path, "rb") as f:
        content = f.read()
    while True:
        copy = f"{path}.{number}"
        try:
            with open(copy, "xb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            return copy
        except FileExistsError:
            number += 1


class RefreshLog:
    """The refresh log at ``path``, which must stay inside ``folder`` (the ``output_dir``; by default the log's own
    folder) once symbolic links are resolved (see the module's rules)."""

    def __init__(self, path: str, folder: str | None = None) -> None:
        self.path = path
        self.folder = (os.path.dirname(path) or os.curdir) if folder is None else folder
        self.run_id = uuid.uuid4().hex
        self.resumed_from_step: int | None = None

    def check_path(self) -> None:
        """Raise :class:`~hf_bpmod._files.SymlinkRefusedError` if the log is a symbolic link, or a linked folder on its
        path leads out of ``folder``."""
        root = os.path.realpath(self.folder)
        real = os.path.realpath(os.path.dirname(self.path) or os.curdir)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            step, link = self.folder, None
            for part in os.path.relpath(os.path.dirname(self.path), self.folder).split(os.sep):
                step = os.path.join(step, part)
                if link is None and os.path.islink(step):
                    link = step
            link = link or os.path.dirname(self.path)
            raise SymlinkRefusedError(
                f"{link} is a symbolic link to {os.path.realpath(link)}, outside `output_dir` {self.folder}: the "
                f"refresh log {self.path} would be written there. Remove the link (or choose another "
                "`offset_log_file`) and start again."
            )
        refuse_symlink(self.path)

    def start(self, start_step: int) -> None:
        """A training run starts at ``start_step`` (0: a fresh run, else a resume from that checkpoint step): a new
        run id, and the log as the rules say."""
        self.run_id = uuid.uuid4().hex
        self.resumed_from_step = start_step if start_step > 0 else None
        self.check_path()
        path = self.path
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return
        if start_step <= 0:
            copy = keep_numbered_copy(path)
            os.remove(path)
            logger.info(f"A fresh run starts a new refresh log {path}; the earlier one is kept as {copy}.")
            return
        with open(path, "rb") as f:
            lines = f.readlines()
        keep, dropped, broken, blank = [], 0, [], 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                blank += 1
                continue
            record = _read_record(line)
            if record is None:
                broken.append(number)
            elif record["step"] < start_step:
                keep.append(line if line.endswith(b"\n") else line + b"\n")
            else:
                dropped += 1
        unended = not lines[-1].endswith(b"\n")  # a later append would run into it
        if not broken and not dropped and not blank and not unended:
            return  # the log is whole and ends before the checkpoint: the resumed run appends to it
        copy = keep_numbered_copy(path)
        if broken:
            logger.warning(
                f"The refresh log {path} has {len(broken)} line(s) that are not a whole record (line(s) "
                f"{', '.join(map(str, broken))} of {len(lines)}, e.g. a write cut short by a crash); they are dropped "
                f"from the log. The file as it was is kept as {copy}."
            )
        if dropped:
            logger.info(
                f"Resuming from step {start_step}: the {dropped} refresh record(s) the earlier run made from that "
                f"step on are dropped from {path} (made again now); the file as it was is kept as {copy}."
            )
        write_atomically(path, b"".join(keep))

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` with this run's id as one whole line, flushed to disk."""
        record = {"run_id": self.run_id, "resumed_from_step": self.resumed_from_step, **record}
        data = (json.dumps(record) + "\n").encode("utf-8")
        self.check_path()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
