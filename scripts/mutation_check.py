"""A small mutation check of the algorithm modules: does the fast test suite notice when the code is wrong?

Each mutant changes one thing in one source file, the file's tests run (``pytest -x``: the first failure kills the
mutant), and the file is restored, always (``try``/``finally``, also on Ctrl-C or SIGTERM). Two kinds of mutants:

* hand-written ones, for the mistakes the suite must catch (named in ``HAND_WRITTEN``): a text replacement in
  a file, checked against the tests meant to catch it;
* generic operator mutants found by walking the AST of ``hf_bpmod/local_grad.py``, ``offset.py``, ``offset_pass.py``,
  ``offset_controller.py`` and ``chain.py`` (arithmetic operator swapped, comparison flipped, ``and``/``or`` swapped, a condition negated, a
  ``not`` dropped, a number changed), sampled with a fixed seed (``--per-module`` of each file) to bound the run.

A mutant survives when every selected test passes. Usage (from the repository root)::

    python scripts/mutation_check.py                  # the default sample, about 10-15 minutes on 2 cores
    python scripts/mutation_check.py --per-module 0   # the hand-written mutants only
    python scripts/mutation_check.py --list           # print the mutants, run nothing

If the process is killed hard (SIGKILL) in the middle of a mutant, ``git checkout hf_bpmod`` restores the sources.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_bpmod"

# The tests run against each module's mutants, the quickest-to-fail first (``-x`` stops at the first failure).
MODULE_TESTS = {
    "local_grad.py": ["tests/test_local_grad.py", "tests/test_offset.py"],
    "chain.py": ["tests/test_chain.py", "tests/test_local_grad.py"],
    "offset.py": ["tests/test_offset.py", "tests/test_precision.py"],
    "offset_pass.py": ["tests/test_offset.py", "tests/test_precision.py"],
    "offset_controller.py": ["tests/test_offset.py", "tests/test_precision.py"],
}


@dataclass
class Mutant:
    file: str  # relative to hf_bpmod/
    line: int
    description: str
    tests: list[str]
    keyword: str | None = None  # a pytest ``-k`` expression
    replace: tuple[str, str] | None = None  # hand-written: (old text, new text), old must occur exactly once
    site: int | None = None  # generic: the index of the AST site (see ``_sites``)


# The three holes the suite once had, each with the tests written to close it.
HAND_WRITTEN = [
    Mutant(
        "local_grad.py", 0,
        "eq. 4 wrong for h >= 2: the blocks a later loss passes through on the way back get its weight gradient",
        ["tests/test_local_grad.py"], keyword="streamed_training_path",
        replace=("want_params = bool(params) and j in self.targets", "want_params = bool(params)"),
    ),
    Mutant(
        "losses.py", 0,
        "the loss ignores num_items_in_batch under gradient accumulation (each micro-batch mean, not divided by the "
        "accumulation steps: twice the loss with 2 steps)",
        ["tests/test_trainer.py"], keyword="sgd_with_uneven_accumulation",
        replace=("if self.model_accepts_loss_kwargs and num_items_in_batch is not None:", "if False:"),
    ),
    Mutant(
        "compat.py", 0,
        "resume reloads the parameters only, dropping the BatchNorm running statistics",
        ["tests/test_trainer.py"], keyword="resnet_resume",
        replace=(
            "target.load_state_dict(reloaded.state_dict(), strict=True)",
            "target.load_state_dict(dict(reloaded.named_parameters()), strict=False)",
        ),
    ),
]  # fmt: skip

_BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}
_CMP_SWAP = {
    ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip


def _skipped(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an error message, an assert, a type annotation or a docstring: no behaviour to test."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Raise | ast.Assert | ast.JoinedStr):
            return True
        if isinstance(parent, ast.arg | ast.AnnAssign) and node is getattr(parent, "annotation", None):
            return True
        if isinstance(parent, ast.FunctionDef) and node is parent.returns:
            return True
        node = parent
    return False


def _sites(tree: ast.Module) -> list[tuple[ast.AST, str, str]]:
    """Every mutable spot inside a function, in a fixed order: ``(node, kind, description)``."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    inside_functions = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            inside_functions.update(n for stmt in node.body for n in ast.walk(stmt))
    out = []
    for node in ast.walk(tree):
        if node not in inside_functions or _skipped(node, parents):
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
            new = _BINOP_SWAP[type(node.op)].__name__
            out.append((node, "binop", f"{type(node.op).__name__} -> {new}"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _CMP_SWAP:
            new = _CMP_SWAP[type(node.ops[0])].__name__
            out.append((node, "compare", f"{type(node.ops[0]).__name__} -> {new}"))
        elif isinstance(node, ast.BoolOp):
            out.append(
                (node, "boolop", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}")
            )
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            out.append((node, "drop_not", "not x -> x"))
        elif isinstance(node, ast.If | ast.While | ast.IfExp):
            out.append((node, "negate_if", "if c -> if not c"))
        elif (
            isinstance(node, ast.Constant)
            and type(node.value) in (int, float)
            and not isinstance(parents.get(node), ast.Subscript | ast.Slice)  # indices crash, rarely mislead
        ):
            new = 1 if node.value == 0 else (0 if node.value == 1 else node.value * 2)
            out.append((node, "constant", f"{node.value!r} -> {new!r}"))
    return out


def _apply_site(tree: ast.Module, index: int) -> ast.Module:
    tree = copy.deepcopy(tree)
    node, kind, _ = _sites(tree)[index]
    if kind == "binop":
        node.op = _BINOP_SWAP[type(node.op)]()
    elif kind == "compare":
        node.ops[0] = _CMP_SWAP[type(node.ops[0])]()
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "drop_not":
        node.op = ast.UAdd()  # +x of a bool is the int 0/1: same truth value as x
    elif kind == "negate_if":
        node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
    elif kind == "constant":
        node.value = 1 if node.value == 0 else (0 if node.value == 1 else node.value * 2)
    return ast.fix_missing_locations(tree)


def generic_mutants(per_module: int, seed: int) -> list[Mutant]:
    rng = random.Random(seed)
    mutants = []
    for name, tests in MODULE_TESTS.items():
        tree = ast.parse((PACKAGE / name).read_text())
        sites = _sites(tree)
        chosen = sorted(rng.sample(range(len(sites)), min(per_module, len(sites))))
        for i in chosen:
            node, _, description = sites[i]
            mutants.append(Mutant(name, node.lineno, description, tests, site=i))
    return mutants


def mutated_source(mutant: Mutant, original: str) -> str | None:
    """The file's text under the mutant; None when the mutant does not apply (the code it names has moved)."""
    if mutant.replace is not None:
        old, new = mutant.replace
        if original.count(old) != 1:
            return None
        mutant.line = original[: original.index(old)].count("\n") + 1
        return original.replace(old, new)
    return ast.unparse(_apply_site(ast.parse(original), mutant.site)) + "\n"


def run_tests(tests: list[str], keyword: str | None, timeout: float) -> tuple[str, str]:
    """``("passed" | "failed" | "timeout", last line of pytest's output)``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::FutureWarning", *tests]
    if keyword:
        cmd += ["-k", keyword]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else proc.stderr.strip().splitlines()[-1:]
    return ("passed" if proc.returncode == 0 else "failed"), str(last)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-module", type=int, default=6, help="generic mutants sampled per module")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)

    mutants = [copy.copy(m) for m in HAND_WRITTEN] + generic_mutants(args.per_module, args.seed)
    if args.list:
        for m in mutants:
            mutated_source(m, (PACKAGE / m.file).read_text())  # sets a hand-written mutant's line
            print(f"hf_bpmod/{m.file}:{m.line or '?'}  {m.description}  [{' '.join(m.tests)}]")
        return 0

    start = time.monotonic()
    groups = {(tuple(sorted({t for m in mutants if not m.keyword for t in m.tests})), None)}
    groups |= {(tuple(m.tests), m.keyword) for m in mutants if m.keyword}
    for tests, keyword in sorted(groups, key=str):
        status, last = run_tests(list(tests), keyword, 3 * args.timeout)
        print(f"baseline (no mutant) {' '.join(tests)}{f' -k {keyword}' if keyword else ''}: {status}  {last}")
        if status != "passed":
            print("the tests fail without a mutant: fix them first", file=sys.stderr)
            return 2

    results = []
    for n, mutant in enumerate(mutants, 1):
        path = PACKAGE / mutant.file
        original = path.read_text()
        source = mutated_source(mutant, original)
        if source is None:
            results.append((mutant, "not applicable", "the code it names is not in the file"))
        else:
            try:
                path.write_text(source)
                status, last = run_tests(mutant.tests, mutant.keyword, args.timeout)
            finally:
                path.write_text(original)
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}[status]
            results.append((mutant, verdict, last))
        where = f"hf_bpmod/{mutant.file}:{mutant.line}"
        print(
            f"[{n}/{len(mutants)}] {results[-1][1]:<16} {where:<28} {mutant.description}  ({results[-1][2]})",
            flush=True,
        )

    killed = sum(r[1].startswith("killed") for r in results)
    survived = [r for r in results if r[1] == "SURVIVED"]
    skipped = sum(r[1] == "not applicable" for r in results)
    print(f"\n{killed} killed, {len(survived)} survived, {skipped} not applicable, of {len(results)} mutants "
          f"in {time.monotonic() - start:.0f} s")  # fmt: skip
    for mutant, _, _ in survived:
        print(f"  survived: hf_bpmod/{mutant.file}:{mutant.line}  {mutant.description}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
