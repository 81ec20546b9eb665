#!/usr/bin/env python
"""A/B of whole training runs: ``BPModifiedTrainer`` of the working tree against the one of a git revision.

For a change that moves code without meaning to change behaviour: each setting trains a tiny model from a config
for a few optimizer steps (offset refreshes included) once with the package as it was at ``--rev`` and once with
the working tree, each in a process of its own, and checks that the weights, BatchNorm statistics, auxiliary heads,
offsets and logged losses are bitwise equal. Not part of ``run_all.py``.

    python benchmarks/ab_trainer.py --rev 0015f73
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (model, trainer arguments). Each refreshes the offset at least twice.
SETTINGS = {
    "resnet_h1_default_sgd": ("resnet", dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.05)),
    "resnet_h2_accumulate": ("resnet", dict(local_horizon=2, gradient_accumulation_steps=2, learning_rate=0.05)),
    "vit_h1_offset_adamw": ("vit", dict(bp_modified=True, learning_rate=1e-3, max_grad_norm=1.0)),
    "vit_h2_offset_optimal": ("vit", dict(bp_modified=True, local_horizon=2, offset_scaling="optimal")),
    "vit_h1_plain_label_smoothing": ("vit", dict(label_smoothing_factor=0.1, learning_rate=1e-3)),
}

RUNNER = r"""
import json, sys, torch
from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit

kind, extra, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
model = tiny_resnet() if kind == "resnet" else tiny_vit(num_layers=4)
args = BPModifiedTrainingArguments(
    output_dir=out + ".run", max_steps=8, per_device_train_batch_size=8, offset_batch_size=32,
    offset_micro_batch_size=8, offset_period="4", logging_steps=1, save_strategy="no", report_to="none",
    use_cpu=True, seed=0, dataloader_drop_last=True, **extra,
)
trainer = BPModifiedTrainer(model=model, args=args, train_dataset=SyntheticImages(96, num_labels=5))
trainer.train()
offset = trainer.offset.state if hasattr(trainer, "offset") else trainer.offset_state
torch.save({
    "model": model.state_dict(),
    "aux_heads": trainer.aux_heads.state_dict(),
    "offsets": [[d for d in (b.unscaled_delta() or [])] for b in offset.blocks],
    "scales": [(b.scale, b.weight) for b in offset.blocks],
    "period_index": offset.period_index,
    "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
}, out)
"""


def run(source: str, kind: str, extra: dict, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as cwd:  # away from the repository, so only `source` provides hf_bpmod
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, kind, json.dumps(extra), out],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
    if done.returncode:
        raise SystemExit(f"the run with hf_bpmod from {source} failed:\n{done.stderr[-4000:]}")
    return torch.load(out, weights_only=True)


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    opts = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "rev")
        os.makedirs(old)
        archive = subprocess.run(["git", "archive", opts.rev, "hf_bpmod"], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        for name in opts.settings:
            kind, extra = SETTINGS[name]
            a = run(old, kind, extra, os.path.join(tmp, f"{name}-rev.pt"))
            b = run(ROOT, kind, extra, os.path.join(tmp, f"{name}-tree.pt"))
            parts = {key: equal(a[key], b[key]) for key in a}
            same = all(parts.values()) and a.keys() == b.keys()
            failures += not same
            print(
                f"{name}: bitwise equal {same} ({', '.join(f'{k} {v}' for k, v in parts.items())}); "
                f"{a['period_index']} offset refreshes, {len(a['model'])} model tensors, final loss {a['losses'][-1]}"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
