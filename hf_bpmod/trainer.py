"""``BPModifiedTrainer``: the HuggingFace ``Trainer`` with block-wise local gradients and the BP-modified offset.

The algorithm lives in :mod:`hf_bpmod.local_grad`, :mod:`hf_bpmod.offset`, :mod:`hf_bpmod.offset_pass` and
:mod:`hf_bpmod.offset_controller`; this file is plumbing. It overrides ``training_step`` (local gradients into
``.grad``, then, once per optimizer step, the average across processes and the offset), the optimizer (auxiliary
heads get their own parameter group), checkpointing (auxiliary heads and offset state travel with the optimizer
state) and the model card. The model that is saved or pushed is the user's model alone.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from . import block_metrics, compat, console, distributed, head_clipping, losses, precision, run_lock, setup_checks
from ._files import refuse_symlink
from ._unwrap import unwrap_model
from .adapters import get_adapter
from .checkpoint import (
    check_block_split,
    forget_optimizer_state,
    last_complete_checkpoint,
    load_bpmod_state,
    save_bpmod_state,
    saved_method,
)
from .config import BPModifiedTrainingArguments
from .guard import NonFiniteGuard
from .local_grad import local_gradients
from .model_card import CARD_TAGS, add_method_section, complete_card, method_description, training_description
from .offset_controller import OffsetController, OffsetData
from .offset_pass import OffsetState, Processes

logger = logging.get_logger(__name__)


class _OffsetLogStart(TrainerCallback):
    """At the start of training (state restored on resume), aligns the refresh log with where training starts."""

    def __init__(self, trainer: BPModifiedTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.offset.start_log(state.global_step)


class BPModifiedTrainer(Trainer):
    """A drop-in ``Trainer`` that trains each block from a local loss ``h`` blocks ahead (eq. 4), corrected by a
    periodically refreshed offset from the true backprop gradient (eq. 5, Algorithm 1).

    Takes ``transformers.Trainer``'s arguments; ``args`` must be a :class:`~hf_bpmod.BPModifiedTrainingArguments`.
    Supported models: those with a registered adapter (``hf_bpmod.adapters.ADAPTERS``), plain or wrapped by peft."""

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
        block_metrics.check_eval_block_accuracy(args, model)
        self.bp_modified = setup_checks.resolve_bp_modified(args, self.adapter)
        if args.gradient_checkpointing:
            compat.check_layer_checkpointing(model)
        if type(self).compute_loss is not BPModifiedTrainer.compute_loss:
            warnings.warn(
                f"{type(self).__name__} overrides `compute_loss`, which BPModifiedTrainer calls in evaluation only: "
                "training computes the loss of every block's head itself. To change the training loss, pass "
                "`compute_loss_func(outputs, labels, num_items_in_batch)` (it gets each head's logits as "
                "`outputs.logits`) or set `label_smoothing_factor`.",
                stacklevel=2,
            )
        super().__init__(model=model, args=args, **kwargs)
        console.shorten_console(self.callback_handler.callbacks)  # per-block details: logged, not printed
        self.forward_takes_labels = losses.forward_takes_labels(self.model)
        if args.label_names is None and not self.forward_takes_labels:
            self.label_names = ["labels"]  # keep the column that the trainer's own loss reads
        distributed.reject_unsupported_backends(self.accelerator, args, self.model)
        base = unwrap_model(self.model)
        self.training_loss = losses.TrainingLoss(
            base,
            compute_loss_func=self.compute_loss_func,
            label_smoother=self.label_smoother,
            model_accepts_loss_kwargs=self.model_accepts_loss_kwargs,
            average_tokens_across_devices=args.average_tokens_across_devices,
        )
        self.aux_heads = self.adapter.aux_heads(base, args.local_horizon, args.block_granularity).to(args.device)
        distributed.broadcast_from_main_process(self.aux_heads)  # not part of the DDP model: start equal everywhere
        self.add_callback(_OffsetLogStart(self))
        self.add_callback(head_clipping.ClipAuxHeadGradients(self.aux_heads))
        self.block_chain = self.adapter.chain(base, self.aux_heads, args.block_granularity)
        setup_checks.warn_about_ignored_settings(args, self.block_chain.num_blocks)
        missed = self.block_chain.uncovered_parameters(self.model)
        if missed:
            warnings.warn(
                f"{len(missed)} trainable parameters lie outside every block and the head and will get no gradient "
                f"from BPModifiedTrainer: {missed[:5]}{' ...' if len(missed) > 5 else ''}",
                stacklevel=2,
            )
        self._zero_aux_grads = True
        num_processes = self.accelerator.num_processes
        reduce_sum = dist.all_reduce if num_processes > 1 else None
        self.offset = OffsetController(
            self.block_chain,
            args.offset_settings(),
            processes=Processes(args.process_index, num_processes, reduce_sum),
            preserve=[self.model, self.aux_heads],
            forward_context=self._forward_context,
            log_path=os.path.join(args.output_dir, args.offset_log_file) if args.should_save else None,
            log_folder=args.output_dir,
            announce=args.should_log,
        )
        if self.uses_offset and self.train_dataset is not None:
            self._check_offset_dataset(self.train_dataset)
        self.guard = NonFiniteGuard(
            self.block_chain, [base, self.aux_heads], args.max_nonfinite_steps, reduce_sum=reduce_sum
        )
        self.block_metrics = block_metrics.BlockMetrics(  # per-block losses and accuracies
            self.block_chain,
            self.aux_heads,
            self.training_loss,
            self.accelerator,
            eval_block_accuracy=args.eval_block_accuracy,
            logging_nan_inf_filter=args.logging_nan_inf_filter,
            label_names=self.label_names,
            reduce_sum=reduce_sum,
        )
        self.add_callback(self.block_metrics)

    # ------------------------------------------------------------------ set-up
    @property
    def uses_offset(self) -> bool:
        """Whether the BP offset is on (``bp_modified``, resolved per architecture when ``None``, and some block's
        local gradient is not already exact)."""
        return self.bp_modified and self.args.local_horizon < self.block_chain.num_blocks

    get_optimizer_cls_and_kwargs = staticmethod(compat.optimizer_cls_and_kwargs)

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
    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ):
        """The Trainer's loss, for evaluation only (``training_step`` computes its own), as the batch mean; with
        ``eval_block_accuracy`` from one forward through the blocks that scores every head on the way; for a model
        whose ``forward`` takes no ``labels``, the loss of its logits that training uses. ``num_items_in_batch`` is
        dropped: ``ResNetForImageClassification.forward`` ignores it, and the Trainer would then multiply its batch
        mean by the number of processes."""
        if self.block_metrics.collecting and "labels" in inputs:
            return self.block_metrics.compute_loss(inputs, return_outputs)
        if "labels" in inputs and not self.forward_takes_labels:
            return losses.loss_of_logits(self.training_loss, model, inputs, return_outputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    def evaluation_loop(self, *args, **kwargs):
        """The Trainer's loop; with ``eval_block_accuracy`` its metrics gain ``{prefix}_block_{s}_accuracy``."""
        return self.block_metrics.evaluation_loop(super().evaluation_loop, *args, **kwargs)

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's ``train``, holding the ``output_dir`` for this run alone (:mod:`hf_bpmod.run_lock`).
        ``resume_from_checkpoint=True`` resumes from the newest complete checkpoint in ``output_dir``, skipping with
        a warning any newer one that a kill during its save left incomplete
        (:func:`~hf_bpmod.checkpoint.last_complete_checkpoint`)."""
        with run_lock.training_lock(self.args):
            if resume_from_checkpoint is True:
                warn = logger.warning if self.args.should_log else logger.info
                found = last_complete_checkpoint(self.args.output_dir, "resume_from_checkpoint=True", warn)
                resume_from_checkpoint = True if found is None else found  # None: the Trainer's own error
            return super().train(resume_from_checkpoint, *args, **kwargs)

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
            self.guard.start_step()
        pixel_values, labels = losses.split_inputs(self._prepare_inputs(inputs))
        loss_fn = self.training_loss.micro_batch(
            labels,
            num_items_in_batch,
            data_processes=self.accelerator.num_processes // compat.tensor_parallel_size(self),
            accumulation_steps=compat.gradient_accumulation_steps(self),
            scaled_for_ga=compat.loss_is_scaled_for_ga(self, num_items_in_batch),
        )
        result = local_gradients(
            self.block_chain,
            pixel_values,
            loss_fn,
            self.args.local_horizon,
            accumulate=True,
            loss_scale=self._grad_scale(),
            forward_context=self._forward_context,
        )
        self.guard.add_losses(result.head_losses)
        self.block_metrics.add_losses(result.head_losses, self.accelerator.sync_gradients)
        if self.accelerator.sync_gradients:
            self._finish_optimizer_step_gradients()
        return result.loss

    def _forward_context(self) -> contextlib.ExitStack:
        return precision.forward_context(self.accelerator, self.compute_loss_context_manager)

    def _grad_scale(self) -> float:
        return precision.loss_scale(self.accelerator, self.args.device)

    def _finish_optimizer_step_gradients(self) -> None:
        """Once per optimizer step: average the gradients (and BatchNorm statistics) across processes, then
        ``g^ = a g_h + lambda Delta`` (eq. 5), refreshing the offset first when a period starts, then skip the step
        if a loss or gradient is not finite (:mod:`hf_bpmod.guard`)."""
        self._zero_aux_grads = True
        num_processes = self.accelerator.num_processes
        if num_processes > 1:
            params = self.block_chain.trainable_parameters() + list(self.aux_heads.parameters())
            distributed.average_gradients(params, num_processes)
            if self.args.ddp_broadcast_buffers is not False:
                distributed.average_buffers((unwrap_model(self.model), self.aux_heads), num_processes)
        offset_blocks: list[int] = []
        if self.uses_offset:
            if self.offset.due(self.state.global_step):
                self._refresh_offset()
            self.offset.apply(self._grad_scale())
            offset_blocks = [
                t
                for t, b in enumerate(self.offset.state.blocks)
                if b.scale != 1.0 or (b.delta is not None and b.weight != 0.0)
            ]
        scaler_on = precision.scaler_enabled(self.accelerator)
        self.guard.finish_step(self.state.global_step, self.optimizer, scaler_on, offset_blocks)

    # ------------------------------------------------------------------ the offset's data
    def _refresh_offset(self) -> None:
        finite = self.offset.refresh(self.state.global_step, self._offset_data(), self._grad_scale())
        self.guard.refresh_done(self.state.global_step, finite)

    def _offset_data(self) -> OffsetData:
        """The training set as the offset pass reads it: the training collator and column filtering, the loss of
        training (as a micro-batch mean), and the optimizer steps of an epoch."""
        dataset = self.train_dataset
        self._check_offset_dataset(dataset)  # it may have been replaced since __init__
        collator = self.data_collator
        datasets = sys.modules.get("datasets")  # a `datasets.Dataset` can only come from an imported `datasets`
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description="training")

        def fetch(indices: list[int]):
            pixel_values, labels = losses.split_inputs(self._prepare_inputs(collator([dataset[i] for i in indices])))
            return pixel_values, lambda logits: self.training_loss(logits, labels)

        return OffsetData(size=len(dataset), fetch=fetch, steps_per_epoch=self._steps_per_epoch(len(dataset)))

    def _steps_per_epoch(self, n: int) -> int:
        """The optimizer steps of an epoch over ``n`` training examples."""
        args = self.args
        per_step = args.per_device_train_batch_size * args.world_size
        batches = n // per_step if args.dataloader_drop_last else -(-n // per_step)
        return max(1, -(-batches // args.gradient_accumulation_steps))

    def _check_offset_dataset(self, dataset: Any) -> None:
        """The offset's checks of the training set; ``B'`` chosen from it where ``offset_batch_size`` is unset."""
        self.offset.check_dataset(dataset, self._steps_per_epoch(len(dataset)) if hasattr(dataset, "__len__") else 1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs = {**logs, **self.offset.pop_logs(), **self.block_metrics.pop_logs()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def bpmod_state_dict(self) -> dict:
        """Auxiliary heads and offset state: what a checkpoint needs besides the model and optimizer."""
        return {
            "aux_heads": self.aux_heads.state_dict(),
            "offset": self.offset.state.state_dict(),
            "local_horizon": self.args.local_horizon,
            "block_granularity": self.args.block_granularity,
            "bp_modified": self.uses_offset,
            "nonfinite": self.guard.state_dict(),
        }

    def load_bpmod_state_dict(self, state: dict) -> None:
        check_block_split(state, self.args)
        self.aux_heads.load_state_dict(state["aux_heads"])
        self.offset.state = OffsetState.from_state_dict(state["offset"])
        self.guard.load_state_dict(state.get("nonfinite") or {})
        self._resume_method(saved_method(state))

    def _resume_method(self, saved: bool) -> None:
        """With ``bp_modified=None`` a run resumes with the method its checkpoint was trained with, also where the
        architecture's default differs. An explicit ``bp_modified`` is obeyed."""
        if self.args.bp_modified is not None or saved == self.uses_offset:
            return
        if saved and self.args.local_horizon >= self.block_chain.num_blocks:
            return  # exact backprop: no offset either way
        logger.warning(
            f"bp_modified=None: resuming {'with' if saved else 'without'} the BP offset, as the checkpoint was "
            f"trained, although the default for {self.adapter.model_type} models is "
            f"{'off' if saved else 'on'}. Pass `bp_modified` to choose."
        )
        if saved and self.train_dataset is not None:
            self._check_offset_dataset(self.train_dataset)
        self.bp_modified = saved

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_bpmod_state(self.bpmod_state_dict(), output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        # checked against this model before the optimizer's state; None: rebuild_bpmod_state with a fresh state
        state = load_bpmod_state(
            checkpoint, self.aux_heads, self.block_chain.block_params, self.args, self._offset_period_steps()
        )
        super()._load_optimizer_and_scheduler(checkpoint)
        if state is not None:
            self.load_bpmod_state_dict(state)
            return
        self.offset.state = OffsetState()  # refreshed at the next step
        self.guard.load_state_dict({})
        forget_optimizer_state(self.optimizer, self.aux_heads.parameters())  # the heads start afresh

    def _offset_period_steps(self) -> int | None:
        """This run's offset period in optimizer steps (``K``); ``None`` without a training set of known size."""
        try:
            n = len(self.train_dataset)
        except TypeError:  # none, or streamed
            return None
        return self.args.offset_settings().period_steps(self._steps_per_epoch(n))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the model weights of a checkpoint to resume from (see `_reload_full_model`)."""
        if not self._reload_full_model(resume_from_checkpoint, model if model is not None else self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """Load the best checkpoint for ``load_best_model_at_end`` (see `_reload_full_model`)."""
        checkpoint = self.state.best_model_checkpoint
        if self._reload_full_model(checkpoint, self.model):
            logger.info(f"Loaded the best model from {checkpoint} (score: {self.state.best_metric}).")
        else:  # the Trainer's path logs it itself
            super()._load_best_model()

    def _reload_full_model(self, checkpoint: str, model: nn.Module) -> bool:
        """Whether :func:`hf_bpmod.compat.reload_full_model` reloaded a full (non-peft) model."""
        return not hasattr(self.model, "peft_config") and compat.reload_full_model(checkpoint, model)

    # ------------------------------------------------------------------ model card
    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        """The Trainer's card with our tags and method section; a symbolic link at ``README.md`` is refused first (the
        Trainer's ``open(path, "w")`` would write through it)."""
        if self.is_world_process_zero():
            refuse_symlink(os.path.join(self.args.output_dir, "README.md"))
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in CARD_TAGS if t not in tags]
        data_description = kwargs.pop("data_description", None)  # markdown for the card's data section
        super().create_model_card(*args, tags=tags, **kwargs)
        if self.is_world_process_zero():
            settings = self.offset.settings
            description = method_description(
                self.args,
                self.block_chain.num_blocks,
                self.uses_offset,
                settings.sample_size,
                settings.micro_batch_size,
            )
            add_method_section(os.path.join(self.args.output_dir, "README.md"), description)
            trained = training_description(self.model, self.aux_heads)
            complete_card(os.path.join(self.args.output_dir, "README.md"), trained, tags, data_description)
