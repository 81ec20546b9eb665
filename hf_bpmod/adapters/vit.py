"""ViT (``ViTForImageClassification``): block 0 = embeddings + encoder layer 0, block t = encoder layer t
(``block_granularity="layer"``, the only granularity a ViT has).

The head is the final ``layernorm`` and the ``classifier`` on token 0. The layer list is ``vit.layers`` in
transformers >= 5.9 and ``vit.encoder.layer`` before; it is found by structure, not by path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..chain import Sequence_
from ..compat import VIT_QUERY_VALUE_NAMES
from .base import ArchitectureAdapter, BlockGranularity, register_adapter, unwrap_model


class ViTHead(nn.Module):
    """``classifier(layernorm(x)[:, 0])``: the ViT classification head on the [CLS] token."""

    def __init__(self, layernorm: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm = layernorm
        self.classifier = classifier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layernorm(hidden_states)[:, 0, :])


def find_layer_list(backbone: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ``nn.ModuleList`` of ``num_layers`` encoder layers inside ``backbone`` (the shallowest one)."""
    candidates = [
        (name.count("."), name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the {num_layers} encoder layers of {type(backbone).__name__}: no nn.ModuleList of that "
            "length (expected `vit.layers` in transformers >= 5.9 or `vit.encoder.layer` before)."
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


@register_adapter("vit")
class ViTAdapter(ArchitectureAdapter):
    """Blocks and heads of ``ViTForImageClassification``.

    No offset by default (``bp_modified=None``): on ViTs the offset did not improve accuracy in the package's
    measurements. ``bp_modified=True`` applies it.
    """

    offset_by_default = False

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        return model.vit

    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        if granularity == "layer+stem":
            raise ValueError(
                "`block_granularity='layer+stem'` is for ResNets: a ViT's CLS token after the patch embedding does "
                "not depend on the image, so the embedding cannot learn from a local loss of its own. Use 'layer'."
            )
        if granularity == "stage":
            raise ValueError(
                "`block_granularity='stage'` is for ResNets: a ViT has no stages (all its encoder layers work at one "
                "width), so 'stage' would mean one block per layer. Use 'layer'."
            )
        vit = self._backbone(model)
        layers = find_layer_list(vit, model.config.num_hidden_layers)
        return [Sequence_(vit.embeddings, layers[0])] + [Sequence_(layer) for layer in layers[1:]]

    def head(self, model: nn.Module) -> nn.Module:
        return ViTHead(self._backbone(model).layernorm, model.classifier)

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """The attention's query and value projections: ``q_proj``/``v_proj`` in transformers >= 5.9, ``query``/
        ``value`` before (found by name in the model, not by version)."""
        leaf_names = {name.rsplit(".", 1)[-1] for name, _ in unwrap_model(model).named_modules()}
        for pair in VIT_QUERY_VALUE_NAMES:
            if set(pair) <= leaf_names:
                return pair
        raise ValueError(
            f"Found neither q_proj/v_proj nor query/value in {type(model).__name__}: pass `target_modules` to the "
            "peft config yourself."
        )

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        head = ViTHead(
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            nn.Linear(config.hidden_size, config.num_labels),
        )
        nn.init.trunc_normal_(head.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(head.classifier.bias)
        dtype = next(model.parameters()).dtype
        return head.to(dtype=dtype)
