"""The training loss of every head, chosen and scaled as the Trainer's ``compute_loss`` and ``training_step`` do,
and the batches it reads."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from . import compat
from ._unwrap import unwrap_model


def split_inputs(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's ``pixel_values`` and ``labels``: the input of the chain (``x_0``) and the target of every head."""
    if "pixel_values" not in inputs or "labels" not in inputs:
        raise ValueError(
            f"BPModifiedTrainer expects batches with `pixel_values` and `labels`, got {sorted(inputs)}. "
            "Check the data collator (it must return both)."
        )
    extra = set(inputs) - {"pixel_values", "labels"}
    if extra:
        raise ValueError(
            f"BPModifiedTrainer runs the model block by block and cannot pass {sorted(extra)} to it; remove "
            "these columns in the data collator."
        )
    return inputs["pixel_values"], inputs["labels"]


def forward_takes_labels(model: nn.Module) -> bool:
    """Whether the model's ``forward`` takes ``labels`` (``DeiTForImageClassificationWithTeacher``'s does not: the
    trainer computes the loss of its logits itself, in training and in evaluation)."""
    return "labels" in inspect.signature(unwrap_model(model).forward).parameters


class TrainingLoss:
    """``L`` on one head's logits, chosen as the Trainer's ``compute_loss`` chooses it: the user's
    ``compute_loss_func`` (given the logits as an ``ImageClassifierOutput``), else the label smoother
    (``label_smoothing_factor``), else the model's own loss (its ``problem_type``).

    Args:
        model: the model, plain or wrapped; its ``loss_function`` and ``config`` when neither of the others is given.
        compute_loss_func: the Trainer's ``compute_loss_func``.
        label_smoother: the Trainer's ``label_smoother``.
        model_accepts_loss_kwargs: the Trainer's ``model_accepts_loss_kwargs`` (the model's loss takes
            ``num_items_in_batch``).
        average_tokens_across_devices: the training argument of that name.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compute_loss_func: Callable | None = None,
        label_smoother: Callable | None = None,
        model_accepts_loss_kwargs: bool = False,
        average_tokens_across_devices: bool = False,
    ) -> None:
        self.model = unwrap_model(model)
        self.compute_loss_func = compute_loss_func
        self.label_smoother = label_smoother
        self.model_accepts_loss_kwargs = model_accepts_loss_kwargs
        self.average_tokens_across_devices = average_tokens_across_devices

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        if self.compute_loss_func is not None:
            outputs = ImageClassifierOutput(logits=logits)
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if self.label_smoother is not None:
            if compat.LABEL_SMOOTHER_COUNTS_ITEMS:
                return self.label_smoother({"logits": logits}, labels, num_items_in_batch=num_items_in_batch)
            return self.label_smoother({"logits": logits}, labels)
        model = self.model
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return model.loss_function(labels, logits, model.config, num_items_in_batch=num_items_in_batch)
        return model.loss_function(labels, logits, model.config)

    def micro_batch(
        self,
        labels: torch.Tensor,
        num_items_in_batch: Any,
        *,
        data_processes: int,
        accumulation_steps: int,
        scaled_for_ga: bool,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``L`` of a training micro-batch, scaled as the Trainer's ``training_step`` scales its loss: times the
        ``data_processes`` with ``average_tokens_across_devices`` (for a loss that counts ``num_items_in_batch``),
        divided by the micro-batch's ``accumulation_steps`` unless the loss is ``scaled_for_ga`` already."""
        counts_items = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        factor = 1.0
        if self.average_tokens_across_devices and counts_items and num_items_in_batch is not None:
            factor *= data_processes
        if not scaled_for_ga:
            factor /= accumulation_steps

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return self(logits, labels, num_items_in_batch) * factor

        return loss_fn


def loss_of_logits(loss: TrainingLoss, model: nn.Module, inputs: dict[str, Any], return_outputs: bool):
    """The evaluation loss of a model whose ``forward`` takes no ``labels``: the training ``loss`` of its logits."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    value = loss(outputs.logits, labels)
    return (value, outputs) if return_outputs else value
