"""ViT (``ViTForImageClassification``): block 0 = embeddings + encoder layer 0, block t = encoder layer t
(``block_granularity="layer"``, the only granularity a ViT has).

The head is the final ``layernorm`` and the ``classifier`` on token 0. The layer list is ``vit.layers`` in
transformers >= 5.9 and ``vit.encoder.layer`` before; it is found by structure, not by path.

:class:`EncoderAdapter` holds what every transformer encoder of this shape shares (DeiT, BEiT and DINOv2 build on
it): the block split, the refused granularities, the LoRA targets and the offset's default.
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
            "length (transformers keeps them in `layers` or `encoder.layer`, e.g. `vit.layers` in transformers >= 5.9 "
            "and `vit.encoder.layer` before)."
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def fresh_linear(in_features: int, out_features: int, initializer_range: float) -> nn.Linear:
    """A ``nn.Linear`` initialised as transformers initialises a classifier (truncated normal, zero bias)."""
    linear = nn.Linear(in_features, out_features)
    nn.init.trunc_normal_(linear.weight, std=initializer_range)
    nn.init.zeros_(linear.bias)
    return linear


class UnmaskedEmbeddings(nn.Module):
    """The embeddings of an encoder that keeps a pre-training ``mask_token``, run with no position masked: the
    same values as without a mask, and the (unused) mask token gets its true gradient, zero, like every other
    parameter of block 0."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patch_height, patch_width = self.embeddings.patch_embeddings.patch_size
        height, width = pixel_values.shape[-2:]
        num_patches = (height // patch_height) * (width // patch_width)
        no_mask = torch.zeros(pixel_values.shape[0], num_patches, dtype=torch.bool, device=pixel_values.device)
        return self.embeddings(pixel_values, bool_masked_pos=no_mask)


class EncoderAdapter(ArchitectureAdapter):
    """Blocks of a transformer encoder whose backbone ``model.<backbone_name>`` holds ``embeddings`` and a list of
    ``config.num_hidden_layers`` layers: block 0 = embeddings + layer 0, block t = layer t.

    No offset by default (``bp_modified=None``), which follows the transformer-encoder family (as the ViT): the
    offset did not improve a ViT's accuracy in the package's measurements. ``bp_modified=True`` applies it.
    """

    offset_by_default = False
    #: The classification model's attribute that holds the backbone (``model.vit``).
    backbone_name: str = ""
    #: The family's name in messages.
    family: str = ""

    def backbone(self, model: nn.Module) -> nn.Module:
        """The encoder under the classification head (``model.vit``, ``model.deit`` ...)."""
        return getattr(model, self.backbone_name)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The encoder layers, found by structure (their path changed between transformers releases)."""
        return find_layer_list(self.backbone(model), model.config.num_hidden_layers)

    def embeddings(self, model: nn.Module) -> nn.Module:
        """The embeddings that start block 0 (see :class:`UnmaskedEmbeddings` where they hold a mask token)."""
        embeddings = self.backbone(model).embeddings
        if getattr(embeddings, "mask_token", None) is not None:
            return UnmaskedEmbeddings(embeddings)
        return embeddings

    def check_granularity(self, granularity: BlockGranularity) -> None:
        """Refuse the ResNet granularities: an encoder has no stem that could learn alone and no stages."""
        if granularity == "layer+stem":
            raise ValueError(
                f"`block_granularity='layer+stem'` is for ResNets: a {self.family}'s CLS token after the patch "
                "embedding does not depend on the image, so the embedding cannot learn from a local loss of its own. "
                "Use 'layer'."
            )
        if granularity == "stage":
            raise ValueError(
                f"`block_granularity='stage'` is for ResNets: a {self.family} has no stages (all its encoder layers "
                "work at one width), so 'stage' would mean one block per layer. Use 'layer'."
            )

    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        self.check_granularity(granularity)
        layers = self.layers(model)
        return [Sequence_(self.embeddings(model), layers[0])] + [Sequence_(layer) for layer in layers[1:]]

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

    @staticmethod
    def in_model_dtype(model: nn.Module, head: nn.Module) -> nn.Module:
        """``head`` in the dtype of ``model``'s parameters."""
        return head.to(dtype=next(model.parameters()).dtype)


@register_adapter("vit")
class ViTAdapter(EncoderAdapter):
    """Blocks and heads of ``ViTForImageClassification``.

    No offset by default (``bp_modified=None``): on ViTs the offset did not improve accuracy in the package's
    measurements. ``bp_modified=True`` applies it.
    """

    backbone_name = "vit"
    family = "ViT"

    def head(self, model: nn.Module) -> nn.Module:
        return ViTHead(self.backbone(model).layernorm, model.classifier)

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        head = ViTHead(
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            fresh_linear(config.hidden_size, config.num_labels, config.initializer_range),
        )
        return self.in_model_dtype(model, head)
