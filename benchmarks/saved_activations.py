#!/usr/bin/env python
"""Peak bytes saved for backward during one step, local horizons vs backprop, on a 12-block ViT (deterministic).

Counts tensors that autograd saves for backward and that are alive at the same time
(:class:`hf_bpmod.memory.SavedTensorMeter`, parameters excluded): activation memory, not a timing.

    python benchmarks/saved_activations.py            # writes benchmarks/results/saved_activations.md
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from hf_bpmod import get_adapter, local_gradients
from hf_bpmod.memory import SavedTensorMeter
from hf_bpmod.testing import tiny_vit


def peak_saved_bytes(horizon: int, num_layers: int, batch: int, image_size: int, hidden: int) -> int:
    model = tiny_vit(num_layers=num_layers, image_size=image_size, hidden_size=hidden, num_labels=10)
    adapter = get_adapter(model)
    chain = adapter.chain(model, adapter.aux_heads(model, horizon))
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))
    exclude = list(model.parameters()) + [p for h in chain.heads if h is not None for p in h.parameters()]
    meter = SavedTensorMeter(exclude=exclude)
    with meter.measure():
        local_gradients(chain, x, lambda logits: F.cross_entropy(logits, y), horizon, accumulate=True)
    return meter.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    opts = parser.parse_args()
    shape = (opts.layers, opts.batch, opts.image_size, opts.hidden)
    bp = peak_saved_bytes(opts.layers, *shape)
    rows = ["| method | horizon | peak saved bytes | ratio to BP |", "|---|---|---|---|"]
    for name, h in (("FF", 1), ("LoCo", 2), ("MPC", 5), ("BP", opts.layers)):
        peak = bp if h == opts.layers else peak_saved_bytes(h, *shape)
        rows.append(f"| {name} | {h} | {peak:,} | {peak / bp:.3f} |")
    text = "\n".join(
        [
            f"# Saved-for-backward activation memory, ViT with {opts.layers} blocks "
            f"(batch {opts.batch}, {opts.image_size}x{opts.image_size}, hidden {opts.hidden})",
            "",
            *rows,
            "",
            "Command: `python benchmarks/saved_activations.py`",
        ]
    )
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "saved_activations.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
