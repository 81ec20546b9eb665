"""Data parallelism without DDP's forward: the collectives local gradients need, and the backends they rule out.

The trainer never calls the DDP-wrapped model's forward (it runs the blocks one by one), so DDP neither averages
gradients nor broadcasts buffers for it: these helpers do, once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import compat


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_from_main_process(module: nn.Module) -> None:
    """Give every process rank 0's copy of ``module``, as DDP does for the model when it wraps it."""
    if is_distributed() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)


def all_reduce_mean(tensors: Sequence[torch.Tensor], num_processes: int) -> None:
    """Average ``tensors`` over processes in place, one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= num_processes
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Iterable[nn.Parameter], num_processes: int) -> None:
    """Average ``.grad`` over processes (a missing gradient counts as zeros and is filled in)."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean([p.grad for p in params], num_processes)


def average_buffers(modules: Iterable[nn.Module], num_processes: int) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over processes.

    DDP would broadcast rank 0's buffers at the start of its forward, which is never called here: without this each
    process would keep statistics of its own shard, and evaluation and checkpoints would depend on the rank. The
    average makes a running mean that of the whole global batch."""
    buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
    if buffers:
        with torch.no_grad():
            all_reduce_mean(buffers, num_processes)


def reject_unsupported_backends(accelerator: Any, args: Any, model: nn.Module) -> None:
    """Raise for the parallel backends that cannot run local gradients, naming what to launch instead: those of the
    ``accelerator`` (DeepSpeed and FSDP plugins, as ``Trainer.is_deepspeed_enabled`` reads them, and its parallelism
    config), of ``args`` (one process on several GPUs) and of the ``model`` (SyncBatchNorm)."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        raise ValueError(
            "DeepSpeed is not supported by BPModifiedTrainer (its engine owns the backward pass). "
            "Launch with plain data parallelism: `torchrun --nproc_per_node N` or `accelerate launch` without a "
            "DeepSpeed config."
        )
    if getattr(state, "fsdp_plugin", None) is not None:
        raise ValueError(
            "FSDP is not supported by BPModifiedTrainer (sharded parameters cannot be differentiated block by "
            "block). Launch with plain data parallelism (DDP): `torchrun --nproc_per_node N` or "
            "`accelerate launch` with `distributed_type: MULTI_GPU`."
        )
    if args.n_gpu > 1:
        raise ValueError(
            f"One process sees {args.n_gpu} GPUs: BPModifiedTrainer does not support `nn.DataParallel` (it "
            "never calls the wrapped model's forward, so only one GPU would work). Launch one process per GPU: "
            "`torchrun --nproc_per_node N ...` or `accelerate launch --multi_gpu ...`."
        )
    config = compat.parallelism_config(accelerator)
    sharded = [n for n in ("tp_size", "cp_size", "sp_size") if (getattr(config, n, None) or 1) > 1]
    if sharded:
        raise ValueError(
            f"Tensor, context and sequence parallelism are not supported by BPModifiedTrainer ({sharded} > 1 in "
            "the accelerate parallelism config): use plain data parallelism."
        )
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError(
            "SyncBatchNorm is not supported by BPModifiedTrainer: the offset pass runs a different number of "
            "micro-batches on each process, so its collectives would not match. Keep the model's BatchNorm "
            "layers (each process normalises over its own micro-batch, as with plain DDP)."
        )
