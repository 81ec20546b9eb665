"""The offset pass of Algorithm 1 (lines 4-9): draw ``B'`` examples, run them in micro-batches of ``b'``, and turn
the statistics into per-block offsets. Knows nothing of the Trainer: data comes through a callable.

The pass is a measurement, not training: it restores every buffer it touched (BatchNorm running statistics),
runs under a forked RNG (so dropout draws do not shift the training run) and uses its own seeded sampler, so the
training data order is untouched and a resumed run redraws the same samples.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .chain import BlockChain
from .local_grad import LossFn, local_gradients
from .offset import BlockOffset, OffsetStatistics, apply_offset, block_offset, exact_block_offset

FetchMicroBatch = Callable[[list[int]], tuple[torch.Tensor, LossFn]]


@dataclass(frozen=True)
class OffsetSettings:
    """The offset's settings (Algorithm 1), built and validated once by ``BPModifiedTrainingArguments``.

    ``horizon`` is ``h`` (eq. 4), ``batch_size`` the training batch ``B`` and ``sample_size`` / ``micro_batch_size``
    the offset pass's ``B'`` / ``b'`` (``None``: chosen from the data by the
    :class:`~hf_bpmod.offset_controller.OffsetController`), ``device_batch_size`` the training batch of one process;
    ``period`` is ``K`` as ``(value, "step" | "epoch")``. The rest choose ``a`` and ``lambda``
    (:func:`~hf_bpmod.offset.block_offset`).
    """

    horizon: int = 1
    batch_size: int = 64
    sample_size: int | None = 320
    micro_batch_size: int | None = 8
    device_batch_size: int = 64
    period: tuple[float, str] = (1.0, "epoch")
    scaling: str = "aligned"
    fixed_a: float = 1.0
    fixed_lambda: float = 0.5
    bias_correction: bool = False
    check_reliability: bool = False
    max_ratio: float | None = None
    seed: int = 42

    def period_steps(self, steps_per_epoch: int) -> int:
        """``K`` in optimizer steps (a fraction of an epoch is rounded, to at least one step)."""
        value, unit = self.period
        if unit == "step":
            return int(value)
        return max(1, round(value * steps_per_epoch))


@dataclass(frozen=True)
class Processes:
    """This process's place among ``count`` data-parallel processes, and the sum across them (``None``: one)."""

    index: int = 0
    count: int = 1
    reduce_sum: Callable[[torch.Tensor], None] | None = None


SINGLE_PROCESS = Processes()


def offset_sample(dataset_size: int, sample_size: int, seed: int, period_index: int) -> list[int]:
    """The ``B'`` example indices of refresh number ``period_index``: a fresh draw without replacement from a
    generator of its own, reproducible from ``(seed, period_index)`` alone. Any integer seed works: the generator's
    seed is ``seed * 1_000_003 + period_index`` taken modulo ``2**64``, which torch reads as it reads that number
    itself (a negative seed as its two's complement)."""
    if sample_size > dataset_size:
        raise ValueError(f"Cannot draw {sample_size} examples from a training set of {dataset_size}.")
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(period_index)) % 2**64)
    return torch.randperm(dataset_size, generator=generator)[:sample_size].tolist()


@contextlib.contextmanager
def preserved_state(modules: Sequence[nn.Module]):
    """Restore every buffer of ``modules`` (BatchNorm running stats, counters) and the RNG state on exit."""
    saved = [{name: buf.detach().clone() for name, buf in m.named_buffers()} for m in modules]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for module, buffers in zip(modules, saved):
                    for name, buf in module.named_buffers():
                        if name in buffers:
                            buf.copy_(buffers[name])


@dataclass
class OffsetState:
    """What the offset holds between refreshes; saved in checkpoints."""

    period_index: int = 0
    next_refresh_step: int = 0
    blocks: list[BlockOffset] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "period_index": self.period_index,
            "next_refresh_step": self.next_refresh_step,
            "blocks": [vars(b).copy() for b in self.blocks],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> OffsetState:
        return cls(
            period_index=state["period_index"],
            next_refresh_step=state["next_refresh_step"],
            blocks=[BlockOffset(**b) for b in state["blocks"]],
        )


def compute_offsets(
    chain: BlockChain,
    indices: list[int],
    fetch: FetchMicroBatch,
    settings: OffsetSettings,
    *,
    period: float,
    processes: Processes = SINGLE_PROCESS,
    preserve: Sequence[nn.Module] = (),
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    previous: Sequence[BlockOffset] = (),
    loss_scale: float = 1.0,
) -> tuple[list[BlockOffset] | None, dict]:
    """Algorithm 1, lines 5-9, for every block: statistics over ``indices`` in micro-batches of ``b'`` (shared
    round-robin among ``processes``, then summed across them), then ``a``, ``lambda`` and the offset, for a period
    of ``period`` optimizer steps (``K``).

    ``loss_scale`` (fp16 loss scaling) multiplies the losses before differentiation; the gradients are divided by it
    before they enter the statistics, so everything returned (and ``previous``) is at true scale.

    Returns ``(offsets, record)``; ``offsets`` is ``None`` when a statistic is not finite (the caller keeps its
    previous offsets). ``record`` holds the per-block diagnostics for logging, the pass's seconds and the seconds of
    each of this process's micro-batches.
    """
    start = time.perf_counter()
    b = settings.micro_batch_size
    micro = [indices[i : i + b] for i in range(0, len(indices), b)]
    device = chain.block_params[0][0].device if chain.block_params and chain.block_params[0] else "cpu"
    stats = OffsetStatistics([[p.shape for p in ps] for ps in chain.block_params], device=device)
    micro_seconds: list[float] = []
    with preserved_state(preserve):
        for i, idx in enumerate(micro):
            if i % processes.count != processes.index:
                continue
            micro_start = time.perf_counter()
            x0, loss_fn = fetch(idx)
            grads = local_gradients(
                chain,
                x0,
                loss_fn,
                settings.horizon,
                also_true=True,
                loss_scale=loss_scale,
                forward_context=forward_context,
            )
            stats.update(_dense(chain, grads.local, loss_scale), _dense(chain, grads.true, loss_scale))
            del grads
            micro_seconds.append(time.perf_counter() - micro_start)
    if processes.reduce_sum is not None and processes.count > 1:
        stats.all_reduce(processes.reduce_sum)
    T = chain.num_blocks
    offsets: list[BlockOffset] = []
    finite = all(torch.isfinite(t).all() for t in stats.tensors())
    for t in range(T):
        if t + settings.horizon >= T or not chain.block_params[t]:
            offsets.append(exact_block_offset())
            continue
        moments = stats.moments(t, b)
        if moments.is_exact():
            offsets.append(exact_block_offset())
            continue
        offsets.append(
            block_offset(
                moments,
                settings.scaling,
                batch_size=settings.batch_size,
                period=period,
                fixed_a=settings.fixed_a,
                fixed_lambda=settings.fixed_lambda,
                bias_correction=settings.bias_correction,
                previous_delta=previous[t].unscaled_delta() if t < len(previous) else None,
                check_reliability=settings.check_reliability,
                max_ratio=settings.max_ratio,
            )
        )
    for o, params in zip(offsets, chain.block_params):  # held for a period: in the parameters' dtype, not float64
        if o.delta is not None:
            o.delta = [d.to(p.dtype) for d, p in zip(o.delta, params)]
            o.prepare()  # one pass per step instead of two (``apply_offset``)
    blocks = [o.log_record() for o in offsets]
    finite = finite and all(math.isfinite(v) for block in blocks for v in block.values())
    record = {
        "seconds": time.perf_counter() - start,
        "micro_batch_seconds": micro_seconds,  # this process's micro-batches, in order (the first pays warm-up)
        "offset_batch_size": len(indices),
        "period_steps": period,
        "blocks": blocks,
        "skipped": not finite,
    }
    return (offsets if finite else None), record


def _dense(
    chain: BlockChain, grads: list[list[torch.Tensor | None]], loss_scale: float = 1.0
) -> list[list[torch.Tensor]]:
    """Missing gradients as zeros, every gradient divided by the loss scale."""
    return [
        [
            (g if loss_scale == 1.0 else g / loss_scale) if g is not None else torch.zeros_like(p)
            for g, p in zip(gs, ps)
        ]
        for gs, ps in zip(grads, chain.block_params)
    ]


def apply_block_offsets(chain: BlockChain, offsets: Sequence[BlockOffset], grad_scale: float = 1.0) -> None:
    """``p.grad <- a_t p.grad + lambda_t Delta_t`` for the trainable parameters of every block (eq. 5)."""
    for params, modification in zip(chain.block_params, offsets):
        if modification.delta is not None and modification.weight != 0.0:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        apply_offset([p.grad for p in params], modification, grad_scale)
