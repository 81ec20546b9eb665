"""DINOv2 (``Dinov2ForImageClassification``): block 0 = embeddings + encoder layer 0, block t = encoder layer t
(``block_granularity="layer"``, the only granularity a DINOv2 has).

The head is the final ``layernorm`` and the ``classifier`` on the [CLS] token concatenated with the mean of the
patch tokens (input width ``2 * hidden_size``); an auxiliary head has the same structure with fresh weights. The
layer list (``dinov2.encoder.layer``) is found by structure. The embeddings' ``mask_token`` (for pre-training) is
unused by classification: block 0 runs the embeddings with no position masked, which gives it its true gradient,
zero (:class:`~hf_bpmod.adapters.vit.UnmaskedEmbeddings`).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BlockGranularity, register_adapter
from .vit import EncoderAdapter, fresh_linear


class Dinov2Head(nn.Module):
    """``classifier(cat[y[:, 0], mean(y[:, 1:])])`` with ``y = layernorm(x)``: the DINOv2 classification head."""

    def __init__(self, layernorm: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm = layernorm
        self.classifier = classifier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layernorm(hidden_states)
        pooled = torch.cat([hidden_states[:, 0], hidden_states[:, 1:].mean(dim=1)], dim=1)
        return self.classifier(pooled)


@register_adapter("dinov2")
class Dinov2Adapter(EncoderAdapter):
    """Blocks and heads of ``Dinov2ForImageClassification``.

    No offset by default (``bp_modified=None``), which follows the transformer-encoder family (as the ViT).
    """

    backbone_name = "dinov2"
    family = "DINOv2"

    def head(self, model: nn.Module) -> nn.Module:
        return Dinov2Head(self.backbone(model).layernorm, model.classifier)

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        head = Dinov2Head(
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            fresh_linear(2 * config.hidden_size, config.num_labels, config.initializer_range),
        )
        return self.in_model_dtype(model, head)
