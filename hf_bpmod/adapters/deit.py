"""DeiT (``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``): block 0 = embeddings (CLS,
distillation token, patches) + encoder layer 0, block t = encoder layer t (``block_granularity="layer"``, the only
granularity a DeiT has).

The head is the final ``layernorm`` and the ``classifier`` on token 0; with the distillation token
(``...WithTeacher``) it is the mean of ``cls_classifier`` on token 0 and ``distillation_classifier`` on token 1, the
logits the model returns. An auxiliary head has the same structure with fresh weights. The layer list is
``deit.layers`` in transformers >= 5.9 and ``deit.encoder.layer`` before; it is found by structure.

``DeiTForImageClassificationWithTeacher.forward`` takes no ``labels``: ``BPModifiedTrainer`` keeps the ``labels``
column for it and computes the loss of its logits itself, in training and in evaluation, with the loss it would use
for any model (``compute_loss_func``, label smoothing, or the model's ``problem_type``).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BlockGranularity, register_adapter
from .vit import EncoderAdapter, ViTHead, fresh_linear


class DistilledHead(nn.Module):
    """``(cls_classifier(y[:, 0]) + distillation_classifier(y[:, 1])) / 2`` with ``y = layernorm(x)``: the logits of
    ``DeiTForImageClassificationWithTeacher``."""

    def __init__(self, layernorm: nn.Module, cls_classifier: nn.Module, distillation_classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm = layernorm
        self.cls_classifier = cls_classifier
        self.distillation_classifier = distillation_classifier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layernorm(hidden_states)
        cls_logits = self.cls_classifier(hidden_states[:, 0, :])
        distillation_logits = self.distillation_classifier(hidden_states[:, 1, :])
        return (cls_logits + distillation_logits) / 2


def has_distillation_head(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DeiTForImageClassificationWithTeacher`` (two classifiers, CLS and distillation)."""
    return hasattr(model, "distillation_classifier")


@register_adapter("deit")
class DeiTAdapter(EncoderAdapter):
    """Blocks and heads of ``DeiTForImageClassification`` and ``DeiTForImageClassificationWithTeacher``.

    No offset by default (``bp_modified=None``), which follows the transformer-encoder family (as the ViT).
    """

    backbone_name = "deit"
    family = "DeiT"

    def head(self, model: nn.Module) -> nn.Module:
        layernorm = self.backbone(model).layernorm
        if has_distillation_head(model):
            return DistilledHead(layernorm, model.cls_classifier, model.distillation_classifier)
        return ViTHead(layernorm, model.classifier)

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        linears = [fresh_linear(config.hidden_size, config.num_labels, config.initializer_range)]
        if has_distillation_head(model):
            linears.append(fresh_linear(config.hidden_size, config.num_labels, config.initializer_range))
            return self.in_model_dtype(model, DistilledHead(layernorm, *linears))
        return self.in_model_dtype(model, ViTHead(layernorm, *linears))
