#!/usr/bin/env python
"""A CPU-scale study of local losses with and without the BP-modified offset, on the embedded data.

Trains a small ViT (6 blocks) and a small ResNet (8 blocks) from scratch on Animal-Shape-MNIST (8,000 train /
2,000 test images, 28x28, 10 classes) with ``BPModifiedTrainer`` and writes a markdown table (accuracy, seconds,
counted peak memory) and, with ``--plots``, PNG plots. The Trainer's defaults otherwise: linear learning-rate decay,
gradient clipping at 1.0.

    # `make study`: both models, SGD with momentum, BP / FF / FF-modified / LoCo / LoCo-modified, 2 seeds (~15 min)
    python research/cpu_study.py --jobs 2 --threads 1 --optimizers sgd --methods bp ff ff_mod loco loco_mod
    python research/cpu_study.py --report --plots
    # research/results/cpu_study (research/offset_study.md): both optimizers, the paper's rule too
    python research/cpu_study.py --jobs 2 --threads 1 --out research/results/cpu_study \
        --methods bp ff ff_mod ff_paper loco loco_mod
    # the paper's setting at CPU scale: a BP-pretrained backbone (classes 0-4), fine-tuned with a new head (5-9)
    python research/cpu_study.py --setting finetune --out research/results/cpu_study_finetune --epochs 4 \
        --methods bp ff ff_mod
    # a quick look (one model, one optimizer, one seed, 2 epochs)
    python research/cpu_study.py --models vit --optimizers adamw --seeds 0 --epochs 2 --methods ff ff_mod bp

Each run is one line of ``<out>/runs.jsonl`` (accuracy per epoch, time, peak saved-activation bytes); runs already
in that file are skipped, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from torch.utils.data import Dataset
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter
from hf_bpmod.data import load_animal_shape_mnist
from hf_bpmod.memory import SavedStorageMeter


class TensorImages(Dataset):
    """Pre-processed images held as one tensor (normalised to [-1, 1], 3 channels), Trainer-ready dicts."""

    def __init__(self, split, classes: list[int] | None = None) -> None:
        images = np.stack([np.asarray(im.convert("L"), dtype=np.float32) for im in split["image"]])
        labels = np.asarray(split["label"])
        if classes is not None:
            keep = np.isin(labels, classes)
            images, labels = images[keep], np.searchsorted(np.asarray(sorted(classes)), labels[keep])
        x = torch.from_numpy(images / 127.5 - 1.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        self.pixel_values, self.labels = x, torch.from_numpy(labels).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


# The other architectures, at the ViT's and the ResNet's scale (28 px, 6 or 8 blocks), for the family check of
# research/family_check.py: transformer encoders as the ViT, convolutional nets as the ResNet.
_ENCODER = dict(image_size=28, patch_size=4, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                intermediate_size=128)  # fmt: skip
FAMILY_MODELS = {
    "deit": ("DeiTConfig", "DeiTForImageClassification", _ENCODER),
    "beit": ("BeitConfig", "BeitForImageClassification", {**_ENCODER, "use_relative_position_bias": True}),
    "dinov2": (
        "Dinov2Config",
        "Dinov2ForImageClassification",
        {k: v for k, v in _ENCODER.items() if k != "intermediate_size"} | {"mlp_ratio": 2},
    ),
    "swin": (
        "SwinConfig",
        "SwinForImageClassification",
        dict(
            image_size=28,
            patch_size=2,
            embed_dim=16,
            depths=[2, 2, 2],
            num_heads=[2, 4, 8],
            window_size=4,
            drop_path_rate=0.0,
        ),
    ),
    "convnext": (
        "ConvNextConfig",
        "ConvNextForImageClassification",
        dict(num_stages=4, patch_size=2, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2]),
    ),
    "regnet": (
        "RegNetConfig",
        "RegNetForImageClassification",
        dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], groups_width=8),
    ),
}


def build_model(kind: str, num_labels: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "vit":
        config = ViTConfig(
            image_size=28, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=6,
            num_attention_heads=4, intermediate_size=128, num_labels=num_labels,
        )  # fmt: skip
        return ViTForImageClassification(config)
    if kind == "resnet":
        config = ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="basic",
            downsample_in_first_stage=False, num_labels=num_labels,
        )  # fmt: skip
        return ResNetForImageClassification(config)
    if kind in FAMILY_MODELS:
        config_name, model_name, settings = FAMILY_MODELS[kind]
        config = getattr(transformers, config_name)(num_channels=3, num_labels=num_labels, **settings)
        return getattr(transformers, model_name)(config)
    raise ValueError(kind)


METHODS = {
    "bp": dict(local_horizon=99, bp_modified=False),
    "ff": dict(local_horizon=1, bp_modified=False),
    "ff_mod": dict(local_horizon=1, bp_modified=True),  # the offset with its default settings (a ViT needs True)
    # the default before the norm cap (offset_max_ratio=0.25) was adopted: research/offset_study.md
    "ff_mod_nocap": dict(local_horizon=1, bp_modified=True, offset_max_ratio=float("inf")),
    "ff_paper": dict(local_horizon=1, bp_modified=True, offset_scaling="optimal"),  # eq. 16-19, faithful
    "loco": dict(local_horizon=2, bp_modified=False),
    "loco_mod": dict(local_horizon=2, bp_modified=True),
    "loco_mod_nocap": dict(local_horizon=2, bp_modified=True, offset_max_ratio=float("inf")),
    "loco_paper": dict(local_horizon=2, bp_modified=True, offset_scaling="optimal"),
}
OPTIMIZERS = {
    "adamw": dict(optim="adamw_torch", learning_rate=2e-3, weight_decay=0.01),
    "sgd": dict(optim="sgd", learning_rate=0.05, optim_args="momentum=0.9"),
}
# fine-tuning a pretrained backbone: a quarter of the from-scratch learning rates
FINETUNE_OPTIMIZERS = {
    "adamw": dict(optim="adamw_torch", learning_rate=5e-4, weight_decay=0.01),
    "sgd": dict(optim="sgd", learning_rate=0.0125, optim_args="momentum=0.9"),
}
PRETRAIN_CLASSES, FINETUNE_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
# (pretraining classes, fine-tuning classes) of each fine-tuning setting; `finetune_reverse` swaps the halves
SPLITS = {"finetune": (PRETRAIN_CLASSES, FINETUNE_CLASSES), "finetune_reverse": (FINETUNE_CLASSES, PRETRAIN_CLASSES)}
PRETRAIN_EPOCHS = 4


def pretrained_path(out: str, kind: str, seed: int, setting: str = "finetune") -> str:
    suffix = "" if setting == "finetune" else "-reverse"
    return os.path.join(out, "pretrained", f"{kind}-seed{seed}{suffix}.pt")


def pretrain(kind: str, seed: int, train: Dataset, out: str, setting: str = "finetune") -> str:
    """Backprop (AdamW 2e-3, 4 epochs) on the pretraining classes of ``setting`` (0-4 for ``finetune``, 5-9 for
    ``finetune_reverse``): the backbone that setting starts from. Cached."""
    path = pretrained_path(out, kind, seed, setting)
    if os.path.exists(path):
        return path
    run = Run(kind, "bp", "adamw", seed, PRETRAIN_EPOCHS)
    args = training_arguments(
        run, os.path.join(out, f"work-pretrain-{os.getpid()}"), eval_strategy="no", logging_strategy="no"
    )
    model = build_model(kind, len(SPLITS[setting][0]), seed)
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(trainer.model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written file
    return path


def initial_model(run: Run, out: str) -> torch.nn.Module:
    """From scratch, or (``finetune``) the pretrained backbone with a freshly initialised classifier."""
    if run.setting == "scratch":
        return build_model(run.model, seed=run.seed)
    model = build_model(run.model, len(SPLITS[run.setting][1]), seed=run.seed + 1000)  # the new head's init
    state = torch.load(pretrained_path(out, run.model, run.seed, run.setting), weights_only=True)
    backbone = {k: v for k, v in state.items() if not k.startswith("classifier")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith("classifier") for k in missing), (missing, unexpected)
    if run.peft == "lora":  # the paper's ViT setting: LoRA r = 1, alpha = 4, the new head trained in full
        from peft import LoraConfig, get_peft_model

        targets = get_adapter(model).peft_target_modules(model)
        config = LoraConfig(r=1, lora_alpha=4, target_modules=targets, modules_to_save=["classifier"])
        model = get_peft_model(model, config)
    return model


@dataclass
class Run:
    model: str
    method: str
    optimizer: str
    seed: int
    epochs: int
    extra: dict = field(default_factory=dict)
    lr_scheduler_type: str = "linear"  # the Trainer's defaults
    max_grad_norm: float = 1.0
    setting: str = "scratch"  # or "finetune": a BP-pretrained backbone (classes 0-4), new head, classes 5-9;
    # or "finetune_reverse": the same with the halves swapped
    peft: str = ""  # or "lora": fine-tune LoRA r = 1, alpha = 4 (the paper's ViT setting) and the new head

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.extra.items()))
        setting = f"{self.lr_scheduler_type},clip={self.max_grad_norm}"
        key = f"{self.model}|{self.method}|{self.optimizer}|{self.seed}|{self.epochs}|{extra}|{setting}"
        key = key if self.setting == "scratch" else f"{key}|{self.setting}"
        return f"{key}|{self.peft}" if self.peft else key


def training_arguments(run: Run, workdir: str, **overrides) -> BPModifiedTrainingArguments:
    settings = dict(
        output_dir=workdir, per_device_train_batch_size=64, per_device_eval_batch_size=500,
        num_train_epochs=run.epochs, lr_scheduler_type=run.lr_scheduler_type,
        max_grad_norm=run.max_grad_norm, seed=run.seed,
        data_seed=run.seed, report_to="none", use_cpu=True, save_strategy="no", eval_strategy="epoch",
        logging_strategy="epoch", disable_tqdm=True, dataloader_drop_last=True, offset_batch_size=320,
        offset_micro_batch_size=8,
    )  # fmt: skip
    optimizer = (OPTIMIZERS if run.setting == "scratch" else FINETUNE_OPTIMIZERS)[run.optimizer]
    return BPModifiedTrainingArguments(**{**settings, **METHODS[run.method], **optimizer, **run.extra, **overrides})


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def peak_step_bytes(run: Run, train: Dataset, workdir: str, out: str) -> dict[str, int]:
    """What one optimizer step holds at its peak, counted: the saved-for-backward storages alive at once
    (:class:`~hf_bpmod.memory.SavedStorageMeter`, the first step's offset refresh included) plus parameters, their
    gradients, the optimizer state, the auxiliary heads and the offsets. Deterministic, unlike the process RSS."""
    model = initial_model(run, out)
    args = training_arguments(run, workdir, max_steps=1, eval_strategy="no", logging_strategy="no")
    trainer = BPModifiedTrainer(model=model, args=args, train_dataset=train)
    params = list(model.parameters()) + list(trainer.aux_heads.parameters())
    meter = SavedStorageMeter(exclude=params)
    with meter.measure():
        trainer.train()
    trainable = [p for p in params if p.requires_grad]
    optimizer_state = [t for state in trainer.optimizer.state.values() for t in state.values()]
    blocks = trainer.offset.state.blocks if trainer.uses_offset else []
    offsets = [d for b in blocks if b.delta is not None for d in b.delta]
    return {
        "activations": meter.peak_bytes,
        "static": _bytes(params) + _bytes(trainable) + _bytes(optimizer_state) + _bytes(offsets),
    }


def train_one(run: Run, train: Dataset, test: Dataset, workdir: str, out: str) -> dict:
    memory = peak_step_bytes(run, train, workdir, out)
    model = initial_model(run, out)
    args = training_arguments(run, workdir)

    def accuracy(eval_pred):
        return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}

    trainer = BPModifiedTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    accs = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
    offsets = []
    log_path = os.path.join(workdir, args.offset_log_file)
    if os.path.exists(log_path) and args.bp_modified:
        with open(log_path) as f:
            offsets = [
                {"step": r["step"], "a": [b["a"] for b in r["blocks"]], "lam": [b["lam"] for b in r["blocks"]],
                 "c": [b["c"] for b in r["blocks"]], "cosine": [b["cosine"] for b in r["blocks"]],
                 "reliability": [b["reliability"] for b in r["blocks"]],
                 "offset_norm": [b["offset_norm"] for b in r["blocks"]]}
                for r in map(json.loads, f)
            ]  # fmt: skip
        os.remove(log_path)
    return {"key": run.key, **run.__dict__, "acc": accs, "final": accs[-1], "best": max(accs), "seconds": seconds,
            "memory": memory, "offsets": offsets}  # fmt: skip


def _label(r: dict) -> str:
    extra = ",".join(f"{k.replace('offset_', '')}={v}" for k, v in sorted(r["extra"].items()))
    label = f"{r['method']}{' (' + extra + ')' if extra else ''}"
    return f"{label} [{r['peft']}]" if r.get("peft") else label


def report(results: list[dict], out: str, plots: bool) -> str:
    """A markdown table (mean final and best test accuracy over seeds, seconds) and, with ``plots``, PNG figures."""
    groups: dict[tuple, list[dict]] = {}
    results = list({r["key"]: r for r in results}.values())  # a run repeated (same key) counts once
    for r in results:
        groups.setdefault((r["model"], r["optimizer"], _label(r)), []).append(r)
    lines = [
        "| model | optimizer | method | seeds | final accuracy (per seed) | mean final | mean best | seconds/run "
        "| peak MiB (activations + rest) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, optimizer, label), rs in sorted(groups.items()):
        finals = [r["final"] for r in sorted(rs, key=lambda r: r["seed"])]
        memory = rs[0].get("memory")
        peak = (
            f"{(memory['activations'] + memory['static']) / 2**20:.1f} ({memory['activations'] / 2**20:.1f} + "
            f"{memory['static'] / 2**20:.1f})"
            if memory
            else "-"
        )
        lines.append(
            f"| {model} | {optimizer} | {label} | {len(rs)} | {', '.join(f'{f:.3f}' for f in finals)} | "
            f"{np.mean(finals):.3f} | {np.mean([r['best'] for r in rs]):.3f} | "
            f"{np.mean([r['seconds'] for r in rs]):.0f} | {peak} |"
        )
    text = "\n".join(lines + ["", offset_effect(results)])
    if plots:
        _plots(groups, out)
    return text


PAIRS = [
    ("ff", "ff_mod"),
    ("ff", "ff_mod_nocap"),
    ("ff", "ff_paper"),
    ("loco", "loco_mod"),
    ("loco", "loco_mod_nocap"),
    ("loco", "loco_paper"),
]


def offset_effect(results: list[dict]) -> str:
    """Per model, optimizer and local method: the offset's effect on the final accuracy, seed by seed (only seeds
    that both runs have), its mean with the standard error of a paired mean, and the part of the local-to-BP gap it
    closes (BP: mean over its own seeds)."""
    final = {(r["model"], r["optimizer"], _label(r), r["seed"]): r["final"] for r in results}
    lines = [
        "| model | optimizer | local -> modified | seeds | modified - local (per seed) | mean difference (s.e.) "
        "| mean local | mean modified | mean BP | gap closed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted({(m, o) for m, o, _, _ in final})
    for model, optimizer in cells:
        bp = [v for (m, o, lab, _), v in final.items() if (m, o, lab) == (model, optimizer, "bp")]
        for local, modified in PAIRS:
            seeds = sorted(
                s
                for (m, o, lab, s) in final
                if (m, o, lab) == (model, optimizer, local) and (model, optimizer, modified, s) in final
            )
            if not seeds:
                continue
            a = [final[(model, optimizer, local, s)] for s in seeds]
            b = [final[(model, optimizer, modified, s)] for s in seeds]
            d = np.subtract(b, a)
            diffs = ", ".join(f"{v:+.3f}" for v in d)
            se = f" ({np.std(d, ddof=1) / np.sqrt(len(d)):.3f})" if len(d) > 1 else ""
            bp_mean = f"{np.mean(bp):.3f}" if bp else "-"
            gap = (
                f"{(np.mean(b) - np.mean(a)) / (np.mean(bp) - np.mean(a)):+.0%}"
                if bp and np.mean(bp) > np.mean(a)
                else "-"
            )
            lines.append(
                f"| {model} | {optimizer} | {local} -> {modified} | {len(seeds)} | {diffs} | {d.mean():+.4f}{se} | "
                f"{np.mean(a):.3f} | {np.mean(b):.3f} | {bp_mean} | {gap} |"
            )
    return "\n".join(lines)


# Plot styles: every method gets its own colour, line style and marker (BP, the reference, is black); 20 colours
# (tab10, then tab20's light shades) before any repeats, and a repeated colour never comes with the same line style.
_COLOURS = [f"C{i}" for i in range(10)] + [f"#{c}" for c in ("aec7e8", "ffbb78", "98df8a", "ff9896", "c5b0d5",
                                                         "c49c94", "f7b6d2", "c7c7c7", "dbdb8d", "9edae5")]  # fmt: skip
_LINESTYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _styles(labels: list[str]) -> dict[str, dict]:
    """One distinct (colour, line style, marker) per label; labels of BP (``bp``, ``bp [lora]``) are black."""
    styles, others = {}, [label for label in labels if label.split(" ")[0] != "bp"]
    for label in labels:
        if label not in others:
            styles[label] = dict(color="black", linestyle="-", marker="o")
    for i, label in enumerate(others):
        linestyle = _LINESTYLES[(i + i // len(_COLOURS)) % len(_LINESTYLES)]
        styles[label] = dict(
            color=_COLOURS[i % len(_COLOURS)], linestyle=linestyle, marker=_MARKERS[i % len(_MARKERS)]
        )
    return styles


def _plots(groups: dict[tuple, list[dict]], out: str) -> None:
    """``accuracy.png``: test accuracy per epoch, mean over seeds, one panel per (model, optimizer), one legend
    outside the panels. ``scales.png``: the offset's ``lambda`` and ``a`` per block (each where it is not constant) at
    every refresh, the lowest seed of each modified method, one row per method and quantity, one column per (model,
    optimizer); cells a method did not run in are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = sorted({(m, o) for m, o, _ in groups})
    labels = sorted({label for _, _, label in groups})
    style = _styles(labels)
    ncols = min(2, len(cells))
    nrows = -(-len(cells) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (model, optimizer) in zip(axes.flat, cells):
        for (m, o, label), rs in sorted(groups.items()):
            if (m, o) != (model, optimizer):
                continue
            acc = np.mean([r["acc"] for r in rs], axis=0)
            ax.plot(range(1, len(acc) + 1), acc, label=label, markersize=4, linewidth=1.4, **style[label])
        ax.set_title(f"{model} / {optimizer}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (mean over seeds)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cells) :]:
        ax.remove()
    handles = [plt.Line2D([], [], markersize=5, linewidth=1.4, **style[label]) for label in labels]
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="method")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)

    modified = {  # the lowest seed of each modified method and cell
        k: min(rs, key=lambda r: r["seed"])
        for k, rs in sorted(groups.items())
        if k[2].startswith(("ff_mod", "ff_paper", "loco_mod", "loco_paper"))
    }
    modified = {k: r for k, r in modified.items() if r["offsets"]}
    if not modified:
        return
    methods = sorted({label for _, _, label in modified})
    rows = []  # (method, quantity), where the quantity moves: lambda = 0 (bias_only) and a = 1 (aligned) are not drawn
    for method in methods:
        runs = [r for (_, _, label), r in modified.items() if label == method]
        for key, constant in (("lam", 0.0), ("a", 1.0)):
            if any(v != constant for r in runs for o in r["offsets"] for v in o[key][:-1]):
                rows.append((method, key))
    blocks = max(len(r["offsets"][0]["a"]) - 1 for r in modified.values())  # the last block is exact: not shown
    block_style = _styles([f"block {t}" for t in range(blocks)])
    fig, axes = plt.subplots(len(rows), len(cells), figsize=(3.8 * len(cells), 2.8 * len(rows)), squeeze=False)
    for i, (method, key) in enumerate(rows):
        for j, (model, optimizer) in enumerate(cells):
            ax = axes[i][j]
            r = modified.get((model, optimizer, method))
            if r is None:
                ax.remove()
                continue
            steps = [o["step"] for o in r["offsets"]]
            values = np.array([o[key] for o in r["offsets"]])
            for t in range(values.shape[1] - 1):
                ax.plot(steps, values[:, t], markersize=3, linewidth=1.2, **block_style[f"block {t}"])
            name = {"a": "a", "lam": "lambda"}[key]
            ax.set_title(f"{model}/{optimizer}, {method}: {name} (seed {r['seed']})", fontsize=7)
            ax.set_xlabel("step", fontsize=7)
            ax.set_ylabel(name, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], markersize=4, linewidth=1.2, **block_style[f"block {t}"]) for t in range(blocks)]
    fig.legend(handles, [f"block {t}" for t in range(blocks)], loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8, title="block\n(the last is exact:\nnot shown)", title_fontsize=8)  # fmt: skip
    fig.suptitle(
        "The offset's scales per block at each refresh (lowest seed); where a method has no row for a, a = 1 "
        "throughout, and where it has none for lambda, lambda = 0",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    fig.savefig(os.path.join(out, "scales.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


def _extra_value(name: str, text: str):
    """``--extra name=text`` as the type of the argument's default; a number where the default is ``None``."""
    default = getattr(BPModifiedTrainingArguments, name, text)
    if isinstance(default, bool):
        return text.lower() in ("1", "true")
    if default is None:
        try:
            return float(text)
        except ValueError:
            return text
    return type(default)(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "resnet"])
    parser.add_argument("--methods", nargs="+", default=["bp", "ff", "ff_mod", "ff_paper", "loco", "loco_mod"])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sgd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--extra", default="", help="extra BPModifiedTrainingArguments, e.g. offset_bias_correction=1")
    parser.add_argument("--lr_scheduler_type", default="linear",
                        help="the Trainer's default; research/results/cpu_study_constant_lr used constant")  # fmt: skip
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="the Trainer's default; 0 disables clipping")
    parser.add_argument("--setting", choices=["scratch", *SPLITS], default="scratch",
                        help="finetune: BP-pretrain on classes 0-4 (cached under <out>/pretrained), then train every "
                        "method from that backbone with a new head on classes 5-9 (the paper's setting); "
                        "finetune_reverse: the same with the halves swapped")  # fmt: skip
    parser.add_argument(
        "--peft",
        choices=["none", "lora"],
        default="none",
        help="lora (fine-tuning settings only): LoRA r=1, alpha=4 on the backbone, the new head in full",
    )
    parser.add_argument("--out", default="runs/cpu_study")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--report", action="store_true", help="only write the table (and plots) from runs.jsonl")
    parser.add_argument("--plots", action="store_true", help="also write accuracy.png and scales.png")
    opts = parser.parse_args()
    if opts.peft != "none" and opts.setting not in SPLITS:
        parser.error("--peft applies to the fine-tuning settings (--setting finetune / finetune_reverse)")
    torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    extra = {item.split("=")[0]: _extra_value(*item.split("=")) for item in filter(None, opts.extra.split(","))}
    os.makedirs(opts.out, exist_ok=True)
    results_path = os.path.join(opts.out, "runs.jsonl")
    done = set()
    if os.path.exists(results_path):
        with open(results_path) as f:
            done = {json.loads(line)["key"] for line in f}
    if opts.report:
        with open(results_path) as f:
            results = [json.loads(line) for line in f]
        text = report(results, opts.out, opts.plots)
        print(text)
        with open(os.path.join(opts.out, "table.md"), "w") as f:
            f.write(text + "\n")
        return
    runs = [
        Run(
            model,
            method,
            optimizer,
            seed,
            opts.epochs,
            dict(extra),
            opts.lr_scheduler_type,
            opts.max_grad_norm,
            opts.setting,
            "" if opts.peft == "none" else opts.peft,
        )
        for model in opts.models
        for optimizer in opts.optimizers
        for seed in opts.seeds
        for method in opts.methods
    ]
    runs = [run for run in runs if run.key not in done]
    if opts.setting in SPLITS:
        pretrain_set = TensorImages(load_animal_shape_mnist()["train"], SPLITS[opts.setting][0])
        for model, seed in sorted({(run.model, run.seed) for run in runs}):
            path = pretrain(model, seed, pretrain_set, opts.out, opts.setting)
            print(f"pretrained backbone: {path}", flush=True)
    if opts.jobs == 1:
        _init_worker(opts.threads)
        results = map(_run_in_worker, runs, [opts.out] * len(runs))
    else:  # one process per run, each with its own threads: runs are independent and the OS balances them
        pool = ProcessPoolExecutor(opts.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(opts.threads,))  # fmt: skip
        results = pool.map(_run_in_worker, runs, [opts.out] * len(runs))
    for result in results:
        print(f"{result['key']}: final {result['final']:.4f} best {result['best']:.4f} "
              f"({result['seconds']:.0f}s) acc={[round(a, 3) for a in result['acc']]}", flush=True)  # fmt: skip
        with open(results_path, "a") as f:
            f.write(json.dumps(result) + "\n")


_DATA: dict[str, Dataset] = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    data = load_animal_shape_mnist()
    _DATA["train"], _DATA["test"] = TensorImages(data["train"]), TensorImages(data["test"])
    for setting, (_, classes) in SPLITS.items():
        _DATA[f"{setting}-train"] = TensorImages(data["train"], classes)
        _DATA[f"{setting}-test"] = TensorImages(data["test"], classes)


def _run_in_worker(run: Run, out: str) -> dict:
    prefix = "" if run.setting == "scratch" else f"{run.setting}-"
    train, test = _DATA[prefix + "train"], _DATA[prefix + "test"]
    return train_one(run, train, test, os.path.join(out, f"work-{os.getpid()}"), out)


if __name__ == "__main__":
    main()
