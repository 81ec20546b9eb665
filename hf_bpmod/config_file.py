"""Arguments from a YAML or JSON config file, each value meaning what the same text means on the command line.

Rules of :func:`parse_config_file` (``HfArgumentParser.parse_yaml_file`` reads YAML 1.1, where ``017`` is 15,
``1:30`` is 90, ``off`` is False for any argument and ``1e-3`` is a string):

* The file holds one mapping of argument names (without dashes) to values; a name given twice is refused.
* A value written at the top level as text (YAML: any scalar, quoted or not; JSON: a string) is read as the same text
  after its flag: through the parser's type for that flag (``017`` is 17, ``1e-3`` is 0.001, ``no`` is False for a
  boolean and ``"no"`` for a string, ``1:30`` stays ``"1:30"``), and refused where the command line refuses it,
  naming the argument and the file. The arguments ``BPModifiedTrainingArguments`` adds get the text itself: their
  checks read it as the command line does. A list of such texts for a flag that takes several values is read item
  by item. YAML's ``null``, ``~`` or nothing is ``None``.
* Other values (a mapping such as ``gradient_checkpointing_kwargs``, JSON's numbers and booleans) are taken as they
  are, YAML's under the YAML 1.2 core schema: ``true``/``false``, decimal, ``0o`` and ``0x`` integers, floats,
  ``.inf`` and ``.nan``; everything else (``yes``, ``off``, ``1:30``, dates) a string.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from .argument_values import shown
from .config import ARGUMENT_CHECKS

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_MERGE = "tag:yaml.org,2002:merge"
_TAKEN_AS_IS = object()  # a value with no text as written: taken as parsed


class _CoreSchemaLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects) with YAML 1.2's core schema in place of YAML 1.1's implicit types,
    refusing a key given twice in a mapping."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        _refuse_repeated_keys(node, self.name)
        return super().construct_mapping(node, deep=deep)


for _tag, _pattern, _first in (
    ("null", _NULL.pattern, "~nN"),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
    ("merge", r"^(?:<<)$", "<"),
):
    _CoreSchemaLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), [*_first])
_CoreSchemaLoader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, [""])


def _construct_int(loader: _CoreSchemaLoader, node: ScalarNode) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    try:
        return int(text[2:] if base != 10 else text, base)
    except ValueError:
        raise ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


def _construct_float(loader: _CoreSchemaLoader, node: ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    try:
        return special[text] if text in special else float(text)
    except ValueError:
        raise ConstructorError(None, None, f"{text!r} is not a number", node.start_mark) from None


def _construct_bool(loader: _CoreSchemaLoader, node: ScalarNode) -> bool:
    text = loader.construct_scalar(node)
    if text.lower() not in ("true", "false"):
        raise ConstructorError(None, None, f"{text!r} is not true or false", node.start_mark)
    return text.lower() == "true"


_CoreSchemaLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_CoreSchemaLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_CoreSchemaLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def _refuse_repeated_keys(node: MappingNode, path: str) -> None:
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, ScalarNode) and key.tag != _MERGE:
            if key.value in seen:
                raise ValueError(f"{path}: `{key.value}` is given twice (line {key.start_mark.line + 1}); keep one.")
            seen.add(key.value)


def _as_written(node: Any) -> Any:
    """The text of a top-level YAML scalar (``None`` for a null), or a list of such texts, or ``_TAKEN_AS_IS``."""
    if isinstance(node, ScalarNode):
        return None if node.style is None and _NULL.match(node.value) else node.value
    if isinstance(node, SequenceNode) and all(isinstance(item, ScalarNode) for item in node.value):
        return [_as_written(item) for item in node.value]
    return _TAKEN_AS_IS


def _load(path: str) -> dict[str, tuple[Any, Any]]:
    """``{name: (as written, as parsed)}`` for each top-level entry of the YAML or JSON file ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entries: dict[str, tuple[Any, Any]] | None = None
    if path.endswith(".json"):

        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [key for key, _ in pairs]
            repeated = next((key for key in keys if keys.count(key) > 1), None)
            if repeated is not None:
                raise ValueError(f"{path}: `{repeated}` is given twice; keep one.")
            return dict(pairs)

        config = json.loads(text, object_pairs_hook=unique)
        if isinstance(config, dict):
            entries = {key: (value, value) for key, value in config.items()}
    else:
        loader = _CoreSchemaLoader(text)
        loader.name = path
        try:
            node = loader.get_single_node()
            if node is None:  # an empty file
                entries = {}
            elif isinstance(node, MappingNode):
                _refuse_repeated_keys(node, path)
                loader.flatten_mapping(node)  # YAML merge keys (`<<: *defaults`)
                entries = {
                    loader.construct_object(key, deep=True): (_as_written(value), loader.construct_object(value, True))
                    for key, value in node.value
                }
        finally:
            loader.dispose()
    if entries is None:
        raise ValueError(
            f"{path} must hold a mapping of argument names to values, one `name: value` per line (e.g. "
            "`learning_rate: 1e-3`); it holds something else."
        )
    return entries


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The arguments in the YAML or JSON file ``path`` as parsed (YAML 1.2's core schema), before any flag's type."""
    return {key: parsed for key, (_, parsed) in _load(os.fspath(path)).items()}


def parse_config_file(parser: Any, path: str | os.PathLike, allow_extra_keys: bool = False) -> tuple[Any, ...]:
    """The dataclasses of ``parser`` (an ``HfArgumentParser``) from the YAML or JSON file ``path``, each value read
    as the module's rules say; in place of ``parser.parse_yaml_file`` / ``parser.parse_json_file``."""
    path = os.fspath(path)
    flags: dict[str, argparse.Action] = {}
    for action in parser._actions:
        flags.setdefault(action.dest, action)  # the field's own flag comes before its `--no_<field>` complement
    values = {}
    for key, (written, parsed) in _load(path).items():
        action = flags.get(key)
        if written is _TAKEN_AS_IS or (written is not None and not isinstance(written, (str, list))):
            values[key] = parsed
        elif key in ARGUMENT_CHECKS:  # BPModifiedTrainingArguments reads the text as the command line does
            values[key] = written if isinstance(written, str) else parsed
        elif action is None or action.type is None or written is None:
            values[key] = parsed if written is not None else None
        elif isinstance(written, str):
            values[key] = _read_as_flag(action, key, written, path)
        elif action.nargs in ("+", "*") and all(isinstance(item, str) for item in written):
            values[key] = [_read_as_flag(action, key, item, path) for item in written]
        else:
            values[key] = parsed
    return tuple(parser.parse_dict(values, allow_extra_keys=allow_extra_keys))


def _read_as_flag(action: argparse.Action, key: str, text: str, path: str) -> Any:
    """``text`` through the type of ``--key`` (and its choices), as the command line reads it."""
    example = ""
    if action.default not in (None, argparse.SUPPRESS) and not isinstance(action.default, list):
        example = f", e.g. `{key}: {action.default}` (the default)"
    try:
        value = action.type(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
        kind = getattr(action.type, "__name__", "value")
        reason = str(error).rstrip(".") if isinstance(error, argparse.ArgumentTypeError) else f"not a valid {kind}"
        raise ValueError(
            f"`{key}` ({shown(text)}) in {path} is refused, as the command line refuses `--{key} {text}`: {reason}. "
            f"Write a value that flag takes{example}."
        ) from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(
            f"`{key}` ({shown(text)}) in {path} must be one of {', '.join(map(str, action.choices))}, as "
            f"`--{key}` on the command line{example}."
        )
    return value
