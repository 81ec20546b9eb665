"""BEiT (``BeitForImageClassification``): block 0 = embeddings + encoder layer 0, block t = encoder layer t
(``block_granularity="layer"``, the only granularity a BEiT has).

Each layer's relative position bias depends on the image's patch grid, which the model passes to every layer
(``resolution``). Between blocks the tokens therefore stay on that grid: for an ``h x w`` patch grid, ``x_t`` has
shape ``(B, h + 1, w, C)`` and holds ``w - 1`` zeros, the [CLS] token, then the patch tokens row by row. Each block
flattens it, runs its layer with that grid's resolution and puts the result back, so the chain computes what the
model computes at any image size, square or not.

The head is the backbone's ``layernorm`` (an identity under mean pooling), its ``pooler`` (the mean of the patch
tokens with a layer norm, or the [CLS] token) and the ``classifier``; an auxiliary head has the same structure with
fresh weights. The layer list is ``beit.layers`` in transformers >= 5.9 and ``beit.encoder.layer`` before; it is
found by structure.

A shared relative position bias (``use_shared_relative_position_bias=True``, as in the self-supervised ``*-pt22k``
checkpoints; ``microsoft/beit-base-patch16-224`` and the other fine-tuned ones have one per layer) is refused. It is
one parameter used by every layer, while a local loss (eq. 4) trains the parameters of one block: the chain would
give it to block 0, whose local gradient would miss its use in every later block, so not even ``h >= T`` would be
backprop. Carrying the bias across block boundaries instead would store an ``(heads, N, N)`` tensor per image at
each boundary, about three times the tokens at 224 px. :func:`unshare_relative_position_bias` gives each layer its
own copy, as BEiT's fine-tuning does: the model computes the same logits, and each layer then trains its own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import BlockGranularity, register_adapter, unwrap_model
from .vit import EncoderAdapter, fresh_linear


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, 1 + h * w, C)`` tokens -> ``(B, h + 1, w, C)``: ``w - 1`` zeros, the [CLS] token, the patch rows."""
    batch, length, channels = tokens.shape
    height, width = grid
    if length != 1 + height * width:
        raise ValueError(
            f"BEiT block output of {length} tokens for a {height}x{width} patch grid: expected the [CLS] token and "
            f"{height * width} patch tokens. This BEiT variant adds tokens hf_bpmod does not know how to place."
        )
    padding = tokens.new_zeros(batch, width - 1, channels)
    return torch.cat([padding, tokens], dim=1).view(batch, height + 1, width, channels)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`tokens_to_grid`: ``(B, h + 1, w, C)`` -> ``(B, 1 + h * w, C)``."""
    return grid.flatten(1, 2)[:, grid.shape[2] - 1 :]


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a module that returns them alone (transformers >= 5) or first in a tuple (before)."""
    return output[0] if isinstance(output, tuple) else output


class BeitBlock(nn.Module):
    """One BEiT layer on the grid layout; block 0 starts from the pixels with the embeddings."""

    def __init__(self, layer: nn.Module, patch_size: int, embeddings: nn.Module | None = None) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layer = layer
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embeddings is not None:  # pixels (B, C, H, W): the grid the patch embedding makes
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
            tokens = _first(self.embeddings(x))
        else:
            grid = (x.shape[1] - 1, x.shape[2])
            tokens = grid_to_tokens(x)
        resolution = (grid[0] * self.patch_size, grid[1] * self.patch_size)  # the layer divides it by patch_size
        return tokens_to_grid(_first(self.layer(tokens, resolution=resolution)), grid)


class BeitHead(nn.Module):
    """``classifier(pooler(layernorm(tokens)))`` on the grid layout: the BEiT classification head."""

    def __init__(self, layernorm: nn.Module, pooler: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm = layernorm
        self.pooler = pooler
        self.classifier = classifier

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(self.layernorm(grid_to_tokens(hidden_states))))


def _refuse_shared_bias(model: nn.Module) -> None:
    if getattr(model.config, "use_shared_relative_position_bias", False):
        raise ValueError(
            f"This {type(model).__name__} has `use_shared_relative_position_bias=True`: one relative position bias "
            "table used by every layer, which local losses cannot train (each trains the parameters of one block). "
            "Give each layer its own copy first, as BEiT's fine-tuning does; the model computes the same logits: "
            "`model = hf_bpmod.adapters.unshare_relative_position_bias(model)` (before `get_peft_model`)."
        )


@register_adapter("beit")
class BeitAdapter(EncoderAdapter):
    """Blocks and heads of ``BeitForImageClassification`` with a relative position bias per layer (or none).

    No offset by default (``bp_modified=None``), which follows the transformer-encoder family (as the ViT).
    """

    backbone_name = "beit"
    family = "BEiT"

    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        self.check_granularity(granularity)
        _refuse_shared_bias(model)
        patch_size = model.config.patch_size
        layers = self.layers(model)
        first = BeitBlock(layers[0], patch_size, embeddings=self.embeddings(model))
        return [first] + [BeitBlock(layer, patch_size) for layer in layers[1:]]

    def head(self, model: nn.Module) -> nn.Module:
        beit = self.backbone(model)
        return BeitHead(beit.layernorm, beit.pooler, model.classifier)

    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        config = model.config
        beit = self.backbone(model)
        layernorm = (
            nn.Identity() if config.use_mean_pooling else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )
        pooler = type(beit.pooler)(config)  # BeitPooler: a fresh layer norm under mean pooling, else the CLS token
        classifier = fresh_linear(config.hidden_size, config.num_labels, config.initializer_range)
        return self.in_model_dtype(model, BeitHead(layernorm, pooler, classifier))


def unshare_relative_position_bias(model: nn.Module) -> nn.Module:
    """A copy of a BEiT model with ``use_shared_relative_position_bias=True`` in which each layer has its own
    relative position bias table, initialised to the shared one (added to the layer's own where it also had one), as
    BEiT's fine-tuning expands the pre-trained shared bias. It computes the same logits, and it saves and reloads as
    a plain BEiT with ``use_relative_position_bias=True``. A model without a shared bias is returned as it is."""
    if unwrap_model(model) is not model:
        raise ValueError(
            "`unshare_relative_position_bias` needs the BEiT model itself, not a peft or DDP wrapper around it: call "
            "it before `get_peft_model` (the wrapper's adapters would not be copied)."
        )
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "beit":
        raise ValueError(
            f"`unshare_relative_position_bias` is for BEiT models (config.model_type 'beit'), got "
            f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})."
        )
    if not config.use_shared_relative_position_bias:
        return model
    new_config = copy.deepcopy(config)
    new_config.use_shared_relative_position_bias = False
    new_config.use_relative_position_bias = True
    param = next(model.parameters())
    unshared = type(model)(new_config).to(device=param.device, dtype=param.dtype)
    old, new = model.state_dict(), unshared.state_dict()
    removed = [k for k in old if k not in new]
    tables = [k for k in removed if k.endswith("relative_position_bias_table")]
    if len(tables) != 1 or len(removed) != 1:
        raise ValueError(
            f"Expected one shared relative position bias table in {type(model).__name__}, found {removed}."
        )
    shared = old[tables[0]]
    state = {k: v for k, v in old.items() if k in new}
    for key in new:
        if key.endswith("relative_position_bias_table") and key not in old:
            state[key] = shared.clone()
        elif key.endswith("relative_position_bias_table"):  # a layer's own table, to which the shared one was added
            state[key] = old[key] + shared
    unshared.load_state_dict(state, strict=True)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    shared_frozen = any(name in frozen for name in tables)
    for name, p in unshared.named_parameters():
        new_table = name.endswith("relative_position_bias_table") and name not in old
        p.requires_grad_(not (shared_frozen if new_table else name in frozen))
    return unshared.train(model.training)
