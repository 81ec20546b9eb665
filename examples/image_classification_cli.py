"""What the command line of ``run_image_classification.py`` adds to ``hf_bpmod``'s API: messages that name the
command-line flags (``--offset_batch_size 16``) where the package names its arguments (``offset_batch_size=16``)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- flags in messages
_NAMED = re.compile(r"`([A-Za-z_]\w*)(?:=([^`]*))?`")


def as_flags(text: str, names: Iterable[str]) -> str:
    """``text`` with every argument of ``names`` quoted as in the API (`` `offset_batch_size` ``,
    `` `bp_modified=False` ``, `` `offset_scaling='fixed'` ``) written as its command-line flag (`` `--offset_batch_size` ``,
    `` `--bp_modified false` ``, `` `--offset_scaling fixed` ``)."""
    names = set(names)

    def flag(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name not in names:
            return match[0]
        if value is None:
            return f"`--{name}`"
        value = value.strip()
        if value in ("True", "False", "None"):
            value = value.lower()
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"`--{name} {value}`"

    return _NAMED.sub(flag, text)


class _FlagsInLogs(logging.Filter):
    """Rewrites a logger's records with :func:`as_flags`."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self.names = set(names)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = as_flags(record.getMessage(), self.names), None
        return True


def flags_in_messages(dataclass_types: Iterable[type]) -> Callable:
    """Decorate ``main``: while it runs, the records of ``hf_bpmod``'s loggers and the ``ValueError`` that leaves it
    name the command-line flags of the fields of ``dataclass_types`` (:func:`as_flags`; the error keeps its type and
    traceback). The ``hf_bpmod`` logger's level, which ``main`` sets, is put back after it."""
    names = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)}

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            package = logging.getLogger("hf_bpmod")
            level, log_filter = package.level, _FlagsInLogs(names)
            loggers = [package] + [
                logger_
                for name, logger_ in logging.Logger.manager.loggerDict.items()
                if name.startswith("hf_bpmod.") and isinstance(logger_, logging.Logger)
            ]
            for logger_ in loggers:
                logger_.addFilter(log_filter)
            try:
                return main(*args, **kwargs)
            except ValueError as error:
                if error.args and isinstance(error.args[0], str):
                    error.args = (as_flags(error.args[0], names), *error.args[1:])
                raise
            finally:
                for logger_ in loggers:
                    logger_.removeFilter(log_filter)
                package.setLevel(level)

        return run

    return decorate
