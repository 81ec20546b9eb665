"""What a checkpoint holds besides the model and the optimizer: the auxiliary heads and the offset state.

Two files, written by the main process, neither of which can run code when read:

- ``bpmod_state.safetensors``: every tensor; the auxiliary heads' state dict under ``aux_heads.<key>``, the offset
  of block ``t`` (one tensor per trainable parameter of the block) under ``offset.<t>.<i>``.
- ``bpmod_state.json``: every plain value (format version, ``local_horizon``, ``block_granularity``,
  ``bp_modified``, the offset's period and each block's scalars, which blocks hold an offset and of how many
  tensors, the non-finite guard's counters), the SHA-256 of the safetensors file, and the SHA-256 of its own
  content (:func:`state_json_digest`), so that no value of either file changes unnoticed. It is written last: a
  checkpoint without it has no state. Format 1 (no checksum of its own, no counters) is still read.

Checkpoints of earlier releases hold ``bpmod_state.pt``, which is read with ``torch.load(weights_only=True)`` only
(tensors and plain values; never a pickled object). Every file is read only if it is a regular file within a size
bound (:func:`hf_bpmod.checkpoint_files.read_regular_file`). Whatever the format, the state is checked before any
of it (or the optimizer's state) is loaded: structure, checksums, keys, shapes and dtypes against the model, finite
values, and values that training can produce (:mod:`hf_bpmod.state_values`). A damaged or mismatched state is
refused with an error naming the file; ``rebuild_bpmod_state=True`` resumes with fresh auxiliary heads and offsets
instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import safetensors.torch
import torch
from transformers.utils import logging

from . import state_values
from ._files import write_atomically
from .checkpoint_files import (
    UnreadableFileError,
    checkpoint_global_step,
    newest_complete_checkpoint,
    read_regular_file,
)
from .offset import BlockOffset

logger = logging.get_logger(__name__)

STATE_JSON = "bpmod_state.json"
STATE_TENSORS = "bpmod_state.safetensors"
LEGACY_STATE = "bpmod_state.pt"
FORMAT = "hf_bpmod.bpmod_state"
FORMAT_VERSION = 2
#: The JSON's fields in each format version read.
FIELDS = {
    1: {"format", "version", "local_horizon", "block_granularity", "bp_modified", "offset", "tensors"},
    2: {"format", "version", "local_horizon", "block_granularity", "bp_modified", "offset", "nonfinite", "tensors",
        "sha256"},
}  # fmt: skip
#: The largest bpmod_state.json read (a few hundred bytes per block).
MAX_JSON_BYTES = 8 * 2**20

_BLOCK_FIELDS = {f.name: f for f in dataclasses.fields(BlockOffset) if f.name != "delta"}
_BOOL_FIELDS = {"capped"}


class BPModStateError(ValueError):
    """A checkpoint's auxiliary heads and offset state cannot be resumed from (damaged, or of another model)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(
            f"{path}: {problem}. The auxiliary heads and offset state of this checkpoint cannot be resumed from. "
            "Resume from another checkpoint, or pass `rebuild_bpmod_state=True` to resume the model and optimizer "
            "with fresh auxiliary heads and offsets (the offset is refreshed at the next step)."
        )


class MissingBPModStateError(BPModStateError, FileNotFoundError):
    """A checkpoint's auxiliary heads and offset state are missing."""


# ---------------------------------------------------------------------------------------------------- writing
def save_bpmod_state(state: dict[str, Any], checkpoint: str) -> None:
    """Write ``state`` (as ``BPModifiedTrainer.bpmod_state_dict`` returns it) into ``checkpoint``: the tensors,
    then the JSON that describes them (each atomically, the JSON last)."""
    json_path = os.path.join(checkpoint, STATE_JSON)
    if os.path.exists(json_path):  # an interrupted rewrite must not pair the old description with new tensors
        os.remove(json_path)
    tensors = {f"aux_heads.{k}": v for k, v in state["aux_heads"].items()}
    blocks = []
    for t, block in enumerate(state["offset"]["blocks"]):
        delta = block.get("delta")
        for i, d in enumerate(delta or []):
            tensors[f"offset.{t}.{i}"] = d
        entry = {k: (bool(v) if k in _BOOL_FIELDS else float(v)) for k, v in block.items() if k != "delta"}
        blocks.append({**entry, "delta_tensors": None if delta is None else len(delta)})
    # safetensors refuses tensors that share memory (the views of one offset vector): each is written from a copy
    data = safetensors.torch.save(
        {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}
    )
    write_atomically(os.path.join(checkpoint, STATE_TENSORS), data)
    counters = state.get("nonfinite") or {}
    description = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "local_horizon": state["local_horizon"],
        "block_granularity": state["block_granularity"],
        "bp_modified": bool(state["bp_modified"]),
        "offset": {
            "period_index": state["offset"]["period_index"],
            "next_refresh_step": state["offset"]["next_refresh_step"],
            "blocks": blocks,
        },
        "nonfinite": {name: int(counters.get(name, 0)) for name in state_values.COUNTERS},
        "tensors": {"file": STATE_TENSORS, "sha256": hashlib.sha256(data).hexdigest()},
    }
    description["sha256"] = state_json_digest(description)
    write_atomically(json_path, (json.dumps(description, indent=1, allow_nan=False) + "\n").encode())


def state_json_digest(description: dict[str, Any]) -> str:
    """The SHA-256 that bpmod_state.json records of its own content: of its canonical JSON (sorted keys, no
    whitespace, as ``json.dumps`` writes it) without the ``sha256`` field. It covers the tensors' SHA-256 too."""
    content = {k: v for k, v in description.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- reading
def _read(path: str, max_bytes: int | None, bound: str) -> bytes:
    """:func:`~hf_bpmod.checkpoint_files.read_regular_file`, refusing with :class:`BPModStateError`."""
    try:
        return read_regular_file(path, max_bytes, bound)
    except UnreadableFileError as e:
        raise BPModStateError(path, e.problem) from None


def _count(path: str, value: Any, what: str) -> int:
    if _expect(path, value, int, what) < 0:
        raise BPModStateError(path, f"{what} is {value}, below 0")
    return value


def _counters(path: str, counters: Any) -> dict[str, int]:
    """The guard's counters as saved (zeros where a state predates them)."""
    if counters is None:
        return dict.fromkeys(state_values.COUNTERS, 0)
    _expect(path, counters, dict, "`nonfinite`")
    if set(counters) != set(state_values.COUNTERS):
        raise BPModStateError(
            path, f"`nonfinite` has fields {sorted(counters)}, not {', '.join(state_values.COUNTERS)}"
        )
    return {name: _count(path, counters[name], f"`nonfinite.{name}`") for name in state_values.COUNTERS}


def _expect(path: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """``value`` if it is of type ``kind`` (a bool is no number here), else the error naming ``path``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BPModStateError(path, f"{what} is {value!r} ({type(value).__name__}), expected {names}")
    return value


def _block_scalars(path: str, block: Any, t: int, extra: set[str]) -> dict[str, Any]:
    """Block ``t``'s scalars, checked: known fields only, the required ones present, numbers finite."""
    _expect(path, block, dict, f"offset block {t}")
    unknown = set(block) - set(_BLOCK_FIELDS) - extra
    missing = {n for n, f in _BLOCK_FIELDS.items() if f.default is dataclasses.MISSING and n not in block}
    if unknown or missing:
        raise BPModStateError(path, f"offset block {t} has unknown fields {sorted(unknown)}, lacks {sorted(missing)}")
    scalars = {}
    for name in set(block) & set(_BLOCK_FIELDS):
        value = block[name]
        if name in _BOOL_FIELDS:
            scalars[name] = _expect(path, value, bool, f"offset block {t}'s `{name}`")
            continue
        _expect(path, value, (int, float), f"offset block {t}'s `{name}`")
        if not math.isfinite(value):
            raise BPModStateError(path, f"offset block {t}'s `{name}` is {value!r}, not a finite number")
        scalars[name] = float(value)
    return scalars


def _check_finite(path: str, name: str, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise BPModStateError(path, f"`{name}` is a {type(tensor).__name__}, not a tensor")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BPModStateError(path, f"`{name}` holds non-finite values (NaN or infinity)")
    return tensor


def _read_json_state(checkpoint: str, max_tensor_bytes: int | None) -> dict[str, Any]:
    json_path = os.path.join(checkpoint, STATE_JSON)
    tensors_path = os.path.join(checkpoint, STATE_TENSORS)
    try:
        raw = _read(json_path, MAX_JSON_BYTES, f"a {STATE_JSON} can take")
    except FileNotFoundError:  # a link to nothing
        raise MissingBPModStateError(json_path, "the file is missing (a link to nothing)") from None
    try:
        desc = json.loads(raw.decode("utf-8"), parse_constant=lambda c: float(c))
    except (ValueError, RecursionError) as e:  # undecodable bytes, malformed or absurdly nested JSON
        raise BPModStateError(json_path, f"not valid JSON ({e})") from None
    _expect(json_path, desc, dict, "the file's content")
    version = desc.get("version")
    fields = FIELDS.get(version, FIELDS[FORMAT_VERSION]) if isinstance(version, int) else FIELDS[FORMAT_VERSION]
    if set(desc) != fields:
        missing, unknown = sorted(fields - set(desc)), sorted(set(desc) - fields)
        raise BPModStateError(json_path, f"fields {missing} are missing, {unknown} unknown")
    if desc["format"] != FORMAT or version not in FIELDS or isinstance(version, bool):
        raise BPModStateError(
            json_path,
            f"format {desc['format']!r} version {version!r} is not {FORMAT!r} version {FORMAT_VERSION} or earlier "
            "(a newer hf_bpmod may read it)",
        )
    if version >= 2 and desc["sha256"] != state_json_digest(desc):
        raise BPModStateError(
            json_path,
            "its content's SHA-256 is not the one recorded in it when it was written (field `sha256`): the file was "
            "changed",
        )
    _expect(json_path, desc["local_horizon"], int, "`local_horizon`")
    _expect(json_path, desc["block_granularity"], str, "`block_granularity`")
    _expect(json_path, desc["bp_modified"], bool, "`bp_modified`")
    offset = _expect(json_path, desc["offset"], dict, "`offset`")
    if set(offset) != {"period_index", "next_refresh_step", "blocks"}:
        raise BPModStateError(
            json_path, f"`offset` has fields {sorted(offset)}, not period_index, next_refresh_step, blocks"
        )
    for name in ("period_index", "next_refresh_step"):
        _count(json_path, offset[name], f"`offset.{name}`")
    counters = _counters(json_path, desc.get("nonfinite"))
    blocks = []
    for t, block in enumerate(_expect(json_path, offset["blocks"], list, "`offset.blocks`")):
        scalars = _block_scalars(json_path, block, t, {"delta_tensors"})
        n = block.get("delta_tensors")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise BPModStateError(json_path, f"offset block {t}'s `delta_tensors` is {n!r}, not a count or null")
        blocks.append((scalars, n))
    tensors_info = _expect(json_path, desc["tensors"], dict, "`tensors`")
    if tensors_info.get("file") != STATE_TENSORS or not isinstance(tensors_info.get("sha256"), str):
        raise BPModStateError(json_path, f"`tensors` is {tensors_info!r}, not the file name and its sha256")

    try:
        data = _read(tensors_path, max_tensor_bytes, "this model's auxiliary heads and offsets can take")
    except FileNotFoundError:
        raise MissingBPModStateError(tensors_path, f"the file is missing (described by {STATE_JSON})") from None
    if hashlib.sha256(data).hexdigest() != tensors_info["sha256"]:
        raise BPModStateError(
            tensors_path, f"its SHA-256 is not the one {STATE_JSON} recorded when it was written: the file was changed"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # the parser's own error types differ across safetensors releases
        raise BPModStateError(tensors_path, f"not a readable safetensors file ({type(e).__name__}: {e})") from None
    aux_keys = {k for k in tensors if k.startswith("aux_heads.")}
    described = {f"offset.{t}.{i}" for t, (_, n) in enumerate(blocks) if n for i in range(min(n, len(tensors)))}
    unexpected = set(tensors) - aux_keys - described
    missing = sum(n or 0 for _, n in blocks) - len(described & set(tensors))
    if unexpected or missing:
        raise BPModStateError(
            tensors_path, f"{missing} offset tensors are missing, {sorted(unexpected)[:5]} are unexpected"
        )
    return {
        "aux_heads": {k[len("aux_heads.") :]: tensors[k] for k in sorted(aux_keys)},
        "offset": {
            "period_index": offset["period_index"],
            "next_refresh_step": offset["next_refresh_step"],
            "blocks": [
                {**s, "delta": None if n is None else [tensors[f"offset.{t}.{i}"] for i in range(n)]}
                for t, (s, n) in enumerate(blocks)
            ],
        },
        "nonfinite": counters,
        "local_horizon": desc["local_horizon"],
        "block_granularity": desc["block_granularity"],
        "bp_modified": desc["bp_modified"],
    }


def _read_legacy_state(checkpoint: str, max_tensor_bytes: int | None) -> dict[str, Any]:
    """``bpmod_state.pt`` of earlier releases: tensors and plain values, loaded without unpickling any object."""
    path = os.path.join(checkpoint, LEGACY_STATE)
    try:
        raw = _read(path, max_tensor_bytes, "this model's auxiliary heads and offsets can take")
    except FileNotFoundError:  # a link to nothing
        raise MissingBPModStateError(path, "the file is missing (a link to nothing)") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler and zip reader raise many types
        raise BPModStateError(
            path,
            f"not a state file of tensors and plain values that can be loaded safely ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it was not unpickled",
        ) from None
    _expect(path, state, dict, "the file's content")
    for name in ("aux_heads", "offset", "local_horizon", "block_granularity"):
        if name not in state:
            raise BPModStateError(path, f"`{name}` is missing")
    aux = _expect(path, state["aux_heads"], dict, "`aux_heads`")
    offset = _expect(path, state["offset"], dict, "`offset`")
    for name in ("period_index", "next_refresh_step"):
        _count(path, offset.get(name), f"`offset.{name}`")
    blocks = []
    for t, block in enumerate(_expect(path, offset.get("blocks"), list, "`offset.blocks`")):
        scalars = _block_scalars(path, block, t, {"delta"})
        delta = block.get("delta")
        if delta is not None:
            delta = [_check_finite(path, f"offset.blocks[{t}].delta[{i}]", d) for i, d in enumerate(list(delta))]
        blocks.append({**scalars, "delta": delta})
    _expect(path, state["local_horizon"], int, "`local_horizon`")
    bp_modified = state.get("bp_modified")
    if bp_modified is not None:
        _expect(path, bp_modified, bool, "`bp_modified`")
    return {
        "aux_heads": {str(k): _check_finite(path, f"aux_heads.{k}", v) for k, v in aux.items()},
        "offset": {
            "period_index": offset["period_index"],
            "next_refresh_step": offset["next_refresh_step"],
            "blocks": blocks,
        },
        "nonfinite": _counters(path, state.get("nonfinite")),
        "local_horizon": state["local_horizon"],
        "block_granularity": state["block_granularity"],
        "bp_modified": bp_modified,
    }


def read_bpmod_state(
    checkpoint: str, *, max_tensor_bytes: int | None = None, period_steps: int | None = None
) -> tuple[dict[str, Any], str]:
    """The state saved in ``checkpoint`` (on the CPU) and the file it came from, checked for structure, checksums,
    finite values and values training can produce (:mod:`hf_bpmod.state_values`; ``period_steps``: this run's
    offset period, if known); :class:`BPModStateError` if damaged, ``FileNotFoundError`` if absent. A tensor file
    larger than ``max_tensor_bytes`` (``None``: any size) is refused unread."""
    json_path = os.path.join(checkpoint, STATE_JSON)
    tensors_path = os.path.join(checkpoint, STATE_TENSORS)
    if os.path.lexists(json_path):
        state, path = _read_json_state(checkpoint, max_tensor_bytes), json_path
        for k, v in state["aux_heads"].items():
            _check_finite(tensors_path, f"aux_heads.{k}", v)
        for t, block in enumerate(state["offset"]["blocks"]):
            for i, d in enumerate(block["delta"] or []):
                _check_finite(tensors_path, f"offset.{t}.{i}", d)
    elif os.path.lexists(tensors_path):
        raise MissingBPModStateError(
            json_path, f"the file is missing next to {STATE_TENSORS} (the save was interrupted before it was written)"
        )
    elif os.path.lexists(os.path.join(checkpoint, LEGACY_STATE)):
        state, path = _read_legacy_state(checkpoint, max_tensor_bytes), os.path.join(checkpoint, LEGACY_STATE)
    else:
        saved = set(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else set()
        if not any(name.startswith("optimizer") for name in saved):
            raise FileNotFoundError(
                f"{checkpoint} holds no training state (no optimizer state, no {STATE_JSON} with the auxiliary heads "
                "and offsets), as `save_only_model=True` writes, so it cannot be resumed. Start a new run from its "
                "weights (`from_pretrained`), or save full checkpoints to resume from."
            )
        raise MissingBPModStateError(
            json_path,
            f"the file is missing (nor is there {STATE_TENSORS} or an earlier release's {LEGACY_STATE}): the "
            "checkpoint was not written by BPModifiedTrainer, or its state files were lost. If it was not, start a "
            "new run instead of resuming from it",
        )
    problem = next(
        (p for t, block in enumerate(state["offset"]["blocks"]) if (p := state_values.block_problem(t, block))), None
    ) or state_values.run_problem(
        state["offset"], state["nonfinite"], checkpoint_global_step(checkpoint), period_steps
    )
    if problem:
        raise BPModStateError(path, f"{problem}: training never writes that")
    return state, path


def last_complete_checkpoint(output_dir: str, flag: str, warn: Callable[[str], None] = logger.warning) -> str | None:
    """The newest checkpoint of ``output_dir`` that holds everything a resume reads (this package's state
    included), each newer incomplete one skipped with ``warn``; ``None`` if there is no checkpoint folder;
    ``FileNotFoundError`` if none is complete (``flag``: how the user asked for it). See
    :func:`hf_bpmod.checkpoint_files.newest_complete_checkpoint`."""
    return newest_complete_checkpoint(output_dir, flag, (STATE_JSON, LEGACY_STATE), warn)


def state_size_bound(aux_heads: torch.nn.Module, block_params: list[list]) -> int:
    """The most bytes a state file of these heads and blocks takes: twice their tensors' bytes (an offset per
    trainable parameter) plus each tensor's entry in the file's header, with a margin."""
    tensors = [*aux_heads.state_dict().values(), *(p for params in block_params for p in params)]
    return 2 * sum(t.numel() * t.element_size() for t in tensors) + 4096 * len(tensors) + 2**20


def check_against_model(
    state: dict[str, Any], path: str, aux_heads: torch.nn.Module, block_params: list[list]
) -> None:
    """The state's keys, shapes and dtypes are those of ``aux_heads`` and of the blocks' trainable parameters."""
    expected = aux_heads.state_dict()
    got = state["aux_heads"]
    if set(got) != set(expected):
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise BPModStateError(
            path, f"the auxiliary heads lack {missing[:5]} and have unexpected {unexpected[:5]}: another model's state"
        )
    for key, want in expected.items():
        have = got[key]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise BPModStateError(
                path,
                f"auxiliary head `{key}` is {have.dtype} {tuple(have.shape)}, this model's is {want.dtype} "
                f"{tuple(want.shape)}: another model's state",
            )
    blocks = state["offset"]["blocks"]
    if len(blocks) not in (0, len(block_params)):
        raise BPModStateError(path, f"the offset has {len(blocks)} blocks, this model {len(block_params)}")
    for t, (block, params) in enumerate(zip(blocks, block_params)):
        delta = block["delta"]
        if delta is None:
            continue
        if len(delta) != len(params):
            raise BPModStateError(
                path, f"the offset of block {t} has {len(delta)} tensors, the block {len(params)} parameters"
            )
        for i, (d, p) in enumerate(zip(delta, params)):
            if d.shape != p.shape or d.dtype != p.dtype:
                raise BPModStateError(
                    path,
                    f"the offset of block {t}, tensor {i}, is {d.dtype} {tuple(d.shape)}, the parameter's "
                    f"{p.dtype} {tuple(p.shape)}: another model's state",
                )


def load_bpmod_state(
    checkpoint: str, aux_heads: torch.nn.Module, block_params: list[list], args: Any, period_steps: int | None = None
) -> dict[str, Any] | None:
    """The state saved in ``checkpoint``, checked against ``aux_heads``, the blocks' trainable parameters
    (``block_params``), the block split of ``args`` and this run's offset period (``period_steps``, if known) before
    anything is loaded, with the offsets on their parameters' devices. With ``args.rebuild_bpmod_state``, ``None``
    for a missing or damaged state: the caller keeps its heads, drops their optimizer state and starts a fresh offset
    (refreshed at the next step)."""
    try:
        bound = state_size_bound(aux_heads, block_params)
        state, path = read_bpmod_state(checkpoint, max_tensor_bytes=bound, period_steps=period_steps)
        check_block_split(state, args)
        check_against_model(state, path, aux_heads, block_params)
    except BPModStateError as e:
        if not args.rebuild_bpmod_state:
            raise
        (logger.warning if args.should_log else logger.info)(
            f"rebuild_bpmod_state=True: {e.path} cannot be resumed from ({e.problem}); "
            "resuming the model and optimizer from the checkpoint with fresh auxiliary heads (and their optimizer "
            "state) and a fresh offset, refreshed at the next step."
        )
        return None
    for block, params in zip(state["offset"]["blocks"], block_params):
        if block["delta"] is not None:
            block["delta"] = [d.to(p.device) for d, p in zip(block["delta"], params)]
    return state


def forget_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> None:
    """Drop ``optimizer``'s state (moments, step counts) of ``params``, which start afresh."""
    for p in params:
        optimizer.state.pop(p, None)


def check_block_split(state: dict[str, Any], args: Any) -> None:
    """A checkpoint resumes only under the block split and horizon it was trained with: others have other
    auxiliary heads (and so other optimizer parameter groups)."""
    for name in ("local_horizon", "block_granularity"):
        saved, now = state.get(name), getattr(args, name)
        if saved != now:
            raise ValueError(
                f"The checkpoint was trained with `{name}={saved!r}`, this run has `{name}={now!r}`: resume with "
                f"`{name}={saved!r}`, or start a new run from the checkpoint's weights (`from_pretrained`) "
                "instead of resuming."
            )


def saved_method(state: dict[str, Any]) -> bool:
    """Whether the checkpoint trained with the offset (a checkpoint without the record did if it ever refreshed)."""
    saved = state.get("bp_modified")
    if saved is None:
        saved = state["offset"].get("period_index", 0) > 0
    return bool(saved)
