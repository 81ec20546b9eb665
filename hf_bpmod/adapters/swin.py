"""Swin and SwinV2 (``SwinForImageClassification``, ``Swinv2ForImageClassification``): block 0 = patch embeddings +
the first Swin layer, block t = one Swin layer (``encoder.layers[s].blocks[j]``), the patch merging of a stage going
with that stage's last layer (``block_granularity="layer"``); or one block per stage, its patch merging included
(``"stage"``). Both splits end a stage's last block at the same tensor, the stage's output as the model computes it.

Between blocks ``x_t`` is a ``(batch, height, width, channels)`` map: the model's ``(batch, height * width,
channels)`` tokens viewed with the patch grid they lie on, which Swin layers and patch merging need
(``input_dimensions``) and which patch merging halves (rounding up, after padding odd sizes). Each block flattens the
map to tokens, calls the model's own modules with its height and width, and views the result as a map again, so the
window clamping at low resolution and the padding to whole windows happen inside the model's modules as in its own
forward.

The head is the final ``layernorm``, average pooling over the tokens and the ``classifier``; an auxiliary head has
that structure with the width of its block's output (paper Appendix A).
"""

from __future__ import annotations

import torch
from torch import nn

from ..chain import Sequence_
from ..compat import SWIN_QUERY_VALUE_NAMES
from .base import ArchitectureAdapter, BlockGranularity, register_adapter, unwrap_model

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # a release without it: no layer checkpoints itself
    GradientCheckpointingLayer = ()  # noqa: N816


def _tokens(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A ``(batch, height, width, channels)`` map as ``(batch, height * width, channels)`` tokens and its grid."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height * width, channels), (height, width)


def _map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(batch, height * width, channels)`` tokens as a ``(batch, height, width, channels)`` map."""
    return tokens.reshape(tokens.shape[0], grid[0], grid[1], tokens.shape[-1])


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _merged(grid: tuple[int, int]) -> tuple[int, int]:
    """The grid after patch merging, which pads odd sizes by one."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


class SwinEmbeddingMap(nn.Module):
    """The patch embeddings (pixels -> tokens on the patch grid), as a map."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.embeddings(pixel_values)
        return _map(tokens, grid)


class SwinLayerOnMap(nn.Module):
    """One Swin layer (windowed attention and MLP) on a map.

    Where the layer does not checkpoint itself but its stage does (SwinV2 in transformers >= 4.53 checkpoints whole
    stages), the layer is checkpointed with the stage's function, so ``gradient_checkpointing=True`` keeps its effect
    when blocks are single layers.
    """

    def __init__(self, layer: nn.Module, stage: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        # A plain list, not a submodule: the stage's other layers belong to other blocks.
        self._checkpointing_stage = [] if isinstance(layer, GradientCheckpointingLayer) else [stage]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = _tokens(x)
        stage = self._checkpointing_stage[0] if self._checkpointing_stage else None
        if getattr(stage, "gradient_checkpointing", False) and self.layer.training and torch.is_grad_enabled():
            out = stage._gradient_checkpointing_func(self.layer.__call__, tokens, grid)
        else:
            out = self.layer(tokens, grid)
        return _map(_first(out), grid)


class SwinPatchMergingOnMap(nn.Module):
    """A stage's patch merging (2 x 2 neighbours concatenated, normalised, projected to twice the width) on a map."""

    def __init__(self, merging: nn.Module) -> None:
        super().__init__()
        self.merging = merging

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = _tokens(x)
        return _map(self.merging(tokens, grid), _merged(grid))


class SwinStageOnMap(nn.Module):
    """A whole Swin stage (its layers, then its patch merging if it has one) on a map."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = _tokens(x)
        out = _first(self.stage(tokens, grid))
        return _map(out, _merged(grid) if self.stage.downsample is not None else grid)


class SwinHead(nn.Module):
    """``classifier(mean over tokens of layernorm(x))``: the Swin classification head on a map."""

    def __init__(self, layernorm: nn.Module, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm = layernorm
        self.pooler = pooler
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = _tokens(x)
        pooled = self.pooler(self.layernorm(tokens).transpose(1, 2))
        return self.classifier(torch.flatten(pooled, 1))


def find_stages(backbone: nn.Module, num_stages: int) -> nn.ModuleList:
    """The ``nn.ModuleList`` of the ``num_stages`` Swin stages inside ``backbone`` (each with ``blocks`` and
    ``downsample``), found by structure."""
    for _, module in sorted(backbone.named_modules(), key=lambda item: (item[0].count("."), item[0])):
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == num_stages
            and all(hasattr(stage, "blocks") and hasattr(stage, "downsample") for stage in module)
        ):
            return module
    raise ValueError(
        f"Could not find the {num_stages} stages of {type(backbone).__name__}: no nn.ModuleList of that length whose "
        "entries have `blocks` and `downsample` (expected `encoder.layers`)."
    )


@register_adapter("swin")
class SwinAdapter(ArchitectureAdapter):
    """Blocks and heads of ``SwinForImageClassification``.

    The offset is on by default (``bp_modified=None``), unlike the other transformer encoders: fine-tuning a
    BP-pretrained Swin, it gained 0.011 (standard error 0.004, 6 seeds) over the plain local loss in the package's
    measurements, more than the 2 standard errors that overturn the family's default.
    """

    offset_by_default = True

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        return getattr(model, model.base_model_prefix)

    def _stages(self, model: nn.Module) -> nn.ModuleList:
        return find_stages(self._backbone(model), len(model.config.depths))

    @staticmethod
    def _check_granularity(granularity: BlockGranularity) -> None:
        if granularity == "layer+stem":
            raise ValueError(
                "`block_granularity='layer+stem'` is for ResNets, whose stem works at a higher resolution than their "
                "first layer: a Swin's patch embedding works at the resolution of its first layer, so a block of its "
                "own would save no activation memory. Use 'layer' or 'stage'."
            )
        if granularity not in ("layer", "stage"):
            raise ValueError(f"`block_granularity` must be 'layer' or 'stage' for a Swin, got {granularity!r}.")

    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        self._check_granularity(granularity)
        stages = self._stages(model)
        embeddings = SwinEmbeddingMap(self._backbone(model).embeddings)
        if granularity == "stage":
            parts = [[SwinStageOnMap(stage)] for stage in stages]
        else:
            parts = []
            for stage in stages:
                parts += [[SwinLayerOnMap(layer, stage)] for layer in stage.blocks]
                if stage.downsample is not None:
                    parts[-1].append(SwinPatchMergingOnMap(stage.downsample))
        return [Sequence_(embeddings, *parts[0])] + [Sequence_(*part) for part in parts[1:]]

    def head(self, model: nn.Module) -> nn.Module:
        backbone = self._backbone(model)
        return SwinHead(backbone.layernorm, backbone.pooler, model.classifier)

    def _block_widths(self, model: nn.Module, granularity: BlockGranularity) -> list[int]:
        """The channels of each block's output: a stage's width, doubled after its patch merging."""
        self._check_granularity(granularity)
        config = model.config
        last = len(config.depths) - 1
        widths = []
        for s, depth in enumerate(config.depths):
            width = int(config.embed_dim * 2**s)
            merged = 2 * width if s < last else width
            widths += [merged] if granularity == "stage" else [width] * (depth - 1) + [merged]
        return widths

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        width = self._block_widths(model, granularity)[block_index]
        head = SwinHead(
            nn.LayerNorm(width, eps=config.layer_norm_eps),
            nn.AdaptiveAvgPool1d(1),
            nn.Linear(width, config.num_labels),
        )
        nn.init.normal_(head.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(head.classifier.bias)
        dtype = next(model.parameters()).dtype
        return head.to(dtype=dtype)

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """The attention's query and value projections: ``q_proj``/``v_proj`` where the installed Swin names them so,
        ``query``/``value`` otherwise (found by name in the model, not by version)."""
        return _query_value_names(model, SWIN_QUERY_VALUE_NAMES)


@register_adapter("swinv2")
class Swinv2Adapter(SwinAdapter):
    """Blocks and heads of ``Swinv2ForImageClassification``: the split, the heads and the offset's default of
    :class:`SwinAdapter`."""

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """The attention's query and value projections (``query``/``value``)."""
        return _query_value_names(model, (["query", "value"],))


def _query_value_names(model: nn.Module, pairs: tuple[list[str], ...]) -> list[str]:
    """The first pair of module names that both name modules of ``model``."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in unwrap_model(model).named_modules()}
    for pair in pairs:
        if set(pair) <= leaf_names:
            return list(pair)
    tried = " or ".join("/".join(pair) for pair in pairs)
    raise ValueError(
        f"Found no query/value projections ({tried}) in {type(model).__name__}: pass `target_modules` to the peft "
        "config yourself."
    )
