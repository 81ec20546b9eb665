#!/usr/bin/env python
"""A/B of the hot path: ``local_gradients`` of the working tree against the one of a git revision.

For a change to ``hf_bpmod/local_grad.py``: on the tiny shapes of ``memory_speed.py`` (one thread, B = 64), checks
that both versions give bitwise the same local and true gradients (eval mode, so no dropout), then times a training
step (``accumulate=True``) and a refresh micro-batch (b' = 8, ``also_true=True``) of each, interleaved, and prints the
medians and their ratio. Not part of ``run_all.py``.

    python benchmarks/ab_local_grad.py --rev HEAD~1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from memory_speed import SHAPES, build_model, passive_openmp  # noqa: E402

from hf_bpmod import get_adapter  # noqa: E402
from hf_bpmod import local_grad as current  # noqa: E402


def load_revision(rev: str):
    """``hf_bpmod/local_grad.py`` as it was at ``rev``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{rev}:hf_bpmod/local_grad.py"], cwd=os.path.dirname(HERE), check=True, capture_output=True
    ).stdout.decode()
    source = source.replace("from .chain import", "from hf_bpmod.chain import")
    path = os.path.join(tempfile.mkdtemp(), "local_grad_rev.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("local_grad_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_grad_rev"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def median_ms(times: list[float], skip: int) -> float:
    return 1e3 * statistics.median(times[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--shapes", nargs="*", default=["tiny_resnet_full", "tiny_vit_full", "tiny_resnet_lokr"])
    parser.add_argument("--horizons", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=25)
    opts = parser.parse_args()
    passive_openmp()
    torch.set_num_threads(1)
    versions = {opts.rev: load_revision(opts.rev), "working tree": current}
    for key in opts.shapes:
        shape = next(s for group in SHAPES.values() for s in group if s.key == key)
        model = build_model(shape)
        adapter = get_adapter(model)
        for h in opts.horizons:
            heads = adapter.aux_heads(model, h)
            chain = adapter.chain(model, heads)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(64, 3, shape.image_size, shape.image_size, generator=g)
            y = torch.randint(0, shape.num_labels, (64,), generator=g)

            def loss_fn(logits: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                return F.cross_entropy(logits, y[: logits.shape[0]])

            model.eval()
            heads.eval()
            grads = {}
            for name, module in versions.items():
                r = module.local_gradients(chain, x[:8], loss_fn, h, also_true=True)
                grads[name] = [t for block in r.local + r.true for t in block if t is not None]
            same = all(torch.equal(a, b) for a, b in zip(*grads.values()))
            model.train()
            heads.train()
            step: dict[str, list[float]] = {name: [] for name in versions}
            micro: dict[str, list[float]] = {name: [] for name in versions}
            for _ in range(opts.steps):
                for name, module in versions.items():
                    model.zero_grad(set_to_none=True)
                    heads.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    module.local_gradients(chain, x, loss_fn, h, accumulate=True)
                    step[name].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    module.local_gradients(chain, x[:8], loss_fn, h, also_true=True)
                    micro[name].append(time.perf_counter() - start)
            (a, b) = versions
            sa, sb = median_ms(step[a], 5), median_ms(step[b], 5)
            ma, mb = median_ms(micro[a], 5), median_ms(micro[b], 5)
            print(
                f"{key} h={h}: bitwise equal {same}; step {a} {sa:.1f} ms, {b} {sb:.1f} ms ({sb / sa:.3f}); "
                f"refresh micro-batch {a} {ma:.1f} ms, {b} {mb:.1f} ms ({mb / ma:.3f})"
            )


if __name__ == "__main__":
    main()
