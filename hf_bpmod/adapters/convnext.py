"""ConvNeXt and ConvNeXt V2 (``ConvNextForImageClassification``, ``ConvNextV2ForImageClassification``; the backbone
under ``convnext`` or ``convnextv2``).

Blocks (``granularity="layer"``): block 0 = embeddings (patchify convolution + LayerNorm) + stage 0's downsampling
(none in stage 0) + stage 0's first layer; then one block per layer (``encoder.stages[s].layers[j]``), the first
layer of a stage taking that stage's downsampling (LayerNorm + stride-2 convolution) in front of it.
``granularity="stage"``: block 0 = embeddings + stage 0, then one block per stage (downsampling and layers).
``granularity="layer+stem"``: as ``"layer"``, with the embeddings a block of their own. Every block maps a
(B, C, H, W) map to the next, as the model's stages do.

The head is ``classifier(layernorm(x.mean([-2, -1])))``: global average pooling, the final LayerNorm and the
classifier. An auxiliary head has that structure with a fresh LayerNorm and Linear of its block's width, the
channels of the block's stage (paper Appendix A).
"""

from __future__ import annotations

import torch
from torch import nn

from ..chain import Sequence_
from .base import ArchitectureAdapter, BlockGranularity, register_adapter


class ConvNextHead(nn.Module):
    """``classifier(layernorm(x.mean([-2, -1])))``: ConvNeXt's head on a (B, C, H, W) map."""

    def __init__(self, layernorm: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm = layernorm
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layernorm(features.mean([-2, -1])))


def _downsampling(stage: nn.Module) -> list[nn.Module]:
    """A stage's downsampling modules: an ``nn.ModuleList`` (empty where the stage keeps its input's size) in
    transformers >= 5, one module (``nn.Sequential`` or ``nn.Identity``) before."""
    downsampling = stage.downsampling_layer
    return list(downsampling) if isinstance(downsampling, nn.ModuleList) else [downsampling]


@register_adapter("convnext")
class ConvNextAdapter(ArchitectureAdapter):
    """Blocks and heads of ``ConvNextForImageClassification``.

    The offset is on by default (``bp_modified=None``), following the convolutional family (as on ResNets).
    """

    offset_by_default = True
    #: The attribute of the classifier that holds ``embeddings``, ``encoder.stages`` and ``layernorm``.
    backbone = "convnext"

    def _split(self, model: nn.Module, granularity: BlockGranularity) -> list[tuple[list[nn.Module], int]]:
        """Each block's modules, in order, and the stage its output belongs to (-1: the stem)."""
        backbone = getattr(model, self.backbone)
        stages = backbone.encoder.stages
        if not all(hasattr(stage, "layers") and hasattr(stage, "downsampling_layer") for stage in stages):
            raise ValueError(
                f"{type(model).__name__}: expected `{self.backbone}.encoder.stages[s]` with `downsampling_layer` and "
                "`layers`."
            )
        if granularity == "stage":
            split: list[tuple[list[nn.Module], int]] = [([stage], s) for s, stage in enumerate(stages)]
        elif granularity in ("layer", "layer+stem"):
            split, pending = [], []
            for s, stage in enumerate(stages):
                pending += _downsampling(stage)  # goes in front of the stage's first layer
                for layer in stage.layers:
                    split.append((pending + [layer], s))
                    pending = []
            if pending:  # trailing stages without layers: their downsampling ends the last block
                split[-1] = (split[-1][0] + pending, len(stages) - 1)
        else:
            raise ValueError(f"`block_granularity` must be 'layer', 'layer+stem' or 'stage', got {granularity!r}.")
        if granularity == "layer+stem":
            return [([backbone.embeddings], -1)] + split
        first, stage = split[0]
        return [([backbone.embeddings] + first, stage)] + split[1:]

    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        return [Sequence_(*modules) for modules, _ in self._split(model, granularity)]

    def head(self, model: nn.Module) -> nn.Module:
        return ConvNextHead(getattr(model, self.backbone).layernorm, model.classifier)

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """The pointwise convolutions of every layer, ``pwconv1`` and ``pwconv2`` (``nn.Linear`` over channels)."""
        return ["pwconv1", "pwconv2"]

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        stage = self._split(model, granularity)[block_index][1]
        channels = config.hidden_sizes[max(stage, 0)]  # the stem's output has the first stage's width
        head = ConvNextHead(nn.LayerNorm(channels, eps=config.layer_norm_eps), nn.Linear(channels, config.num_labels))
        nn.init.normal_(head.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(head.classifier.bias)
        dtype = next(model.parameters()).dtype
        return head.to(dtype=dtype)


@register_adapter("convnextv2")
class ConvNextV2Adapter(ConvNextAdapter):
    """Blocks and heads of ``ConvNextV2ForImageClassification``: ConvNeXt's layout under ``convnextv2``.

    The offset is on by default (``bp_modified=None``), following the convolutional family (as on ResNets).
    """

    offset_by_default = True
    backbone = "convnextv2"
