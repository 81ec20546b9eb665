"""The offset over a training run (Algorithm 1): when to refresh it, what it holds between refreshes, and the log of
every refresh. Knows nothing of the Trainer: the data comes through a callable, the step count as a number.

Once per optimizer step, after the local gradients of the whole batch are in ``.grad`` (and averaged across
processes), the trainer refreshes the offset when a period of ``K`` steps starts (:meth:`OffsetController.due`,
:meth:`OffsetController.refresh`) and applies ``g^ = a g_h + lambda Delta`` (eq. 5, :meth:`OffsetController.apply`).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
#: The paper's ``B'`` and ``b'`` (Section 6): the largest ``B'`` chosen from the data, and the micro-batch it is
#: counted in.
PAPER_SAMPLE_SIZE = 320
PAPER_MICRO_BATCH_SIZE = 8
#: ``B'`` chosen from the data as a share of the examples of one refresh period, ``K B`` (the paper's guidance).
SAMPLE_SHARE = 0.01


def default_sample_size(period_examples: int, dataset_size: int, micro_batch_size: int) -> int:
    """``B'`` when ``offset_batch_size`` is unset: about :data:`SAMPLE_SHARE` of the ``period_examples`` (``K B``),
    in whole micro-batches of ``micro_batch_size`` (``b'``), at least two, at most :data:`PAPER_SAMPLE_SIZE` and at
    most the ``dataset_size`` examples of the training set (which must hold two micro-batches)."""
    b = micro_batch_size
    most = max(2, min(PAPER_SAMPLE_SIZE // b, dataset_size // b))
    return b * max(2, min(round(SAMPLE_SHARE * period_examples / b), most))


def default_micro_batch_size(sample_size: int, device_batch_size: int, on_cpu: bool) -> int:
    """``b'`` chosen with ``B'`` (``sample_size``) where both are unset: the largest divisor of ``B'`` that leaves
    at least two micro-batches and is at most :data:`PAPER_MICRO_BATCH_SIZE` on an accelerator (the pass holds
    ``b'`` examples through every block: its memory), or, ``on_cpu`` (where a micro-batch costs about as much as a
    training step whatever its size: benchmarks/results/offset_share.md), at most ``device_batch_size`` (the pass
    then holds no more activations than one backprop step on a training batch)."""
    limit = min(device_batch_size if on_cpu else PAPER_MICRO_BATCH_SIZE, sample_size // 2)
    return max(d for d in range(1, max(1, limit) + 1) if sample_size % d == 0)


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
        announce: log the ``B'`` chosen from the data and the first refresh (the main process).
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
        announce: bool = True,
    ) -> None:
        self.chain = chain
        self.settings = settings
        self.requested = (settings.sample_size, settings.micro_batch_size)  # None: chosen from the data
        self.announce = announce
        self._chosen_for: tuple[int, int] | None = None  # (training set size, K B) that B' was chosen for
        self._refreshed = False
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

    def check_dataset(self, dataset: Any, steps_per_epoch: int) -> None:
        """The sampler draws ``B'`` examples at random (Algorithm 1, line 4): it needs a map-style training set
        (``len`` and indexing) that holds ``B'`` examples, in at least two micro-batches. ``B'`` and ``b'`` left
        unset are chosen here from the training set and the ``steps_per_epoch`` optimizer steps of an epoch
        (:func:`default_sample_size`, :func:`default_micro_batch_size`), and logged."""
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"The BP offset draws `offset_batch_size` examples at random from the training set, which needs a "
                f"map-style dataset (with `len` and indexing); got {type(dataset).__name__}. Load the data without "
                "streaming (a `datasets.Dataset`, not an `IterableDataset`), or set `bp_modified=False`."
            )
        n, (wanted, micro) = len(dataset), self.requested
        unit = micro or min(PAPER_MICRO_BATCH_SIZE, n // 2)  # what B' is counted in
        if n < 2 * max(unit, 1):
            fix = f"lower it (e.g. `offset_micro_batch_size={n // 2}`) or " if micro and n >= 2 else ""
            raise ValueError(
                f"The training set ({n} examples) cannot hold the two micro-batches of `offset_micro_batch_size` "
                f"({unit or 1}) that the BP offset needs to estimate the gradient's variance; {fix}set "
                "`bp_modified=False`."
            )
        examples = self.settings.period_steps(steps_per_epoch) * self.settings.batch_size
        chosen = default_sample_size(examples, n, unit)
        if wanted is not None and wanted > n:
            raise ValueError(
                f"`offset_batch_size` ({wanted}) is larger than the training set ({n} examples); lower it (e.g. "
                f"`offset_batch_size={chosen}`, the value chosen from the data when it is left unset) or set "
                "`bp_modified=False`."
            )
        if wanted is not None and micro is not None or self._chosen_for == (n, examples):
            return
        self._chosen_for = (n, examples)
        size = wanted or chosen
        on_cpu = not any(p.device.type != "cpu" for ps in self.chain.block_params for p in ps[:1])
        micro = micro or default_micro_batch_size(size, self.settings.device_batch_size, on_cpu)
        self.settings = dataclasses.replace(self.settings, sample_size=size, micro_batch_size=micro)
        if self.announce:
            logger.info(
                f"`offset_batch_size` unset: the BP offset draws {size} examples per refresh, {self._why(examples, n)}; "
                f"in {size // micro} micro-batches of {micro}"
                + (f" ({self._why_micro(on_cpu)})" if self.requested[1] is None else "")
                + ". Set `offset_batch_size` and `offset_micro_batch_size` to choose others."
            )

    def _why(self, examples: int, n: int) -> str:
        """Which bound of :func:`default_sample_size` chose ``B'`` for ``examples`` = ``K B`` and ``n`` examples."""
        unit = self.requested[1] or min(PAPER_MICRO_BATCH_SIZE, n // 2)
        share = f"{SAMPLE_SHARE:.0%} of the {examples} examples of a refresh period (K steps x batch B)"
        wanted = round(SAMPLE_SHARE * examples / unit)
        if wanted < 2:
            return f"at least two micro-batches of {unit}, more than {share}"
        if wanted > min(PAPER_SAMPLE_SIZE // unit, n // unit):
            paper = PAPER_SAMPLE_SIZE // unit <= n // unit
            bound = f"the paper's {PAPER_SAMPLE_SIZE}" if paper else f"the training set of {n}"
            return f"at most {bound}, less than {share}"
        return f"about {share}, the paper's guidance"

    def _why_micro(self, on_cpu: bool) -> str:
        """Why :func:`default_micro_batch_size` chose ``b'``."""
        if on_cpu:
            return (
                "on the CPU a micro-batch costs about a training step whatever its size: the fewest, at least two, "
                f"of at most `per_device_train_batch_size` ({self.settings.device_batch_size})"
            )
        return f"the paper's {PAPER_MICRO_BATCH_SIZE} at most: the pass's memory grows with it"

    def refresh(self, global_step: int, data: OffsetData, loss_scale: float = 1.0) -> bool:
        """Algorithm 1, lines 4-9, at the start of a period: a fresh sample of ``B'`` examples, the statistics,
        and the new offset. Whether the statistics were finite (if not, the previous offset is kept)."""
        state = self.state
        period = self.settings.period_steps(data.steps_per_epoch)
        size, micro = self.settings.sample_size, self.settings.micro_batch_size
        if self.announce and not self._refreshed:  # the first refresh holds step 0 (or the resumed step) back
            logger.info(
                f"Refreshing the BP offset on {size} examples in {-(-size // micro)} micro-batches before step "
                f"{global_step} (a backprop and a local pass over each; then every {period} steps)."
            )
        self._refreshed = True
        indices = offset_sample(data.size, size, self.settings.seed, state.period_index)
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
