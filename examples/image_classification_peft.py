"""The PEFT side of ``run_image_classification.py``: LoRA/LoKr adapters on the architecture's default targets, and
what a run saves so that it can be reloaded and resumed (for a base built from a config, the rules of
:mod:`hf_bpmod.peft_from_config`: the merged model in ``output_dir``, the untrained base weights in
``output_dir/_base_model`` for the checkpoints' adapters)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter
from hf_bpmod.peft_from_config import BASE_MODEL_DIR, plan_base, save_merged_model

if TYPE_CHECKING:  # the argument dataclasses live in the script, where HfArgumentParser parses them
    from run_image_classification import ModelArguments

logger = logging.getLogger(__name__)

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
    """For peft training on a model built from a config, :func:`hf_bpmod.peft_from_config.plan_base`: the saved
    base weights to resume on, or the folder to save the new ones in; ``(None, None)`` otherwise."""
    if not (model_args.merges_peft_on_save and training_args.do_train):
        return None, None
    return plan_base(training_args.output_dir, checkpoint, training_args.push_to_hub, training_args.hub_strategy)
