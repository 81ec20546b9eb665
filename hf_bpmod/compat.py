"""Every workaround for a transformers release, in one place.

Each is marked ``Delete when:`` with the release of transformers (or accelerate) that makes it unnecessary; it can
go once ``pyproject.toml``'s floor reaches that release. Where no release fixes it yet, the mark says how to see
whether it is still needed. Model layouts that moved between releases (a ViT's layer list, tuple outputs of encoder
layers) need no branch: the adapters find them by structure (``adapters.vit.find_layer_list``, ``chain.Sequence_``).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import LabelSmoother

from ._unwrap import unwrap_model

#: Delete when: transformers >= 5.0. Since 5 the label-smoothed loss is normalised by `num_items_in_batch` as the
#: Trainer passes it; before, by the batch. Training follows whichever the installed Trainer does.
LABEL_SMOOTHER_COUNTS_ITEMS = "num_items_in_batch" in inspect.signature(LabelSmoother.__call__).parameters


def no_dataset_code() -> dict[str, Any]:
    """Delete when: datasets >= 4.0 is the floor (it no longer runs dataset scripts). Keyword arguments that stop
    ``datasets.load_dataset`` from running a Hub dataset's loading script, whatever ``HF_DATASETS_TRUST_REMOTE_CODE``
    says."""
    import datasets

    parameters = inspect.signature(datasets.load_dataset).parameters
    return {"trust_remote_code": False} if "trust_remote_code" in parameters else {}


def check_layer_checkpointing(model: nn.Module) -> None:
    """Delete when: transformers >= 4.53.

    Local gradients call a model's layers one by one. Before 4.53 a ViT checkpointed its layers in the encoder's
    loop, which those calls bypass, so ``gradient_checkpointing=True`` would silently do nothing; since, each layer
    (a ``GradientCheckpointingLayer``) checkpoints itself. A model without checkpointing is refused here, before
    any work, rather than by the Trainer when training starts."""
    base = unwrap_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"`gradient_checkpointing=True`: transformers has no gradient checkpointing for {type(base).__name__}. "
            "Leave it off: with local losses only `local_horizon` blocks keep their activations."
        )
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


def non_reentrant_checkpointing(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Delete when: transformers >= 5.0 (which defaults to the non-reentrant variant).

    ``gradient_checkpointing_kwargs`` with ``use_reentrant=False`` unless given: before 5 the reentrant variant was
    the default, and it cannot be differentiated with ``torch.autograd.grad``."""
    kwargs = dict(kwargs or {})
    kwargs.setdefault("use_reentrant", False)
    return kwargs


def sync_activation_checkpointing_kwargs(args: Any) -> None:
    """Delete when: transformers >= 5.0 is the floor and ``gradient_checkpointing_kwargs`` is gone: since 5 the
    Trainer reads the same settings as ``activation_checkpointing_kwargs``."""
    if hasattr(args, "activation_checkpointing_kwargs"):
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs


def parallelism_config(accelerator: Any) -> Any:
    """Delete when: accelerate >= 1.10 (``Accelerator.parallelism_config``) is the floor."""
    return getattr(accelerator, "parallelism_config", None)


#: Delete the second pair when: transformers >= 5.9. A ViT's query and value projections, as peft targets, by name.
VIT_QUERY_VALUE_NAMES = (["q_proj", "v_proj"], ["query", "value"])

#: Delete the second pair when: transformers >= 5.9. A Swin's query and value projections, as peft targets, by name
#: (SwinV2 names them query/value in every supported release).
SWIN_QUERY_VALUE_NAMES = (["q_proj", "v_proj"], ["query", "value"])


def optimizer_cls_and_kwargs(args: Any, model: nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
    """Delete when: transformers >= 5.0.

    The Trainer's optimizer class and arguments, with ``optim_args`` honoured for ``optim="sgd"`` (``momentum``,
    ``dampening``, ``weight_decay``, ``nesterov``) as 5 honours them: before, they were silently dropped, which
    would train the paper's recipes (SGD with momentum 0.9) without momentum."""
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    if optimizer_cls is torch.optim.SGD and args.optim_args:
        given = dict(item.split("=", 1) for item in args.optim_args.replace(" ", "").split(",") if "=" in item)
        for key in ("momentum", "dampening", "weight_decay"):
            if key in given and key not in optimizer_kwargs:
                optimizer_kwargs[key] = float(given[key])
        if "nesterov" in given and "nesterov" not in optimizer_kwargs:
            optimizer_kwargs["nesterov"] = given["nesterov"].lower() in ("true", "1", "yes")
    return optimizer_cls, optimizer_kwargs


def loss_is_scaled_for_ga(trainer: Trainer, num_items_in_batch: Any) -> bool:
    """Whether the loss the Trainer's ``training_step`` gets is already divided over gradient accumulation, by the
    Trainer's own rule. Delete the ``getattr`` when the floor has ``Trainer.loss_is_scaled_for_ga`` (5.0 has not,
    5.24 has)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return scaled


def gradient_accumulation_steps(trainer: Trainer) -> int:
    """Delete when: transformers >= 4.55 (``Trainer.current_gradient_accumulation_steps``)."""
    return getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)


def tensor_parallel_size(trainer: Trainer) -> int:
    """Delete when: transformers >= 4.53 (``Trainer.get_tp_size``)."""
    return trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1


#: Delete when: transformers >= 4.56 is the floor. The name of ``from_pretrained``'s dtype argument (``torch_dtype``
#: before 4.56; since, ``dtype``, ``torch_dtype`` deprecated).
DTYPE_ARGUMENT = "dtype" if tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56) else "torch_dtype"


def reload_full_model(checkpoint: str, model: nn.Module) -> bool:
    """No release fixes this yet (reload a ViT's best checkpoint under ``load_best_model_at_end`` to see it).

    transformers 5.24 saves ViT checkpoints under the legacy key names (``vit.encoder.layer...``) but its
    ``Trainer`` reloads them, to resume and for ``load_best_model_at_end``, with a plain ``load_state_dict``, which
    silently drops every encoder weight. A full model is therefore reloaded with ``from_pretrained`` (which converts
    the keys), in the model's dtype whatever dtype the checkpoint's config.json names (as the ``Trainer`` loads its
    weights), and copied in, strictly. Returns False, leaving it to the ``Trainer``'s own path, for peft models
    (their adapters) and where the folder holds no saved model (the ``Trainer`` then raises, or for the best model on
    another node's disk, warns)."""
    if hasattr(model, "peft_config") or not os.path.isfile(os.path.join(checkpoint, "config.json")):
        return False
    target = unwrap_model(model)
    # in the model's own dtype, as the Trainer's load_state_dict keeps it, not the one config.json names
    reloaded = type(target).from_pretrained(checkpoint, **{DTYPE_ARGUMENT: target.dtype})
    target.load_state_dict(reloaded.state_dict(), strict=True)
    del reloaded
    return True


#: No release fixes this yet. transformers takes a model card's `finetuned_from` from the config's `_name_or_path`,
#: which is "" for a model built from a config, and then links an empty base model.
UNNAMED_BASE_MODEL_SENTENCE = "This model is a fine-tuned version of [](https://huggingface.co/) on "


#: Whether ``PreTrainedModel.from_pretrained`` looks for a peft adapter itself, with the hub arguments it was given
#: (transformers < 5; since, only ``AutoModel*.from_pretrained`` looks, without them: see ``model_load_kwargs``).
_MODEL_LOOKS_FOR_ADAPTERS_ITSELF = "find_adapter_config_file" in (
    inspect.unwrap(transformers.PreTrainedModel.from_pretrained.__func__).__code__.co_names
)


def model_load_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """No release fixes this yet (transformers 5.25: load a cached model with ``local_files_only=True`` while the Hub
    is unreachable to see it).

    ``AutoModel*.from_pretrained`` looks for a peft ``adapter_config.json`` without the ``local_files_only`` and
    ``cache_dir`` it was given, so with the Hub out of reach it retries that one file for about 20 seconds before it
    loads the cached model. ``adapter_kwargs`` gives that lookup the same settings. Releases whose model class looks
    itself pass them already (and would get them twice)."""
    if not kwargs.get("local_files_only") or _MODEL_LOOKS_FOR_ADAPTERS_ITSELF:
        return kwargs
    adapter = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token") if kwargs.get(k) is not None}
    return {**kwargs, "adapter_kwargs": adapter}
