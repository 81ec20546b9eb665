"""``BPModifiedTrainer``: the HuggingFace ``Trainer`` with block-wise local gradients and the BP-modified offset.

The algorithm lives in :mod:`hf_bpmod.local_grad`, :mod:`hf_bpmod.offset` and :mod:`hf_bpmod.offset_pass`; this
file is plumbing. It overrides ``training_step`` (local gradients into ``.grad``, then, once per optimizer step,
the all-reduce across processes and the offset), the optimizer (auxiliary heads get their own parameter group),
checkpointing (auxiliary heads and offset state travel with the optimizer state) and the model card. The model
that is saved or pushed is the user's model alone.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import logging

from .adapters import get_adapter, unwrap_model
from .config import BPModifiedTrainingArguments, parse_offset_period
from .local_grad import local_gradients
from .offset_pass import OffsetSettings, OffsetState, apply_block_offsets, compute_offsets, offset_sample

logger = logging.get_logger(__name__)

BPMOD_STATE_NAME = "bpmod_state.pt"
# transformers >= 5 normalises the label-smoothed loss by `num_items_in_batch` as the Trainer passes it; before, by
# the batch. Training follows whichever the installed Trainer does.
_LABEL_SMOOTHER_COUNTS_ITEMS = "num_items_in_batch" in inspect.signature(LabelSmoother.__call__).parameters


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_layer_checkpointing(model: nn.Module) -> None:
    """Local gradients call a model's layers one by one. Before transformers 4.53 a ViT checkpointed its layers in
    the encoder's loop, which those calls bypass, so ``gradient_checkpointing=True`` would silently do nothing; since,
    each layer (a ``GradientCheckpointingLayer``) checkpoints itself. Models that do not support checkpointing at all
    are left to the Trainer, which says so."""
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        return
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = ()  # noqa: N806
    if not any(isinstance(m, GradientCheckpointingLayer) for m in base.modules()):
        raise ValueError(
            f"`gradient_checkpointing=True` would have no effect on this {type(base).__name__} under local losses: "
            f"transformers {transformers.__version__} checkpoints its layers in the encoder's loop, which "
            "BPModifiedTrainer bypasses (it calls the layers one by one). Upgrade to transformers >= 4.53, where each "
            "layer checkpoints itself, or leave `gradient_checkpointing` off."
        )


class _OffsetLogStart(TrainerCallback):
    """At the start of training (state restored on resume), aligns the refresh log with where training starts."""

    def __init__(self, trainer: BPModifiedTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_offset_log(state.global_step)


class BPModifiedTrainer(Trainer):
    """A drop-in ``Trainer`` that trains each block from a local loss ``h`` blocks ahead (eq. 4), corrected by a
    periodically refreshed offset from the true backprop gradient (eq. 5, Algorithm 1).

    Takes the same arguments as ``transformers.Trainer``; ``args`` must be a
    :class:`~hf_bpmod.BPModifiedTrainingArguments`. Supported models: those with a registered adapter
    (``ViTForImageClassification``, ``ResNetForImageClassification``), plain or wrapped by peft.
    """

    def __init__(self, model: nn.Module | None = None, args: BPModifiedTrainingArguments | None = None, **kwargs):
        if args is None:
            args = BPModifiedTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, BPModifiedTrainingArguments):
            raise TypeError(
                f"`args` must be a BPModifiedTrainingArguments, got {type(args).__name__}: build it with "
                "`hf_bpmod.BPModifiedTrainingArguments(...)` (it accepts every TrainingArguments field)."
            )
        if model is None:
            raise ValueError("BPModifiedTrainer needs a `model` (model_init is not supported).")
        if kwargs.get("model_init") is not None:
            raise ValueError("`model_init` is not supported by BPModifiedTrainer: pass an instantiated `model`.")
        self.adapter = get_adapter(model)  # fails here, before any work, for unsupported models
        self.bp_modified = self._resolve_bp_modified(args)
        if args is not None and args.gradient_checkpointing:
            _check_layer_checkpointing(model)
        if type(self).compute_loss is not BPModifiedTrainer.compute_loss:
            warnings.warn(
                f"{type(self).__name__} overrides `compute_loss`, which BPModifiedTrainer calls in evaluation only: "
                "training computes the loss of every block's head itself. To change the training loss, pass "
                "`compute_loss_func(outputs, labels, num_items_in_batch)` (it gets each head's logits as "
                "`outputs.logits`) or set `label_smoothing_factor`.",
                stacklevel=2,
            )
        super().__init__(model=model, args=args, **kwargs)
        self._reject_unsupported_backends()
        base = unwrap_model(self.model)
        self.aux_heads = self.adapter.aux_heads(base, args.local_horizon, args.block_granularity).to(args.device)
        self._broadcast_from_main_process(self.aux_heads)
        self.add_callback(_OffsetLogStart(self))
        self.block_chain = self.adapter.chain(base, self.aux_heads, args.block_granularity)
        self._warn_uncovered_parameters()
        self._zero_aux_grads = True
        self.offset_state = OffsetState()
        self.offset_settings = OffsetSettings(
            offset_batch_size=args.offset_batch_size,
            micro_batch_size=args.offset_micro_batch_size,
            scaling=args.offset_scaling,
            fixed_a=args.offset_fixed_a,
            fixed_lambda=args.offset_fixed_lambda,
            bias_correction=args.offset_bias_correction,
            check_reliability=args.offset_reliability,
            max_ratio=args.offset_max_ratio if math.isfinite(args.offset_max_ratio) else None,
            seed=args.seed if args.offset_seed is None else args.offset_seed,
        )
        if self.uses_offset and self.train_dataset is not None:
            self._check_offset_dataset(self.train_dataset)

    # ------------------------------------------------------------------ set-up
    def _check_offset_dataset(self, dataset: Any) -> None:
        """The offset sampler draws ``B'`` examples at random (Algorithm 1, line 4): it needs a map-style training set
        (``len`` and indexing) of at least ``B'`` examples."""
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"The BP offset draws `offset_batch_size` examples at random from the training set, which needs a "
                f"map-style dataset (with `len` and indexing); got {type(dataset).__name__}. Load the data without "
                "streaming (a `datasets.Dataset`, not an `IterableDataset`), or set `bp_modified=False`."
            )
        n = len(dataset)
        if self.args.offset_batch_size > n:
            raise ValueError(
                f"`offset_batch_size` ({self.args.offset_batch_size}) is larger than the training set ({n} examples); "
                f"lower it (e.g. `offset_batch_size={max(2 * self.args.offset_micro_batch_size, n // 10)}`) or set "
                "`bp_modified=False`."
            )

    def _resolve_bp_modified(self, args: BPModifiedTrainingArguments) -> bool:
        """``bp_modified`` as given, or (``None``) the architecture's default, which is logged: measured per
        architecture (``ArchitectureAdapter.offset_by_default``, docs/offset_study.md item 14)."""
        if args.bp_modified is not None:
            return args.bp_modified
        chosen = self.adapter.offset_by_default
        name = self.adapter.model_type
        if chosen:
            logger.info(f"bp_modified=None: the BP offset is on, the default for {name} models.")
        else:  # a warning from the main process only
            (logger.warning if args.should_log else logger.info)(
                f"bp_modified=None: no BP offset for this {name} model, which trains with the plain local loss. On "
                f"{name} models no offset rule we measured helped (docs/offset_study.md, item 14). Pass "
                "`bp_modified=True` for the paper's method, or `bp_modified=False` to silence this."
            )
        return chosen

    @property
    def uses_offset(self) -> bool:
        """Whether the BP offset is on (``bp_modified``, resolved per architecture when ``None``, and some block's
        local gradient is not already exact)."""
        return self.bp_modified and self.args.local_horizon < self.block_chain.num_blocks

    def _reject_unsupported_backends(self) -> None:
        if self.is_deepspeed_enabled:
            raise ValueError(
                "DeepSpeed is not supported by BPModifiedTrainer (its engine owns the backward pass). "
                "Launch with plain data parallelism: `torchrun --nproc_per_node N` or `accelerate launch` without a "
                "DeepSpeed config."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                "FSDP is not supported by BPModifiedTrainer (sharded parameters cannot be differentiated block by "
                "block). Launch with plain data parallelism (DDP): `torchrun --nproc_per_node N` or "
                "`accelerate launch` with `distributed_type: MULTI_GPU`."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"One process sees {self.args.n_gpu} GPUs: BPModifiedTrainer does not support `nn.DataParallel` (it "
                "never calls the wrapped model's forward, so only one GPU would work). Launch one process per GPU: "
                "`torchrun --nproc_per_node N ...` or `accelerate launch --multi_gpu ...`."
            )
        config = getattr(self.accelerator, "parallelism_config", None)
        sharded = [n for n in ("tp_size", "cp_size", "sp_size") if (getattr(config, n, None) or 1) > 1]
        if sharded:
            raise ValueError(
                f"Tensor, context and sequence parallelism are not supported by BPModifiedTrainer ({sharded} > 1 in "
                "the accelerate parallelism config): use plain data parallelism."
            )
        if any(isinstance(m, nn.SyncBatchNorm) for m in self.model.modules()):
            raise ValueError(
                "SyncBatchNorm is not supported by BPModifiedTrainer: the offset pass runs a different number of "
                "micro-batches on each process, so its collectives would not match. Keep the model's BatchNorm "
                "layers (each process normalises over its own micro-batch, as with plain DDP)."
            )

    def _broadcast_from_main_process(self, module: nn.Module) -> None:
        """Give every process rank 0's copy of ``module`` (as DDP does for the model when it wraps it): the auxiliary
        heads are not part of the DDP model and must start equal everywhere, whatever seed each process used."""
        if self.args.world_size > 1 and dist.is_available() and dist.is_initialized():
            with torch.no_grad():
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def _warn_uncovered_parameters(self) -> None:
        covered = {id(p) for ps in self.block_chain.block_params for p in ps}
        covered |= {id(p) for p in self.block_chain.head_params[-1]}
        missed = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missed:
            warnings.warn(
                f"{len(missed)} trainable parameters lie outside every block and the head and will get no gradient "
                f"from BPModifiedTrainer: {missed[:5]}{' ...' if len(missed) > 5 else ''}",
                stacklevel=3,
            )

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
        """The Trainer's optimizer class and arguments, with ``optim_args`` honoured for ``optim="sgd"`` (``momentum``,
        ``dampening``, ``weight_decay``, ``nesterov``) as transformers >= 5 honours them: before 5 they were silently
        dropped, which would train the paper's recipes (SGD with momentum 0.9) without momentum."""
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if optimizer_cls is torch.optim.SGD and args.optim_args:
            given = dict(item.split("=", 1) for item in args.optim_args.replace(" ", "").split(",") if "=" in item)
            for key in ("momentum", "dampening", "weight_decay"):
                if key in given and key not in optimizer_kwargs:
                    optimizer_kwargs[key] = float(given[key])
            if "nesterov" in given and "nesterov" not in optimizer_kwargs:
                optimizer_kwargs["nesterov"] = given["nesterov"].lower() in ("true", "1", "yes")
        return optimizer_cls, optimizer_kwargs

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, plus one parameter group with the auxiliary heads (they are not part of the
        model, so the Trainer would not see them)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        aux = [p for p in self.aux_heads.parameters() if p.requires_grad]
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if aux and not any(id(p) in owned for p in aux):
            optimizer.add_param_group({"params": aux, "weight_decay": self.args.weight_decay})
        return optimizer

    # ------------------------------------------------------------------ losses
    def _logits_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """``L`` on one head's logits, chosen as the Trainer's ``compute_loss`` chooses it: the user's
        ``compute_loss_func`` (given the logits as an ``ImageClassifierOutput``), else the label smoother
        (``label_smoothing_factor``), else the model's own loss (its ``problem_type``)."""
        if self.compute_loss_func is not None:
            outputs = ImageClassifierOutput(logits=logits)
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if self.label_smoother is not None:
            if _LABEL_SMOOTHER_COUNTS_ITEMS:
                return self.label_smoother({"logits": logits}, labels, num_items_in_batch=num_items_in_batch)
            return self.label_smoother({"logits": logits}, labels)  # transformers < 5: the batch mean
        base = unwrap_model(self.model)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return base.loss_function(labels, logits, base.config, num_items_in_batch=num_items_in_batch)
        return base.loss_function(labels, logits, base.config)

    def _head_loss_fn(self, labels: torch.Tensor, num_items_in_batch: Any):
        """``L`` of a training micro-batch, scaled as the Trainer's ``training_step`` scales its loss (gradient
        accumulation, ``average_tokens_across_devices``)."""
        counts_items = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        factor = 1.0
        if self.args.average_tokens_across_devices and counts_items and num_items_in_batch is not None:
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            factor *= self.accelerator.num_processes // tp_size
        if not scaled_for_ga:
            factor /= getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return self._logits_loss(logits, labels, num_items_in_batch) * factor

        return loss_fn

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ):
        """The Trainer's loss, for evaluation only (``training_step`` computes its own), as the mean over the batch.

        ``num_items_in_batch`` is dropped: ``ResNetForImageClassification.forward`` accepts ``**kwargs`` but ignores
        it, and the Trainer then multiplies its batch mean by the number of processes (two processes reported twice
        the evaluation loss). Without it every model returns its batch mean and the Trainer averages those.
        """
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    def _split_inputs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "pixel_values" not in inputs or "labels" not in inputs:
            raise ValueError(
                f"BPModifiedTrainer expects batches with `pixel_values` and `labels`, got {sorted(inputs)}. "
                "Check the data collator (it must return both)."
            )
        extra = set(inputs) - {"pixel_values", "labels"}
        if extra:
            raise ValueError(
                f"BPModifiedTrainer runs the model block by block and cannot pass {sorted(extra)} to it; remove "
                "these columns in the data collator."
            )
        return inputs["pixel_values"], inputs["labels"]

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Local gradients of one micro-batch into ``.grad`` (eq. 4); on the last micro-batch of an optimizer step,
        average across processes and apply the offset (eq. 5) before the Trainer clips and steps."""
        model.train()
        self.aux_heads.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        if self._zero_aux_grads:
            self.aux_heads.zero_grad(set_to_none=True)
            self._zero_aux_grads = False
        inputs = self._prepare_inputs(inputs)
        pixel_values, labels = self._split_inputs(inputs)
        result = local_gradients(
            self.block_chain,
            pixel_values,
            self._head_loss_fn(labels, num_items_in_batch),
            self.args.local_horizon,
            accumulate=True,
            loss_scale=self._grad_scale(),
            forward_context=self._forward_context,
        )
        if self.accelerator.sync_gradients:
            self._finish_optimizer_step_gradients()
        return result.loss

    def _forward_context(self) -> contextlib.ExitStack:
        """The context of every forward computation: the Trainer's ``compute_loss_context_manager`` and accelerate's
        autocast. transformers >= 5 leaves autocast to accelerate, which wraps ``model.forward`` only; the chain calls
        the model's blocks directly, so without this ``bf16``/``fp16`` would silently run in fp32."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.compute_loss_context_manager())
        stack.enter_context(self.accelerator.autocast())
        return stack

    def _grad_scale(self) -> float:
        """The fp16 loss scale (1 without an enabled scaler). The losses never pass through ``scaler.scale`` (they
        are scaled by this number inside the chain), which is what creates the scaler's scale tensor; its ``unscale_``
        and ``step`` fail without it, so it is created here the public way, on the training device."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scaler.scale(torch.ones((), device=self.args.device))
        return float(scaler.get_scale())

    def _finish_optimizer_step_gradients(self) -> None:
        """Once per optimizer step: all-reduce (mean) the gradients, then ``g^ = a g_h + lambda Delta`` (eq. 5)."""
        self._zero_aux_grads = True
        if self.accelerator.num_processes > 1:
            params = self.block_chain.trainable_parameters() + [p for p in self.aux_heads.parameters()]
            self._all_reduce_mean(params)
            if self.args.ddp_broadcast_buffers is not False:
                self._average_buffers()
        if not self.uses_offset:
            return
        if self.state.global_step >= self.offset_state.next_refresh_step:
            self._refresh_offset()
        if self.offset_state.blocks:
            apply_block_offsets(self.block_chain, self.offset_state.blocks, self._grad_scale())

    def _all_reduce_mean(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        self._all_reduce_mean_tensors(grads)

    def _all_reduce_mean_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over processes in place, one collective per dtype."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            flat /= self.accelerator.num_processes
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _average_buffers(self) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) over processes, once per optimizer step.

        DDP would broadcast rank 0's buffers at the start of its forward, which this trainer never calls: without
        this each process would keep statistics of its own shard, and evaluation (which runs on every process) and
        checkpoints would depend on the rank. The average makes a running mean that of the whole global batch.
        ``ddp_broadcast_buffers=False`` leaves every process its own buffers."""
        modules = (unwrap_model(self.model), self.aux_heads)
        buffers = [b for m in modules for b in m.buffers() if b.is_floating_point()]
        if buffers:
            with torch.no_grad():
                self._all_reduce_mean_tensors(buffers)

    # ------------------------------------------------------------------ the offset
    def offset_period_steps(self) -> int:
        """``K`` in optimizer steps, from ``offset_period`` (fractions of an epoch rounded, at least 1)."""
        value, unit = parse_offset_period(self.args.offset_period)
        if unit == "step":
            return int(value)
        return max(1, round(value * self._optimizer_steps_per_epoch()))

    def _optimizer_steps_per_epoch(self) -> int:
        n = len(self.train_dataset)
        per_step = self.args.per_device_train_batch_size * self.args.world_size
        batches = n // per_step if self.args.dataloader_drop_last else math.ceil(n / per_step)
        return max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

    def effective_batch_size(self) -> int:
        """``B``: per-device batch x accumulation steps x processes."""
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def _offset_fetch(self):
        dataset = self.train_dataset
        self._check_offset_dataset(dataset)  # it may have been replaced since __init__
        collator = self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(self.data_collator, description="training")
        except ImportError:  # pragma: no cover
            collator = self._get_collator_with_removed_columns(self.data_collator, description="training")

        def fetch(indices: list[int]):
            batch = self._prepare_inputs(collator([dataset[i] for i in indices]))
            pixel_values, labels = self._split_inputs(batch)

            def loss_fn(logits: torch.Tensor) -> torch.Tensor:  # the training loss, as a micro-batch mean
                return self._logits_loss(logits, labels)

            return pixel_values, loss_fn

        return fetch

    def _refresh_offset(self) -> None:
        """Algorithm 1, lines 4-9, at the start of a period (the first one before the first update)."""
        period = self.offset_period_steps()
        state = self.offset_state
        indices = offset_sample(
            len(self.train_dataset), self.args.offset_batch_size, self.offset_settings.seed, state.period_index
        )
        grad_scale = self._grad_scale()
        fetch = self._offset_fetch()
        # fp16: the pass runs at the loss scale of training and unscales before any statistic; if that overflowed,
        # it is run once more unscaled rather than leaving the whole period without an offset.
        for loss_scale in [grad_scale, 1.0] if grad_scale != 1.0 else [1.0]:
            offsets, record = compute_offsets(
                self.block_chain,
                self.args.local_horizon,
                indices,
                fetch,
                self.offset_settings,
                batch_size=self.effective_batch_size(),
                period=period,
                process_index=self.args.process_index,
                num_processes=self.accelerator.num_processes,
                reduce_sum=dist.all_reduce if self.accelerator.num_processes > 1 else None,
                preserve=[self.model, self.aux_heads],
                forward_context=self._forward_context,
                previous=state.blocks,
                loss_scale=loss_scale,
            )
            if offsets is not None:
                break
        if offsets is None:
            logger.warning(
                f"Offset refresh {state.period_index} at step {self.state.global_step} gave non-finite statistics; "
                "keeping the previous offset."
            )
        else:
            state.blocks = offsets
        record.update(step=self.state.global_step, period_index=state.period_index)
        state.period_index += 1
        state.next_refresh_step = self.state.global_step + period
        self._log_offset_record(record)

    def _start_offset_log(self, start_step: int) -> None:
        """Drop the refresh records at or after ``start_step`` from ``offset_log_file``: those of an earlier run in
        the same ``output_dir`` (a fresh run starts at 0) or, on resume, those the interrupted run made after its
        checkpoint (they are made again). The file as it was is kept as ``<file>.old``; the new one is written
        atomically."""
        if not self.args.should_save:
            return
        path = os.path.join(self.args.output_dir, self.args.offset_log_file)
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        keep = [line for line in lines if json.loads(line).get("step", 0) < start_step]
        if len(keep) == len(lines):
            return
        with open(path + ".old", "w", encoding="utf-8") as f:
            f.writelines(lines)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)

    def _log_offset_record(self, record: dict) -> None:
        logs = {"offset/seconds": record["seconds"]}
        for t, block in enumerate(record["blocks"]):
            for key in ("a", "lam", "bias", "var", "cosine", "offset_norm", "reliability", "capped"):
                logs[f"offset/block_{t}/{key}"] = block[key]
        self._pending_offset_logs = logs
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = os.path.join(self.args.output_dir, self.args.offset_log_file)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        pending = getattr(self, "_pending_offset_logs", None)
        if pending and "loss" in logs:
            logs = {**logs, **pending}
            self._pending_offset_logs = None
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def bpmod_state_dict(self) -> dict:
        """Auxiliary heads and offset state: what a checkpoint needs besides the model and optimizer."""
        return {
            "aux_heads": self.aux_heads.state_dict(),
            "offset": self.offset_state.state_dict(),
            "local_horizon": self.args.local_horizon,
            "block_granularity": self.args.block_granularity,
            "bp_modified": self.uses_offset,
        }

    def load_bpmod_state_dict(self, state: dict) -> None:
        self._check_bpmod_state(state)
        self.aux_heads.load_state_dict(state["aux_heads"])
        self.offset_state = OffsetState.from_state_dict(state["offset"])
        self._resume_method(state)

    def _resume_method(self, state: dict) -> None:
        """With ``bp_modified=None`` a run resumes with the method its checkpoint was trained with, also when the
        architecture's default has changed since (checkpoints without the record used the offset if it was ever
        refreshed). An explicit ``bp_modified`` is obeyed."""
        saved = state.get("bp_modified")
        if saved is None:
            saved = state["offset"].get("period_index", 0) > 0
        if self.args.bp_modified is not None or saved == self.uses_offset:
            return
        if saved and self.args.local_horizon >= self.block_chain.num_blocks:
            return  # exact backprop: no offset either way
        logger.warning(
            f"bp_modified=None: resuming {'with' if saved else 'without'} the BP offset, as the checkpoint was "
            f"trained, although the default for {self.adapter.model_type} models is now "
            f"{'off' if saved else 'on'}. Pass `bp_modified` to choose."
        )
        if saved and self.train_dataset is not None:
            self._check_offset_dataset(self.train_dataset)
        self.bp_modified = saved

    def _check_bpmod_state(self, state: dict) -> None:
        """A checkpoint resumes only under the block split and horizon it was trained with: others have other
        auxiliary heads (and so other optimizer parameter groups)."""
        for name in ("local_horizon", "block_granularity"):
            saved, now = state.get(name), getattr(self.args, name)
            if saved != now:
                raise ValueError(
                    f"The checkpoint was trained with `{name}={saved!r}`, this run has `{name}={now!r}`: resume with "
                    f"`{name}={saved!r}`, or start a new run from the checkpoint's weights (`from_pretrained`) "
                    "instead of resuming."
                )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            _atomic_torch_save(self.bpmod_state_dict(), os.path.join(output_dir, BPMOD_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        path = os.path.join(checkpoint, BPMOD_STATE_NAME)
        if not os.path.isfile(path):
            saved = set(os.listdir(checkpoint)) if os.path.isdir(checkpoint) else set()
            if not any(name.startswith("optimizer") for name in saved):
                raise FileNotFoundError(
                    f"{checkpoint} holds no training state (no optimizer state, no {BPMOD_STATE_NAME} with the "
                    "auxiliary heads and offsets), as `save_only_model=True` writes, so it cannot be resumed. Start a "
                    "new run from its weights (`from_pretrained`), or save full checkpoints to resume from."
                )
            raise FileNotFoundError(
                f"{checkpoint} has no {BPMOD_STATE_NAME} (auxiliary heads and offset state): it was not written by "
                "BPModifiedTrainer. Start a new run instead of resuming from it."
            )
        state = torch.load(path, map_location=self.args.device, weights_only=False)
        self._check_bpmod_state(state)  # before the optimizer's state, which would fail on other parameter groups
        super()._load_optimizer_and_scheduler(checkpoint)
        self.load_bpmod_state_dict(state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the model weights of a checkpoint to resume from (see `_reload_full_model`)."""
        if not self._reload_full_model(resume_from_checkpoint, model if model is not None else self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """Load the best checkpoint at the end of training (`load_best_model_at_end`; see `_reload_full_model`)."""
        checkpoint = self.state.best_model_checkpoint
        if self._reload_full_model(checkpoint, self.model):
            logger.info(f"Loaded the best model from {checkpoint} (score: {self.state.best_metric}).")
        else:  # the Trainer's path logs it itself
            super()._load_best_model()

    def _reload_full_model(self, checkpoint: str, model: nn.Module) -> bool:
        """Copy a checkpoint's weights into a full (non-peft) model through ``from_pretrained``'s key conversion.

        transformers 5.24 saves ViT checkpoints under the legacy key names (``vit.encoder.layer...``) but its
        ``Trainer`` reloads them, to resume and for ``load_best_model_at_end``, with a plain ``load_state_dict``,
        which silently drops every encoder weight. A full model is therefore reloaded with ``from_pretrained`` and
        copied in, strictly. Returns False, leaving it to the ``Trainer``'s own path, for peft models (their adapters)
        and where the folder holds no saved model (the ``Trainer`` then raises, or for the best model on another node's
        disk, warns).
        """
        if hasattr(model, "peft_config") or hasattr(self.model, "peft_config"):
            return False
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            return False
        target = unwrap_model(model)
        reloaded = type(target).from_pretrained(checkpoint)
        target.load_state_dict(reloaded.state_dict(), strict=True)
        del reloaded
        return True

    # ------------------------------------------------------------------ model card
    def method_description(self) -> dict[str, Any]:
        """The method and its settings, as recorded in the model card."""
        args = self.args
        info: dict[str, Any] = {
            "method": "BP-modified local loss" if self.uses_offset else "local loss",
            "local_horizon": args.local_horizon,
            "num_blocks": self.block_chain.num_blocks,
            "block_granularity": args.block_granularity,
            "bp_modified": self.uses_offset,
        }
        if self.uses_offset:
            info.update(
                offset_batch_size=args.offset_batch_size,
                offset_micro_batch_size=args.offset_micro_batch_size,
                offset_period=args.offset_period,
                offset_scaling=args.offset_scaling,
                offset_max_ratio=args.offset_max_ratio,
            )
        return info

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in ("hf_bpmod", "local-learning") if t not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, encoding="utf-8") as f:
            card = f.read()
        # transformers takes `finetuned_from` from the config's `_name_or_path`, which is "" for a model built from a
        # config, and then links an empty base model; say what it is instead.
        unnamed_base = "This model is a fine-tuned version of [](https://huggingface.co/) on "
        card = card.replace(unnamed_base, "This model was trained from scratch on ", 1)
        lines = ["", "## Training method (hf_bpmod)", ""]
        lines.append(
            "Trained with [hf_bpmod](https://pypi.org/project/hf-bpmod/): each block learns from the loss of an "
            "auxiliary head `local_horizon` blocks ahead (Ren & Li, *BP-modified local loss for efficient training "
            "of deep neural networks*)."
        )
        lines.append("")
        lines += [f"- {key}: {value}" for key, value in self.method_description().items()]
        tmp = f"{path}.tmp-{os.getpid()}"  # the card is replaced whole, never left half-written
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(card + "\n".join(lines) + "\n")
        os.replace(tmp, path)
