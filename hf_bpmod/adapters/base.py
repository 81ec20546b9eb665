"""What an architecture adapter declares, and the registry that finds one by ``config.model_type``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

from torch import nn

from .._unwrap import unwrap_model, unwrap_with_peft_levels
from ..chain import BlockChain

BlockGranularity = Literal["layer", "layer+stem", "stage"]

ADAPTERS: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(model_type: str):
    """Class decorator: register an :class:`ArchitectureAdapter` for ``config.model_type == model_type``."""

    def wrap(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
        if model_type in ADAPTERS:
            raise ValueError(
                f"An adapter for model_type {model_type!r} is already registered ({ADAPTERS[model_type].__name__})."
            )
        cls.model_type = model_type
        ADAPTERS[model_type] = cls
        return cls

    return wrap


def check_single_peft_wrapper(model: nn.Module) -> None:
    """Refuse a peft model wrapped in another peft model (``get_peft_model`` applied twice).

    peft does not nest: the outer adapter replaces the inner one where both use the same adapter name, the saved
    adapter's keys name the inner wrapper and do not load onto the base model, and the Trainer, which reads the
    forward signature of the outer wrapper's base model (the inner wrapper's ``*args, **kwargs``), drops every column
    of every batch.
    """
    levels = unwrap_with_peft_levels(model)[1]
    if levels > 1:
        raise ValueError(
            f"The model is wrapped in {levels} peft models (`get_peft_model` applied to a model that already is a "
            "PeftModel); peft does not nest them, so it would not train or save correctly. Wrap the base model once "
            "(one peft config naming every target module), or, to keep a first adapter's trained weights, merge it "
            "into the base model with `model = model.merge_and_unload()` before calling `get_peft_model` again."
        )


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The registered adapter for ``model`` (plain, peft-wrapped once or DDP-wrapped); a clear error if there is none
    or if ``model`` is peft-wrapped more than once."""
    check_single_peft_wrapper(model)
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(
            f"hf_bpmod cannot split a {type(base).__name__} (config.model_type={model_type!r}) into blocks. "
            f"Supported model types: {supported}. "
            "Register an adapter with `hf_bpmod.adapters.register_adapter` to add one."
        )
    return ADAPTERS[model_type]()


class ArchitectureAdapter(ABC):
    """Declares where a model's blocks are and what its head looks like.

    Subclasses read as declarations: :meth:`blocks` lists the modules of each block ``f_t``, :meth:`head` the
    model's own head, :meth:`aux_head` builds a fresh head of the same structure for the output of a block.
    """

    model_type: str = ""
    #: Whether ``bp_modified=None`` (the default) applies the BP offset on this architecture. The paper's method is
    #: on; an adapter turns it off where measurements show that the offset does not help.
    offset_by_default: bool = True

    @abstractmethod
    def blocks(self, model: nn.Module, granularity: BlockGranularity = "layer") -> list[nn.Module]:
        """``f_0 .. f_{T-1}`` as callables over the model's own submodules."""

    @abstractmethod
    def head(self, model: nn.Module) -> nn.Module:
        """The model's own head: block output ``x_T`` -> logits."""

    @abstractmethod
    def aux_head(self, model: nn.Module, block_index: int, granularity: BlockGranularity = "layer") -> nn.Module:
        """A freshly initialised head of the model head's structure for the output of block ``block_index``."""

    def peft_target_modules(self, model: nn.Module) -> list[str]:
        """The module names a peft adapter (LoRA, LoKr) targets on this architecture by default, under the names of
        the installed transformers release. The paper (§6: LoRA on ViT-B/16, LoKr on ResNet-50, r = 1, alpha = 4)
        does not name its targets; these are LoRA's usual ones."""
        raise NotImplementedError(
            f"{type(self).__name__} names no default peft targets; pass `target_modules` to the peft config yourself."
        )

    def aux_heads(self, model: nn.Module, horizon: int, granularity: BlockGranularity = "layer") -> nn.ModuleDict:
        """The auxiliary heads a horizon needs: one per block output ``x_s`` with ``h <= s < T``, keyed ``str(s)``.

        Outputs ``x_s`` with ``s < h`` feed no local loss (their target block would be ``s - h < 0``), and ``x_T``
        uses the model's own head, so neither gets an auxiliary head.
        """
        base = unwrap_model(model)
        num_blocks = len(self.blocks(base, granularity))
        heads = nn.ModuleDict()
        for s in range(max(1, horizon), num_blocks):
            heads[str(s)] = self.aux_head(base, s - 1, granularity)
        param = next(base.parameters())
        return heads.to(device=param.device)

    def chain(
        self, model: nn.Module, aux_heads: nn.ModuleDict | None = None, granularity: BlockGranularity = "layer"
    ) -> BlockChain:
        """The :class:`BlockChain` of ``model`` with ``aux_heads`` (as made by :meth:`aux_heads`) on its outputs."""
        base = unwrap_model(model)
        blocks = self.blocks(base, granularity)
        aux_heads = aux_heads if aux_heads is not None else nn.ModuleDict()
        heads: list[nn.Module | None] = [
            aux_heads[str(s)] if str(s) in aux_heads else None for s in range(1, len(blocks))
        ]
        heads.append(self.head(base))
        return BlockChain(blocks=blocks, heads=heads)
