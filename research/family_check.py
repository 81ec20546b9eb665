#!/usr/bin/env python
"""The family check of the offset's default: one fine-tuning cell per architecture (``research/plans/
plan_family_check.md``), read from ``research/results/family_check/runs.jsonl`` into ``table.md``.

    python research/cpu_study.py --setting finetune --models deit beit dinov2 swin convnext regnet \
        --optimizers sgd --methods bp ff ff_mod --seeds 0 1 2 3 4 5 --epochs 4 --jobs 2 --threads 1 \
        --out research/results/family_check
    python research/family_check.py   # prints and writes research/results/family_check/table.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

#: The family of each architecture, and the offset's default it gives (on for convolutional nets).
FAMILY = {
    "deit": "transformer",
    "beit": "transformer",
    "dinov2": "transformer",
    "swin": "transformer",
    "convnext": "convolutional",
    "regnet": "convolutional",
}


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def verdict(family: str, d: float, se: float) -> str:
    """The plan's reading: the family default changes only if the cell contradicts it by 2 standard errors."""
    if family == "transformer" and d >= 2 * se:
        return "rule wrong: the offset helps (turn it on)"
    if family == "convolutional" and d <= -2 * se:
        return "rule wrong: the offset hurts (turn it off)"
    return "rule stands"


def table(records: list[dict]) -> str:
    final = {(r["model"], r["method"], r["seed"]): r["final"] for r in records}
    lines = [
        "| model | family (default) | seeds | BP | FF | FF + offset | offset - FF (s.e.) | per seed | reading |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, family in FAMILY.items():
        seeds = sorted(s for (m, method, s) in final if m == model and method == "ff" and (m, "ff_mod", s) in final)
        if len(seeds) < 2:
            continue
        ff = [final[model, "ff", s] for s in seeds]
        mod = [final[model, "ff_mod", s] for s in seeds]
        bp = [final[model, "bp", s] for s in seeds if (model, "bp", s) in final]
        diffs = [b - a for a, b in zip(ff, mod)]
        d, se = mean_se(diffs)
        default = "on" if family == "convolutional" else "off"
        lines.append(
            f"| {model} | {family} ({default}) | {len(seeds)} | {statistics.fmean(bp):.3f} | {statistics.fmean(ff):.3f} "
            f"| {statistics.fmean(mod):.3f} | {d:+.4f} ({se:.4f}) | {', '.join(f'{x:+.3f}' for x in diffs)} "
            f"| {verdict(family, d, se)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "family_check"))
    opts = parser.parse_args()
    with open(os.path.join(opts.out, "runs.jsonl")) as f:
        records = [json.loads(line) for line in f]
    text = table(records)
    print(text)
    with open(os.path.join(opts.out, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
