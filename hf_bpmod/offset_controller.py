"""The offset over a training run (Algorithm 1): when to refresh it, what it holds between refreshes, and the log of
every refresh. Knows nothing of the Trainer: the data comes through a callable, the step count as a number.

Once per optimizer step, after the local gradients of the whole batch are in ``.grad`` (and averaged across
processes), the trainer refreshes the offset when a period of ``K`` steps starts (:meth:`OffsetController.due`,
:meth:`OffsetController.refresh`) and applies ``g^ = a g_h + lambda Delta`` (eq. 5, :meth:`OffsetController.apply`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .chain import BlockChain
from .offset_pass import (
    SINGLE_PROCESS,
    FetchMicroBatch,
    OffsetSettings,
    OffsetState,
    Processes,
    apply_block_offsets,
    compute_offsets,
    offset_sample,
)
from .refresh_log import RefreshLog

logger = logging.getLogger(__name__)

#: The per-block values of a refresh that are logged (``offset/block_<t>/<key>``).
LOGGED_KEYS = ("a", "lam", "bias", "var", "cosine", "offset_norm", "reliability", "capped")


@dataclass
class OffsetData:
    """What a refresh needs of the training data: its size, a micro-batch fetcher and the optimizer steps of an
    epoch (for a period given in epochs)."""

    size: int
    fetch: FetchMicroBatch
    steps_per_epoch: int


class OffsetController:
    """Owns the offset's settings, state, sampler, period and refresh log (Algorithm 1, lines 2-9).

    Args:
        chain: the model's blocks and heads.
        settings: built by ``BPModifiedTrainingArguments.offset_settings()``.
        processes: this process among the data-parallel ones; statistics are summed across them.
        preserve: modules whose buffers (BatchNorm statistics) the offset pass must leave as it found them.
        forward_context: the context of every forward computation (autocast).
        log_path: the JSON-lines refresh log, written by this process (``None``: not written here); its rules are
            those of :mod:`hf_bpmod.refresh_log`.
        log_folder: the ``output_dir`` the log must stay inside, symbolic links resolved.
    """

    def __init__(
        self,
        chain: BlockChain,
        settings: OffsetSettings,
        *,
        processes: Processes = SINGLE_PROCESS,
        preserve: Sequence[nn.Module] = (),
        forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        log_path: str | None = None,
        log_folder: str | None = None,
    ) -> None:
        self.chain = chain
        self.settings = settings
        self.processes = processes
        self.preserve = list(preserve)
        self.forward_context = forward_context
        self.log = RefreshLog(log_path, log_folder) if log_path is not None else None
        self.state = OffsetState()
        self.pending_logs: dict[str, float] | None = None

    def due(self, global_step: int) -> bool:
        """Whether a period starts at ``global_step`` (the first one before the first update)."""
        return global_step >= self.state.next_refresh_step

    def apply(self, loss_scale: float = 1.0) -> None:
        """``g^ = a g_h + lambda Delta`` (eq. 5) on the gradients in ``.grad`` (at ``loss_scale``)."""
        if self.state.blocks:
            apply_block_offsets(self.chain, self.state.blocks, loss_scale)

    def check_dataset(self, dataset: Any) -> None:
        """The sampler draws ``B'`` examples at random (Algorithm 1, line 4): it needs a map-style training set
        (``len`` and indexing) of at least ``B'`` examples."""
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"The BP offset draws `offset_batch_size` examples at random from the training set, which needs a "
                f"map-style dataset (with `len` and indexing); got {type(dataset).__name__}. Load the data without "
                "streaming (a `datasets.Dataset`, not an `IterableDataset`), or set `bp_modified=False`."
            )
        n, wanted = len(dataset), self.settings.sample_size
        if wanted > n:
            raise ValueError(
                f"`offset_batch_size` ({wanted}) is larger than the training set ({n} examples); lower it (e.g. "
                f"`offset_batch_size={max(2 * self.settings.micro_batch_size, n // 10)}`) or set `bp_modified=False`."
            )

    def refresh(self, global_step: int, data: OffsetData, loss_scale: float = 1.0) -> bool:
        """Algorithm 1, lines 4-9, at the start of a period: a fresh sample of ``B'`` examples, the statistics,
        and the new offset. Whether the statistics were finite (if not, the previous offset is kept)."""
        state = self.state
        period = self.settings.period_steps(data.steps_per_epoch)
        indices = offset_sample(data.size, self.settings.sample_size, self.settings.seed, state.period_index)
        # fp16: the pass runs at the loss scale of training and unscales before any statistic; if that overflowed,
        # it is run once more unscaled rather than leaving the whole period without an offset.
        for scale in [loss_scale, 1.0] if loss_scale != 1.0 else [1.0]:
            offsets, record = compute_offsets(
                self.chain,
                indices,
                data.fetch,
                self.settings,
                period=period,
                processes=self.processes,
                preserve=self.preserve,
                forward_context=self.forward_context,
                previous=state.blocks,
                loss_scale=scale,
            )
            if offsets is not None:
                break
        if offsets is None:
            logger.warning(
                f"Offset refresh {state.period_index} at step {global_step} gave non-finite statistics; "
                "keeping the previous offset."
            )
        else:
            state.blocks = offsets
        record.update(step=global_step, period_index=state.period_index)
        state.period_index += 1
        state.next_refresh_step = global_step + period
        self._log(record)
        return offsets is not None

    # ------------------------------------------------------------------ the refresh log
    def start_log(self, start_step: int) -> None:
        """A training run starts at ``start_step`` (0: fresh; else resumed from the checkpoint of that step): a new
        run id for its records, and the log kept, cut and repaired as :class:`~hf_bpmod.refresh_log.RefreshLog`
        says (records from ``start_step`` on, made again by this run, are only in the numbered copy)."""
        if self.log is not None:
            self.log.start(start_step)

    def _log(self, record: dict) -> None:
        logs = {"offset/seconds": record["seconds"]}
        for t, block in enumerate(record["blocks"]):
            for key in LOGGED_KEYS:
                logs[f"offset/block_{t}/{key}"] = block[key]
        self.pending_logs = logs
        if self.log is not None:
            self.log.append(record)

    def pop_logs(self) -> dict[str, float]:
        """The last refresh's values for the Trainer's log, once."""
        logs, self.pending_logs = self.pending_logs or {}, None
        return logs
