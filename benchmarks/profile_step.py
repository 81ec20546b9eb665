#!/usr/bin/env python
"""Where a training step's time goes: ``torch.profiler`` of one step per method (BP, FF, LoCo, MPC h=5), by operator.

Builds a shape of ``memory_speed.py`` (random init, nothing downloaded), warms every method up with one step, then
profiles one more step of each and prints, per method, the total of the operator families that dominate (matrix
products, convolutions, attention, normalisation, element-wise, copies and allocation) for the forward ops and for
the backward ops (autograd nodes), and the ``top`` operators by self CPU time. Not part of ``run_all.py``.

    python benchmarks/profile_step.py --shape vit_lora --batch 8      # ViT-B/16 LoRA, 224 px
    python benchmarks/profile_step.py --shape resnet_lokr --batch 8   # ResNet-50 LoKr, 224 px
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_speed import METHODS, SHAPES, Runner, build_model, passive_openmp  # noqa: E402

FAMILIES = {
    "matmul": ("mm", "addmm", "bmm", "matmul", "linear"),
    "conv": ("convolution", "conv2d", "mkldnn_convolution", "convolution_backward"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "norm": ("layer_norm", "batch_norm", "native_layer_norm", "native_batch_norm"),
    "copy/alloc": ("copy_", "empty", "zeros", "clone", "contiguous", "to", "_to_copy", "fill_", "zero_"),
}


def family(name: str) -> str:
    base = name.split("::")[-1].lower()
    for fam, keys in FAMILIES.items():
        if any(base == k or base.startswith(k) for k in keys):
            return fam
    return "other"


def main() -> None:
    passive_openmp()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="vit_lora", help="a shape key of memory_speed.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=12)
    opts = parser.parse_args()
    shape = next(s for suite in SHAPES.values() for s in suite if s.key == opts.shape)
    template = build_model(shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(opts.batch, 3, shape.image_size, shape.image_size, generator=g)
    y = torch.randint(0, shape.num_labels, (opts.batch,), generator=g)
    runners = [Runner(m, copy.deepcopy(template), x, y) for m in METHODS if m.kind != "gc"]
    for r in runners:
        r.step()
    for r in runners:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            r.step()
        totals: dict[tuple[str, str], float] = defaultdict(float)
        for e in prof.events():
            if e.name.startswith("autograd::engine") or e.name.startswith("ProfilerStep"):
                continue
            phase, parent = "forward", e
            while parent is not None:
                if "Backward" in parent.name or parent.name.startswith("autograd::"):
                    phase = "backward"
                    break
                parent = parent.cpu_parent
            totals[(phase, family(e.name))] += e.self_cpu_time_total / 1e6
        wall = sum(totals.values())
        print(
            f"\n## {r.method.name} (h={r.method.horizon or '-'}), {shape.title}, B = {opts.batch}: {wall:.2f} s of ops"
        )
        for (phase, fam), seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
            if seconds / wall >= 0.01:
                print(f"  {phase:8s} {fam:11s} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
