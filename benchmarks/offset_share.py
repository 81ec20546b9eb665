#!/usr/bin/env python
"""The offset's share of the training time of ``make train``'s run, with the default ``B'`` and other settings.

Each run is ``make train``'s command (the Makefile's TRAIN_MODEL: a small ResNet from a config, SGD with momentum,
batch 64, the 8,000 embedded training images) for ``--epochs`` epochs, without evaluation or checkpoints, in a
process of its own with 2 threads. The share is a ratio within one process: the sum of the refreshes' ``seconds``
in the refresh log over the run's ``train_runtime`` (which holds them), so a load that slows the whole process cancels
out. The same run with ``--bp_modified false`` (``off``) is the reference for the whole process's time. The runs go round
``--repeats`` times, each setting once per round, and each setting's shares are reported as median and range.

    python benchmarks/offset_share.py                                 # writes benchmarks/results/offset_share.md
    python benchmarks/offset_share.py --settings default b16 off --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "examples", "run_image_classification.py")

#: Each setting's extra flags: the defaults (B' and b' chosen from the data), B' chosen in micro-batches of 8 or 16,
#: the paper's B' = 320 (b' = 8), no offset.
SETTINGS = {
    "default": [],
    "b8": ["--offset_micro_batch_size", "8"],
    "b16": ["--offset_micro_batch_size", "16"],
    "B320": ["--offset_batch_size", "320"],
    "off": ["--bp_modified", "false"],
}


def train_model_flags() -> list[str]:
    """The Makefile's ``TRAIN_MODEL`` (its continuation lines joined), as the flags ``make train`` passes."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        lines = f.read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("TRAIN_MODEL ?="))
    text = lines[start].split("?=", 1)[1]
    while text.endswith("\\"):
        start += 1
        text = text[:-1] + lines[start]
    return shlex.split(text)


def run(setting: str, epochs: int, out: str) -> dict:
    """One run of ``setting``: its training seconds, the refreshes' seconds and the B' and b' they used."""
    flags = [
        "--output_dir", out, "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "64",
        *train_model_flags(), "--do_train", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "25",
        "--dataloader_drop_last", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
        "--log_level", "error", *SETTINGS[setting],
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    subprocess.run([sys.executable, SCRIPT, *flags], cwd=ROOT, env=env, check=True, capture_output=True)
    with open(os.path.join(out, "train_results.json")) as f:
        seconds = json.load(f)["train_runtime"]
    log = os.path.join(out, "bpmod_offsets.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    return {
        "train": seconds,
        "refresh": sum(r["seconds"] for r in records),
        "refreshes": len(records),
        "B'": records[0]["offset_batch_size"] if records else None,
        "micro": len(records[0]["micro_batch_seconds"]) if records else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["default", "b8", "B320", "off"], choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    opts = parser.parse_args()
    runs: dict[str, list[dict]] = {s: [] for s in opts.settings}
    with tempfile.TemporaryDirectory() as work:
        for r in range(opts.repeats):
            for i, setting in enumerate(opts.settings):
                result = run(setting, opts.epochs, os.path.join(work, f"{r}-{i}"))
                runs[setting].append(result)
                print(setting, result, file=sys.stderr, flush=True)
    reference = statistics.median(x["train"] for x in runs.get("off", [])) if "off" in runs else None
    lines = [
        f"# The offset's share of `make train`'s training time ({opts.epochs} epochs, {opts.repeats} runs each)",
        "",
        "| setting | B' (micro-batches) | refreshes | training s (median) | refresh s (median) | share: median (range) "
        "| training s / off |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, results in runs.items():
        shares = [100 * x["refresh"] / x["train"] for x in results]
        train = statistics.median(x["train"] for x in results)
        first = results[0]
        sample = first["B'"]
        size = f"{sample} ({first['micro']})" if sample else ""
        share = f"{statistics.median(shares):.1f}% ({min(shares):.1f}-{max(shares):.1f}%)" if first["B'"] else ""
        versus = f"{train / reference:.3f}" if reference else ""
        refresh = f"{statistics.median(x['refresh'] for x in results):.2f}" if first["B'"] else ""
        lines.append(f"| {setting} | {size} | {first['refreshes']} | {train:.1f} | {refresh} | {share} | {versus} |")
    command = "python benchmarks/offset_share.py" + (
        f" --settings {' '.join(shlex.quote(s) for s in opts.settings)}"
        if opts.settings != ["default", "b8", "B320", "off"]
        else ""
    )
    if (opts.epochs, opts.repeats) != (2, 2):
        command += f" --epochs {opts.epochs} --repeats {opts.repeats}"
    lines += [
        "",
        "The share is the refreshes' seconds over the training seconds of the same process (a ratio that the machine's "
        "load moves less than either); the last column compares whole processes run one after the other. 2 CPU "
        "threads, `OMP_WAIT_POLICY=PASSIVE`.",
        "",
        f"Command: `{command}`",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "offset_share.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
