#!/usr/bin/env python
"""Peak memory and time per optimizer step: backprop (BP), BP + gradient checkpointing, local losses and BP-modified.

For every model shape (one table, one run: every method measured in the same process, the timed repetitions
interleaved round-robin so that background load affects them alike) it trains with SGD (momentum 0.9, as the paper)
on one fixed random batch:

- BP: ``loss_fn(model(pixel_values).logits).backward()`` + the optimizer step;
- BP + GC: the same with reentrant activation checkpointing of every layer (``gradient_checkpointing_enable``
  (``activation_checkpointing_enable`` in transformers >= 5.x) for ViT, plus ``enable_input_require_grads`` for peft;
  ResNet has no checkpointing in transformers, so each residual layer is wrapped in ``torch.utils.checkpoint``);
- FF (h = 1), LoCo (h = 2), MPC (h = 5): ``local_gradients(..., accumulate=True)`` + the optimizer step, as
  :class:`hf_bpmod.BPModifiedTrainer` does;
- each local method BP-modified: the same step plus ``apply_block_offsets`` (timed separately on the real offsets,
  median of several calls), plus the offset refresh amortised at the paper's ratio B'/(K B) = 320 / 50,000: one
  refresh of B' = 320 examples in micro-batches of b' = 8 every K = 50,000 / B steps. The refresh is timed on
  ``--refresh-micro-batches`` (``--tiny-refresh-micro-batches``) of the 40 micro-batches and extrapolated to 40:
  its fixed part and its first micro-batch (warm-up) once, the median later micro-batch 39 times. On CPU the
  refresh's peak memory is counted on a separate refresh of 2 micro-batches, so that the counter's hooks are not in
  the timed one.

Memory. On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what the other methods'
models hold. On CPU there is no allocator peak, so the step's memory is counted: the peak of live storages saved for
backward (:class:`hf_bpmod.memory.SavedStorageMeter`: each storage once, parameters excluded) plus every parameter and
buffer (frozen ones included, auxiliary heads included), the gradients and the SGD momentum (1 x trainable
parameters), plus the offset tensors for BP-modified methods (their real size: ``delta`` in the parameters' dtype). The
static parts are counted in full even where they do not coincide with the activation peak (an upper bound, the same
for every method). For the tiny models (``--profile all``: every shape) the count is cross-checked with
``torch.profiler(profile_memory=True)``: the peak of the allocations made during the step, plus what was resident
before it. The profiler also sees the backward's transient gradient buffers, which the count leaves out: for a local
method they come on top of its block's activations (ResNet-50 LoKr, B = 8, FF: 279 MB counted, 379 MB profiled; BP:
839 vs 845 MB), so the profiler column is the one to compare with a GPU's ``max_memory_allocated``. The offset refresh has its own
peak (a full backprop graph of b' = 8 examples, the float64 running sums, one micro-batch's g_h and g_T): reported
separately as "refresh peak" (with the previous period's offsets alive, as in steady state; the count agrees with
the profiler within 1-12% on the tiny models). Saved bytes are affine in B (exact on the tiny models), so on CPU the
ViT-B/16 and ResNet-50 shapes are also metered at B = ``--fit-batch`` and their memory is given at the paper's
B = 64 too (``--paper-batch``).

Checkpointing is reentrant because the meter cannot see inside non-reentrant checkpoints (they install their own
saved-tensor hooks); both keep the same tensors (profiler on the tiny ViT: 7.3 vs 7.0 MB) and do the same passes.

The script re-runs itself under ``OMP_WAIT_POLICY=PASSIVE`` (see :func:`passive_openmp`), and each shape runs in a
process of its own: on CPU a shape measured after others in the same process inherited their fragmented heap, and its
large tensors kept landing on fresh pages (a GELU backward of 8 x 197 x 3072 took 38 ms on fresh memory against 4 ms
on reused memory). ViT-B/16 LoRA measured after the tiny shapes and ViT-B/16 full: LoCo / BP 1.44, MPC / BP 2.55;
alone: 1.14 and 1.78.

    python benchmarks/memory_speed.py                  # CPU: tiny, ViT-B/16, ResNet-50 (B = 8) -> results/memory_speed_cpu.md
    python benchmarks/memory_speed.py --suite tiny     # tiny models only (a few minutes)
    python benchmarks/memory_speed.py --suite paper --shapes vit_lora resnet_lokr   # two tables only

One GPU (writes benchmarks/results/memory_speed_cuda.md; the paper's B = 64, the full refresh of 40 micro-batches):

    python benchmarks/memory_speed.py --device cuda --batch 64 --warmup 3 --steps 10 --refresh-micro-batches 40
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_bpmod import get_adapter, local_gradients
from hf_bpmod.adapters import unwrap_model
from hf_bpmod.memory import SavedStorageMeter
from hf_bpmod.offset_pass import OffsetSettings, apply_block_offsets, compute_offsets
from hf_bpmod.testing import tiny_resnet, tiny_vit

MB = 2**20
EPOCH_EXAMPLES = 50_000  # CIFAR-100's training set: K = 50,000 / B steps per epoch (the paper's offset period)
OFFSET_BATCH, OFFSET_MICRO_BATCH = 320, 8  # the paper's B' and b'


# ----------------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """One table: a model, its tuning and its input."""

    key: str
    title: str
    arch: str  # "vit" | "resnet"
    size: str  # "paper" | "tiny"
    peft: str | None  # None (full fine-tune) | "lora" | "lokr"
    image_size: int
    num_labels: int


SHAPES = {
    "paper": [
        Shape("vit_full", "ViT-B/16 (12 blocks, 224 px), full fine-tune", "vit", "paper", None, 224, 100),
        Shape("vit_lora", "ViT-B/16 (12 blocks, 224 px), LoRA r=1 on q_proj, v_proj", "vit", "paper", "lora", 224, 100),
        Shape("resnet_full", "ResNet-50 (16 blocks, 224 px), full fine-tune", "resnet", "paper", None, 224, 100),
        Shape("resnet_lokr", "ResNet-50 (16 blocks, 224 px), LoKr r=1 on convolutions", "resnet", "paper", "lokr", 224, 100),
    ],
    "tiny": [
        Shape("tiny_vit_full", "tiny ViT (12 blocks, hidden 64, 32 px), full", "vit", "tiny", None, 32, 10),
        Shape("tiny_vit_lora", "tiny ViT (12 blocks, hidden 64, 32 px), LoRA r=1", "vit", "tiny", "lora", 32, 10),
        Shape("tiny_resnet_full", "tiny ResNet (bottleneck 3-4-6-3, 16 blocks, 32 px), full", "resnet", "tiny", None, 32, 10),
        Shape("tiny_resnet_lokr", "tiny ResNet (bottleneck 3-4-6-3, 16 blocks, 32 px), LoKr r=1", "resnet", "tiny", "lokr", 32, 10),
    ],
}  # fmt: skip


def build_model(shape: Shape) -> nn.Module:
    """A randomly initialised model from a config (nothing is downloaded), peft-wrapped when the shape asks."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if shape.size == "paper":
        if shape.arch == "vit":  # ViTConfig() defaults: hidden 768, 12 layers, 12 heads, 224 px, patch 16
            model = ViTForImageClassification(ViTConfig(num_labels=shape.num_labels))
        else:  # ResNetConfig() defaults: bottleneck, depths [3, 4, 6, 3], hidden sizes 256 .. 2048
            model = ResNetForImageClassification(ResNetConfig(num_labels=shape.num_labels))
    elif shape.arch == "vit":
        model = tiny_vit(num_layers=12, image_size=shape.image_size, hidden_size=64, num_labels=shape.num_labels)
    else:
        model = tiny_resnet(depths=(3, 4, 6, 3), layer_type="bottleneck", num_labels=shape.num_labels)
    if shape.peft is None:
        return model
    from peft import LoKrConfig, LoraConfig, get_peft_model

    targets = get_adapter(model).peft_target_modules(model)  # q_proj/v_proj (query/value before 5.9); convolution
    if shape.peft == "lora":
        config = LoraConfig(r=1, lora_alpha=4, target_modules=targets, modules_to_save=["classifier"])
    else:
        config = LoKrConfig(r=1, alpha=4, target_modules=targets, modules_to_save=["classifier"])
    return get_peft_model(model, config)


def enable_checkpointing(model: nn.Module, reentrant: bool = True) -> None:
    """Activation checkpointing of every layer: reentrant here (see the module docstring for why), non-reentrant as
    ``BPModifiedTrainer`` sets it (``benchmarks/checkpointing.py``)."""
    base = unwrap_model(model)
    kwargs = {"use_reentrant": reentrant}
    if getattr(base, "supports_gradient_checkpointing", False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `gradient_checkpointing_enable` is deprecated in 5.x
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if (
            reentrant and base is not model
        ):  # peft: frozen embeddings, so a reentrant checkpoint sees no input needing grad
            base.enable_input_require_grads()
        return
    # ResNet: transformers has no checkpointing for it; wrap every residual layer (the local methods' blocks).
    for stage in base.resnet.encoder.stages:
        for layer in stage.layers:
            layer.forward = _checkpointed(layer.forward, reentrant)


def _checkpointed(
    forward: Callable[[torch.Tensor], torch.Tensor], reentrant: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x)
        if reentrant and not x.requires_grad:
            x = x.detach().requires_grad_(True)
        return checkpoint(forward, x, use_reentrant=reentrant)

    return run


# ---------------------------------------------------------------------------------------------------------- memory
def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (``None`` entries skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def profiled_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of the allocations made while ``fn`` runs and still alive, from ``torch.profiler`` memory events
    (frees of memory allocated before are ignored, so what was resident before must be added by the caller)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _DEVICE.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    device_type = 1 if _DEVICE.type == "cuda" else 0  # the trace's "Device Type": 0 CPU, 1 CUDA
    live: dict[int, int] = {}
    current = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        args = event["args"]
        if args.get("Device Type", 0) != device_type:
            continue
        addr, nbytes = args["Addr"], args["Bytes"]
        if nbytes > 0:
            live[addr] = live.get(addr, 0) + nbytes
            current += nbytes
            peak = max(peak, current)
        elif addr in live:
            current -= live.pop(addr)
    return peak


_DEVICE = torch.device("cpu")


def _sync() -> None:
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "bp" | "gc" | "local"
    horizon: int = 0
    granularity: str = "layer"


METHODS = [Method("BP", "bp"), Method("BP + GC", "gc")] + [
    Method(name, "local", h) for name, h in (("FF", 1), ("LoCo", 2), ("MPC", 5))
]
STEM_APART = Method("FF, stem apart", "local", 1, "layer+stem")  # ResNets: block_granularity="layer+stem"


def methods_for(shape: Shape) -> list[Method]:
    return METHODS + ([STEM_APART] if shape.arch == "resnet" else [])


@dataclass
class Runner:
    """One timed method: its own copy of the model, its auxiliary heads and its optimizer."""

    method: Method
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    chain: object = None
    aux_heads: nn.Module | None = None
    times: list[float] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    refresh: dict[str, float] = field(default_factory=dict)
    offsets: list | None = None

    def __post_init__(self) -> None:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.method.kind == "gc":
            enable_checkpointing(self.model)
        if self.method.kind == "local":
            adapter = get_adapter(self.model)
            granularity = self.method.granularity
            self.aux_heads = adapter.aux_heads(self.model, self.method.horizon, granularity).train()
            self.chain = adapter.chain(self.model, self.aux_heads, granularity)
            params += [p for p in self.aux_heads.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)

    def loss_fn(self, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, self.y)

    def step(self) -> None:
        """One optimizer step (the previous step's gradients are released first, as ``zero_grad`` does)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.method.kind == "local":
            local_gradients(self.chain, self.x, self.loss_fn, self.method.horizon, accumulate=True)
        else:
            self.loss_fn(self.model(pixel_values=self.x).logits).backward()
        self.optimizer.step()

    def modules(self) -> list[nn.Module]:
        return [self.model] + ([self.aux_heads] if self.aux_heads is not None else [])

    def parameters(self) -> list[torch.Tensor]:
        return [p for m in self.modules() for p in m.parameters()]

    def static_bytes(self) -> dict[str, int]:
        """Parameters + buffers, gradients, optimizer state and offsets that this method holds right now."""
        params = storage_bytes([*self.parameters(), *(b for m in self.modules() for b in m.buffers())])
        grads = storage_bytes(p.grad for p in self.parameters())
        state = storage_bytes(v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        return {"params": params, "grads": grads, "optimizer": state, "offsets": self.offset_bytes()}

    def offset_bytes(self) -> int:
        return storage_bytes(d for o in self.offsets or () if o.delta is not None for d in o.delta)

    # -- measurements
    def timed_step(self) -> None:
        _sync()
        start = time.perf_counter()
        self.step()
        _sync()
        self.times.append(time.perf_counter() - start)

    def measured_step(self, profile: bool) -> None:
        """A (warm-up) step whose peak memory is measured (see the module docstring)."""
        self.optimizer.zero_grad(set_to_none=True)
        if _DEVICE.type == "cuda":
            _sync()
            other = torch.cuda.memory_allocated() - sum(self.static_bytes().values())
            torch.cuda.reset_peak_memory_stats()
            self.step()
            _sync()
            self.memory["peak"] = torch.cuda.max_memory_allocated() - other
            self.memory["method"] = "cuda"
        else:
            meter = SavedStorageMeter(exclude=self.parameters())
            with meter.measure():
                self.step()
            static = self.static_bytes()
            self.memory.update(static)
            self.memory["saved"] = meter.peak_bytes
            self.memory["peak"] = meter.peak_bytes + sum(static.values())
        if profile:
            self.optimizer.zero_grad(set_to_none=True)
            resident = sum(self.static_bytes().values())
            self.memory["profiler"] = resident + profiled_peak_bytes(self.step)

    def saved_bytes_at(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Peak saved-for-backward bytes of one step on the batch ``(x, y)`` (CPU meter; for the affine fit)."""
        self.x, self.y, (x0, y0) = x, y, (self.x, self.y)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            meter = SavedStorageMeter(exclude=self.parameters())
            with meter.measure():
                self.step()
            return meter.peak_bytes
        finally:
            self.x, self.y = x0, y0

    def measure_refresh(self, micro_batches: int, batch_size: int) -> None:
        """Time (and measure the peak of) one offset refresh of ``micro_batches`` micro-batches of b' = 8, right
        after a step (the gradients are alive, as in the trainer), and keep its offsets.

        On CPU the peak comes from a refresh of 2 micro-batches under the saved-storage meter (its pack hooks would
        add their own cost to the time: 10% of a tiny model's refresh) and the time from a separate refresh
        without it. On CUDA one refresh gives both."""
        image_size = self.x.shape[-1]
        num_labels = int(self.y.max()) + 1

        def fetch(indices: list[int]):
            g = torch.Generator().manual_seed(indices[0])
            x = torch.randn(len(indices), 3, image_size, image_size, generator=g).to(_DEVICE)
            y = torch.randint(0, num_labels, (len(indices),), generator=g).to(_DEVICE)
            return x, lambda logits: F.cross_entropy(logits, y)

        period = EPOCH_EXAMPLES / batch_size

        def refresh(n: int):
            indices = list(range(n * OFFSET_MICRO_BATCH))
            settings = OffsetSettings(
                horizon=self.method.horizon,
                batch_size=batch_size,
                sample_size=len(indices),
                micro_batch_size=OFFSET_MICRO_BATCH,
            )
            return compute_offsets(
                self.chain,
                indices,
                fetch,
                settings,
                period=period,
                preserve=self.modules(),
            )

        before = self.static_bytes()
        _sync()
        if _DEVICE.type == "cuda":
            other = torch.cuda.memory_allocated() - sum(before.values())
            torch.cuda.reset_peak_memory_stats()
            offsets, record = refresh(micro_batches)
            _sync()
            peak = torch.cuda.max_memory_allocated() - other
        else:
            meter = SavedStorageMeter(exclude=self.parameters())
            with meter.measure():
                refresh(min(2, micro_batches))
            block_params = sum(p.numel() * p.element_size() for ps in self.chain.block_params for p in ps)
            # float64 running sums S_h, S_T (2 x 8 bytes per block parameter) + one micro-batch's g_h, g_T
            peak = sum(before.values()) + meter.peak_bytes + 4 * block_params + 2 * block_params
            offsets, record = refresh(micro_batches)
        if offsets is None:
            raise RuntimeError(f"{self.method.name}: the offset refresh gave non-finite statistics.")
        self.offsets = offsets
        self.refresh = {
            "seconds": full_refresh_seconds(record, OFFSET_BATCH // OFFSET_MICRO_BATCH),
            "peak": peak + self.offset_bytes(),  # in steady state the previous period's offsets are alive meanwhile
            "micro_batches": micro_batches,
        }
        # applying the offset: the only change to the step itself; timed on the gradients of the last step
        reps = []
        for _ in range(5):
            _sync()
            start = time.perf_counter()
            apply_block_offsets(self.chain, offsets)
            _sync()
            reps.append(time.perf_counter() - start)
        self.refresh["apply"] = statistics.median(reps)


# ------------------------------------------------------------------------------------------------------------- run
def full_refresh_seconds(record: dict, full: int) -> float:
    """The seconds of a refresh of ``full`` micro-batches from one of fewer: its fixed part (statistics, scaling) and
    its first micro-batch (which pays the warm-up: the refresh's graphs need memory the step does not) once, and the
    median of the later micro-batches for the other ``full - 1``. Scaling the whole pass by ``full / n`` instead
    would count the fixed part and the warm-up ``full / n`` times (on ResNet-50 at B = 8: 137 s instead of 85 s)."""
    micro = record["micro_batch_seconds"]
    fixed = record["seconds"] - sum(micro)
    if len(micro) < 2:
        return fixed + micro[0] * full
    return fixed + micro[0] + (full - 1) * statistics.median(micro[1:])


def run_shape(shape: Shape, opts: argparse.Namespace) -> str:
    tiny = shape.size == "tiny"
    if tiny and opts.tiny_threads and _DEVICE.type == "cpu":
        torch.set_num_threads(opts.tiny_threads)
    batch = opts.tiny_batch if tiny else opts.batch
    warmup = opts.tiny_warmup if tiny else opts.warmup
    steps = opts.tiny_steps if tiny else opts.steps
    micro = opts.tiny_refresh_micro_batches if tiny else opts.refresh_micro_batches
    profile = _DEVICE.type == "cpu" and (opts.profile == "all" or (opts.profile == "tiny" and tiny))
    start = time.perf_counter()
    template = build_model(shape).to(_DEVICE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=g).to(_DEVICE)
    y = torch.randint(0, shape.num_labels, (batch,), generator=g).to(_DEVICE)
    runners = [Runner(m, copy.deepcopy(template), x, y) for m in methods_for(shape)]
    n_params = sum(p.numel() for p in template.parameters())
    n_train = sum(p.numel() for p in template.parameters() if p.requires_grad)
    del template
    fit = not tiny and _DEVICE.type == "cpu" and opts.fit_batch > 0
    x_fit, y_fit = x[: opts.fit_batch], y[: opts.fit_batch]
    for rep in range(warmup + steps):
        for r in runners:
            if rep == warmup - 1:
                r.measured_step(profile)
                if fit:  # saved bytes are affine in B: two batch sizes give them at any B (exact on the tiny models)
                    small = r.saved_bytes_at(x_fit, y_fit)
                    slope = (r.memory["saved"] - small) / (batch - opts.fit_batch)
                    r.memory["saved_at_paper_batch"] = small + slope * (opts.paper_batch - opts.fit_batch)
            elif rep < warmup:
                r.step()
            else:
                r.timed_step()
        _log(f"{shape.key}: round {rep + 1}/{warmup + steps} ({time.perf_counter() - start:.0f} s)")
    for r in runners:
        if r.method.kind == "local":
            r.step()  # gradients alive during the refresh, as in the trainer
            r.measure_refresh(micro, batch)
            _log(f"{shape.key}: {r.method.name} refresh ({time.perf_counter() - start:.0f} s)")
    text = format_table(
        shape, runners, batch, warmup, steps, micro, n_params, n_train, profile, opts.paper_batch, opts.fit_batch
    )
    _log(f"{shape.key}: done in {time.perf_counter() - start:.0f} s")
    return text


def format_table(
    shape: Shape,
    runners: list[Runner],
    batch: int,
    warmup: int,
    steps: int,
    micro: int,
    n_params: int,
    n_train: int,
    profile: bool,
    paper_batch: int,
    fit_batch: int,
) -> str:
    K = EPOCH_EXAMPLES / batch
    bp = runners[0]
    bp_time = statistics.median(bp.times)
    bp_mem = bp.memory["peak"]
    gc_mem = runners[1].memory["peak"]
    cpu = _DEVICE.type == "cpu"
    fit = "saved_at_paper_batch" in bp.memory

    def at_paper_batch(r: Runner) -> float:
        m = r.memory
        return m["saved_at_paper_batch"] + m["params"] + m["grads"] + m["optimizer"]

    head = "| method | h | peak memory (MB) | memory / BP |"
    rule = "|---|---|---|---|"
    if fit:
        head += f" peak at B={paper_batch} (MB) | / BP at B={paper_batch} |"
        rule += "---|---|"
    if cpu:
        head += " saved activations (MB) | params + grads + momentum (MB) | offsets (MB) |"
        rule += "---|---|---|"
    if profile:
        head += " profiler peak (MB) |"
        rule += "---|"
    head += " step (s) | step / BP | refresh of B'=320 (s) | offset overhead / epoch | refresh peak (MB) |"
    rule += "---|---|---|---|---|"
    rows = [head, rule]
    goals: dict[str, float] = {}
    for r in runners:
        variants = [False, True] if r.method.kind == "local" else [False]
        for modified in variants:
            t = statistics.median(r.times)
            mem = r.memory["peak"]
            offsets = 0
            refresh_s = overhead = refresh_peak = None
            if modified:
                offsets = r.offset_bytes()
                mem += offsets
                extra = r.refresh["apply"] + r.refresh["seconds"] / K
                overhead = extra / t
                t += extra
                refresh_s, refresh_peak = r.refresh["seconds"], r.refresh["peak"]
            name = r.method.name + (" BP-modified" if modified else "")
            goals[name + " memory"] = mem / bp_mem
            goals[name + " time"] = t / bp_time
            if overhead is not None:
                goals[name + " overhead"] = overhead
            h = str(r.method.horizon) if r.method.kind == "local" else "-"
            row = f"| {name} | {h} | {mem / MB:,.1f} | {mem / bp_mem:.3f} |"
            if fit:
                big = at_paper_batch(r) + offsets
                goals[name + " memory at paper batch"] = big / at_paper_batch(bp)
                goals["BP + GC memory at paper batch"] = at_paper_batch(runners[1]) / at_paper_batch(bp)
                row += f" {big / MB:,.1f} | {big / at_paper_batch(bp):.3f} |"
            if cpu:
                static = r.memory["params"] + r.memory["grads"] + r.memory["optimizer"]
                row += f" {r.memory['saved'] / MB:,.1f} | {static / MB:,.1f} | {offsets / MB:,.2f} |"
            if profile:
                row += f" {(r.memory['profiler'] + offsets) / MB:,.1f} |"
            row += f" {t:.3f} | {t / bp_time:.2f} |"
            row += f" {refresh_s:.2f} | {100 * overhead:.2f}% | {refresh_peak / MB:,.1f} |" if modified else " | | |"
            rows.append(row)
    how = (
        "`torch.cuda.max_memory_allocated` (minus the other methods' models)"
        if not cpu
        else "counted: live saved-for-backward storages (`SavedStorageMeter`) + parameters and buffers + gradients + "
        "SGD momentum (1x trainable) + offsets"
        + ("; cross-checked with `torch.profiler(profile_memory=True)` (peak of the step's allocations + resident)" if profile else "")
    )  # fmt: skip
    refresh_note = (
        f"timed on {micro} of the 40 micro-batches: the first and the fixed part once, the median later one 39 times"
        if micro != 40
        else "all 40 micro-batches timed"
    ) + ("; its peak counted on a separate refresh" if cpu else "")
    device = torch.cuda.get_device_name() if not cpu else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"## {shape.title}",
        "",
        f"{n_train:,} trainable of {n_params:,} parameters; B = {batch}, SGD momentum 0.9; {device}. "
        f"Memory: {how}. Time: median of {steps} timed steps after {warmup} warm-up, methods interleaved. "
        f"BP-modified: the local step + applying the offset + the refresh (B' = 320, b' = 8; {refresh_note}) "
        f"amortised over K = 50,000 / B = {K:,.0f} steps; its memory adds the offset tensors; the refresh's own peak is "
        "in the last column."
        + (
            f" Memory at B = {paper_batch} (the paper's batch): saved bytes measured at B = {fit_batch} and B = {batch}, "
            "extended linearly (they are affine in B: exact on the tiny models), plus the same static parts."
            if fit
            else ""
        ),
        "",
        *rows,
        "",
    ]
    lines += [goal_lines(goals, gc_mem / bp_mem, shape, paper_batch), ""]
    return "\n".join(lines)


def goal_lines(goals: dict[str, float], gc_ratio: float, shape: Shape, paper_batch: int) -> str:
    """The issue's goals, met or missed, for this table."""

    def check(value: float, limit: float) -> str:
        return f"{value:.2f} (goal <= {limit:.2f}: {'met' if value <= limit else f'missed by {value - limit:+.2f}'})"

    parts = []
    if shape.peft is not None:
        ff = goals["FF BP-modified memory"]
        below = "met" if ff < gc_ratio else "missed"
        parts.append(f"memory FF-modified / BP = {check(ff, 0.20)}, below BP + GC ({gc_ratio:.2f}): {below}")
        if "FF BP-modified memory at paper batch" in goals:
            ff, gc = goals["FF BP-modified memory at paper batch"], goals["BP + GC memory at paper batch"]
            below = "met" if ff < gc else "missed"
            parts.append(f"at B = {paper_batch}: {check(ff, 0.20)}, below BP + GC ({gc:.2f}): {below}")
        apart = f"{STEM_APART.name} BP-modified memory"
        if apart in goals:
            at_b = goals.get(apart + " at paper batch")
            parts.append(
                f"with the stem apart (`block_granularity='layer+stem'`): {check(goals[apart], 0.20)}"
                + (f", at B = {paper_batch}: {check(at_b, 0.20)}" if at_b is not None else "")
            )
    parts.append(f"time FF / BP = {check(goals['FF time'], 1.0)}")
    parts.append(f"LoCo / BP = {check(goals['LoCo time'], 1.15)}")
    parts.append(f"MPC h=5 / BP = {check(goals['MPC time'], 2.2)}")
    worst = max(v for k, v in goals.items() if k.endswith("overhead"))
    parts.append(
        f"offset overhead per epoch (worst horizon) = {100 * worst:.2f}% (goal <= 2%: {'met' if worst <= 0.02 else 'missed'})"
    )
    return "Goals: " + "; ".join(parts) + "."


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def passive_openmp() -> None:
    """Re-run this script with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    OpenMP's default spin-waiting collapses when other processes compete for the cores: on this 2-core machine under
    background load, one tiny-ViT step took 6.3 s with 2 spinning threads and 0.31 s with passive ones. The variable
    must be set before the OpenMP runtime starts, hence the re-exec.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def run_shape_in_own_process(shape: Shape, argv: list[str]) -> str:
    """:func:`run_shape` in a fresh interpreter (same options, this shape only): no heap history from other shapes."""
    argv = list(argv)
    if "--shapes" in argv:  # drop the parent's shape list
        i = argv.index("--shapes")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        del argv[i:j]
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "table.md")
        command = [sys.executable, os.path.abspath(__file__), *argv, "--shapes", shape.key, "--table-out", table]
        subprocess.run(command, check=True)
        with open(table) as f:
            return f.read()


def main() -> None:
    global _DEVICE
    passive_openmp()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--suite", choices=["all", "tiny", "paper"], default="all")
    parser.add_argument("--shapes", nargs="*", help="only these shape keys (e.g. vit_lora resnet_lokr)")
    parser.add_argument("--batch", type=int, default=8, help="B for the ViT-B/16 and ResNet-50 shapes")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds, ViT-B/16 and ResNet-50 shapes")
    parser.add_argument("--steps", type=int, default=4, help="timed rounds, ViT-B/16 and ResNet-50 shapes")
    parser.add_argument("--refresh-micro-batches", type=int, default=4, help="of the 40; ViT-B/16 and ResNet-50")
    parser.add_argument("--fit-batch", type=int, default=2, help="CPU: second batch of the affine memory fit (0: off)")
    parser.add_argument("--paper-batch", type=int, default=64, help="CPU: memory also reported at this batch (fit)")
    parser.add_argument("--tiny-batch", type=int, default=64)
    parser.add_argument("--tiny-refresh-micro-batches", type=int, default=10, help="of the 40; tiny models")
    parser.add_argument("--tiny-warmup", type=int, default=3)
    parser.add_argument("--tiny-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--tiny-threads",
        type=int,
        default=1,
        help="torch CPU threads for the tiny models (0: as --threads). One by default: their ops are too small to "
        "split, and a second (passive) thread made BP slower (tiny ResNet 0.085 s per step against 0.027 s)",
    )
    parser.add_argument(
        "--profile",
        choices=["tiny", "all", "none"],
        default="tiny",
        help="CPU: which shapes get the torch.profiler cross-check column (one more step per method)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--table-out", help=argparse.SUPPRESS)  # internal: one shape's table, for the parent
    opts = parser.parse_args()
    _DEVICE = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*_checkpointing.*deprecated", category=FutureWarning)
    suites = ["tiny", "paper"] if opts.suite == "all" else [opts.suite]
    shapes = [s for suite in suites for s in SHAPES[suite] if not opts.shapes or s.key in opts.shapes]
    start = time.perf_counter()
    if opts.table_out or len(shapes) == 1:
        tables = [run_shape(shape, opts) for shape in shapes]
        if opts.table_out:
            with open(opts.table_out, "w") as f:
                f.write("\n".join(tables))
            return
    else:
        tables = [run_shape_in_own_process(shape, sys.argv[1:]) for shape in shapes]
    command = "python benchmarks/memory_speed.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            f"# Peak memory and time per optimizer step ({opts.device})",
            "",
            *tables,
            f"Total {time.perf_counter() - start:.0f} s. Command: `{command.strip()}`",
        ]
    )
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, f"memory_speed_{_DEVICE.type}.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
