#!/usr/bin/env python
"""Run every benchmark with its defaults and gather their markdown into ``benchmarks/results/README.md``.

Runs, one after the other, each in its own process (so that one's threads and memory do not touch the next):
``saved_activations.py`` (deterministic saved-activation bytes), ``offset_overhead.py`` (offset time per epoch through
the Trainer), ``offset_share.py`` (the offset's share of ``make train``'s training time, with the default ``B'`` and
``b'`` and others), ``memory_speed.py`` (peak memory and step time against BP and gradient checkpointing),
``vjp_floor.py`` (the passes of one block: the step-time floor of each horizon), ``apply_offset.py`` (applying
the offset at every step, one pass against two) and ``checkpointing.py`` (what gradient checkpointing saves under
local losses) ``nonfinite_guard.py`` (the non-finite guard's share of a step) and ``architectures.py`` (each supported
architecture's saved activations at h = 1 against BP, and a short run). Then it
concatenates the markdown each one wrote, prints it and writes it to ``benchmarks/results/README.md``.

The children run with ``OMP_WAIT_POLICY=PASSIVE`` (unless set): spinning OpenMP threads collapse when other processes
share the cores (see ``memory_speed.py``).

    python benchmarks/run_all.py              # or: make bench
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (script, its arguments, the markdown files it writes under the results folder). offset_overhead.py runs plain,
# modified, modified, plain (--abba): run once each in sequence, its ratio moved by several percent with the load.
BENCHMARKS = [
    ("saved_activations.py", [], ["saved_activations.md"]),
    ("offset_overhead.py", ["--abba"], ["offset_overhead_h1.md"]),
    ("offset_share.py", [], ["offset_share.md"]),
    ("memory_speed.py", [], ["memory_speed_cpu.md"]),
    ("vjp_floor.py", [], ["vjp_floor.md"]),
    ("apply_offset.py", [], ["apply_offset.md"]),
    ("checkpointing.py", [], ["checkpointing.md"]),
    ("nonfinite_guard.py", [], ["nonfinite_guard.md"]),
    ("architectures.py", ["--accuracy"], ["architectures.md"]),
]


def run(script: str, args: list[str], out: str) -> float:
    """Run one benchmark script with its defaults (results into ``out``); its wall time in seconds."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    print(f"== {script}", file=sys.stderr, flush=True)
    # the child's own print-out goes to stderr: stdout carries only the gathered page
    # a folder inside the repository is passed relative to it: each script writes its command line under its table
    folder = os.path.relpath(out, ROOT) if os.path.commonpath([ROOT, out]) == ROOT else out
    command = [sys.executable, os.path.join(HERE, script), *args, "--out", folder]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def demote(markdown: str) -> str:
    """Every heading one level down, so that each benchmark's title sits under the page's."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.split("\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument(
        "--report", action="store_true", help="run nothing: gather the markdown the scripts last wrote into README.md"
    )
    opts = parser.parse_args()
    out = os.path.join(ROOT, opts.out) if not os.path.isabs(opts.out) else opts.out
    os.makedirs(out, exist_ok=True)
    if opts.report:
        summary = "Gathered by `python benchmarks/run_all.py --report` from each script's last output (its command is under its table)."
    else:
        start = time.perf_counter()
        seconds = {script: run(script, args, out) for script, args, _ in BENCHMARKS}
        total = time.perf_counter() - start
        with contextlib.suppress(OSError):  # offset_overhead.py's Trainer output folder, empty when it is done
            os.rmdir(os.path.join(out, "work"))
        summary = (
            f"Written by `python benchmarks/run_all.py` (`make bench`) in {total / 60:.1f} min: "
            + ", ".join(f"`{script}` {s:.0f} s" for script, s in seconds.items())
            + "."
        )
    parts = ["# Benchmark results", "", summary, ""]
    for _, _, files in BENCHMARKS:
        for name in files:
            with open(os.path.join(out, name)) as f:
                parts += [demote(f.read().rstrip("\n")), ""]
    text = "\n".join(parts)
    print(text)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
