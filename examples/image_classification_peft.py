"""The PEFT side of ``run_image_classification.py``: LoRA/LoKr adapters on the architecture's default targets, and
what a run saves so that it can be reloaded and resumed (for a base built from a config: the merged model in
``output_dir``, the untrained base weights in ``output_dir/_base_model`` for the checkpoints' adapters)."""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import TYPE_CHECKING

import torch
from transformers.trainer_utils import get_last_checkpoint

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter

if TYPE_CHECKING:  # the argument dataclasses live in the script, where HfArgumentParser parses them
    from run_image_classification import ModelArguments

logger = logging.getLogger(__name__)

#: Where a peft run on a model built from a config keeps the untrained base weights its checkpoints' adapters need,
#: inside ``output_dir``; ``push_to_hub`` leaves ``_*`` folders out of the upload.
BASE_MODEL_DIR = "_base_model"
PEFT_METHODS = ("none", "lora", "lokr")


def peft_target_modules(model: torch.nn.Module) -> list[str]:
    """Adapter targets: the architecture adapter's default (ViT: the attention's query/value projections, named
    ``q_proj``/``v_proj`` in transformers >= 5.9 and ``query``/``value`` before; ResNet: every convolution)."""
    try:
        return get_adapter(model).peft_target_modules(model)
    except (NotImplementedError, ValueError) as err:
        raise ValueError(f"{err} Or use --peft none.") from err


def apply_peft(
    model: torch.nn.Module, model_args: ModelArguments, base_model_path: str | None = None
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA or LoKr adapters; the classifier head is trained in full. ``base_model_path``: where
    the base weights are saved, recorded in the adapter's config (``base_model_name_or_path``) in place of the
    model's own name (none for a model built from a config)."""
    import peft

    targets = peft_target_modules(model)
    head = next(
        (name for name in ("classifier", "head") if isinstance(getattr(model, name, None), torch.nn.Module)), None
    )
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no 'classifier' (or 'head') module to train alongside the adapters; use "
            "--peft none."
        )
    if model_args.peft == "lora":
        peft_config = peft.LoraConfig(
            r=model_args.peft_rank, lora_alpha=model_args.peft_alpha, target_modules=targets, modules_to_save=[head]
        )
    else:
        peft_config = peft.LoKrConfig(
            r=model_args.peft_rank, alpha=model_args.peft_alpha, target_modules=targets, modules_to_save=[head]
        )
    model = peft.get_peft_model(model, peft_config)
    if base_model_path is not None:
        model.peft_config["default"].base_model_name_or_path = base_model_path
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        f"{model_args.peft} adapters on {targets} (+ full {head!r}): {trainable:,} of {total:,} parameters trainable."
    )
    return model


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def save_merged_model(model: torch.nn.Module, output_dir: str) -> None:
    """Save ``model`` (a peft model) with its adapters merged into the base weights, as a plain transformers model;
    adapter files left in ``output_dir`` by earlier saves are removed, so ``from_pretrained`` reads the full model."""
    from peft.utils import ModulesToSaveWrapper

    merged = copy.deepcopy(model)  # a copy: the trainer's model keeps its adapters
    # The fully trained modules (the head) first, as merge_and_unload would: peft 0.21's LoKr merge fails on a
    # Sequential one such as ResNet's head.
    for name, module in list(merged.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, attribute = name.rpartition(".")
            setattr(merged.get_submodule(parent), attribute, module.modules_to_save[merged.active_adapter])
    merged = merged.merge_and_unload()
    merged.save_pretrained(output_dir)
    for name in ADAPTER_FILES:
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


class ExampleTrainer(BPModifiedTrainer):
    """``BPModifiedTrainer`` whose save to ``output_dir`` (``save_model()``, ``push_to_hub``) writes the merged
    model when ``merge_peft_on_save``: the peft adapters on a base built from a config, which no one else has.
    Checkpoints keep the adapter, for resuming."""

    merge_peft_on_save: bool = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        target = output_dir if output_dir is not None else self.args.output_dir
        if not self.merge_peft_on_save or os.path.abspath(target) != os.path.abspath(self.args.output_dir):
            super().save_model(output_dir, _internal_call=_internal_call)
            return
        if self.args.should_save:
            os.makedirs(target, exist_ok=True)
            save_merged_model(self.accelerator.unwrap_model(self.model), target)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(target)
            torch.save(self.args, os.path.join(target, "training_args.bin"))


def peft_base_for_resume(checkpoint: str) -> str:
    """The untrained base weights a peft checkpoint of a model built from a config was trained on: the folder its
    adapter config names, else ``_base_model`` next to the checkpoint (an ``output_dir`` that was moved)."""
    candidates = []
    adapter_config = os.path.join(checkpoint, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config) as f:
            named = json.load(f).get("base_model_name_or_path")
        if named:
            candidates.append(named)
    candidates.append(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), BASE_MODEL_DIR))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise ValueError(
        f"--resume_from_checkpoint {checkpoint}: its adapters were trained on base weights saved in "
        f"{' or '.join(dict.fromkeys(candidates))}, which hold no model. Restore that folder, or train from scratch "
        "in another --output_dir."
    )


def reload_instructions(model_args: ModelArguments, output_dir: str, num_labels: int) -> str:
    """What the run saved in ``output_dir`` and how to reload it with plain transformers/peft."""
    if model_args.peft == "none":
        return (
            f"Saved the trained model to {output_dir}: reload it with "
            f"AutoModelForImageClassification.from_pretrained({output_dir!r})."
        )
    if model_args.merges_peft_on_save:
        base = os.path.join(output_dir, BASE_MODEL_DIR)
        return (
            f"Saved the trained model to {output_dir}, the {model_args.peft} adapters merged into the base weights "
            f"built from the config: reload it with AutoModelForImageClassification.from_pretrained({output_dir!r}). "
            f"The checkpoints hold the adapters on the untrained base weights in {base}: "
            f"PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained({base!r}), "
            "'<checkpoint folder>')."
        )
    resize = ", ignore_mismatched_sizes=True" if model_args.ignore_mismatched_sizes else ""
    return (
        f"Saved the {model_args.peft} adapter and the trained classifier to {output_dir}: reload them with "
        f"PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained("
        f"{model_args.model_name_or_path!r}, num_labels={num_labels}{resize}), {output_dir!r})."
    )


def peft_base_plan(
    model_args: ModelArguments, training_args: BPModifiedTrainingArguments, checkpoint: str | None
) -> tuple[str | None, str | None]:
    """For peft training on a model built from a config: the saved base weights to resume on, or the folder to save
    the new ones in (``output_dir/_base_model``); ``(None, None)`` otherwise. Refuses what would lose or break a
    run: replacing the base of an earlier run's checkpoints, and Hub pushes of adapters whose base is not there."""
    if not (model_args.merges_peft_on_save and training_args.do_train):
        return None, None
    if training_args.push_to_hub and training_args.hub_strategy != "end":
        raise ValueError(
            f"--push_to_hub with --peft {model_args.peft} on a model built from a config uploads the merged model at "
            f"the end; --hub_strategy {getattr(training_args.hub_strategy, 'value', training_args.hub_strategy)} would also upload checkpoint adapters, whose base "
            "weights are not on the Hub. Pass --hub_strategy end."
        )
    if checkpoint is not None:
        return peft_base_for_resume(checkpoint), None
    save_base = os.path.join(training_args.output_dir, BASE_MODEL_DIR)
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is not None and os.path.isdir(save_base):
        raise ValueError(
            f"Training from scratch would replace {save_base}, the base weights the adapters in {last} were trained "
            "on. Pass --resume_from_checkpoint last to continue that run, or another --output_dir."
        )
    return None, save_base
