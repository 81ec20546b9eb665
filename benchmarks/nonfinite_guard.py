#!/usr/bin/env python
"""The non-finite guard's cost against the training step it guards, on the paper shapes of ``memory_speed.py``.

For each shape (ViT-B/16 and ResNet-50 at random init, LoRA/LoKr r=1 and full fine-tune) one FF step (h = 1) as
:class:`hf_bpmod.BPModifiedTrainer` runs it: ``zero_grad``, ``local_gradients(..., accumulate=True)`` on one fixed
random batch of ``--batch`` images, the SGD step (momentum 0.9). Within the same step the guard's three calls are
timed: ``start_step`` (the buffer snapshot), ``add_losses`` and ``finish_step`` (the float32 sum of every gradient
tensor, blocks and heads, and the one synchronisation that reads the verdict). The table gives the medians and
the guard's share of the step without it. Part of ``run_all.py`` (``make bench``).

    python benchmarks/nonfinite_guard.py                       # CPU, B = 8, every paper shape
    python benchmarks/nonfinite_guard.py --device cuda --batch 64
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
from memory_speed import SHAPES, build_model, passive_openmp  # noqa: E402

from hf_bpmod import get_adapter, local_gradients  # noqa: E402
from hf_bpmod.adapters import unwrap_model  # noqa: E402
from hf_bpmod.guard import NonFiniteGuard  # noqa: E402


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def time_shape(key: str, batch: int, warmup: int, reps: int, device: torch.device) -> dict:
    shape = next(s for s in SHAPES["paper"] if s.key == key)
    model = build_model(shape).to(device).train()
    adapter = get_adapter(model)
    base = unwrap_model(model)
    aux_heads = adapter.aux_heads(base, 1).to(device).train()
    chain = adapter.chain(base, aux_heads)
    params = [p for m in (model, aux_heads) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    guard = NonFiniteGuard(chain, [base, aux_heads], max_nonfinite_steps=10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=g).to(device)
    y = torch.randint(0, shape.num_labels, (batch,), generator=g).to(device)
    steps, guards = [], []
    for i in range(warmup + reps):
        optimizer.zero_grad(set_to_none=True)
        t0 = _sync(device)
        guard.start_step()
        t1 = _sync(device)
        result = local_gradients(chain, x, lambda logits: F.cross_entropy(logits, y), 1, accumulate=True)
        t2 = _sync(device)
        guard.add_losses(result.head_losses)
        assert guard.finish_step(i, optimizer)
        t3 = _sync(device)
        optimizer.step()
        t4 = _sync(device)
        if i >= warmup:
            guards.append((t1 - t0) + (t3 - t2))
            steps.append((t4 - t0) - guards[-1])
    return {
        "title": shape.title,
        "params": sum(p.numel() for p in guard.params),
        "tensors": len(guard.params),
        "step": statistics.median(steps),
        "guard": statistics.median(guards),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=[s.key for s in SHAPES["paper"]])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    opts = parser.parse_args()
    passive_openmp()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    rows = [time_shape(key, opts.batch, opts.warmup, opts.reps, device) for key in opts.shapes]
    where = (
        f"{device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
    )
    lines = [
        f"# The non-finite guard's cost per optimizer step ({where}, B = {opts.batch})",
        "",
        "| shape | checked parameters (tensors) | step without the guard (ms) | guard (ms) | guard / step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["guard"] / r["step"]
        lines.append(
            f"| {r['title']} | {r['params']:,} ({r['tensors']}) | {1e3 * r['step']:.0f} | {1e3 * r['guard']:.2f} "
            f"| {100 * ratio:.2f}% |"
        )
    command = "python benchmarks/nonfinite_guard.py " + " ".join(a for a in sys.argv[1:] if a)
    lines += [
        "",
        f"FF (h = 1) steps with SGD on one fixed random batch; medians of {opts.reps} steps after {opts.warmup} "
        "warm-up. The guard: the buffer snapshot at the step's start, the losses, and the check of every gradient "
        "(one float32 sum per gradient tensor and one synchronisation). Goal: at most 1% of a step. "
        f"Command: `{command.strip()}`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    suffix = "" if device.type == "cpu" else "_" + device.type
    with open(os.path.join(opts.out, f"nonfinite_guard{suffix}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
