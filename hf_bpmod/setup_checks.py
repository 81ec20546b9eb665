"""A ``BPModifiedTrainer``'s arguments at set-up: ``bp_modified``'s default per architecture, and warnings about
settings that would otherwise be ignored without a word."""

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


def resolve_bp_modified(args: Any, adapter: Any) -> bool:
    """``bp_modified`` as given, or (``None``) the architecture's default (the ``adapter``'s ``offset_by_default``),
    which is logged."""
    if args.bp_modified is not None:
        return args.bp_modified
    chosen = adapter.offset_by_default
    name = adapter.model_type
    if chosen:
        logger.info(f"bp_modified=None: the BP offset is on, the default for {name} models.")
    else:  # a warning from the main process only
        (logger.warning if args.should_log else logger.info)(
            f"bp_modified=None: no BP offset for this {name} model, which trains with the plain local loss: on "
            f"{name} models the offset did not improve accuracy in the package's measurements. Pass "
            "`bp_modified=True` for the paper's method, or `bp_modified=False` to silence this."
        )
    return chosen


def warn_about_ignored_settings(args: Any, num_blocks: int) -> None:
    """Warn (from the main process) about arguments that were given but have no effect on a model of
    ``num_blocks`` blocks."""
    if not args.should_log:
        return
    warn_if_offset_cannot_apply(args, num_blocks)
    warn_about_unused_offset_arguments(args)


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


def warn_if_offset_cannot_apply(args: Any, num_blocks: int) -> None:
    """Warn when ``bp_modified=True`` was asked for but ``local_horizon`` reaches past the last of ``num_blocks``
    blocks: every block's local gradient is then exact backprop and there is no offset to apply."""
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
