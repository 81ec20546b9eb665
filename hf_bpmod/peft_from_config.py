"""PEFT on a model built from a config: its base weights are random and exist nowhere else, so what is saved carries
them.

- The final model is saved with the adapters merged into the base weights (:func:`save_merged_model`): a plain
  transformers model that ``from_pretrained`` reloads and the Hub serves. An adapter alone could not be reloaded.
- The untrained base is saved once in ``output_dir/_base_model`` (:data:`BASE_MODEL_DIR`), which the checkpoints'
  adapters name as their base, so they can be resumed and reloaded with plain peft; :func:`plan_base` says where to
  save it or, when resuming, where to load it from (:func:`base_for_resume`), and refuses what would orphan a run's
  checkpoints.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from transformers.trainer_utils import get_last_checkpoint

#: Where the untrained base weights go, inside ``output_dir``; ``push_to_hub`` leaves ``_*`` folders out of uploads.
BASE_MODEL_DIR = "_base_model"
#: The files an adapter save writes, which a merged save removes from its folder.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def save_merged_model(model: torch.nn.Module, output_dir: str) -> None:
    """Save ``model`` (a peft model) with its adapters merged into the base weights, as a plain transformers model;
    adapter files left in ``output_dir`` by earlier saves are removed, so ``from_pretrained`` reads the full model.
    ``model`` itself keeps its adapters."""
    from peft.utils import ModulesToSaveWrapper

    merged = copy.deepcopy(model)
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


def base_for_resume(checkpoint: str) -> str:
    """The untrained base weights a peft checkpoint of a model built from a config was trained on: the folder its
    adapter config names, else :data:`BASE_MODEL_DIR` next to the checkpoint (an ``output_dir`` that was moved)."""
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


def plan_base(
    output_dir: str, checkpoint: str | None, push_to_hub: bool = False, hub_strategy: str = "end"
) -> tuple[str | None, str | None]:
    """``(resume_base, save_base)`` for a peft run on a model built from a config: the saved base weights to resume
    on (when resuming from ``checkpoint``), or the folder to save the new ones in (``output_dir/_base_model``). Refuses
    Hub pushes of checkpoint adapters, whose base is not on the Hub, and replacing the base of an earlier run's
    checkpoints."""
    strategy = getattr(hub_strategy, "value", hub_strategy)
    if push_to_hub and strategy != "end":
        raise ValueError(
            f"--push_to_hub with peft on a model built from a config uploads the merged model at the end; "
            f"--hub_strategy {strategy} would also upload checkpoint adapters, whose base weights are not on the "
            "Hub. Pass --hub_strategy end."
        )
    if checkpoint is not None:
        return base_for_resume(checkpoint), None
    save_base = os.path.join(output_dir, BASE_MODEL_DIR)
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is not None and os.path.isdir(save_base):
        raise ValueError(
            f"Training from scratch would replace {save_base}, the base weights the adapters in {last} were trained "
            "on. Pass --resume_from_checkpoint last to continue that run, or another --output_dir."
        )
    return None, save_base
