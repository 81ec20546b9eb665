"""What the command line of ``run_image_classification.py`` adds to ``hf_bpmod``'s API: messages that name the
command-line flags (``--offset_batch_size 16``) where the package names its arguments (``offset_batch_size=16``), the
defaults the script chooses where a flag was not given, and a run refused before it does something useless."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the argument dataclasses live in the script, where HfArgumentParser parses them
    from run_image_classification import ModelArguments

    from hf_bpmod import BPModifiedTrainingArguments

logger = logging.getLogger(__name__)

#: ``--learning_rate`` for a model built from a config when the flag is not given, per optimizer family (the first
#: prefix of ``--optim`` that matches): ``TrainingArguments``' 5e-5 is a fine-tuning rate, at which a model with
#: random weights stays near chance (measured: docs/example.md).
SCRATCH_LEARNING_RATES = (("adam", 1e-3),)
#: ``--logging_steps`` when the flag is not given: a fraction of the run's steps (the Trainer's reading of a float in
#: (0, 1)), so that every run logs about 20 times.
LOGGING_FRACTION = 0.05

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


# ---------------------------------------------------------------------------------------------- defaults
def scratch_learning_rate(optim: str) -> float | None:
    """The learning rate of :data:`SCRATCH_LEARNING_RATES` for the optimizer ``optim`` (``None``: none measured)."""
    return next((rate for prefix, rate in SCRATCH_LEARNING_RATES if optim.startswith(prefix)), None)


def choose_defaults(given: set[str], model_args: ModelArguments, training_args: BPModifiedTrainingArguments) -> None:
    """The script's own defaults, for the flags the user did not give (``given``: the flags given), each logged:
    ``--learning_rate`` for a model built from a config (:data:`SCRATCH_LEARNING_RATES`; a warning where none was
    measured for the optimizer) and ``--logging_steps`` (:data:`LOGGING_FRACTION` of the run)."""
    if "learning_rate" not in given and model_args.from_config and training_args.do_train:
        optim = str(getattr(training_args.optim, "value", training_args.optim))
        rate = scratch_learning_rate(optim)
        if rate is not None:
            training_args.learning_rate = rate
            logger.info(
                f"--learning_rate not given: {rate:g}, the script's default for a model built from a config with "
                f"--optim {optim} (the Trainer's {5e-5:g} is a fine-tuning rate). Pass --learning_rate to choose."
            )
        else:
            logger.warning(
                f"--learning_rate not given: the Trainer's {training_args.learning_rate:g} is a fine-tuning rate, and a "
                f"model built from a config may stay near chance at it with --optim {optim}. Pass --learning_rate "
                "(e.g. 1e-3 with AdamW)."
            )
    if "logging_steps" not in given:
        training_args.logging_steps = LOGGING_FRACTION
        logger.info(
            f"--logging_steps not given: the training loss is logged every {LOGGING_FRACTION:.0%} of the run's steps "
            "(about 20 times). Pass --logging_steps to choose."
        )


def describe_defaults(parser: argparse.ArgumentParser) -> None:
    """Say in ``--help`` what :func:`choose_defaults` does for ``--learning_rate`` and ``--logging_steps``."""
    said = {
        "learning_rate": " The script's default for a model built from a config (no --model_name_or_path) with an "
        "AdamW-family --optim: 1e-3 (5e-5 is a fine-tuning rate); other optimizers: a warning.",
        "logging_steps": f" The script's default: {LOGGING_FRACTION} (every {LOGGING_FRACTION:.0%} of the run's steps, "
        "about 20 logs a run).",
    }
    for action in parser._actions:
        if action.dest in said and action.help:
            action.help = action.help.rstrip() + said[action.dest].replace("%", "%%")


def refuse_untrained_predictions(model_args: ModelArguments, training_args: BPModifiedTrainingArguments) -> None:
    """``--do_predict`` without ``--do_train`` on a model built from a config would predict with random weights."""
    if training_args.do_predict and not training_args.do_train and model_args.from_config:
        built = f"--model_type {model_args.model_type}" if model_args.model_type else "--config_name"
        raise ValueError(
            f"--do_predict without --do_train would predict with the random weights of a model built from a config "
            f"({built}). Add --do_train to train it first, or pass --model_name_or_path with the --output_dir of a "
            "trained run to predict with its weights."
        )
