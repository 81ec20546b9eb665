"""The chain of blocks ``x_{t+1} = f_t(x_t, u_t)`` (paper eq. 1) and the heads that read it.

A :class:`BlockChain` is a plain-torch view of a classifier: ``blocks[t]`` maps ``x_t`` to ``x_{t+1}``
(``x_0`` the pixels), and ``heads[s - 1]`` maps ``x_s`` to logits, so that ``L(x_s)`` is the model's loss
applied to ``heads[s - 1](x_s)``. The last head is the model's own (``L(x_T)`` is the training loss); the
others are auxiliary heads of the same structure with independent weights (paper Appendix A). A head may
be ``None`` where no local loss ever reads that block output (``s < h``, see :mod:`hf_bpmod.local_grad`).

The chain holds references to the model's own submodules: running it runs the model's weights, so
gradients computed on the chain are gradients of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class Sequence_(nn.Module):
    """Apply modules one after the other, keeping only the first output of any that return a tuple.

    transformers' encoder layers returned ``(hidden_states, ...)`` tuples before 5.x and return a bare tensor now;
    this wrapper lets a block be declared as a list of the model's modules whichever the release.
    """

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
            if isinstance(x, tuple):
                x = x[0]
        return x


def trainable_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` of ``modules``, each once, in registration order (``u_t``)."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


@dataclass
class BlockChain:
    """A classifier as a chain of ``T`` blocks and ``T`` heads (paper eq. 1, Appendix A).

    Args:
        blocks: ``f_0 .. f_{T-1}``; ``blocks[t](x_t) = x_{t+1}``.
        heads: ``heads[s - 1](x_s)`` are the logits whose loss is ``L(x_s)``, for ``s = 1 .. T``; ``heads[-1]`` is
            the model's own head. An entry may be ``None`` where no loss reads ``x_s``.
        block_params: ``u_t``, the trainable parameters of block ``t`` (filled from ``blocks`` when omitted).
        head_params: the trainable parameters of each head (filled from ``heads`` when omitted).
    """

    blocks: Sequence[nn.Module]
    heads: Sequence[nn.Module | None]
    block_params: list[list[nn.Parameter]] = field(default_factory=list)
    head_params: list[list[nn.Parameter]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.blocks) == 0:
            raise ValueError("A BlockChain needs at least one block.")
        if len(self.heads) != len(self.blocks):
            raise ValueError(
                f"A BlockChain needs one head per block output: got {len(self.blocks)} blocks and {len(self.heads)} heads."
            )
        if self.heads[-1] is None:
            raise ValueError("The last head of a BlockChain is the model's own head and cannot be None.")
        if not self.block_params:
            self.block_params = self._disjoint([[b] for b in self.blocks])
        if not self.head_params:
            self.head_params = [trainable_parameters([h]) if h is not None else [] for h in self.heads]

    @staticmethod
    def _disjoint(groups: list[list[nn.Module]]) -> list[list[nn.Parameter]]:
        """Trainable parameters per group, a parameter shared by two groups belonging to the first."""
        seen: set[int] = set()
        out = []
        for group in groups:
            params = [p for p in trainable_parameters(group) if id(p) not in seen]
            seen.update(id(p) for p in params)
            out.append(params)
        return out

    @property
    def num_blocks(self) -> int:
        """``T``, the number of blocks."""
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits, block by block: ``heads[-1](f_{T-1}(... f_0(x)))``."""
        for block in self.blocks:
            x = block(x)
        return self.heads[-1](x)

    __call__ = forward

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[x_1, ..., x_T]`` for the input ``x_0 = x``."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def uncovered_parameters(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s trainable parameters that lie in no block and not in the model's own head."""
        covered = {id(p) for ps in self.block_params for p in ps} | {id(p) for p in self.head_params[-1]}
        return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of the blocks and of the model's own head (not the auxiliary heads)."""
        params = [p for ps in self.block_params for p in ps]
        seen = {id(p) for p in params}
        params += [p for p in self.head_params[-1] if id(p) not in seen]
        return params
