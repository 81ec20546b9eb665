#!/usr/bin/env python
"""Every supported architecture: its blocks, the activations h = 1 saves against backprop, and a short run.

For each tiny model of ``hf_bpmod.testing.TINY_KINDS`` (built from configs): the number of blocks ``T``, the peak bytes
saved for backward in one step at h = T (backprop) and at h = 1 (:func:`hf_bpmod.memory.peak_saved_bytes`, each
storage once, parameters excluded; deterministic), and, with ``--accuracy``, the test accuracy of the short run that
``tests/test_architectures.py`` checks (:func:`hf_bpmod.testing.embedded_short_run`: 4,000 Animal-Shape-MNIST
images, 3 epochs at h = 1, 500 held-out images; chance 0.10).

    python benchmarks/architectures.py --accuracy    # writes benchmarks/results/architectures.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from transformers.utils import logging as hf_logging

from hf_bpmod import get_adapter
from hf_bpmod.memory import peak_saved_bytes
from hf_bpmod.testing import TINY_KINDS, embedded_short_run, short_run_data, tiny_model

#: ``beit_shared`` (one position bias shared by every layer) is refused by the BEiT adapter until
#: ``hf_bpmod.adapters.unshare_relative_position_bias`` gives each layer its copy; ``beit`` is measured instead.
KINDS = [kind for kind in TINY_KINDS if kind != "beit_shared"]


def measure(kind: str, image_size: int, batch: int, data: tuple | None) -> dict:
    """One row; ``data``: the short run's data (:func:`short_run_data`), or ``None`` for no short run."""
    model = tiny_model(kind, image_size=image_size).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    bp, local = peak_saved_bytes(model, None, x, y), peak_saved_bytes(model, 1, x, y)
    row = {
        "kind": kind,
        "class": type(model).__name__,
        "blocks": get_adapter(model).chain(model).num_blocks,
        "bp": bp,
        "h1": local,
    }
    if data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            row["accuracy"] = embedded_short_run(kind, tmp, data=data)
    return row


def table(rows: list[dict], image_size: int, batch: int) -> str:
    lines = [
        "# Supported architectures: saved activations (h = 1 vs BP) and a short run",
        "",
        f"Tiny models of `hf_bpmod.testing.tiny_model`, {image_size} px, batch {batch}: peak bytes saved for "
        "backward in one step, each storage once, parameters excluded (deterministic). Short run: h = 1, 4,000 "
        "Animal-Shape-MNIST images, 3 epochs, accuracy on 500 held-out images (chance 0.10).",
        "",
        "| kind | model | blocks T | saved, BP (KiB) | saved, h = 1 (KiB) | h = 1 / BP | short-run accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "not run"
        lines.append(
            f"| {r['kind']} | {r['class']} | {r['blocks']} | {r['bp'] / 1024:.0f} | {r['h1'] / 1024:.0f} "
            f"| {r['h1'] / r['bp']:.2f} | {acc} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--accuracy", action="store_true", help="also the short run's accuracy (about 10 s a kind)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    data = short_run_data() if opts.accuracy else None  # transformed once for every kind
    rows = [measure(kind, opts.image_size, opts.batch, data) for kind in opts.kinds]
    text = table(rows, opts.image_size, opts.batch)
    command = " ".join(["python", "benchmarks/architectures.py", *sys.argv[1:]])
    text += f"\n\nCommand: `{command}`\n"
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "architectures.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
