"""RegNet (``RegNetForImageClassification``), laid out as a ResNet under ``regnet``: block 0 = embedder + first
layer, then one block per layer (``regnet.encoder.stages[s].layers[j]``, the first of a stage downsampling), or per
stage with ``granularity="stage"``; ``granularity="layer+stem"`` makes the embedder (a stride-2 convolution) a block
of its own.

The head is the pooler and the classifier (``Flatten`` + ``Linear``); an auxiliary head is the same pooling, flatten
and a fresh ``Linear`` whose input width follows its stage's channels (paper Appendix A).
"""

from __future__ import annotations

from torch import nn

from .base import register_adapter, unwrap_model
from .resnet import ResNetAdapter


@register_adapter("regnet")
class RegNetAdapter(ResNetAdapter):
    """Blocks and heads of ``RegNetForImageClassification``.

    The offset is on by default (``bp_modified=None``), following the convolutional family (as on ResNets).
    """

    offset_by_default = True
    backbone = "regnet"

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """Every ungrouped convolution, by full name: the 1x1 convolutions of each layer, the stem's and the
        shortcuts' (transformers names them all ``convolution``). Left out: the grouped 3x3 convolutions, since peft's
        LoRA needs its rank divisible by a convolution's groups (name them in ``target_modules`` with such a rank to
        add them), and the squeeze-and-excitation gates of RegNet-Y."""
        return [
            name
            for name, module in unwrap_model(model).named_modules()
            if name.rsplit(".", 1)[-1] == "convolution"
            and getattr(getattr(module, "base_layer", module), "groups", None) == 1
        ]
