"""``BPModifiedTrainingArguments``: ``TrainingArguments`` plus the settings of local learning and of the offset."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .compat import non_reentrant_checkpointing, sync_activation_checkpointing_kwargs
from .offset_pass import OffsetSettings

SCALING_MODES = ("aligned", "optimal", "bias_only", "fixed")
_PERIOD = re.compile(r"^\s*(?P<value>\d+(\.\d*)?|\.\d+)\s*(?P<unit>epochs?|steps?)?\s*$")


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
            f"`offset_period` ({period!r}) is not understood: use a number of optimizer steps (`'200'` or "
            "`'200steps'`) or of epochs (`'epoch'`, `'1epoch'`, `'0.25epoch'`)."
        )
    value = float(match["value"])
    unit = "epoch" if (match["unit"] or "step").startswith("epoch") else "step"
    if value <= 0:
        raise ValueError(f"`offset_period` ({period!r}) must be positive.")
    if unit == "step" and value != int(value):
        raise ValueError(f"`offset_period` ({period!r}) counts optimizer steps and must be a whole number.")
    return value, unit


@dataclass
class BPModifiedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~hf_bpmod.BPModifiedTrainer` (BP-modified local loss, Ren & Li).

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
            ResNets and off for ViTs, where the offset did not improve accuracy in the package's measurements; on
            for an adapter registered by a user (the paper's method). The trainer logs the choice and records it in
            checkpoints and the model card.
        offset_batch_size (`int`, *optional*, defaults to `320`):
            ``B'``: training examples drawn for each offset refresh.
        offset_micro_batch_size (`int`, *optional*, defaults to `8`):
            ``b'``: the offset pass runs ``B'/b'`` micro-batches of this size; its memory depends on ``b'`` only.
        offset_period (`str`, *optional*, defaults to `"epoch"`):
            ``K``: how often the offset is refreshed: `"200"` or `"200steps"` (optimizer steps), `"epoch"`,
            `"1epoch"`, `"0.25epoch"` (fractions of an epoch, rounded to at least one step).
        offset_scaling (`str`, *optional*, defaults to `"aligned"`):
            How the per-block scales ``a`` and ``lambda`` are chosen: `"optimal"` (the paper's MSE rule, eq. 16-19
            with the K factor and the corrected ``a*``), `"aligned"` (the mixture best aligned with the true gradient,
            at the local gradient's step size), `"bias_only"` (``lambda = 0``,
            ``a = a*_bias``: Table 3) or `"fixed"` (`offset_fixed_a`, `offset_fixed_lambda`).
        offset_fixed_a (`float`, *optional*, defaults to `1.0`):
            ``a`` for `offset_scaling="fixed"`.
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
            Seed of the offset sampler (defaults to `seed`). The sampler never touches the training data order.
        offset_log_file (`str`, *optional*, defaults to `"bpmod_offsets.jsonl"`):
            JSON-lines file in `output_dir` with one record per offset refresh (per-block a, lambda, bias, ...).
        max_nonfinite_steps (`int`, *optional*, defaults to `10`):
            Optimizer steps whose local losses or gradients are not finite are skipped (weights, optimizer state and
            heads untouched), as are offset refreshes with non-finite statistics (the previous offset is kept); after
            this many in a row training stops with an error. `0` stops at the first.
        rebuild_bpmod_state (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint whose auxiliary heads and offset state are missing or damaged: fresh heads and
            offsets are built instead (and the trainer says so). Off: such a checkpoint is refused.
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
            "'stage' (one per stage)."
        },
    )

    # The BP-modified offset (eq. 5, Algorithm 1)
    bp_modified: bool | None = field(
        default=None,
        metadata={
            "help": "Add the periodic BP offset of eq. 5 to the local gradient. Default: the architecture's choice, "
            "made by measurement (on for ResNets, off for ViTs)."
        },
    )
    offset_batch_size: int = field(default=320, metadata={"help": "B': examples drawn per offset refresh."})
    offset_micro_batch_size: int = field(
        default=8, metadata={"help": "b': micro-batch size of the offset pass (must divide offset_batch_size)."}
    )
    offset_period: str = field(
        default="epoch",
        metadata={"help": "K: refresh period, e.g. '200' / '200steps' (optimizer steps) or 'epoch' / '0.25epoch'."},
    )
    offset_scaling: str = field(
        default="aligned",
        metadata={"help": f"How a and lambda are chosen, one of {SCALING_MODES}."},
    )
    offset_fixed_a: float = field(default=1.0, metadata={"help": "a for offset_scaling='fixed'."})
    offset_fixed_lambda: float = field(default=0.5, metadata={"help": "lambda in [0, 1] for offset_scaling='fixed'."})
    offset_bias_correction: bool = field(
        default=False, metadata={"help": "Subtract the sampling noise Var/K from the bias estimate."}
    )
    offset_reliability: bool | None = field(
        default=None,
        metadata={
            "help": "Scale lambda by how much of the previous offset survived one period (the first period gets "
            "none). Default: on for offset_scaling='aligned', off for the others."
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
            "help": "On resume, build fresh auxiliary heads and offsets if the checkpoint's are missing or damaged."
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
        if self.bp_modified not in (None, True, False):
            raise ValueError(
                f"`bp_modified` ({self.bp_modified!r}) must be True, False or None (the architecture's default)."
            )
        if self.bp_modified is not None:
            self.bp_modified = bool(self.bp_modified)
        self._check_int("local_horizon", 1, "use 1 (Forward-Forward), 2 (LoCo), 5 (MPC) or more")
        if self.block_granularity not in ("layer", "layer+stem", "stage"):
            raise ValueError(
                f"`block_granularity` ({self.block_granularity!r}) must be 'layer' (one block per residual layer), "
                "'layer+stem' (the same, with the ResNet stem as a block of its own) or 'stage' (one block per ResNet "
                "stage)."
            )
        self._check_int("max_nonfinite_steps", 0, "the non-finite steps allowed in a row, e.g. 10")
        self._check_int("offset_batch_size", 2, "B' is the number of examples per offset refresh, e.g. 320")
        self._check_int("offset_micro_batch_size", 1, "b' is the micro-batch size of the offset pass, e.g. 8")
        if self.offset_batch_size % self.offset_micro_batch_size:
            raise ValueError(
                f"`offset_micro_batch_size` ({self.offset_micro_batch_size}) must divide `offset_batch_size` "
                f"({self.offset_batch_size}); e.g. use {self._divisor_hint()}."
            )
        if self.offset_batch_size // self.offset_micro_batch_size < 2:
            raise ValueError(
                f"`offset_batch_size` ({self.offset_batch_size}) must hold at least two micro-batches of "
                f"`offset_micro_batch_size` ({self.offset_micro_batch_size}) to estimate the gradient variance."
            )
        parse_offset_period(self.offset_period)
        if self.offset_reliability is None:
            self.offset_reliability = self.offset_scaling == "aligned"
        if self.offset_scaling not in SCALING_MODES:
            raise ValueError(f"`offset_scaling` ({self.offset_scaling!r}) must be one of {SCALING_MODES}.")
        if self.offset_max_ratio is None:
            self.offset_max_ratio = 0.1 if self.offset_scaling == "aligned" else float("inf")
        if not self.offset_max_ratio > 0:  # also rejects NaN
            raise ValueError(
                f"`offset_max_ratio` ({self.offset_max_ratio!r}) must be positive: the largest share of the local "
                "gradient the offset may take, e.g. 0.1; use float('inf') for no cap."
            )
        if not 0.0 <= self.offset_fixed_lambda <= 1.0:
            raise ValueError(f"`offset_fixed_lambda` ({self.offset_fixed_lambda}) must lie in [0, 1].")
        super().__post_init__()
        if self.gradient_checkpointing:  # after TrainingArguments, which parses the kwargs and resolves their aliases
            if (self.gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
                raise ValueError(
                    "`gradient_checkpointing_kwargs={'use_reentrant': True}` is not supported by BPModifiedTrainer: "
                    "reentrant checkpointing cannot be differentiated with `torch.autograd.grad`, which local "
                    "gradients use. Leave `use_reentrant` unset (hf_bpmod sets it to False) or set it to False."
                )
            if "use_reentrant" not in (self.gradient_checkpointing_kwargs or {}):
                self.gradient_checkpointing_kwargs = non_reentrant_checkpointing(self.gradient_checkpointing_kwargs)
                sync_activation_checkpointing_kwargs(self)

    def offset_settings(self) -> OffsetSettings:
        """The offset's settings for the offset pass (validated in ``__post_init__``)."""
        return OffsetSettings(
            horizon=self.local_horizon,
            batch_size=self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size,
            sample_size=self.offset_batch_size,
            micro_batch_size=self.offset_micro_batch_size,
            period=parse_offset_period(self.offset_period),
            scaling=self.offset_scaling,
            fixed_a=self.offset_fixed_a,
            fixed_lambda=self.offset_fixed_lambda,
            bias_correction=self.offset_bias_correction,
            check_reliability=self.offset_reliability,
            max_ratio=self.offset_max_ratio if math.isfinite(self.offset_max_ratio) else None,
            seed=self.seed if self.offset_seed is None else self.offset_seed,
        )

    def _check_int(self, name: str, minimum: int, hint: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` ({value!r}) must be an integer >= {minimum}; {hint}.")

    def _divisor_hint(self) -> str:
        divisors = [d for d in range(1, self.offset_batch_size + 1) if self.offset_batch_size % d == 0]
        near = min(divisors, key=lambda d: abs(d - self.offset_micro_batch_size))
        return f"`offset_micro_batch_size={near}`"
