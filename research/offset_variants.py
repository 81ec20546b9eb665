# ruff: noqa: E402  (the imports follow sys.path and thread settings)
"""Variants of the offset rule on the CPU study, by patching the package at run time (a research harness, not part
of the package). One run per call; one JSON line per run in research/results/offset_variants.jsonl.

    OMP_NUM_THREADS=1 SCHED=constant CLIP=0 python research/offset_variants.py VARIANT vit sgd SEED 8 [METHOD]

VARIANT: regression (lambda times the clamped regression coefficient of successive offsets: the package's rule
before it adopted corr; the JSON lines made before that change call it "base"), base (the package as it is), noc (no step factor c), decay (offset weight decays
linearly to 0 within each period), rho2 (lambda times reliability squared), random (the offset replaced by a random
vector of the same norm when it is computed; the next refresh then measures its reliability against that random
vector, so from the second refresh on it is mostly switched off: superseded by randdir), randdir (the offset's
direction replaced, where it is applied, by a random one drawn afresh for every refresh and block, its norm, timing
and weight kept, while the reliability and the cap see the real offsets: a control for "a push of that size that
carries no information about the true gradient"), tiny (offset times 1e-6: a control for chaos),
no0 (block 0, which holds the ViT's embeddings, gets no offset; the others as in the default: the sixth addendum of
plan_vit_adamw_seeds.md), corr (reliability = correlation of successive offsets, the rule the package adopted),
corr2, gate, cap (the offset's norm capped at a quarter of the mean local gradient's, keeping the uncapped step
factor c: the probe behind the package's offset_max_ratio, which the package applies itself (0.1 by default) and
follows with a recomputed c).
Since the package caps by default, every variant here runs on top of the cap; base is the capped default.
SCHED / CLIP: learning-rate schedule and gradient clipping (the Trainer's defaults are linear and 1.0).
SETTING: scratch (default) or finetune (the backbone pretrained with BP on classes 0-4 that
`research/cpu_study.py --setting finetune` caches under research/results/cpu_study_finetune/pretrained/, pretraining
it here if it is missing; classes 5-9, the fine-tuning learning rates; pass EPOCHS 4 as that study does), or
finetune_reverse (the same with the halves swapped, cached under research/results/cpu_study_finetune_reverse/pretrained/).
"""

import dataclasses
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)  # cpu_study.py, the study harness
import torch

torch.set_num_threads(1)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
import cpu_study

import hf_bpmod.offset as O
import hf_bpmod.offset_pass as OP
import hf_bpmod.trainer as T

variant, model, opt, seed, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
method = sys.argv[6] if len(sys.argv) > 6 else "ff_mod"
sched = os.environ.get("SCHED", "constant")
orig_block_offset = O.block_offset


def patched(moments, scaling, **kw):
    off = orig_block_offset(moments, scaling, **kw)
    prob = O.ScalingProblem.from_moments(moments, kw["batch_size"], kw["period"], kw.get("bias_correction", False))
    rho = off.reliability
    if variant == "rho2":
        lam = off.lam * rho
        c = prob.aligned_step_factor(lam)
        off = dataclasses.replace(off, lam=lam, c=c, scale=c * off.a, weight=c * lam)
    elif variant in ("noc", "decay_noc"):
        off = dataclasses.replace(off, c=1.0, scale=off.a, weight=off.lam)
    elif variant == "random" and off.delta is not None:
        g = torch.Generator().manual_seed(1234 + len(off.delta))
        rnd = [torch.randn(d.shape, generator=g, dtype=d.dtype) for d in off.delta]
        n0 = math.sqrt(sum(float((d.double() ** 2).sum()) for d in off.delta))
        n1 = math.sqrt(sum(float((d.double() ** 2).sum()) for d in rnd))
        off = dataclasses.replace(off, delta=[d * (n0 / n1) for d in rnd])
    elif variant == "regression":  # the rule before: lambda times the clamped regression coefficient
        prev = kw.get("previous_delta")
        _, lam0, _ = prob.solve_aligned()
        r = 0.0
        if prev is not None and off.delta is not None:
            dot = sum(float((p.double() * d.double()).sum()) for p, d in zip(prev, off.delta))
            npp = sum(float((p.double() ** 2).sum()) for p in prev)
            r = min(max(dot / npp, 0.0), 1.0) if npp > 0 else 0.0
        lam = lam0 * r
        c = prob.aligned_step_factor(lam)
        off = dataclasses.replace(off, lam=lam, c=c, scale=c * off.a, weight=c * lam, reliability=r)
    elif variant in ("corr2", "corr"):
        prev = kw.get("previous_delta")
        _, lam0, _ = prob.solve_aligned()
        if prev is None or off.delta is None:
            r = 0.0
        else:
            dot = sum(float((p.double() * d.double()).sum()) for p, d in zip(prev, off.delta))
            npp = sum(float((p.double() ** 2).sum()) for p in prev)
            ndd = sum(float((d.double() ** 2).sum()) for d in off.delta)
            r = max(dot, 0.0) / math.sqrt(max(npp * ndd, 1e-300))
        if variant == "corr2":
            r = r * r
        lam = lam0 * r
        c = prob.aligned_step_factor(lam)
        off = dataclasses.replace(off, lam=lam, c=c, scale=c * off.a, weight=c * lam, reliability=r)
    elif variant == "cap" and off.delta is not None and off.weight > 0:
        # the offset may not exceed a quarter of the mean local gradient's norm (a guess at an Adam-safe bound)
        n_d = math.sqrt(sum(float((d.double() ** 2).sum()) for d in off.delta))
        n_h = math.sqrt(sum(float((m.double() ** 2).sum()) for m in moments.mean_h))
        limit = 0.25 * n_h * off.scale
        if off.weight * n_d > limit:
            lam = limit / (n_d * off.c)
            off = dataclasses.replace(off, lam=lam, weight=off.c * lam)
    elif variant == "gate":
        if rho < 0.5:
            off = dataclasses.replace(off, lam=0.0, c=1.0, scale=off.a, weight=0.0)
    if os.environ.get("DIAG") and off.delta is not None and off.weight > 0:
        # the offset's share of the local gradient, per parameter tensor: ||w Delta_p|| / ||scale m_h,p||
        ratios = [
            (
                tuple(d.shape),
                off.weight * float(d.double().norm()) / max(abs(off.scale) * float(m.double().norm()), 1e-30),
            )
            for d, m in zip(off.delta, moments.mean_h)
        ]
        top = sorted(ratios, key=lambda r: -r[1])[:4]
        print(
            "DIAG",
            len(off.delta),
            f"block_ratio={off.offset_norm:.3g}",
            [(s, round(r, 3)) for s, r in top],
            file=sys.stderr,
        )
    return off


OP.block_offset = patched

TR = {}
RANDOM: dict = {}
orig_apply = T.apply_block_offsets


def apply(chain, offsets, grad_scale=1.0):
    if variant.startswith("decay"):
        tr = TR["t"]
        st = tr.offset_state
        K = tr.offset_period_steps()
        s = tr.state.global_step - (st.next_refresh_step - K)
        f = max(0.0, 1 - s / K)
        offsets = [dataclasses.replace(o, weight=o.weight * f) for o in offsets]
    if variant == "tiny":
        offsets = [dataclasses.replace(o, weight=o.weight * 1e-6, scale=1.0) for o in offsets]
    if variant == "no0":  # block 0 trains on its plain local gradient; every other block as in the default
        offsets = [dataclasses.replace(offsets[0], weight=0.0, scale=1.0), *offsets[1:]]
    if variant == "randdir":
        period = TR["t"].offset_state.period_index
        if RANDOM.get("period") != period:  # draw once per refresh and block, keep for the period
            RANDOM.clear()
            RANDOM["period"] = period
            for t, o in enumerate(offsets):
                if o.delta is None or o.weight == 0.0:
                    continue
                g = torch.Generator().manual_seed(1_000 * seed + 100 * period + t)
                rnd = [torch.randn(d.shape, generator=g, dtype=torch.float64) for d in o.delta]
                n0 = math.sqrt(sum(float((d.double() ** 2).sum()) for d in o.delta))
                n1 = math.sqrt(sum(float((r**2).sum()) for r in rnd))
                RANDOM[t] = [(r * (n0 / n1)).to(d.dtype) for r, d in zip(rnd, o.delta)]
        offsets = [dataclasses.replace(o, delta=RANDOM[t]) if t in RANDOM else o for t, o in enumerate(offsets)]
    orig_apply(chain, offsets, grad_scale)


T.apply_block_offsets = apply

orig_init = T.BPModifiedTrainer.__init__


def init(self, *a, **k):
    orig_init(self, *a, **k)
    TR["t"] = self


T.BPModifiedTrainer.__init__ = init

orig_args = cpu_study.BPModifiedTrainingArguments


def args(**kw):
    kw["lr_scheduler_type"] = sched
    kw["max_grad_norm"] = float(os.environ.get("CLIP", "0"))
    return orig_args(**kw)


cpu_study.BPModifiedTrainingArguments = args

# keep full offset logs
data = cpu_study.load_animal_shape_mnist()
setting = os.environ.get("SETTING", "scratch")
if setting in cpu_study.SPLITS:  # the backbones pretrained by `cpu_study.py --setting SETTING` (cached there)
    out = os.path.join(RESULTS, "cpu_study_finetune" + ("" if setting == "finetune" else "_reverse"))
    pretrain_classes, classes = cpu_study.SPLITS[setting]
    if not os.path.exists(cpu_study.pretrained_path(out, model, seed, setting)):
        pretrain_set = cpu_study.TensorImages(data["train"], pretrain_classes)
        cpu_study.pretrain(model, seed, pretrain_set, out, setting)
else:
    out, classes = HERE, None
train, test = cpu_study.TensorImages(data["train"], classes), cpu_study.TensorImages(data["test"], classes)
run = cpu_study.Run(model, method, opt, seed, epochs, {}, setting=setting)
wd = os.path.join(HERE, f"work-{os.getpid()}")
orig_remove = os.remove
logs = []


def keep(path):
    if path.endswith(".jsonl"):
        logs.extend(json.loads(line) for line in open(path))
    orig_remove(path)


os.remove = keep
res = cpu_study.train_one(run, train, test, wd, out)
os.remove = orig_remove
rec = {
    "variant": variant,
    "setting": setting,
    "sched": sched,
    "clip": os.environ.get("CLIP", "0"),
    "model": model,
    "opt": opt,
    "seed": seed,
    "method": method,
    "acc": res["acc"],
    "seconds": res["seconds"],
    "offsets": [
        {
            "step": r["step"],
            "period_steps": r.get("period_steps"),
            **{
                k: [b.get(k) for b in r["blocks"]]
                for k in ("lam", "c", "reliability", "offset_norm", "cosine", "bias", "var")
            },
        }
        for r in logs
    ],
}
with open(os.path.join(RESULTS, "offset_variants.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\n")
print(variant, sched, model, opt, seed, method, [round(a, 3) for a in res["acc"]], round(res["seconds"]))
