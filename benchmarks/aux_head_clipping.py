#!/usr/bin/env python
"""Gradient clipping and the auxiliary heads: what ``max_grad_norm`` on the heads changes.

Trains a tiny ResNet (4 blocks) and a tiny ViT (4 blocks) with ``local_horizon=1`` on ``SyntheticImages`` (4,096
training and 512 held-out images, 8 px) for ``--steps`` optimizer steps, ``max_grad_norm=1``, with the heads'
gradients clipped three ways: ``none`` (the model clipped, the heads not), ``together`` (one norm over all heads)
and ``each`` (each head on its own, what ``BPModifiedTrainer`` does), for several seeds, in two settings meant to
stress clipping:

- ``sgd``: plain SGD at a large learning rate, where the step is the gradient itself;
- ``outliers``: AdamW, with 2% of the training images multiplied by 100 (gradient spikes on the batches that hold
  them).

For each run: held-out accuracy and loss of the model, mean held-out loss of the auxiliary heads, the largest
pre-clipping gradient norm any head had, and whether anything went non-finite. Prints a Markdown table of the
means over the seeds (and every run with ``--runs``).

    python benchmarks/aux_head_clipping.py                      # 300 steps, seeds 0 1 2
    python benchmarks/aux_head_clipping.py --steps 100 --seeds 0
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments
from hf_bpmod.head_clipping import ClipAuxHeadGradients
from hf_bpmod.testing import SyntheticImages, tiny_resnet, tiny_vit

SIZE, TRAIN, HELD_OUT = 8, 4096, 512
MODELS = {
    "resnet": lambda seed: tiny_resnet(depths=(2, 2), seed=seed),
    "vit": lambda seed: tiny_vit(4, image_size=SIZE, seed=seed),
}
SETTINGS = {
    "adamw": dict(optim="adamw_torch", learning_rate=1e-3),
    "sgd": dict(optim="sgd", learning_rate=0.5),
    "outliers": dict(optim="adamw_torch", learning_rate=3e-3),
}
MODES = ("none", "together", "each")


class Outliers(Dataset):
    """``data`` with every 50th image multiplied by ``scale``."""

    def __init__(self, data: Dataset, scale: float) -> None:
        self.data, self.scale = data, scale

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        item = self.data[i]
        return {**item, "pixel_values": item["pixel_values"] * self.scale} if i % 50 == 0 else item


class HeadClipping(TrainerCallback):
    """Records each step's largest head gradient norm, then clips the heads as ``mode`` says."""

    def __init__(self, heads, mode: str) -> None:
        self.heads, self.mode, self.max_norm = heads, mode, 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        groups = [[p for p in h.parameters() if p.grad is not None] for h in self.heads.values()]
        groups = [g for g in groups if g]
        norms = [float(torch.nn.utils.get_total_norm([p.grad for p in g])) for g in groups]
        self.max_norm = max([self.max_norm, *norms])
        if self.mode == "together":
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g], args.max_grad_norm)
        elif self.mode == "each":
            for g in groups:
                torch.nn.utils.clip_grad_norm_(g, args.max_grad_norm)


@torch.no_grad()
def evaluate(trainer: BPModifiedTrainer, data: Dataset) -> tuple[float, float, float]:
    """Held-out ``(accuracy, loss)`` of the model and the mean loss of the auxiliary heads."""
    chain, heads = trainer.block_chain, trainer.aux_heads
    trainer.model.eval()
    heads.eval()
    x = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    y = torch.stack([data[i]["labels"] for i in range(len(data))])
    outputs = chain.block_outputs(x)
    logits = chain.heads[-1](outputs[-1])
    head_losses = [float(F.cross_entropy(heads[s](outputs[int(s) - 1]), y)) for s in heads]
    return (
        float((logits.argmax(-1) == y).float().mean()),
        float(F.cross_entropy(logits, y)),
        statistics.mean(head_losses),
    )


def run(model_name: str, setting: str, mode: str, seed: int, steps: int) -> dict:
    data = SyntheticImages(n=TRAIN + HELD_OUT, image_size=SIZE, seed=seed)
    train, held_out = Subset(data, range(TRAIN)), Subset(data, range(TRAIN, TRAIN + HELD_OUT))
    if setting == "outliers":
        train = Outliers(train, 100.0)
    with tempfile.TemporaryDirectory() as out:
        args = BPModifiedTrainingArguments(
            output_dir=out, per_device_train_batch_size=32, max_steps=steps, report_to="none", use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=seed, local_horizon=1,
            bp_modified=False, max_grad_norm=1.0, lr_scheduler_type="constant", **SETTINGS[setting],
        )  # fmt: skip
        trainer = BPModifiedTrainer(model=MODELS[model_name](seed), args=args, train_dataset=train)
        trainer.remove_callback(ClipAuxHeadGradients)
        trainer.remove_callback(PrinterCallback)
        clipping = HeadClipping(trainer.aux_heads, mode)
        trainer.add_callback(clipping)
        trainer.train()
        accuracy, loss, head_loss = evaluate(trainer, held_out)
    params = [*trainer.model.parameters(), *trainer.aux_heads.parameters()]
    finite = all(bool(torch.isfinite(p).all()) for p in params) and math.isfinite(loss)
    return dict(accuracy=accuracy, loss=loss, head_loss=head_loss, max_head_norm=clipping.max_norm, finite=finite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--runs", action="store_true", help="also print every run")
    opts = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    print(
        "| model | setting | heads clipped | accuracy | model loss | aux-head loss | largest head grad norm | finite |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_name in opts.models:
        for setting in opts.settings:
            for mode in MODES:
                runs = [run(model_name, setting, mode, seed, opts.steps) for seed in opts.seeds]
                if opts.runs:
                    for seed, r in zip(opts.seeds, runs, strict=True):
                        print(f"<!-- {model_name} {setting} {mode} seed {seed}: {r} -->")

                def mean(key: str, runs: list[dict] = runs) -> float:
                    return statistics.mean(r[key] for r in runs)

                finite = sum(r["finite"] for r in runs)
                print(
                    f"| {model_name} | {setting} | {mode} | {mean('accuracy'):.3f} | {mean('loss'):.3f} | "
                    f"{mean('head_loss'):.3f} | {max(r['max_head_norm'] for r in runs):.1f} | "
                    f"{finite}/{len(runs)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
