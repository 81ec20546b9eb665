"""``BPModifiedTrainingArguments``: ``TrainingArguments`` plus the settings of local learning and of the offset."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from transformers import TrainingArguments

from .adapters.base import BlockGranularity
from .argument_values import (
    MAX_COUNT,
    BooleanFlag,
    divisor_hint,
    parse_bool,
    parse_float,
    parse_int,
    parse_offset_period,
    shown,
)
from .compat import non_reentrant_checkpointing, sync_activation_checkpointing_kwargs
from .offset_pass import OffsetSettings
from .run_files import length_problem, run_file_owner

GRANULARITIES: tuple[str, ...] = get_args(BlockGranularity)
SCALING_MODES = ("aligned", "optimal", "bias_only", "fixed")
#: The largest ``|offset_fixed_a|``: it multiplies the gradients, which must stay finite in float32.
MAX_FIXED_A = 1e6
SEED_RANGE = (-(2**63), 2**64 - 1)  # what ``torch.manual_seed`` accepts


def check_log_file(value: Any, output_dir: str | None) -> str:
    """``offset_log_file``, normalised: a non-empty relative file path that stays inside ``output_dir``, is none of
    the run's own files and is not too long for file systems (:mod:`hf_bpmod.run_files`)."""
    hint = "give a file name relative to `output_dir`, e.g. `'bpmod_offsets.jsonl'` or `'logs/bpmod_offsets.jsonl'`"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(f"`offset_log_file` ({shown(value)}) must be a non-empty file name; {hint}.")
    if os.path.isabs(value) or os.path.splitdrive(value)[0] or value.startswith(("/", "\\")):
        raise ValueError(
            f"`offset_log_file` ({shown(value)}) must be relative: the log is written inside `output_dir`; {hint}."
        )
    normal = os.path.normpath(value)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise ValueError(
            f"`offset_log_file` ({shown(value)}) must stay inside `output_dir` (no `..` leading out of it); {hint}."
        )
    if value.endswith(("/", os.sep)) or normal == os.curdir:
        raise ValueError(f"`offset_log_file` ({shown(value)}) names a folder, not a file; {hint}.")
    owner = run_file_owner(normal)
    if owner is not None:
        raise ValueError(
            f"`offset_log_file` ({shown(value)}) is or lies inside {owner[0]} in `output_dir` (`{owner[1]}`): the "
            f"log would overwrite it or be deleted with it; {hint}."
        )
    too_long = length_problem(normal, output_dir or "trainer_output")  # transformers >= 5 defaults to it
    if too_long is not None:
        raise ValueError(f"`offset_log_file` ({shown(value)}) {too_long}; {hint}.")
    return normal


# ---------------------------------------------------------------------------------------- one check per argument
#: ``check(name, value, args)`` returns the value given for the argument ``name``, normalised to the field's type,
#: or raises a ``ValueError`` that names the argument, shows the value and gives one that works. ``args`` holds the
#: arguments checked before it (already normalised), for a default or a limit that depends on one of them.
Check = Callable[[str, Any, "BPModifiedTrainingArguments"], Any]


def _boolean(optional: bool = False) -> Check:
    """A boolean as the command line reads it (:func:`parse_bool`); ``None`` stays ``None`` where ``optional``."""
    return lambda name, value, args: parse_bool(name, value, optional)


def _count(minimum: int, hint: str) -> Check:
    """An integer from ``minimum`` to ``MAX_COUNT`` (:func:`parse_int`)."""
    return lambda name, value, args: parse_int(name, value, minimum, MAX_COUNT, hint)


def _block_granularity(name: str, value: Any, args: BPModifiedTrainingArguments) -> str:
    if not isinstance(value, str) or value not in GRANULARITIES:
        raise ValueError(
            f"`block_granularity` ({shown(value)}) must be 'layer' (one block per residual layer), 'layer+stem' (the "
            "same, with the ResNet stem as a block of its own) or 'stage' (one block per ResNet stage)."
        )
    return value


def _offset_batch_size(name: str, value: Any, args: BPModifiedTrainingArguments) -> int | None:
    """``B'``; unset (``None``): chosen from the data when the trainer meets the training set
    (:func:`hf_bpmod.offset_controller.default_sample_size`)."""
    if value is None:
        return None
    return parse_int(
        name,
        value,
        2,
        MAX_COUNT,
        "B' is the number of examples per offset refresh, e.g. 320, or leave it unset to have it chosen from the data",
    )


def _offset_micro_batch_size(name: str, value: Any, args: BPModifiedTrainingArguments) -> int | None:
    """``b'``, which must split ``offset_batch_size`` (checked before it), when given, into at least two
    micro-batches; unset (``None``): the paper's 8 where ``offset_batch_size`` is given, else chosen with it."""
    size = args.offset_batch_size
    if value is None and size is None:
        return None
    given = value is not None
    micro = (
        parse_int(name, value, 1, MAX_COUNT, "b' is the micro-batch size of the offset pass, e.g. 8") if given else 8
    )
    if size is None:  # B' chosen from the data in whole micro-batches, at least two
        return micro
    if size % micro:
        raise ValueError(
            f"`offset_micro_batch_size` ({micro}) must divide `offset_batch_size` ({size}); e.g. use "
            f"{divisor_hint(size, micro)}."
        )
    if size // micro < 2:
        raise ValueError(
            f"`offset_batch_size` ({size}) must hold at least two micro-batches of `offset_micro_batch_size` "
            f"({micro}) to estimate the gradient variance; e.g. use {divisor_hint(size, micro)}."
        )
    return micro if given else None


def _offset_period(name: str, value: Any, args: BPModifiedTrainingArguments) -> str | int | float:
    """``K``, kept as given; parsed here, once, into ``args._checked_offset_period`` for :meth:`offset_settings`."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(
            f"`offset_period` ({shown(value)}) must be a string such as `'200'` or `'200steps'` (optimizer steps) or "
            "`'epoch'`, `'1epoch'`, `'0.25epoch'` (epochs)."
        )
    args._checked_offset_period = (value, parse_offset_period(value))
    return value


def _offset_scaling(name: str, value: Any, args: BPModifiedTrainingArguments) -> str:
    if not isinstance(value, str) or value not in SCALING_MODES:
        raise ValueError(f"`offset_scaling` ({shown(value)}) must be one of {SCALING_MODES}.")
    return value


def _offset_reliability(name: str, value: Any, args: BPModifiedTrainingArguments) -> bool:
    """Unset: on for ``offset_scaling="aligned"``, off for the others."""
    value = parse_bool(name, value, optional=True)
    return args.offset_scaling == "aligned" if value is None else value


def _offset_max_ratio(name: str, value: Any, args: BPModifiedTrainingArguments) -> float:
    """Unset: 0.1 for ``offset_scaling="aligned"``, no cap (``inf``) for the others."""
    if value is None:
        value = 0.1 if args.offset_scaling == "aligned" else float("inf")
    hint = "the largest share of the local gradient the offset may take, e.g. 0.1; use float('inf') for no cap"
    ratio = parse_float(name, value, condition="a positive number", hint=hint)
    if not ratio > 0:
        raise ValueError(f"`offset_max_ratio` ({ratio!r}) must be positive: {hint}.")
    return ratio


def _offset_fixed_a(name: str, value: Any, args: BPModifiedTrainingArguments) -> float:
    use = "the scale of the local gradient for `offset_scaling='fixed'`, e.g. 1.0"
    a = parse_float(name, value, condition="a finite number", hint=use)
    if not math.isfinite(a):
        raise ValueError(f"`offset_fixed_a` ({a!r}) must be a finite number: {use}.")
    if abs(a) > MAX_FIXED_A:
        raise ValueError(
            f"`offset_fixed_a` ({a!r}) must lie in [-{MAX_FIXED_A:g}, {MAX_FIXED_A:g}]: it scales the local gradient, "
            "and the scaled gradient must stay within float32's range; e.g. 1.0."
        )
    return a


def _offset_fixed_lambda(name: str, value: Any, args: BPModifiedTrainingArguments) -> float:
    use = "the weight of the offset for `offset_scaling='fixed'`, e.g. 0.5"
    lam = parse_float(name, value, condition="a number in [0, 1]", hint=use)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"`offset_fixed_lambda` ({lam}) must lie in [0, 1]: {use}.")
    return lam


def _offset_seed(name: str, value: Any, args: BPModifiedTrainingArguments) -> int | None:
    """Unset (``None``): the sampler uses ``seed``."""
    if value is None:
        return None
    return parse_int(name, value, *SEED_RANGE, "the range torch's generators accept; e.g. 42, or None to use `seed`")


#: Every argument ``BPModifiedTrainingArguments`` adds to ``TrainingArguments``, and its check, in the order they
#: run (and report the first error): a check may read the arguments above it.
ARGUMENT_CHECKS: dict[str, Check] = {
    "bp_modified": _boolean(optional=True),
    "local_horizon": _count(1, "use 1 (Forward-Forward), 2 (LoCo), 5 (MPC) or more"),
    "block_granularity": _block_granularity,
    "max_nonfinite_steps": _count(0, "the non-finite steps allowed in a row, e.g. 10"),
    "rebuild_bpmod_state": _boolean(),
    "eval_block_accuracy": _boolean(),
    "offset_batch_size": _offset_batch_size,
    "offset_micro_batch_size": _offset_micro_batch_size,
    "offset_period": _offset_period,
    "offset_scaling": _offset_scaling,
    "offset_reliability": _offset_reliability,
    "offset_bias_correction": _boolean(),
    "offset_max_ratio": _offset_max_ratio,
    "offset_fixed_a": _offset_fixed_a,
    "offset_fixed_lambda": _offset_fixed_lambda,
    "offset_seed": _offset_seed,
    "offset_log_file": lambda name, value, args: check_log_file(value, args.output_dir),
}


@dataclass
class BPModifiedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~hf_bpmod.BPModifiedTrainer` (BP-modified local loss, Ren & Li).

    Every argument below is checked when the arguments are built, and a bad one raises a ``ValueError`` that names
    it. A boolean or a number may be given as a string (as from a YAML or JSON file): it is read as the command line
    reads it (`"false"`, `"no"`, `"0"` are False; `"10"` is 10); a count never takes a float.

    Args:
        local_horizon (`int`, *optional*, defaults to `1`):
            The horizon ``h`` of eq. 4: block ``t`` learns from the loss of the head on ``x_{min(t+h, T)}``. ``1`` is
            Forward-Forward-like, ``2`` LoCo-like, ``5`` the paper's MPC; ``h`` >= the number of blocks is exact
            backprop. Activation memory grows with ``h``, not with depth.
        block_granularity (`str`, *optional*, defaults to `"layer"`):
            How a ResNet is cut into blocks: one block per residual layer, the stem joined to the first
            (`"layer"`, the paper's split); the same with the stem as a block of its own (`"layer+stem"`: lower
            peak memory at high resolution, one more auxiliary head); or one block per stage (`"stage"`). ViT
            blocks are always encoder layers.
        bp_modified (`bool`, *optional*):
            Add the periodic BP offset of eq. 5 to the local gradient (`True`), or train with the plain local loss
            (`False`). Defaults to the architecture's choice (``ArchitectureAdapter.offset_by_default``): on for
            convolutional nets and Swin, off for the other transformer encoders (ViT, DeiT, BEiT, DINOv2), where the
            offset did not improve accuracy in the package's measurements; on for an adapter registered by a user (the paper's method). The trainer logs the choice and records it in
            checkpoints and the model card.
        offset_batch_size (`int`, *optional*):
            ``B'``: training examples drawn for each offset refresh. Unset: chosen from the data when the trainer
            meets the training set, as the paper advises, about 1% of the examples of a refresh period (``K`` steps
            x the effective batch ``B``), in whole micro-batches of `offset_micro_batch_size` (8 where it is
            unset): at least two, at most the training set and at most the paper's 320. The value chosen is logged.
        offset_micro_batch_size (`int`, *optional*):
            ``b'``: the offset pass runs ``B'/b'`` micro-batches of this size; its memory depends on ``b'`` only.
            Unset: the paper's 8 where `offset_batch_size` is given; where both are unset, chosen with ``B'``: 8 on
            an accelerator (memory), and on the CPU, where a micro-batch costs about a training step whatever its
            size, the fewest micro-batches (at least two) of at most `per_device_train_batch_size` examples.
        offset_period (`str`, *optional*, defaults to `"epoch"`):
            ``K``: how often the offset is refreshed: `"200"` or `"200steps"` (optimizer steps), `"epoch"`,
            `"1epoch"`, `"0.25epoch"` (fractions of an epoch, rounded to at least one step).
        offset_scaling (`str`, *optional*, defaults to `"aligned"`):
            How the per-block scales ``a`` and ``lambda`` are chosen: `"optimal"` (the paper's MSE rule, eq. 16-19
            with the K factor and the corrected ``a*``), `"aligned"` (the mixture best aligned with the true gradient,
            at the local gradient's step size), `"bias_only"` (``lambda = 0``,
            ``a = a*_bias``: Table 3) or `"fixed"` (`offset_fixed_a`, `offset_fixed_lambda`).
        offset_fixed_a (`float`, *optional*, defaults to `1.0`):
            ``a`` for `offset_scaling="fixed"`, at most 1e6 in size.
        offset_fixed_lambda (`float`, *optional*, defaults to `0.5`):
            ``lambda`` in [0, 1] for `offset_scaling="fixed"`.
        offset_bias_correction (`bool`, *optional*, defaults to `False`):
            Subtract the sampling noise ``Var/K`` from the bias estimate ``||a m_h - m_T||^2`` (§5 of the method).
        offset_reliability (`bool`, *optional*):
            At each refresh, measure how much of the previous offset still holds (the correlation of the new
            ``Delta`` with the old one, clamped to [0, 1]) and multiply ``lambda`` by it. A stale offset is then
            not applied for a whole period; the first period, with nothing to compare, gets no offset. Defaults to on
            for `offset_scaling="aligned"` (the package default) and off for the paper's rules and `"fixed"`.
        offset_max_ratio (`float`, *optional*):
            Cap the offset at this fraction of the scaled mean local gradient: ``lambda`` is lowered where
            ``lambda ||Delta|| > offset_max_ratio |a| ||m_h||``. It keeps a constant offset from dominating a block's
            gradient for a whole period, which adaptive optimizers turn into full-size steps. Defaults to `0.1` for
            `offset_scaling="aligned"` and to no cap (`float("inf")`) for the paper's rules and `"fixed"`, which stay
            as written.
        offset_seed (`int`, *optional*):
            Seed of the offset sampler (defaults to `seed`): an integer from ``-2**63`` to ``2**64 - 1``, the range
            torch's generators take. The sampler never touches the training data order.
        offset_log_file (`str`, *optional*, defaults to `"bpmod_offsets.jsonl"`):
            JSON-lines file with one record per offset refresh (per-block a, lambda, bias, ...): a path relative to
            `output_dir` that stays inside it (e.g. `"logs/offsets.jsonl"`; no absolute path, no `..` out of it), is
            not one of the run's own files or folders (the lock, `checkpoint-*`, the saved model, the Trainer's files:
            :data:`hf_bpmod.run_files.RUN_FILES`) and is short enough for file systems.
        max_nonfinite_steps (`int`, *optional*, defaults to `10`):
            Optimizer steps whose local losses or gradients are not finite are skipped (weights, optimizer state and
            heads untouched), as are offset refreshes with non-finite statistics (the previous offset is kept); after
            this many in a row training stops with an error. `0` stops at the first.
        rebuild_bpmod_state (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint whose auxiliary heads and offset state are missing or damaged: fresh heads and
            offsets are built instead (and the trainer says so). Off: such a checkpoint is refused.
        eval_block_accuracy (`bool`, *optional*, defaults to `False`):
            Also report every head's evaluation accuracy, `eval_block_{s}_accuracy`: how good the model is if cut
            after block `s` (the auxiliary head on the block output `x_s`; `s = T` is the model's own head). One
            forward through the blocks scores every head inside the Trainer's evaluation loop. Single-label
            classification only. The training loss of every head is always logged, as `block_{s}_loss`.
    """

    # Local learning
    local_horizon: int = field(
        default=1,
        metadata={"help": "Horizon h (eq. 4): block t learns from the head on x_{t+h}. 1=FF, 2=LoCo, >=#blocks=BP."},
    )
    block_granularity: str = field(
        default="layer",
        metadata={
            "help": "ResNet blocks: 'layer' (one per residual layer), 'layer+stem' (the stem a block of its own) or "
            "'stage' (one per stage).",
            "choices": GRANULARITIES,
        },
    )

    # The BP-modified offset (eq. 5, Algorithm 1)
    bp_modified: bool | None = field(
        default=None,
        metadata={
            "action": BooleanFlag,
            "help": "Add the periodic BP offset of eq. 5 to the local gradient. Default: the architecture's choice, "
            "made by measurement (on for ResNets, off for ViTs).",
        },
    )
    offset_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "B': examples drawn per offset refresh. Default: chosen from the data, about 1%% of the examples "
            "of a refresh period (K steps x batch), in whole micro-batches: at least 2, at most 320 and the training "
            "set (logged)."
        },
    )
    offset_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "b': micro-batch size of the offset pass (must divide offset_batch_size). Default: 8 where "
            "offset_batch_size is given; where both are unset, chosen with it: 8 on an accelerator, on the CPU the "
            "fewest micro-batches (at least 2) of at most the training batch (logged)."
        },
    )
    offset_period: str = field(
        default="epoch",
        metadata={"help": "K: refresh period, e.g. '200' / '200steps' (optimizer steps) or 'epoch' / '0.25epoch'."},
    )
    offset_scaling: str = field(
        default="aligned",
        metadata={"help": f"How a and lambda are chosen, one of {SCALING_MODES}.", "choices": SCALING_MODES},
    )
    offset_fixed_a: float = field(default=1.0, metadata={"help": "a for offset_scaling='fixed'."})
    offset_fixed_lambda: float = field(default=0.5, metadata={"help": "lambda in [0, 1] for offset_scaling='fixed'."})
    offset_bias_correction: bool = field(
        default=False,
        metadata={"action": BooleanFlag, "help": "Subtract the sampling noise Var/K from the bias estimate."},
    )
    offset_reliability: bool | None = field(
        default=None,
        metadata={
            "action": BooleanFlag,
            "help": "Scale lambda by how much of the previous offset survived one period (the first period gets "
            "none). Default: on for offset_scaling='aligned', off for the others.",
        },
    )
    offset_max_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Cap on the offset's norm as a fraction of the scaled mean local gradient's (lambda is lowered "
            "to meet it); 'inf' disables it. Default: 0.1 for offset_scaling='aligned', none for the others."
        },
    )
    offset_seed: int | None = field(default=None, metadata={"help": "Seed of the offset sampler (default: seed)."})
    offset_log_file: str = field(
        default="bpmod_offsets.jsonl", metadata={"help": "JSON-lines log of every offset refresh, in output_dir."}
    )

    # Safety
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "Steps (and offset refreshes) with non-finite values are skipped; stop after this many in a row."
        },
    )
    rebuild_bpmod_state: bool = field(
        default=False,
        metadata={
            "action": BooleanFlag,
            "help": "On resume, build fresh auxiliary heads and offsets if the checkpoint's are missing or damaged.",
        },
    )

    # Metrics
    eval_block_accuracy: bool = field(
        default=False,
        metadata={
            "action": BooleanFlag,
            "help": "Also report each head's evaluation accuracy, eval_block_{s}_accuracy: the model cut after block "
            "s (single-label classification only).",
        },
    )

    def __post_init__(self) -> None:
        if self.deepspeed:  # before TrainingArguments, which would first ask for the deepspeed package
            raise ValueError(
                "`deepspeed` is not supported by BPModifiedTrainer: its engine owns the backward pass, which local "
                "losses replace. Use plain data parallelism (torchrun / accelerate launch without a DeepSpeed config)."
            )
        # Every check comes before TrainingArguments' own, which exports some settings to accelerate through
        # environment variables (transformers < 5: all of them) that would outlive rejected arguments in this process.
        if self.torch_compile or self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            raise ValueError(
                "`torch_compile` is not supported by BPModifiedTrainer: local gradients call the model's blocks one by "
                "one, outside the compiled forward. Leave `torch_compile`, `torch_compile_backend` and "
                "`torch_compile_mode` unset."
            )
        if self.fsdp:
            raise ValueError(
                f"`fsdp` ({self.fsdp!r}) is not supported by BPModifiedTrainer: sharded parameters cannot be "
                "differentiated block by block. Use plain data parallelism (DDP via torchrun / accelerate launch); "
                "local losses already keep activation memory at O(h) blocks."
            )
        self._check_arguments()
        super().__post_init__()
        if self.gradient_checkpointing:  # after TrainingArguments, which parses the kwargs and resolves their aliases
            kwargs = self.gradient_checkpointing_kwargs or {}
            if "use_reentrant" in kwargs:  # a string from a config file ("no") is read as the command line reads it
                given = kwargs["use_reentrant"]
                kwargs = {**kwargs, "use_reentrant": parse_bool("gradient_checkpointing_kwargs.use_reentrant", given)}
                self.gradient_checkpointing_kwargs = kwargs
                sync_activation_checkpointing_kwargs(self)
            if kwargs.get("use_reentrant", False):
                raise ValueError(
                    "`gradient_checkpointing_kwargs={'use_reentrant': True}` is not supported by BPModifiedTrainer: "
                    "reentrant checkpointing cannot be differentiated with `torch.autograd.grad`, which local "
                    "gradients use. Leave `use_reentrant` unset (hf_bpmod sets it to False) or set it to False."
                )
            if "use_reentrant" not in (self.gradient_checkpointing_kwargs or {}):
                self.gradient_checkpointing_kwargs = non_reentrant_checkpointing(self.gradient_checkpointing_kwargs)
                sync_activation_checkpointing_kwargs(self)

    def offset_settings(self) -> OffsetSettings:
        """The offset's settings for the offset pass (validated in ``__post_init__``); ``sample_size`` is ``None``
        where ``offset_batch_size`` is left to be chosen from the data."""
        return OffsetSettings(
            horizon=self.local_horizon,
            batch_size=self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size,
            sample_size=self.offset_batch_size,
            micro_batch_size=self.offset_micro_batch_size or (None if self.offset_batch_size is None else 8),
            device_batch_size=self.per_device_train_batch_size,
            period=self._parsed_offset_period(),
            scaling=self.offset_scaling,
            fixed_a=self.offset_fixed_a,
            fixed_lambda=self.offset_fixed_lambda,
            bias_correction=self.offset_bias_correction,
            check_reliability=self.offset_reliability,
            max_ratio=self.offset_max_ratio if math.isfinite(self.offset_max_ratio) else None,
            seed=self.seed if self.offset_seed is None else self.offset_seed,
        )

    def _parsed_offset_period(self) -> tuple[float, str]:
        """``offset_period`` as ``(value, unit)``, as parsed by its check; parsed again only where it was set after
        the arguments were built (or they were unpickled from a release that did not keep the parsed value)."""
        given, parsed = getattr(self, "_checked_offset_period", (None, None))
        if parsed is not None and (type(given), given) == (type(self.offset_period), self.offset_period):
            return parsed
        return parse_offset_period(self.offset_period)

    def _check_arguments(self) -> None:
        """Run every argument this class adds through its check in ``ARGUMENT_CHECKS`` and keep the normalised value
        (a boolean or number given as a string, as from a YAML or JSON file, is read as the command line reads it)."""
        for name, check in ARGUMENT_CHECKS.items():
            setattr(self, name, check(name, getattr(self, name), self))
