#!/usr/bin/env python
"""What ``gradient_checkpointing=True`` saves under local losses: peak memory and time of one training step of a ViT
with and without it, for BP, FF (h = 1) and LoCo (h = 2).

Each method trains its own copy of the same randomly initialised model on one fixed random batch, as
``BPModifiedTrainer`` does (``local_gradients(..., accumulate=True)``; BP: ``loss.backward()``), with the
checkpointing the trainer sets up: the model's own, non-reentrant (``use_reentrant=False``), so that every encoder
layer is recomputed in its backward. Only ViTs: transformers' ResNet has no gradient checkpointing.

Memory: ``torch.profiler`` (``profile_memory=True``) sees every allocation of the step, the recomputed activations
included, which the saved-tensor meter of ``memory_speed.py`` cannot see inside non-reentrant checkpoints. "Step
peak" is the peak of the allocations made during one step (activations, recomputations, the backward's buffers and
the gradients, released with ``zero_grad(set_to_none=True)`` before it), without what every method holds anyway
(parameters, buffers, SGD momentum), which is given once per table as "resident". The checkpointed and plain
gradients of the first step are compared (max absolute difference), so the table also shows that nothing else
changed.

    python benchmarks/checkpointing.py                       # tiny ViT, ViT-B/16 full and LoRA (B = 8, 224 px)
    python benchmarks/checkpointing.py --shapes tiny_vit_full --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_speed import (  # noqa: E402
    SHAPES,
    build_model,
    enable_checkpointing,
    passive_openmp,
    profiled_peak_bytes,
    storage_bytes,
)

from hf_bpmod import get_adapter, local_gradients  # noqa: E402

METHODS = (("BP", None), ("FF", 1), ("LoCo", 2))  # (name, horizon; None = backprop)


class Run:
    """One method, with or without checkpointing: its model copy, auxiliary heads and optimizer."""

    def __init__(self, shape, horizon: int | None, checkpointing: bool, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model = build_model(shape).train()
        if checkpointing:
            enable_checkpointing(self.model, reentrant=False)  # as BPModifiedTrainer sets it
        self.horizon, self.x, self.y = horizon, x, y
        params = [p for p in self.model.parameters() if p.requires_grad]
        if horizon is not None:
            adapter = get_adapter(self.model)
            self.aux_heads = adapter.aux_heads(self.model, horizon).train()
            self.chain = adapter.chain(self.model, self.aux_heads)
            params += list(self.aux_heads.parameters())
        self.params = params
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def loss_fn(self, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, self.y)

    def backward(self) -> None:
        if self.horizon is None:
            self.loss_fn(self.model(pixel_values=self.x).logits).backward()
        else:
            local_gradients(self.chain, self.x, self.loss_fn, self.horizon, accumulate=True)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.backward()
        self.optimizer.step()

    def resident_bytes(self) -> int:
        """Parameters (frozen ones too) and buffers of the model and its auxiliary heads, and the SGD momentum."""
        modules = [m for m in (self.model, getattr(self, "aux_heads", None)) if m is not None]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return storage_bytes([*tensors, *state])


def measure(shape, batch: int, steps: int) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, shape.image_size, shape.image_size)
    y = torch.randint(0, shape.num_labels, (batch,))
    rows, resident = [], 0
    for name, horizon in METHODS:
        runs = {gc: Run(shape, horizon, gc, x, y) for gc in (False, True)}
        for run in runs.values():  # the first step's gradients, before any update: checkpointing changes nothing
            run.optimizer.zero_grad(set_to_none=True)
            run.backward()
        diff = max(
            (a.grad - b.grad).abs().max().item()
            for a, b in zip(runs[False].params, runs[True].params, strict=True)
            if a.grad is not None
        )
        result = {}
        for gc, run in runs.items():
            run.step()  # warm-up (and the optimizer's state)
            peak = profiled_peak_bytes(run.step)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                run.step()
                times.append(time.perf_counter() - start)
            result[gc] = (peak, statistics.median(times))
            resident = max(resident, run.resident_bytes())
        (plain, t_plain), (ckpt, t_ckpt) = result[False], result[True]
        rows.append(
            f"| {name} | {plain / 2**20:.1f} | {ckpt / 2**20:.1f} | {ckpt / plain:.2f} | {t_plain:.3f} | "
            f"{t_ckpt:.3f} | {t_ckpt / t_plain:.2f} | {diff:.1e} |"
        )
        del runs
    return [
        f"### {shape.title}, B = {batch}",
        "",
        "| method | step peak (MiB) | with checkpointing | ratio | seconds / step | with checkpointing | ratio "
        "| max grad difference |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Resident besides (parameters, frozen ones included, buffers, SGD momentum, auxiliary heads; the largest "
        f"method's): "
        f"{resident / 2**20:.1f} MiB.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = {s.key: s for group in SHAPES.values() for s in group if s.arch == "vit"}
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(shapes), default=["tiny_vit_full", "vit_full", "vit_lora"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    opts = parser.parse_args()
    passive_openmp()
    torch.set_num_threads(opts.threads)
    lines = [
        "## Gradient checkpointing under local losses (CPU)",
        "",
        "Peak of the allocations during one training step (torch.profiler), with and without the model's own "
        "non-reentrant gradient checkpointing, as BPModifiedTrainer enables it; seconds per step are the median of "
        f"{opts.steps}, {opts.threads} threads, one shape after the other in one process.",
        "",
    ]
    for key in opts.shapes:
        lines += measure(shapes[key], opts.batch, opts.steps)
        print("\n".join(lines[-10:]), flush=True)
    args = sys.argv[1:]
    if "--out" in args:  # where it writes is not part of what it measured
        del args[args.index("--out") : args.index("--out") + 2]
    command = " ".join(["python benchmarks/checkpointing.py", *args])
    lines += [f"Command: `{command}`", ""]
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "checkpointing.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
