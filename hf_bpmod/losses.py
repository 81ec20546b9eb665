"""The training loss of every head, chosen and scaled as the Trainer's ``compute_loss`` and ``training_step`` do."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer
from transformers.modeling_outputs import ImageClassifierOutput

from . import compat
from .adapters import unwrap_model


def logits_loss(trainer: Trainer, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None):
    """``L`` on one head's logits, chosen as the Trainer's ``compute_loss`` chooses it: the user's
    ``compute_loss_func`` (given the logits as an ``ImageClassifierOutput``), else the label smoother
    (``label_smoothing_factor``), else the model's own loss (its ``problem_type``)."""
    if trainer.compute_loss_func is not None:
        outputs = ImageClassifierOutput(logits=logits)
        return trainer.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
    if trainer.label_smoother is not None:
        if compat.LABEL_SMOOTHER_COUNTS_ITEMS:
            return trainer.label_smoother({"logits": logits}, labels, num_items_in_batch=num_items_in_batch)
        return trainer.label_smoother({"logits": logits}, labels)
    base = unwrap_model(trainer.model)
    if trainer.model_accepts_loss_kwargs and num_items_in_batch is not None:
        return base.loss_function(labels, logits, base.config, num_items_in_batch=num_items_in_batch)
    return base.loss_function(labels, logits, base.config)


def forward_takes_labels(model: torch.nn.Module) -> bool:
    """Whether the model's ``forward`` takes ``labels`` (``DeiTForImageClassificationWithTeacher``'s does not: the
    trainer computes the loss of its logits itself, in training and in evaluation)."""
    return "labels" in inspect.signature(unwrap_model(model).forward).parameters


def head_loss_fn(trainer: Trainer, labels: torch.Tensor, num_items_in_batch: Any) -> Callable:
    """``L`` of a training micro-batch, scaled as the Trainer's ``training_step`` scales its loss (gradient
    accumulation, ``average_tokens_across_devices``)."""
    counts_items = trainer.model_accepts_loss_kwargs or trainer.compute_loss_func is not None
    factor = 1.0
    if trainer.args.average_tokens_across_devices and counts_items and num_items_in_batch is not None:
        factor *= trainer.accelerator.num_processes // compat.tensor_parallel_size(trainer)
    if not compat.loss_is_scaled_for_ga(trainer, num_items_in_batch):
        factor /= compat.gradient_accumulation_steps(trainer)

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return trainer._logits_loss(logits, labels, num_items_in_batch) * factor

    return loss_fn


def loss_of_logits(trainer: Trainer, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool):
    """The evaluation loss of a model whose ``forward`` takes no ``labels``: the training loss of its logits."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    loss = logits_loss(trainer, outputs.logits, labels)
    return (loss, outputs) if return_outputs else loss
