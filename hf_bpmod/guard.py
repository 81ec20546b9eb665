"""Non-finite values never reach the weights: a step whose losses or gradients are not finite is skipped.

Once per optimizer step, after the gradients are averaged across processes and the offset is applied (so that an
offset that makes a finite gradient overflow is caught as well), :meth:`NonFiniteGuard.finish_step` checks that
every local loss of the step (each head's, summed over the step's micro-batches) and every gradient (each block's,
each head's, the auxiliary heads' included) is finite: the sum of each gradient tensor in float32 (NaN and Inf
propagate; a sum of finite values overflows only past ``3.4e38``, which then counts as non-finite) and the losses go
into one small vector, summed across processes (so that every process reaches the same verdict), and one
synchronisation reads whether it is finite. (A max-norm would be exact as well
but is several times slower on CPU; a 2-norm overflows for gradients of ``1e19``.)

A non-finite step is skipped: the gradients are dropped, the next ``optimizer.step()`` does nothing (weights,
optimizer state and the auxiliary heads stay as they were, step counts included), the floating-point buffers
(BatchNorm running statistics) of the model and the heads are put back to what they were before the step's first
micro-batch, and a warning names the step and the first non-finite loss or gradient. The learning-rate schedule,
the global step and the offset's refresh schedule advance as for any step (a refresh due at that step has run).
After ``max_nonfinite_steps`` skipped steps in a row the next non-finite one raises :class:`NonFiniteTrainingError`
(``0``: the first one does), the model being left at the last finite step. Offset refreshes with non-finite
statistics (the previous offset is kept) are counted the same way, in a run of their own: after
``max_nonfinite_steps`` failed refreshes in a row the next failure raises. Both counts travel with checkpoints
(:meth:`NonFiniteGuard.state_dict`), so that a resumed run stops where the uninterrupted one would.

Under fp16 with an enabled gradient scaler, non-finite gradients are the scaler's normal overflow: the scaler
skips that step itself and lowers its scale, so the guard neither drops the gradients (the scaler must see them)
nor warns nor counts; it only puts the buffers back, since the skipped step's forward may have left non-finite
running statistics. Knows nothing of the Trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import nn

from .chain import BlockChain

ReduceSum = Callable[[torch.Tensor], Any]

WHAT_TO_CHECK = (
    "Check the data (NaN or Inf pixels or labels, e.g. a damaged image or a division by a zero standard deviation in "
    "the transform), the learning rate (too high makes the weights overflow) and, with fp16, overflow in the forward "
    "(bf16 or fp32 do not overflow)"
)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many non-finite steps (or offset refreshes) in a row."""


def _innermost(optimizer: Any) -> Any:
    """The optimizer that updates the weights: the one inside a wrapper such as accelerate's ``AcceleratedOptimizer``
    (so that the wrapper's ``step``, and a learning-rate scheduler's tracking of it, still run)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _skip_once(optimizer: Any) -> None:
    """Make the next ``step()`` of the optimizer that updates the weights a no-op, which then puts back the ``step``
    it replaced."""
    inner = _innermost(optimizer)
    previous = vars(inner).get("step")  # an instance attribute (a scheduler's or accelerate's wrapper), if any

    def skipped(*args: Any, **kwargs: Any) -> None:
        _disarm(inner)

    skipped.__hf_bpmod_skip__ = True  # type: ignore[attr-defined]
    skipped.__hf_bpmod_previous__ = previous  # type: ignore[attr-defined]
    inner.step = skipped


def _disarm(inner: Any) -> None:
    step = vars(inner).get("step")
    if getattr(step, "__hf_bpmod_skip__", False):
        previous = step.__hf_bpmod_previous__
        if previous is None:
            del inner.step
        else:
            inner.step = previous


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class _InARow:
    """Failures in a row: ``allowed`` of them pass, the next raises :class:`NonFiniteTrainingError`."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.count = 0

    def success(self) -> None:
        self.count = 0

    def failure(self, message: Callable[[str], str]) -> None:
        """Count one more failure; past ``allowed``, raise with ``message`` of its ordinal (``"3rd"``)."""
        self.count += 1
        if self.count > self.allowed:
            raise NonFiniteTrainingError(message(_ordinal(self.count)))


class NonFiniteGuard:
    """Checks each optimizer step's losses and gradients and skips the step when one is not finite.

    Args:
        chain: the model's blocks and heads; the gradients checked are those of ``chain.block_params`` and
            ``chain.head_params``.
        modules: the modules whose buffers a skipped step puts back (the model and the auxiliary heads).
        max_nonfinite_steps: skipped steps (and failed refreshes) allowed in a row.
        reduce_sum: sums a tensor across processes in place (``None``: one process).
    """

    def __init__(
        self,
        chain: BlockChain,
        modules: Sequence[nn.Module],
        max_nonfinite_steps: int,
        *,
        reduce_sum: ReduceSum | None = None,
    ) -> None:
        self.modules = list(modules)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.reduce_sum = reduce_sum
        self.params: list[nn.Parameter] = []
        self.owners: list[tuple[str, int | None]] = []  # the name of a parameter's owner, and its block if one
        seen: set[int] = set()
        named = [(f"block {t}", t, ps) for t, ps in enumerate(chain.block_params)]
        self.num_blocks = T = chain.num_blocks
        named += [
            (f"head {s}" if s < T else "the model's head", None, ps) for s, ps in enumerate(chain.head_params, 1)
        ]
        for name, block, params in named:
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
                    self.owners.append((name, block))
        self._skipped = _InARow(max_nonfinite_steps)
        self._failed_refreshes = _InARow(max_nonfinite_steps)
        self._losses: list[tuple[list[int], torch.Tensor]] = []
        self._buffers: list[torch.Tensor] = []
        self._snapshot: list[torch.Tensor] = []
        self._optimizer: Any = None

    @property
    def skipped_in_a_row(self) -> int:
        """Optimizer steps skipped in a row, up to the last one."""
        return self._skipped.count

    @property
    def failed_refreshes_in_a_row(self) -> int:
        """Offset refreshes with non-finite statistics in a row, up to the last one."""
        return self._failed_refreshes.count

    def state_dict(self) -> dict[str, int]:
        """The counts in a row, for a checkpoint."""
        return {
            "skipped_steps_in_a_row": self._skipped.count,
            "failed_refreshes_in_a_row": self._failed_refreshes.count,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The counts of a checkpoint (missing ones: 0)."""
        self._skipped.count = int(state.get("skipped_steps_in_a_row", 0))
        self._failed_refreshes.count = int(state.get("failed_refreshes_in_a_row", 0))

    # ------------------------------------------------------------------ during the step
    def start_step(self) -> None:
        """At the first micro-batch of an optimizer step: remember the buffers, forget the previous step's losses."""
        if self._optimizer is not None:  # a skip that no `optimizer.step()` consumed
            _disarm(_innermost(self._optimizer))
            self._optimizer = None
        self._losses = []
        seen: set[int] = set()
        buffers = [b for m in self.modules for b in m.buffers() if not (id(b) in seen or seen.add(id(b)))]
        if len(buffers) != len(self._snapshot) or any(
            s.shape != b.shape or s.dtype != b.dtype or s.device != b.device for s, b in zip(self._snapshot, buffers)
        ):
            self._snapshot = [b.detach().clone() for b in buffers]
        elif buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot, buffers)
        self._buffers = buffers

    def add_losses(self, head_losses: dict[int, torch.Tensor]) -> None:
        """The local losses of one micro-batch (``s -> L(x_s)``)."""
        if head_losses:
            keys = list(head_losses)
            self._losses.append((keys, torch.stack([head_losses[s].detach().float() for s in keys])))

    # ------------------------------------------------------------------ the verdict
    def finish_step(
        self, global_step: int, optimizer: Any, scaler_enabled: bool = False, offset_blocks: Collection[int] = ()
    ) -> bool:
        """Once per optimizer step, after the gradients are averaged and the offset applied (to the blocks
        ``offset_blocks``): whether the optimizer may step. A non-finite step is skipped (see the module's
        docstring) and ``False`` returned; raises :class:`NonFiniteTrainingError` when one more non-finite step than
        allowed comes in a row."""
        index = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in index]
        sums = [g.sum(dtype=torch.float32) for g in grads]
        loss_keys = [s for keys, _ in self._losses for s in keys]
        parts = [v for _, v in self._losses]
        if sums:
            parts.append(torch.stack(sums))
        if not parts:
            return True
        verdict = torch.cat(parts)
        if self.reduce_sum is not None:
            self.reduce_sum(verdict)
        num_losses = len(loss_keys)
        checked = verdict[num_losses:] if scaler_enabled else verdict
        if bool(torch.isfinite(checked).all()):
            self._skipped.success()
            return True
        self._restore_buffers()
        if scaler_enabled:  # the scaler's own overflow: it skips the step and lowers its scale
            return True
        first = int((~torch.isfinite(verdict)).nonzero()[0])
        if first < num_losses:
            s = loss_keys[first]
            what = "the loss of the model's head" if s == self.num_blocks else f"the loss of head {s}"
        else:
            name, block = self.owners[index[first - num_losses]]
            what = f"the gradient of {name}{' (with its offset)' if block in offset_blocks else ''}"
        for p in self.params:
            p.grad = None
        self._optimizer = optimizer
        _skip_once(optimizer)
        self._skipped.failure(
            lambda nth: (
                f"Step {global_step}: {what} is not finite, the {nth} step in a row "
                f"(max_nonfinite_steps={self.max_nonfinite_steps}); training stopped. The model, its buffers, the "
                f"optimizer state and the auxiliary heads are left as they were after the last finite step. "
                f"{WHAT_TO_CHECK}."
            )
        )
        warnings.warn(
            f"Step {global_step}: {what} is not finite; the optimizer step is skipped (weights, optimizer state, "
            f"buffers and auxiliary heads unchanged), {self.skipped_in_a_row} in a row of the "
            f"{self.max_nonfinite_steps} allowed (`max_nonfinite_steps`). {WHAT_TO_CHECK}.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def refresh_done(self, global_step: int, finite: bool) -> None:
        """Count an offset refresh: a failed one (non-finite statistics, previous offset kept) adds to its run;
        raises :class:`NonFiniteTrainingError` when one more than ``max_nonfinite_steps`` fails in a row."""
        if finite:
            self._failed_refreshes.success()
            return
        self._failed_refreshes.failure(
            lambda nth: (
                f"Step {global_step}: the offset refresh gave non-finite statistics, the {nth} refresh in a "
                f"row (max_nonfinite_steps={self.max_nonfinite_steps}); training stopped. The model is left as it was "
                f"after the last finite step. {WHAT_TO_CHECK}."
            )
        )

    def _restore_buffers(self) -> None:
        if self._buffers:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers, self._snapshot)
