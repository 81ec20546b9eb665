"""Checks of a built ``BPModifiedTrainer`` whose settings would otherwise be ignored without a word."""

from __future__ import annotations

from typing import Any

from transformers.utils import logging

logger = logging.get_logger("hf_bpmod.trainer")


def warn_if_offset_cannot_apply(trainer: Any) -> None:
    """Warn (from the main process) when ``bp_modified=True`` was asked for but ``local_horizon`` reaches past the
    last block: every block's local gradient is then exact backprop and there is no offset to apply."""
    args, num_blocks = trainer.args, trainer.block_chain.num_blocks
    if args.bp_modified is not True or args.local_horizon < num_blocks or not args.should_log:
        return
    logger.warning(
        f"bp_modified=True has no effect: local_horizon={args.local_horizon} >= the model's {num_blocks} block"
        f"{'s' if num_blocks != 1 else ''} (block_granularity={args.block_granularity!r}), so every block's local "
        "gradient is already the exact backprop gradient and no offset is computed (training is plain backprop). "
        f"For the BP-modified local loss, set local_horizon below {num_blocks}"
        f"{' or use a finer block_granularity' if args.block_granularity == 'stage' else ''}; pass "
        "bp_modified=False to silence this."
    )
