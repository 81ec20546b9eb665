#!/usr/bin/env python
"""Applying the offset at every step: one ``lerp`` pass (the prepared offset) against a multiply and an add.

Eq. 5, ``g <- scale * g + weight * Delta`` for the trainable parameters of every block, on the full fine-tune shapes
of ``memory_speed.py`` (ViT-B/16 and ResNet-50 at random init, FF's chain: every block but the last gets an
offset). The values do not matter to the time, so the gradients and ``Delta`` are random and ``scale``, ``weight``
are those of an ``aligned`` refresh with ``c != 1``. The two forms are timed interleaved on the same gradients;
their results are checked to agree. Part of ``run_all.py`` (``make bench``).

    python benchmarks/apply_offset.py                 # CPU, torch's threads
    python benchmarks/apply_offset.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_speed import SHAPES, build_model, passive_openmp  # noqa: E402

from hf_bpmod import get_adapter  # noqa: E402
from hf_bpmod.offset import BlockOffset  # noqa: E402
from hf_bpmod.offset_pass import apply_block_offsets  # noqa: E402

SCALE, WEIGHT = 0.93, 0.11  # an aligned refresh: scale = c, weight = c * lambda


def offsets_for(chain, prepared: bool, seed: int = 0) -> list[BlockOffset]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    offsets = []
    for t, params in enumerate(chain.block_params):
        delta = None
        if t < len(chain.block_params) - 1 and params:  # the last block is exact under h = 1
            delta = [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params]
        block = BlockOffset(scale=SCALE if delta else 1.0, weight=WEIGHT if delta else 0.0, delta=delta, a=1.0,
                            lam=WEIGHT / SCALE, c=SCALE, bias=0.0, var=0.0, cosine=0.0, offset_norm=0.0)  # fmt: skip
        if prepared:
            block.prepare()
        offsets.append(block)
    return offsets


def time_shape(key: str, reps: int, device: torch.device) -> dict:
    shape = next(s for group in SHAPES.values() for s in group if s.key == key)
    model = build_model(shape).to(device)
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, 1).to(device))
    params = [p for ps in chain.block_params for p in ps]
    g = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(p.shape, generator=g).to(device, p.dtype) for p in params]
    forms = {"two passes": offsets_for(chain, prepared=False), "one lerp pass": offsets_for(chain, prepared=True)}
    assert all(b.lerp_weight is not None for b in forms["one lerp pass"] if b.delta is not None)
    results = {}
    for name, offsets in forms.items():  # the two forms agree
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        apply_block_offsets(chain, offsets)
        results[name] = [p.grad.clone() for p in params]
    worst = max(float((a - b).norm() / b.norm()) for a, b in zip(results["one lerp pass"], results["two passes"]))
    del results
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(reps):
        for name, offsets in forms.items():
            for p, grad in zip(params, grads):
                p.grad = grad.clone()  # fresh gradients each time, as after a step's backward
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            apply_block_offsets(chain, offsets)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    n_offset = sum(
        p.numel() for b, ps in zip(forms["two passes"], chain.block_params) if b.delta is not None for p in ps
    )
    return {
        "title": shape.title,
        "params": n_offset,
        "ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
        "worst_rel": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["vit_full", "resnet_full"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    opts = parser.parse_args()
    passive_openmp()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    rows = [time_shape(key, opts.reps, device) for key in opts.shapes]
    where = (
        f"{device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
    )
    lines = [
        f"# Applying the offset at every step ({where})",
        "",
        "| shape | parameters with an offset | two passes (ms) | one lerp pass (ms) | ratio | largest relative difference (norm) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        two, one = r["ms"]["two passes"], r["ms"]["one lerp pass"]
        lines.append(
            f"| {r['title']} | {r['params']:,} | {two:.1f} | {one:.1f} | {one / two:.2f} | {r['worst_rel']:.1e} |"
        )
    lines += [
        "",
        f"Median of {opts.reps} interleaved repetitions on fresh gradients; `scale = {SCALE}`, `weight = {WEIGHT}` "
        "(the two-pass form multiplies, then adds; the prepared offset stores `weight Delta / (1 - scale)` and does "
        "one `torch._foreach_lerp_`). Command: `python benchmarks/apply_offset.py`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, f"apply_offset{'' if device.type == 'cpu' else '_' + device.type}.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
