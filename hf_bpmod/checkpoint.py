"""What a checkpoint holds besides the model and the optimizer: the auxiliary heads and the offset state."""

from __future__ import annotations

import os
from typing import Any

import torch

BPMOD_STATE_NAME = "bpmod_state.pt"


def save_bpmod_state(state: dict[str, Any], checkpoint: str) -> None:
    """Write ``state`` into ``checkpoint`` atomically (a temporary file, then renamed)."""
    path = os.path.join(checkpoint, BPMOD_STATE_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_bpmod_state(checkpoint: str, device: torch.device | str) -> dict[str, Any]:
    """The state saved in ``checkpoint``; a clear error if the folder cannot be resumed from."""
    path = os.path.join(checkpoint, BPMOD_STATE_NAME)
    if not os.path.isfile(path):
        saved = set(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else set()
        if not any(name.startswith("optimizer") for name in saved):
            raise FileNotFoundError(
                f"{checkpoint} holds no training state (no optimizer state, no {BPMOD_STATE_NAME} with the "
                "auxiliary heads and offsets), as `save_only_model=True` writes, so it cannot be resumed. Start a "
                "new run from its weights (`from_pretrained`), or save full checkpoints to resume from."
            )
        raise FileNotFoundError(
            f"{checkpoint} has no {BPMOD_STATE_NAME} (auxiliary heads and offset state): it was not written by "
            "BPModifiedTrainer. Start a new run instead of resuming from it."
        )
    return torch.load(path, map_location=device, weights_only=False)


def check_block_split(state: dict[str, Any], args: Any) -> None:
    """A checkpoint resumes only under the block split and horizon it was trained with: others have other
    auxiliary heads (and so other optimizer parameter groups)."""
    for name in ("local_horizon", "block_granularity"):
        saved, now = state.get(name), getattr(args, name)
        if saved != now:
            raise ValueError(
                f"The checkpoint was trained with `{name}={saved!r}`, this run has `{name}={now!r}`: resume with "
                f"`{name}={saved!r}`, or start a new run from the checkpoint's weights (`from_pretrained`) "
                "instead of resuming."
            )


def saved_method(state: dict[str, Any]) -> bool:
    """Whether the checkpoint trained with the offset (a checkpoint without the record did if it ever refreshed)."""
    saved = state.get("bp_modified")
    if saved is None:
        saved = state["offset"].get("period_index", 0) > 0
    return bool(saved)
