"""How ``BPModifiedTrainingArguments`` reads a boolean or a number given as a Python value or as a string (from the
command line, a YAML or a JSON file), and the errors it raises: each names the argument, shows the value and says
what works; and the two arguments read from text of their own: ``offset_period`` and the hint for
``offset_micro_batch_size``."""

from __future__ import annotations

import argparse
import math
import numbers
import operator
import re
from typing import Any

MAX_COUNT = 2**31 - 1  # the largest count (steps, examples, blocks) an argument may hold
_TRUE = ("yes", "y", "true", "t", "on", "1")  # transformers' ``strtobool`` spellings
_FALSE = ("no", "n", "false", "f", "off", "0")
_PERIOD = re.compile(r"^\s*(?P<value>\d+(\.\d*)?|\.\d+)\s*(?P<unit>epochs?|steps?)?\s*$")


def shown(value: Any) -> str:
    """``repr(value)``, cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:45]}...{text[-10:]} ({len(text)} characters)"


def parse_bool(name: str, value: Any, optional: bool = False) -> bool | None:
    """An argument's boolean as the command line reads it (:class:`BooleanFlag`): ``True``/``False``, ``1``/``0``
    or a string ``"true"``/``"false"``, ``"yes"``/``"no"``, ``"t"``/``"f"``, ``"y"``/``"n"``, ``"on"``/``"off"``,
    ``"1"``/``"0"`` (any case); ``None`` where ``optional``. Anything else raises ``ValueError`` naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    accepted = "True, False" + (" or None (the default)" if optional else "")
    raise ValueError(
        f"`{name}` ({shown(value)}) must be {accepted}; strings are read as on the command line: "
        f"{'/'.join(_TRUE)} for True, {'/'.join(_FALSE)} for False."
    )


def command_line_bool(text: str) -> bool:
    """A boolean flag's value on the command line, spelled as :func:`parse_bool` reads it."""
    if text.strip().lower() in _TRUE + _FALSE:
        return text.strip().lower() in _TRUE
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a boolean: write {'/'.join(_TRUE)} for True, {'/'.join(_FALSE)} for False."
    )


class BooleanFlag(argparse.Action):
    """The command-line action of the boolean arguments (``field(metadata={"action": BooleanFlag})``): their value
    is read by :func:`command_line_bool`, so the command line takes every spelling a config file or Python may use.
    ``HfArgumentParser`` gives each boolean field its ``string_to_bool``, which refuses ``on``/``off``; this action
    replaces that type and keeps the rest (``--flag`` alone is ``True`` where the field has a boolean default). Not
    for a field that defaults to ``True``: the parser's ``--no_<field>`` complement would get this action too."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **{**kwargs, "type": command_line_bool})

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string=None
    ):
        setattr(namespace, self.dest, values)


def parse_int(name: str, value: Any, minimum: int, maximum: int, hint: str) -> int:
    """An argument's integer in ``[minimum, maximum]``: an ``int`` (not a ``bool``) or a string ``int()`` reads, as
    from the command line. A float, even a whole one, is refused: the argument counts something."""
    number = None
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    elif not isinstance(value, (bool, float)):
        try:
            number = operator.index(value)  # int and integer types of numpy / torch
        except TypeError:
            pass
    limits = f">= {minimum}" if maximum == MAX_COUNT else f"from {minimum} to {maximum}"
    if number is None:
        whole = isinstance(value, float) and math.isfinite(value) and value == int(value)
        fix = f"write `{name}={int(value)}`" if whole else hint
        raise ValueError(f"`{name}` ({shown(value)}) must be an integer {limits}; {fix}.")
    if number < minimum:
        raise ValueError(f"`{name}` ({shown(value)}) must be an integer {limits}; {hint}.")
    if number > maximum:
        raise ValueError(f"`{name}` ({shown(value)}) must be at most {maximum}; {hint}.")
    return number


def parse_float(name: str, value: Any, *, condition: str, hint: str) -> float:
    """An argument's real number: an ``int`` or ``float`` (not a ``bool``), or a string ``float()`` reads, as from
    the command line. NaN is always refused; the caller checks the range (``condition`` says it in the message)."""
    number = None
    try:
        if isinstance(value, str):
            number = float(value.strip())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
    except (ValueError, OverflowError):
        pass
    if number is None or math.isnan(number):
        raise ValueError(f"`{name}` ({shown(value)}) must be {condition}; {hint}.")
    return number


def parse_offset_period(period: str | float | int) -> tuple[float, str]:
    """Parse ``offset_period``: ``"epoch"``/``"1epoch"``/``"0.25epoch"`` (epochs) or ``"200"``/``"200steps"`` (steps).

    Returns ``(value, unit)`` with unit ``"epoch"`` or ``"step"``; raises ``ValueError`` with the accepted syntax.
    """
    text = str(period).strip().lower()
    if text in ("epoch", "epochs"):
        return 1.0, "epoch"
    match = _PERIOD.match(text)
    if match is None:
        raise ValueError(
            f"`offset_period` ({shown(period)}) is not understood: use a number of optimizer steps (`'200'` or "
            "`'200steps'`) or of epochs (`'epoch'`, `'1epoch'`, `'0.25epoch'`)."
        )
    value = float(match["value"])
    unit = "epoch" if (match["unit"] or "step").startswith("epoch") else "step"
    if value <= 0:
        raise ValueError(f"`offset_period` ({shown(period)}) must be positive, e.g. `'200'` or `'epoch'`.")
    if not value <= MAX_COUNT:  # also rejects a number of digits that float() turns into inf
        raise ValueError(
            f"`offset_period` ({shown(period)}) must be at most {MAX_COUNT} {unit}s, e.g. `'200'` or `'epoch'`; "
            "`bp_modified=False` trains without the offset."
        )
    if unit == "step" and value != int(value):
        raise ValueError(
            f"`offset_period` ({shown(period)}) counts optimizer steps and must be a whole number, e.g. "
            f"`'{max(1, round(value))}'`."
        )
    return value, unit


def divisor_hint(size: int, micro: int) -> str:
    """A value of ``offset_micro_batch_size`` that passes the checks: the divisor of ``offset_batch_size`` (``size``)
    nearest the one given (``micro``) that leaves at least two micro-batches."""
    divisors = set()
    for d in range(1, math.isqrt(size) + 1):
        if size % d == 0:
            divisors.update((d, size // d))
    usable = [d for d in sorted(divisors) if size // d >= 2]  # never empty: size >= 2, so 1 is usable
    near = min(usable, key=lambda d: abs(d - micro))
    return f"`offset_micro_batch_size={near}`"
