"""The transformers model under its wrappers (DDP, DataParallel, peft). Imports nothing from the package."""

from __future__ import annotations

from torch import nn


def unwrap_with_peft_levels(model: nn.Module) -> tuple[nn.Module, int]:
    """The transformers model under DDP / accelerate / peft wrappers, and how many peft wrappers were passed."""
    peft_levels = 0
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module  # DDP, DataParallel
        elif hasattr(model, "get_base_model"):
            peft_levels += 1
            model = model.get_base_model()  # peft
        else:
            return model, peft_levels


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / accelerate / peft wrappers."""
    return unwrap_with_peft_levels(model)[0]
