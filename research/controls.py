"""Tables of the offset controls in ``research/offset_study.md`` ("Is it the offset's information?"), from the study's
``runs.jsonl`` files and ``research/results/offset_variants.jsonl``. Reads only; prints markdown.

    python research/controls.py

Per cell (setting, model, optimizer; FF-modified against FF on the same seeds): the default's gain, the gain of a
push of the default's size in a random direction (``randdir``), that of the default offset times 1e-6 (``tiny``, a
perturbation that carries nothing), and the default minus ``randdir`` paired by seed, each as a mean and its
standard error. "The default" is the harness's ``base`` runs where they cover every ``randdir`` seed (they ran under
the same code as the controls), else the study's ``ff_mod`` runs. Then, per refresh after the first, how much of
``||Delta||^2`` the sampling noise of the B' examples explains (``var / (K bias)``: ``var`` carries the factor K/B'),
the measured reliability, and the reliability an unchanged ``Delta`` would have shown under that noise. Last, the
norm cap at 0.1 against the default's 0.25 (:func:`cap_table`), and the cap of 0.1 (the default since) against FF
on seeds that played no part in choosing it (:func:`fresh_table`, :func:`epoch_table`), the controls on those seeds
(:func:`fresh_control_table`), the default with a ten times shorter period (:func:`short_period_table`), and the
default without block 0's offset (:func:`block0_table`; in every cell, :func:`block0_cells_table`; the refresh
statistics of each block, :func:`block0_statistics_table`), and fine-tuning on the other class split
(:func:`reverse_table`, with its random-direction control, :func:`reverse_control_table`).
"""

from __future__ import annotations

import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
STUDIES = {"scratch": "cpu_study", "finetune": "cpu_study_finetune"}
REVERSE_STUDY = "cpu_study_finetune_reverse"  # pretrained on classes 5-9, fine-tuned on 0-4


def _load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (at least two values)."""
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def _mean_se(values: list[float]) -> str:
    if len(values) < 2:
        return f"{statistics.mean(values):+.4f}" if values else "-"
    return "{:+.4f} ({:.4f})".format(*_mean_and_se(values))


def _passes(differences: list[float]) -> bool:
    """The never-worse test of a method against its baseline, paired by seed (``plans/plan_more_seeds.md``): the mean
    difference not 2 or more s.e. below zero, and no seed below -0.05."""
    mean, se = _mean_and_se(differences)
    return mean > -2 * se and min(differences) >= -0.05


def _gap_closed(differences: list[float], bp: dict[int, float], ff: dict[int, float], seeds: list[int]) -> str:
    """The mean difference as a share of the mean gap from FF to BP on the same seeds ("-" without BP on all)."""
    if not all(s in bp for s in seeds):
        return "-"
    g = statistics.mean(bp[s] - ff[s] for s in seeds)
    return f"{statistics.mean(differences) / g:.1%} of {g:.3f}" if g > 0 else "-"


def _finals(study: list[dict], model: str, opt: str, method: str, extra: dict | None) -> dict[int, float]:
    """Final accuracy per seed of one study cell run with exactly ``extra`` (``None``: whatever its ``extra``)."""
    return {
        r["seed"]: r["final"]
        for r in study
        if (r["model"], r["optimizer"], r["method"]) == (model, opt, method) and extra in (None, r["extra"])
    }


def _harness_finals(
    variants: list[dict], name: str, setting: str, model: str, opt: str, method: str = "ff_mod"
) -> dict[int, float]:
    """Final accuracy per seed of the harness's ``name`` runs of ``method`` in one cell (the Trainer's schedule)."""
    return {
        v["seed"]: v["acc"][-1]
        for v in variants
        if v["variant"] == name
        and v["sched"] == "linear"
        and (v.get("setting", "scratch"), v["model"], v["opt"], v["method"]) == (setting, model, opt, method)
    }


def control_table(variants: list[dict]) -> list[str]:
    lines = [
        "| setting | model / optimizer | seeds | default - FF | randdir - FF | tiny - FF | default - randdir | "
        "default from |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted(
        {
            (v.get("setting", "scratch"), v["model"], v["opt"])
            for v in variants
            if v["variant"] == "randdir" and v.get("setting", "scratch") in STUDIES  # the other split: its own table
        }
    )
    studies = {setting: _load(os.path.join(RESULTS, d, "runs.jsonl")) for setting, d in STUDIES.items()}
    for setting, model, opt in cells:
        finals = {method: _finals(studies[setting], model, opt, method, {}) for method in ("ff", "ff_mod")}

        randdir, tiny, base = (_harness_finals(variants, n, setting, model, opt) for n in ("randdir", "tiny", "base"))
        use_base = set(randdir) <= set(base)
        default = base if use_base else finals["ff_mod"]
        ff = finals["ff"]
        seeds = sorted(s for s in randdir if s in ff and s in default)
        minus_ff = {
            n: [d[s] - ff[s] for s in seeds if s in d] for n, d in (("d", default), ("r", randdir), ("t", tiny))
        }
        paired = [default[s] - randdir[s] for s in seeds]
        lines.append(
            f"| {setting} | {model} / {opt} | {', '.join(map(str, seeds))} | {_mean_se(minus_ff['d'])} | "
            f"{_mean_se(minus_ff['r'])} | {_mean_se(minus_ff['t'])} | **{_mean_se(paired)}** | "
            f"{'harness base' if use_base else 'study ff_mod'} |"
        )
    return lines


def noise_table(variants: list[dict]) -> list[str]:
    lines = [
        "| setting | model / optimizer | seeds | noise share of the offset, median (quartiles) | reliability, median "
        "| reliability of an unchanged offset, median |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict[str, list]] = {}
    seen = set()  # item 7's runs: the first of each seed (later reruns checked reproductions) in the two studies
    for v in variants:
        if v["variant"] != "base" or not v["offsets"] or "bias" not in v["offsets"][0]:
            continue
        run = (v.get("setting", "scratch"), v["model"], v["opt"], v["seed"])
        if run in seen or run[0] not in STUDIES:
            continue
        seen.add(run)
        g = groups.setdefault((v.get("setting", "scratch"), v["model"], v["opt"]), {"seeds": [], "share": [],
                                                                                        "rho": [], "pred": []})  # fmt: skip
        g["seeds"].append(v["seed"])
        for refresh in v["offsets"][1:]:  # the first refresh applies no offset and has no reliability
            for bias, var, rho in zip(refresh["bias"], refresh["var"], refresh["reliability"]):
                if var == 0 or bias <= 0:  # an exact block
                    continue
                share = min(var / refresh["period_steps"] / bias, 1.0)
                g["share"].append(share)
                g["rho"].append(rho)
                g["pred"].append(1.0 - share)  # E corr of two estimates of one Delta: signal / (signal + noise)
    for (setting, model, opt), g in sorted(groups.items()):
        q1, q2, q3 = statistics.quantiles(g["share"], n=4)
        lines.append(
            f"| {setting} | {model} / {opt} | {', '.join(map(str, sorted(g['seeds'])))} | {q2:.2f} ({q1:.2f}-{q3:.2f})"
            f" | {statistics.median(g['rho']):.2f} | {statistics.median(g['pred']):.2f} |"
        )
    return lines


def cap_table(extra: dict | None = None) -> list[str]:
    """FF -> FF-modified (and LoCo -> LoCo-modified) with ``extra`` (the cap at 0.1) against the package default,
    paired by seed, over the seeds where all three ran: the cap test of ``plan_vit_adamw_seeds.md``."""
    extra = extra or CAP
    lines = [
        "| setting | model / optimizer | method | seeds | default - local | variant - local | worst seed (variant) "
        "| variant - default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, study_dir in STUDIES.items():
        study = _load(os.path.join(RESULTS, study_dir, "runs.jsonl"))
        cells = sorted(
            {(r["model"], r["optimizer"], r["method"]) for r in study if r["extra"] == extra and "_mod" in r["method"]}
        )
        for model, opt, method in cells:
            local = method.removesuffix("_mod")

            base, default, variant = (_finals(study, model, opt, m, x) for m, x in ((local, {}), (method, {}),
                                                                                      (method, extra)))  # fmt: skip
            seeds = sorted(set(base) & set(default) & set(variant))
            d = [default[s] - base[s] for s in seeds]
            v = [variant[s] - base[s] for s in seeds]
            lines.append(
                f"| {setting} | {model} / {opt} | {local} -> {method} | {len(seeds)} | {_mean_se(d)} | "
                f"**{_mean_se(v)}** | {min(v):+.4f} | {_mean_se([b - a for a, b in zip(d, v)])} |"
            )
    return lines


CAP = {"offset_max_ratio": 0.1}  # the study's label of the default cap (the default since commit 29d2b53)

# Seeds that played no part in choosing the cap of 0.1 (planned in ``plan_vit_adamw_seeds.md``, second and third
# addenda), per from-scratch cell.
FRESH_SEEDS = {("vit", "adamw"): range(24, 56), ("vit", "sgd"): range(12, 24)}


def _scratch_study() -> list[dict]:
    """The from-scratch study's runs (``research/results/cpu_study/runs.jsonl``)."""
    return _load(os.path.join(RESULTS, STUDIES["scratch"], "runs.jsonl"))


def _ff_and_default(study: list[dict], model: str, opt: str) -> tuple[dict[int, float], dict[int, float]]:
    """Final accuracy per seed of FF (whatever its ``extra``: FF does not use the cap) and of the default (cap 0.1)."""
    return _finals(study, model, opt, "ff", None), _finals(study, model, opt, "ff_mod", CAP)


def _variant_table(
    name: str, variant: dict[int, float], ff: dict, default: dict, seeds: list[int], *extra
) -> list[str]:
    """One ViT/AdamW row of a variant of the default against FF and the default on ``seeds``; ``extra``: a further
    (column title, cell) pair."""
    d_ff = [variant[s] - ff[s] for s in seeds]
    titles = "".join(f" {title} |" for title, _ in extra)
    cells = "".join(f" {cell} |" for _, cell in extra)
    return [
        f"| model / optimizer | seeds | {name} - FF | worst seed | seeds below FF | {name} - default | default - FF |"
        + titles,
        "|---|---|---|---|---|---|---|" + "---|" * len(extra),
        f"| vit / adamw | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | {_mean_se(d_ff)} | {min(d_ff):+.4f} | "
        f"{sum(x < 0 for x in d_ff)} of {len(d_ff)} | **{_mean_se([variant[s] - default[s] for s in seeds])}** | "
        f"{_mean_se([default[s] - ff[s] for s in seeds])} |" + cells,
    ]


def fresh_table() -> list[str]:
    """The default (cap 0.1) against FF on the fresh seeds of ``FRESH_SEEDS``: the never-worse test (mean not 2 or more
    s.e. below zero, no seed below -0.05), the mean's 95% interval (t quantile), and how many seeds lost. FF's runs
    are taken whatever their ``extra`` (seeds 32 and up carry the cap in their key, which FF does not use)."""
    study = _scratch_study()
    lines = [
        "| model / optimizer | fresh seeds | default - FF | 95% interval | worst seed | seeds below FF | test |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, opt), wanted in FRESH_SEEDS.items():
        ff, mod = _ff_and_default(study, model, opt)
        seeds = [s for s in wanted if s in ff and s in mod]
        if len(seeds) < 2:
            continue
        d = [mod[s] - ff[s] for s in seeds]
        mean, se = _mean_and_se(d)
        half = _t975(len(d) - 1) * se
        lines.append(
            f"| {model} / {opt} | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | {_mean_se(d)} | {mean - half:+.4f} to "
            f"{mean + half:+.4f} | {min(d):+.4f} | {sum(x < 0 for x in d)} of {len(d)} | "
            f"{'passes' if _passes(d) else 'fails'} |"
        )
    return lines


def fresh_control_table(variants: list[dict]) -> list[str]:
    """The controls of :func:`control_table` on the fresh seeds (``plan_vit_adamw_seeds.md``, fourth addendum): the
    harness's ``randdir`` and ``tiny`` under the default cap of 0.1, against the study's FF and default runs."""
    study = _scratch_study()
    lines = [
        "| model / optimizer | seeds | default - FF | randdir - FF | tiny - FF | default - randdir |",
        "|---|---|---|---|---|---|",
    ]
    for (model, opt), wanted in FRESH_SEEDS.items():
        ff, default = _ff_and_default(study, model, opt)
        runs = {name: _harness_finals(variants, name, "scratch", model, opt) for name in ("randdir", "tiny")}
        seeds = [s for s in wanted if s in ff and s in default and s in runs["randdir"] and s in runs["tiny"]]
        if len(seeds) < 2:
            continue
        cols = [[d[s] - ff[s] for s in seeds] for d in (default, runs["randdir"], runs["tiny"])]
        paired = [default[s] - runs["randdir"][s] for s in seeds]
        lines.append(
            f"| {model} / {opt} | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | "
            + " | ".join(_mean_se(c) for c in cols)
            + f" | **{_mean_se(paired)}** |"
        )
    return lines


def epoch_table() -> list[str]:
    """Test accuracy of the default minus FF after each epoch, mean (s.e.) over the fresh seeds of each cell: where in
    training the difference arises."""
    study = _scratch_study()
    lines = ["| model / optimizer | " + " | ".join(f"epoch {e}" for e in range(1, 9)) + " |", "|---|" + "---|" * 8]
    for (model, opt), wanted in FRESH_SEEDS.items():
        cell = [r for r in study if (r["model"], r["optimizer"]) == (model, opt) and r["seed"] in wanted]
        ff = {r["seed"]: r["acc"] for r in cell if r["method"] == "ff"}
        mod = {r["seed"]: r["acc"] for r in cell if r["method"] == "ff_mod" and r["extra"] == CAP}
        seeds = [s for s in wanted if s in ff and s in mod]
        if len(seeds) < 2:
            continue
        diffs = [_mean_se([mod[s][e] - ff[s][e] for s in seeds]) for e in range(len(ff[seeds[0]]))]
        lines.append(f"| {model} / {opt} ({len(seeds)} seeds) | " + " | ".join(diffs) + " |")
    return lines


SHORT = {**CAP, "offset_period": "0.1epoch"}  # the fifth addendum's variant: the default with K = 12 steps


def short_period_table() -> list[str]:
    """The default with a ten times shorter period (``SHORT``) on ViT/AdamW seeds 24-39 (``plan_vit_adamw_seeds.md``,
    fifth addendum), against the study's FF and default runs on the same seeds, with the seconds per run."""
    study = _scratch_study()
    ff, default = _ff_and_default(study, "vit", "adamw")
    short = _finals(study, "vit", "adamw", "ff_mod", SHORT)
    seeds = [s for s in range(24, 40) if s in ff and s in default and s in short]
    if len(seeds) < 2:
        return []
    seconds = {
        name: statistics.mean(
            r["seconds"]
            for r in study
            if (r["model"], r["optimizer"], r["method"], r["extra"]) == ("vit", "adamw", "ff_mod", extra)
            and r["seed"] in seeds
        )
        for name, extra in (("short", SHORT), ("default", CAP))
    }
    acc = {
        (r["method"], r["seed"]): r["acc"]
        for r in study
        if (r["model"], r["optimizer"]) == ("vit", "adamw")
        and r["seed"] in seeds
        and (r["method"] == "ff" or r["extra"] == SHORT)
    }
    per_epoch = [_mean_se([acc["ff_mod", s][e] - acc["ff", s][e] for s in seeds]) for e in range(8)]
    cost = ("seconds per run, short K / default", f"{seconds['short']:.0f} / {seconds['default']:.0f}")
    return [
        "| short K - FF after epoch | " + " | ".join(str(e) for e in range(1, 9)) + " |",
        "|---|" + "---|" * 8,
        "| vit / adamw | " + " | ".join(per_epoch) + " |",
        "",
        *_variant_table("short K", short, ff, default, seeds, cost),
    ]


def block0_table(variants: list[dict]) -> list[str]:
    """The default without block 0's offset (the harness's ``no0``) on fresh ViT/AdamW seeds 56 and up
    (``plan_vit_adamw_seeds.md``, sixth addendum), against the study's FF and default runs on the same seeds."""
    study = _scratch_study()
    ff, default = _ff_and_default(study, "vit", "adamw")
    no0 = _harness_finals(variants, "no0", "scratch", "vit", "adamw")
    seeds = sorted(s for s in no0 if s >= 56 and s in ff and s in default)
    if len(seeds) < 2:
        return []
    return _variant_table("no0", no0, ff, default, seeds)


# The seventh addendum's cells of ``no0`` (setting, model, optimizer, modified method, seeds); from scratch on the
# ViT with FF, fresh seeds (ViT/SGD 24-31, ViT/AdamW 76 and up).
BLOCK0_CELLS = [
    ("finetune", "vit", "adamw", "ff_mod", range(12)),
    ("finetune", "vit", "sgd", "ff_mod", range(12)),
    ("finetune", "resnet", "sgd", "ff_mod", range(6)),
    ("finetune", "resnet", "adamw", "ff_mod", range(6)),
    *(("scratch", m, o, "ff_mod", (0, 1, 4, 5)) for m, o in (("resnet", "adamw"), ("resnet", "sgd"))),
    *(("scratch", m, o, "loco_mod", (0, 1, 4, 5)) for m in ("resnet", "vit") for o in ("adamw", "sgd")),
    ("scratch", "vit", "sgd", "ff_mod", range(24, 32)),
    ("scratch", "vit", "adamw", "ff_mod", range(76, 200)),
]


def block0_cells_table(variants: list[dict]) -> list[str]:
    """``no0`` in every cell of the seventh addendum: against the local method (the never-worse test: mean not 2 or
    more s.e. below zero, no seed below -0.05) and against the default (cap 0.1) where the study has it on those
    seeds, with the part of the gap to BP closed where the study has BP on them."""
    lines = [
        "| setting | model / optimizer | method | seeds | no0 - local | worst seed | test | no0 - default "
        "| default - local | gap to BP closed (no0 / default) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, model, opt, method, wanted in BLOCK0_CELLS:
        study = _load(os.path.join(RESULTS, STUDIES[setting], "runs.jsonl"))
        local_name = method.removesuffix("_mod")
        local = _finals(study, model, opt, local_name, None)
        default, bp = _finals(study, model, opt, method, CAP), _finals(study, model, opt, "bp", None)
        no0 = _harness_finals(variants, "no0", setting, model, opt, method)
        seeds = [s for s in wanted if s in no0 and s in local]
        if len(seeds) < 2:
            continue
        d = [no0[s] - local[s] for s in seeds]
        mean = statistics.mean(d)
        with_default = [s for s in seeds if s in default]
        vs_default = _mean_se([no0[s] - default[s] for s in with_default]) if len(with_default) == len(seeds) else "-"
        default_gain = _mean_se([default[s] - local[s] for s in with_default]) if with_default == seeds else "-"
        gap = "-"
        if all(s in bp for s in seeds) and with_default == seeds:
            g = statistics.mean(bp[s] - local[s] for s in seeds)
            gap = f"{mean / g:.1%} / {statistics.mean(default[s] - local[s] for s in seeds) / g:.1%}" if g > 0 else "-"
        span = (
            f"{seeds[0]}-{seeds[-1]}"
            if list(seeds) == list(range(seeds[0], seeds[-1] + 1))
            else ", ".join(map(str, seeds))
        )
        lines.append(
            f"| {setting} | {model} / {opt} | {local_name} | {span} ({len(seeds)}) | {_mean_se(d)} | {min(d):+.4f} | "
            f"{'passes' if _passes(d) else 'fails'} | **{vs_default}** | {default_gain} | {gap} |"
        )
    return lines


def block0_statistics_table() -> list[str]:
    """Per block of the ViT, the refreshes after the first where the default (cap 0.1) applied an offset
    (``lambda > 0``), over every seed of the study: their share and the medians of ``lambda``, the reliability and
    the cosine between mean local and mean true gradient, from scratch and fine-tuning."""
    lines = [
        "| setting | optimizer | block | refreshes with an offset | lambda | reliability | cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, study_dir in STUDIES.items():
        study = _load(os.path.join(RESULTS, study_dir, "runs.jsonl"))
        for opt in ("adamw", "sgd"):
            runs = [
                r
                for r in study
                if (r["model"], r["optimizer"], r["method"]) == ("vit", opt, "ff_mod") and r["extra"] == CAP
            ]
            refreshes = [o for r in runs for o in r["offsets"][1:]]
            for b in range(len(refreshes[0]["lam"]) - 1):  # the last block is exact
                applied = [o for o in refreshes if o["lam"][b] > 0]
                med = {k: statistics.median(o[k][b] for o in applied) for k in ("lam", "reliability", "cosine")}
                lines.append(
                    f"| {setting} ({len(runs)} seeds) | {opt} | {b} | {len(applied)} of {len(refreshes)} | "
                    f"{med['lam']:.3f} | {med['reliability']:.2f} | {med['cosine']:.2f} |"
                )
    return lines


def reverse_table() -> list[str]:
    """The default minus FF in fine-tuning on both class splits (``plan_finetune_reverse.md``): pretrained on 0-4 and
    fine-tuned on 5-9 (the study), and the other way round; the planned reading is 2 s.e. above zero."""
    lines = [
        "| split (pretrain -> fine-tune) | model / optimizer | seeds | default - FF | worst seed | seeds below FF "
        "| 2 s.e. above zero | gap to BP closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # the default's label: the first split's study names the cap it ran with, the second ran after it became default
    for split, study_dir, default_extra in (
        ("0-4 -> 5-9", STUDIES["finetune"], CAP),
        ("5-9 -> 0-4", REVERSE_STUDY, {}),
    ):
        path = os.path.join(RESULTS, study_dir, "runs.jsonl")
        if not os.path.exists(path):
            continue
        study = _load(path)
        for model, opt in (("vit", "adamw"), ("resnet", "sgd"), ("vit", "sgd"), ("resnet", "adamw")):
            ff, bp = _finals(study, model, opt, "ff", None), _finals(study, model, opt, "bp", None)
            default = _finals(study, model, opt, "ff_mod", default_extra)
            own = range(12) if model == "vit" else range(6)  # item 13's seeds; item 14's fresh ones have their table
            seeds = sorted(set(ff) & set(default) & set(own))
            if len(seeds) < 2:
                continue
            d = [default[s] - ff[s] for s in seeds]
            mean, se = _mean_and_se(d)
            gap = _gap_closed(d, bp, ff, seeds)
            lines.append(
                f"| {split} | {model} / {opt} | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | {_mean_se(d)} | {min(d):+.4f} "
                f"| {sum(x < 0 for x in d)} of {len(d)} | {'yes' if mean >= 2 * se else 'no'} | {gap} |"
            )
    return lines


def reverse_control_table(variants: list[dict]) -> list[str]:
    """The random-direction control on the reverse split (``plan_finetune_reverse.md``, second addendum): the
    harness's ``randdir`` against the study's FF and default, paired by seed."""
    study = _load(os.path.join(RESULTS, REVERSE_STUDY, "runs.jsonl"))
    lines = [
        "| model / optimizer | seeds | default - FF | randdir - FF | default - randdir |",
        "|---|---|---|---|---|",
    ]
    for model, opt in (("resnet", "sgd"), ("resnet", "adamw")):
        ff, default = _finals(study, model, opt, "ff", None), _finals(study, model, opt, "ff_mod", {})
        randdir = _harness_finals(variants, "randdir", "finetune_reverse", model, opt)
        seeds = sorted(set(ff) & set(default) & set(randdir))
        if len(seeds) < 2:
            continue
        lines.append(
            f"| {model} / {opt} | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | "
            f"{_mean_se([default[s] - ff[s] for s in seeds])} | {_mean_se([randdir[s] - ff[s] for s in seeds])} | "
            f"**{_mean_se([default[s] - randdir[s] for s in seeds])}** |"
        )
    return lines


ARCHITECTURE_CELLS = (  # plan_default_by_architecture.md: the fresh seeds of every ResNet cell, and the default's label
    ("scratch", STUDIES["scratch"], range(6, 14), CAP),
    ("finetune 0-4 -> 5-9", STUDIES["finetune"], range(6, 12), CAP),
    ("finetune 5-9 -> 0-4", REVERSE_STUDY, range(6, 12), {}),
)


def default_by_architecture_table() -> list[str]:
    """The confirmation of ``plan_default_by_architecture.md``: in every ResNet cell, on fresh seeds, the default
    minus FF paired by seed, the never-worse test, and the part of the gap to BP it closes."""
    lines = [
        "| setting | model / optimizer | fresh seeds | default - FF | worst seed | above / at / below FF | test "
        "| gap to BP closed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, study_dir, fresh, default_extra in ARCHITECTURE_CELLS:
        study = _load(os.path.join(RESULTS, study_dir, "runs.jsonl"))
        for opt in ("sgd", "adamw"):
            ff, bp = _finals(study, "resnet", opt, "ff", None), _finals(study, "resnet", opt, "bp", None)
            default = _finals(study, "resnet", opt, "ff_mod", default_extra)
            seeds = [s for s in fresh if s in ff and s in default]
            if len(seeds) < 2:
                continue
            d = [default[s] - ff[s] for s in seeds]
            gap = _gap_closed(d, bp, ff, seeds)
            counts = f"{sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / {sum(x < 0 for x in d)}"
            lines.append(
                f"| {setting} | resnet / {opt} | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | {_mean_se(d)} | "
                f"{min(d):+.4f} | {counts} | {'passes' if _passes(d) else 'fails'} | {gap} |"
            )
    return lines


LORA_STUDIES = (("0-4 -> 5-9", "cpu_study_finetune_lora"), ("5-9 -> 0-4", "cpu_study_finetune_reverse_lora"))


def lora_table() -> list[str]:
    """The ViT with LoRA r = 1, the paper's ViT setting (``plan_vit_lora.md``): the offset minus FF paired by seed on
    each class split; the planned reading is 2 s.e. above zero, with the never-worse test."""
    lines = [
        "| split (pretrain -> fine-tune) | model / optimizer | seeds | offset - FF | worst seed | seeds below FF "
        "| 2 s.e. above zero | test | gap to BP closed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, study_dir in LORA_STUDIES:
        path = os.path.join(RESULTS, study_dir, "runs.jsonl")
        if not os.path.exists(path):
            continue
        study = _load(path)
        ff, bp = _finals(study, "vit", "sgd", "ff", None), _finals(study, "vit", "sgd", "bp", None)
        offset = _finals(study, "vit", "sgd", "ff_mod", {})
        seeds = sorted(set(ff) & set(offset))
        if len(seeds) < 2:
            continue
        d = [offset[s] - ff[s] for s in seeds]
        mean, se = _mean_and_se(d)
        gap = _gap_closed(d, bp, ff, seeds)
        lines.append(
            f"| {split} | vit (LoRA r=1) / sgd | {seeds[0]}-{seeds[-1]} ({len(seeds)}) | {_mean_se(d)} | "
            f"{min(d):+.4f} | {sum(x < 0 for x in d)} of {len(d)} | {'yes' if mean >= 2 * se else 'no'} | "
            f"{'passes' if _passes(d) else 'fails'} | {gap} |"
        )
    return lines


def _t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (Cornish-Fisher expansion: within 1e-3 for
    df >= 7, 0.03 at df = 3)."""
    z = 1.959964
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def main() -> None:
    variants = _load(os.path.join(RESULTS, "offset_variants.jsonl"))
    tables = [
        control_table(variants),
        noise_table(variants),
        cap_table(),
        fresh_table(),
        epoch_table(),
        fresh_control_table(variants),
        short_period_table(),
        block0_table(variants),
        block0_cells_table(variants),
        block0_statistics_table(),
        reverse_table(),
        reverse_control_table(variants),
        default_by_architecture_table(),
        lora_table(),
    ]
    print("\n\n".join("\n".join(table) for table in tables))


if __name__ == "__main__":
    main()
