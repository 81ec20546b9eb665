"""Mixed precision for a model run block by block: the forward context and the fp16 loss scale."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


def forward_context(
    accelerator: Any, compute_loss_context_manager: Callable[[], contextlib.AbstractContextManager]
) -> contextlib.ExitStack:
    """The context of every forward computation: the Trainer's ``compute_loss_context_manager`` and the
    ``accelerator``'s autocast (which wraps ``model.forward`` only; the chain calls the model's blocks directly, so
    without this ``bf16``/``fp16`` would silently run in fp32)."""
    stack = contextlib.ExitStack()
    stack.enter_context(compute_loss_context_manager())
    stack.enter_context(accelerator.autocast())
    return stack


def scaler_enabled(accelerator: Any) -> bool:
    """Whether fp16's gradient scaler is on (it then skips steps with non-finite gradients itself)."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler is not None and scaler.is_enabled()


def loss_scale(accelerator: Any, device: torch.device) -> float:
    """The fp16 loss scale (1 without an enabled scaler).

    The losses never pass through ``scaler.scale`` (they are scaled by this number inside the chain), which is
    what creates the scaler's scale tensor; its ``unscale_`` and ``step`` fail without it, so it is created here the
    public way, on the training device."""
    if not scaler_enabled(accelerator):
        return 1.0
    scaler = accelerator.scaler
    scaler.scale(torch.ones((), device=device))
    return float(scaler.get_scale())
