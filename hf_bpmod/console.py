"""The console line of a log: the Trainer prints every logged key, and a refresh adds eight per block
(``offset/block_<t>/<key>``) to the per-block losses (``block_<s>_loss``). Those details stay in
``trainer.state.log_history``, every ``report_to`` backend and the refresh log; the printed line leaves them out."""

from __future__ import annotations

import re
from typing import Any

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

#: Logged keys left out of the console line.
DETAIL = re.compile(r"^(offset/block_\d+/.*|block_\d+_loss)$")


def console_logs(logs: dict[str, Any] | None) -> dict[str, Any] | None:
    """``logs`` without the per-block details (:data:`DETAIL`): a new dict, the one other callbacks get unchanged."""
    return None if logs is None else {k: v for k, v in logs.items() if not DETAIL.match(k)}


class ShortPrinterCallback(PrinterCallback):
    """``PrinterCallback`` (``disable_tqdm=True``) printing :func:`console_logs`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs), **kwargs)


class ShortProgressCallback(ProgressCallback):
    """``ProgressCallback`` (the progress bar) writing :func:`console_logs`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs), **kwargs)


def shorten_console(callbacks: list[TrainerCallback]) -> None:
    """Replace, in place in the Trainer's ``callback_handler.callbacks``, its own ``PrinterCallback`` and
    ``ProgressCallback`` by the short ones (a subclass a user passed is left alone)."""
    for i, callback in enumerate(callbacks):
        for plain, short in ((PrinterCallback, ShortPrinterCallback), (ProgressCallback, ShortProgressCallback)):
            if type(callback) is plain:
                replacement = short.__new__(short)
                replacement.__dict__.update(callback.__dict__)
                callbacks[i] = replacement
