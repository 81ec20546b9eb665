"""The model card's section on the training method."""

from __future__ import annotations

from typing import Any

from ._files import write_atomically
from .compat import UNNAMED_BASE_MODEL_SENTENCE

CARD_TAGS = ("hf_bpmod", "local-learning")


def method_description(
    args: Any,
    num_blocks: int,
    uses_offset: bool,
    offset_batch_size: int | None = None,
    offset_micro_batch_size: int | None = None,
) -> dict[str, Any]:
    """The method and its settings, as recorded in the model card; ``offset_batch_size`` and
    ``offset_micro_batch_size``: the ``B'`` and ``b'`` used, where they were chosen from the data (default: the
    arguments')."""
    info: dict[str, Any] = {
        "method": "BP-modified local loss" if uses_offset else "local loss",
        "local_horizon": args.local_horizon,
        "num_blocks": num_blocks,
        "block_granularity": args.block_granularity,
        "bp_modified": uses_offset,
    }
    if uses_offset:
        unset = "chosen from the training data"
        info.update(
            offset_batch_size=offset_batch_size or args.offset_batch_size or unset,
            offset_micro_batch_size=offset_micro_batch_size or args.offset_micro_batch_size or unset,
            offset_period=args.offset_period,
            offset_scaling=args.offset_scaling,
            offset_max_ratio=args.offset_max_ratio,
        )
    return info


def add_method_section(path: str, description: dict[str, Any]) -> None:
    """Append the method section to the card at ``path`` (replaced whole, never left half-written); a model built
    from a config is said to be trained from scratch instead of fine-tuned from an empty link."""
    with open(path, encoding="utf-8") as f:
        card = f.read()
    card = card.replace(UNNAMED_BASE_MODEL_SENTENCE, "This model was trained from scratch on ", 1)
    lines = ["", "## Training method (hf_bpmod)", ""]
    lines.append(
        "Trained with [hf_bpmod](https://pypi.org/project/hf-bpmod/): each block learns from the loss of an "
        "auxiliary head `local_horizon` blocks ahead (Ren & Li, *BP-modified local loss for efficient training "
        "of deep neural networks*)."
    )
    lines.append("")
    lines += [f"- {key}: {value}" for key, value in description.items()]
    write_atomically(path, (card + "\n".join(lines) + "\n").encode("utf-8"))
