#!/usr/bin/env python
"""What a local step must cost: the four passes of one block, timed, and the step-time floor they imply.

Per block, backprop does one forward ``F`` and one backward for the input and the weights together (``AW``). Horizon
``h`` does one forward, one backward for the weights only (``W``: the local loss ``h`` blocks ahead trains this
block) and ``h - 1`` backwards for the input only (``A``: it carries the losses of the next ``h - 1`` blocks through
to their targets below). Inside a block the weight-only pass still has to carry the cotangent through every
operation to reach the first layer's weights, so ``W`` is close to ``AW``, not to ``AW - A``: that is why ``h = 2``
costs more than backprop, not the same. The floor of a local step relative to BP, heads left out, per block:

    (F + W + (h - 1) A) / (F + AW)

and for the whole model of ``T`` blocks, where the losses of the last ``h`` blocks share one walk back from the
output (the final loss trains them all), so that ``(T - h + 1)(h - 1)`` input passes are needed instead of
``T (h - 1)``:

    (T (F + W) + (T - h + 1)(h - 1) A) / (T (F + AW))

(``T = 12`` for ViT-B/16, 16 for ResNet-50 with the paper's split). The second is what ``memory_speed.py`` compares
with.

Measured on one encoder layer of ViT-B/16 and one bottleneck of ResNet-50 (stage 2), random init, 224 px input
shapes, batch ``B``, fully trained and with the adapters of ``memory_speed.py`` (LoRA r=1 on ``q_proj``/``v_proj``,
LoKr r=1 on the convolutions; the base weights frozen); median of ``--repeats`` after a warm-up, the four passes
interleaved. With a frozen base, backprop's own backward is mostly the input pass, and ``W`` still has to carry the
cotangent down to the first adapter, so the floor of ``h >= 2`` rises further above 1.

    python benchmarks/vjp_floor.py              # writes benchmarks/results/vjp_floor.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def blocks(batch: int, adapters: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """One ViT-B/16 layer and one ResNet-50 bottleneck; with ``adapters``, taken from the peft-wrapped models."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    from hf_bpmod import get_adapter
    from hf_bpmod.adapters.vit import find_layer_list

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(num_labels=100))
    resnet = ResNetForImageClassification(ResNetConfig(num_labels=100))
    if adapters:
        from peft import LoKrConfig, LoraConfig, get_peft_model

        lora = LoraConfig(r=1, lora_alpha=4, target_modules=get_adapter(vit).peft_target_modules(vit))
        lokr = LoKrConfig(r=1, alpha=4, target_modules=get_adapter(resnet).peft_target_modules(resnet))
        vit = get_peft_model(vit, lora).base_model.model
        resnet = get_peft_model(resnet, lokr).base_model.model
    layers = find_layer_list(vit.vit, vit.config.num_hidden_layers)  # vit.layers, or vit.encoder.layer before 5.9
    bottleneck = resnet.resnet.encoder.stages[1].layers[1]
    vit_layer = layers[0]
    tag = ", LoRA" if adapters else ""
    resnet_tag = ", LoKr" if adapters else ""

    class First(nn.Module):  # a ViT layer returns a tuple in older transformers releases
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x)
            return out[0] if isinstance(out, tuple) else out

    return {
        f"ViT-B/16 encoder layer (197 tokens x 768){tag}": (First(vit_layer), torch.randn(batch, 197, 768)),
        f"ResNet-50 bottleneck, stage 2 (512 ch, 28 x 28){resnet_tag}": (bottleneck, torch.randn(batch, 512, 28, 28)),
    }


def passes(block: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    params = [p for p in block.parameters() if p.requires_grad]
    leaf = x.detach().requires_grad_(True)

    def graph():
        out = block(leaf)
        return out, torch.randn_like(out)

    def backward(wrt):
        out, cot = graph()
        return torch.autograd.grad(out, wrt, grad_outputs=cot)

    return {
        "F": lambda: block(x),
        "F+A": lambda: backward([leaf]),
        "F+W": lambda: backward(params),
        "F+AW": lambda: backward([leaf, *params]),
    }


def time_passes(block: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    fns = passes(block, x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    F = med["F"]
    return {"F": F, "A": med["F+A"] - F, "W": med["F+W"] - F, "AW": med["F+AW"] - F}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    lines = [
        f"# The passes of one block and the step-time floor (B = {opts.batch}, CPU, {torch.get_num_threads()} threads)",
        "",
        "| block | F (ms) | A: input only (ms) | W: weights only (ms) | AW: both (ms) | W / AW | "
        "floor h=1 / BP | floor h=2 / BP | floor h=5 / BP | T | model floor h=2 | model floor h=5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shapes = {**blocks(opts.batch, adapters=False), **blocks(opts.batch, adapters=True)}
    for name, (block, x) in shapes.items():
        block.train()
        t = time_passes(block, x, opts.repeats)
        bp = t["F"] + t["AW"]
        floor = {h: (t["F"] + t["W"] + (h - 1) * t["A"]) / bp for h in (1, 2, 5)}
        T = 12 if name.startswith("ViT") else 16
        model = {h: (T * (t["F"] + t["W"]) + (T - h + 1) * (h - 1) * t["A"]) / (T * bp) for h in (2, 5)}
        lines.append(
            f"| {name} | {1e3 * t['F']:.1f} | {1e3 * t['A']:.1f} | {1e3 * t['W']:.1f} | {1e3 * t['AW']:.1f} | "
            f"{t['W'] / t['AW']:.2f} | {floor[1]:.2f} | {floor[2]:.2f} | {floor[5]:.2f} | {T} | {model[2]:.2f} | "
            f"{model[5]:.2f} |"
        )
    lines += [
        "",
        "Floor = (F + W + (h - 1) A) / (F + AW): what horizon h costs per block relative to backprop when nothing "
        "else (auxiliary heads, Python) is counted. Model floor = (T (F + W) + (T - h + 1)(h - 1) A) / (T (F + AW)): "
        "the same for T such blocks, the last h sharing the final loss's walk back. Passes timed as forward + "
        "backward minus the forward; adapters: LoRA r=1 on q_proj/v_proj, LoKr r=1 on the convolutions, base frozen.",
        "",
        f"Command: `python benchmarks/vjp_floor.py --batch {opts.batch}`",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "vjp_floor.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
