"""Checks of a built ``BPModifiedTrainer`` whose settings would otherwise be ignored without a word."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.utils import logging

logger = logging.get_logger("hf_bpmod.trainer")


#: Offset arguments whose default does not depend on another argument.
OFFSET_ARGUMENTS = (
    "offset_batch_size",
    "offset_micro_batch_size",
    "offset_period",
    "offset_scaling",
    "offset_fixed_a",
    "offset_fixed_lambda",
    "offset_bias_correction",
    "offset_seed",
    "offset_log_file",
)


def warn_about_ignored_settings(trainer: Any) -> None:
    """Warn (from the main process) about arguments that were given but have no effect."""
    if not trainer.args.should_log:
        return
    warn_if_offset_cannot_apply(trainer)
    warn_about_unused_offset_arguments(trainer.args)


def _changed(args: Any, names: tuple[str, ...]) -> list[str]:
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    return [f"{n}={getattr(args, n)!r}" for n in names if n in defaults and getattr(args, n) != defaults[n]]


def warn_about_unused_offset_arguments(args: Any) -> None:
    """Offset arguments set away from their defaults where they are not read: with ``bp_modified=False`` (no
    offset), and ``offset_fixed_a`` / ``offset_fixed_lambda`` with an ``offset_scaling`` other than ``"fixed"``."""
    if args.bp_modified is False:
        changed = _changed(args, OFFSET_ARGUMENTS)
        if changed:
            logger.warning(
                f"{', '.join(changed)} ha{'s' if len(changed) == 1 else 've'} no effect with bp_modified=False (no "
                "BP offset is computed). Pass bp_modified=True to use the offset, or drop these arguments."
            )
    elif args.offset_scaling != "fixed":
        changed = _changed(args, ("offset_fixed_a", "offset_fixed_lambda"))
        if changed:
            logger.warning(
                f"{', '.join(changed)} ha{'s' if len(changed) == 1 else 've'} no effect with "
                f"offset_scaling={args.offset_scaling!r}, which chooses a and lambda itself. Pass "
                "offset_scaling='fixed' to use them, or drop them."
            )


def warn_if_offset_cannot_apply(trainer: Any) -> None:
    """Warn when ``bp_modified=True`` was asked for but ``local_horizon`` reaches past the
    last block: every block's local gradient is then exact backprop and there is no offset to apply."""
    args, num_blocks = trainer.args, trainer.block_chain.num_blocks
    if args.bp_modified is not True or args.local_horizon < num_blocks:
        return
    logger.warning(
        f"bp_modified=True has no effect: local_horizon={args.local_horizon} >= the model's {num_blocks} block"
        f"{'s' if num_blocks != 1 else ''} (block_granularity={args.block_granularity!r}), so every block's local "
        "gradient is already the exact backprop gradient and no offset is computed (training is plain backprop). "
        f"For the BP-modified local loss, set local_horizon below {num_blocks}"
        f"{' or use a finer block_granularity' if args.block_granularity == 'stage' else ''}; pass "
        "bp_modified=False to silence this."
    )
