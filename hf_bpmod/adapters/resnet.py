"""ResNet (``ResNetForImageClassification``): block 0 = embedder + first residual layer, then one block per
residual layer (``encoder.stages[s].layers[j]``), or per stage with ``granularity="stage"``. With
``granularity="layer+stem"`` the embedder (stem) is a block of its own: at 224 px the stem and the first residual
layer both work at high resolution, and keeping them apart lowers the peak activation memory of ``h = 1``.

The head is the pooler and the classifier; an auxiliary head's input width follows its stage's channels
(paper Appendix A).
"""

from __future__ import annotations

from torch import nn

from ..chain import Sequence_
from .base import ArchitectureAdapter, BlockGranularity, register_adapter


def _stages(model: nn.Module, backbone: str) -> nn.ModuleList:
    stages = getattr(model, backbone).encoder.stages
    if not all(hasattr(stage, "layers") for stage in stages):
        raise ValueError(f"{type(model).__name__}: expected `{backbone}.encoder.stages[s].layers`.")
    return stages


@register_adapter("resnet")
class ResNetAdapter(ArchitectureAdapter):
    """Blocks and heads of ``ResNetForImageClassification``.

    The offset is on by default (``bp_modified=None``): on ResNets it never did worse than the plain local loss in
    the package's measurements and helped a little in fine-tuning.
    """

    offset_by_default = True
    #: The attribute of the classifier that holds ``embedder``, ``encoder.stages`` and ``pooler``.
    backbone = "resnet"

    def _block_stages(self, model: nn.Module, granularity: BlockGranularity) -> list[int]:
        """The stage that each block's output belongs to (-1: the stem)."""
        stages = _stages(model, self.backbone)
        if granularity == "stage":
            return list(range(len(stages)))
        layers = [s for s, stage in enumerate(stages) for _ in stage.layers]
        return [-1] + layers if granularity == "layer+stem" else layers

    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        embedder = getattr(model, self.backbone).embedder
        stages = _stages(model, self.backbone)
        if granularity == "stage":
            parts: list[nn.Module] = list(stages)
        elif granularity in ("layer", "layer+stem"):
            parts = [layer for stage in stages for layer in stage.layers]
        else:
            raise ValueError(f"`block_granularity` must be 'layer', 'layer+stem' or 'stage', got {granularity!r}.")
        if granularity == "layer+stem":
            return [Sequence_(embedder)] + [Sequence_(part) for part in parts]
        return [Sequence_(embedder, parts[0])] + [Sequence_(part) for part in parts[1:]]

    def head(self, model: nn.Module) -> nn.Module:
        return Sequence_(getattr(model, self.backbone).pooler, model.classifier)

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """Every convolution of the backbone (transformers names them ``convolution``)."""
        return ["convolution"]

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        stage = self._block_stages(model, granularity)[block_index]
        channels = config.embedding_size if stage < 0 else config.hidden_sizes[stage]
        head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(channels, config.num_labels))
        dtype = next(model.parameters()).dtype
        return head.to(dtype=dtype)
