"""The values a checkpoint's offset state can hold: what training produces (:mod:`hf_bpmod.offset`,
:mod:`hf_bpmod.offset_controller`, :mod:`hf_bpmod.guard`), checked when a state is loaded, so that a state training
could not have written is refused rather than resumed into another run.

Per block (:func:`hf_bpmod.offset.block_offset`, :meth:`hf_bpmod.offset.BlockOffset.prepare`):

- ``lam`` and ``reliability`` lie in [0, 1]; ``c`` (a square root, or 1), ``bias``, ``var`` and ``offset_norm`` are
  at least 0; ``cosine`` lies in [-1, 1] (to rounding);
- ``a``, ``c``, ``scale``, ``weight`` and ``delta_factor`` multiply gradients: a float32 gradient holds them
  (at most ``3.4e38`` in size);
- ``scale = c * a`` and ``weight = c * lam``, exactly as computed; ``delta_factor`` is 1, or
  ``weight / (1 - scale)`` once :meth:`~hf_bpmod.offset.BlockOffset.prepare` folded it in (never with
  ``weight = 0`` or ``scale = 1``).

Over the run, with ``G`` the checkpoint's ``global_step`` (trainer_state.json) and ``K`` the longest period
(:data:`MAX_PERIOD_STEPS` steps, or this run's period if longer): a refresh runs at most once per step, at a step
before ``G``, and schedules the next one period later, so ``period_index <= G``; ``period_index = 0`` (no refresh
yet) leaves ``next_refresh_step = 0`` and no offsets; else ``period_index <= next_refresh_step <= G - 1 + K``.
Non-finite counters: at most ``G`` skipped steps and ``period_index`` failed refreshes in a row.
"""

from __future__ import annotations

from typing import Any

import torch

from .argument_values import MAX_COUNT

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: The longest offset period the arguments accept in steps (`offset_period` up to this many steps).
MAX_PERIOD_STEPS = MAX_COUNT
COSINE_ROUNDING = 1e-6
COUNTERS = ("skipped_steps_in_a_row", "failed_refreshes_in_a_row")


def block_problem(t: int, block: dict[str, Any]) -> str | None:
    """Why block ``t``'s scalars (finite, of the right types) are not what training writes; ``None`` if they are."""
    block = {"reliability": 1.0, "delta_factor": 1.0, **block}  # the defaults of fields older states lack

    def field(name: str) -> str:
        return f"offset block {t}'s `{name}` is {block[name]!r}"

    for name in ("a", "c", "scale", "weight", "delta_factor"):
        if abs(block[name]) > FLOAT32_MAX:
            return f"{field(name)}, beyond what a float32 gradient holds ({FLOAT32_MAX:.3g})"
    for name in ("lam", "reliability"):
        if not 0.0 <= block[name] <= 1.0:
            return f"{field(name)}, outside [0, 1]"
    for name in ("c", "bias", "var", "offset_norm"):
        if block[name] < 0.0:
            return f"{field(name)}, below 0"
    if abs(block["cosine"]) > 1.0 + COSINE_ROUNDING:
        return f"{field('cosine')}, outside [-1, 1]"
    scale, weight, factor = block["scale"], block["weight"], block["delta_factor"]
    if scale != block["c"] * block["a"]:
        return f"{field('scale')}, not `c * a` = {block['c'] * block['a']!r}"
    if weight != block["c"] * block["lam"]:
        return f"{field('weight')}, not `c * lam` = {block['c'] * block['lam']!r}"
    if factor != 1.0 and not (weight != 0.0 and scale != 1.0 and factor == weight / (1.0 - scale)):
        return f"{field('delta_factor')}, neither 1.0 nor `weight / (1 - scale)`"
    return None


def run_problem(
    offset: dict[str, Any], counters: dict[str, int], global_step: int | None, period_steps: int | None
) -> str | None:
    """Why the offset's period count, its next refresh and the non-finite ``counters`` are not what a run reaching
    ``global_step`` (``None``: unknown) writes with periods of at most ``max(MAX_PERIOD_STEPS, period_steps)`` steps;
    ``None`` if they are."""
    index, next_step, blocks = offset["period_index"], offset["next_refresh_step"], offset["blocks"]
    if index == 0 and (next_step != 0 or blocks):
        held = [f"`offset.next_refresh_step` is {next_step}"] if next_step else []
        held += [f"{len(blocks)} blocks hold offsets"] if blocks else []
        return f"`offset.period_index` is 0 (no refresh yet), but {' and '.join(held)}"
    if global_step is not None and index > global_step:
        return f"`offset.period_index` is {index}, more refreshes than the checkpoint's {global_step} steps"
    if index > 0 and next_step < index:
        return (
            f"`offset.next_refresh_step` is {next_step}, but after {index} refreshes the next is due at step {index} "
            "or later"
        )
    if counters["failed_refreshes_in_a_row"] > index:
        return (
            f"`nonfinite.failed_refreshes_in_a_row` is {counters['failed_refreshes_in_a_row']}, more than the "
            f"{index} refreshes the offset state counts"
        )
    if global_step is None:
        return None
    longest = max(MAX_PERIOD_STEPS, period_steps or 0)
    if index > 0 and next_step > global_step - 1 + longest:
        return (
            f"`offset.next_refresh_step` is {next_step}, more than one offset period (at most {longest} steps) after "
            f"the checkpoint's step {global_step}"
        )
    if counters["skipped_steps_in_a_row"] > global_step:
        return (
            f"`nonfinite.skipped_steps_in_a_row` is {counters['skipped_steps_in_a_row']}, more than the checkpoint's "
            f"{global_step} steps"
        )
    return None
