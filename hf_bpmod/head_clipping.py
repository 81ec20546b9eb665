"""``max_grad_norm`` for the auxiliary heads, which the Trainer's clipping (of the model's parameters) does not see.

Each auxiliary head is clipped on its own to ``max_grad_norm``: a head is trained by its own loss only, so its
gradient is that of a separate small problem, and one head's spike should not shrink another head's step (the
measurements behind this choice are in the method documentation, "Gradient clipping and the auxiliary heads").
The model's parameters stay clipped by the Trainer, together, exactly as plain ``Trainer`` clips them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback


def clip_aux_head_gradients(heads: nn.ModuleDict, max_norm: float | None) -> dict[str, torch.Tensor]:
    """Clip every head's gradient to the norm ``max_norm`` (nothing for ``None`` or ``<= 0``, as the Trainer);
    returns each head's norm before clipping (tensors: reading them would wait for the device)."""
    norms: dict[str, torch.Tensor] = {}
    if not max_norm or max_norm <= 0:
        return norms
    for name, head in heads.items():
        params = [p for p in head.parameters() if p.grad is not None]
        if params:
            norms[name] = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norms


class ClipAuxHeadGradients(TrainerCallback):
    """Clips the auxiliary heads' gradients right before each optimizer step, after the Trainer clipped the model's
    (with fp16 the Trainer's clipping has unscaled every gradient of the optimizer, the heads' included)."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        self.heads = heads

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        clip_aux_head_gradients(self.heads, args.max_grad_norm)
