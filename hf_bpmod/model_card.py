"""What the model card says of the training: the method and its settings, what was trained (the peft adapters and
how many parameters), and the data; and what it links: only what exists."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import yaml

from . import __version__
from ._files import refuse_symlink, write_atomically
from .compat import UNNAMED_BASE_MODEL_SENTENCE

CARD_TAGS = ("hf_bpmod", "local-learning")
#: The section transformers leaves for the data, and its placeholder.
DATA_HEADING, PLACEHOLDER = "## Training and evaluation data", "More information needed"
#: peft's method names as its papers write them.
_PEFT_NAMES = {"LORA": "LoRA", "LOKR": "LoKr", "LOHA": "LoHa", "ADALORA": "AdaLoRA", "IA3": "IA3", "OFT": "OFT"}
#: A Hub repository id: ``name`` or ``namespace/name``.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def method_description(
    args: Any,
    num_blocks: int,
    uses_offset: bool,
    offset_batch_size: int | None = None,
    offset_micro_batch_size: int | None = None,
) -> dict[str, Any]:
    """The method and its settings, as recorded in the model card; ``offset_batch_size`` and
    ``offset_micro_batch_size``: the ``B'`` and ``b'`` used, where they were chosen from the data (default: the
    arguments')."""
    info: dict[str, Any] = {
        "method": "BP-modified local loss" if uses_offset else "local loss",
        "local_horizon": args.local_horizon,
        "num_blocks": num_blocks,
        "block_granularity": args.block_granularity,
        "bp_modified": uses_offset,
    }
    if uses_offset:
        unset = "chosen from the training data"
        info.update(
            offset_batch_size=offset_batch_size or args.offset_batch_size or unset,
            offset_micro_batch_size=offset_micro_batch_size or args.offset_micro_batch_size or unset,
            offset_period=args.offset_period,
            offset_scaling=args.offset_scaling,
            offset_max_ratio=args.offset_max_ratio,
        )
    return info


def add_method_section(path: str, description: dict[str, Any]) -> None:
    """Append the method section to the card at ``path`` (replaced whole, never left half-written); a model built
    from a config is said to be trained from scratch instead of fine-tuned from an empty link. A symbolic link at
    ``path`` is refused, not read."""
    refuse_symlink(path)
    with open(path, encoding="utf-8") as f:
        card = f.read()
    card = card.replace(UNNAMED_BASE_MODEL_SENTENCE, "This model was trained from scratch on ", 1)
    lines = ["", "## Training method (hf_bpmod)", ""]
    lines.append(
        f"Trained with hf_bpmod {__version__}: each block learns from the loss of an auxiliary head "
        "`local_horizon` blocks ahead (Ren & Li, *BP-modified local loss for efficient training of deep neural "
        "networks*)."
    )
    lines.append("")
    lines += [f"- {key}: {value}" for key, value in description.items()]
    write_atomically(path, (card + "\n".join(lines) + "\n").encode("utf-8"))


def training_description(model: torch.nn.Module, aux_heads: torch.nn.Module | None = None) -> dict[str, Any]:
    """What was trained, as recorded in the model card: the active peft adapter (method, rank, alpha, targets,
    modules trained in full), the model's trained parameters of all its parameters (as peft counts them), and the
    auxiliary heads' parameters, which train with the model and are not saved with it."""
    info: dict[str, Any] = {}
    config = _active_peft_config(model)
    if config is not None:
        kind = str(getattr(config.peft_type, "value", config.peft_type))
        info["peft"] = _PEFT_NAMES.get(kind, kind)
        rank = getattr(config, "r", None)
        alpha = next(
            (getattr(config, n) for n in ("lora_alpha", "alpha") if getattr(config, n, None) is not None), None
        )
        targets, full = getattr(config, "target_modules", None), getattr(config, "modules_to_save", None)
        for key, value in (("peft_r", rank), ("peft_alpha", alpha)):
            if value is not None:
                info[key] = value
        for key, value in (("peft_target_modules", targets), ("peft_modules_to_save", full)):
            if value:
                info[key] = value if isinstance(value, str) else ", ".join(sorted(value))
    if hasattr(model, "get_nb_trainable_parameters"):
        trained, total = model.get_nb_trainable_parameters()
    else:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    info["trained_parameters"] = f"{trained:,} of {total:,} ({trained / max(total, 1):.2%})"
    heads = sum(p.numel() for p in aux_heads.parameters()) if aux_heads is not None else 0
    if heads:
        info["auxiliary_head_parameters"] = f"{heads:,} (trained with the model, not saved with it)"
    return info


def _active_peft_config(model: torch.nn.Module) -> Any:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    active = active[0] if isinstance(active, (list, tuple)) and active else active
    return configs.get(active, next(iter(configs.values())))


def complete_card(path: str, trained: dict[str, Any], tags: list[str], data_description: str | None = None) -> None:
    """Complete the card at ``path`` after :func:`add_method_section` (replaced whole, never left half-written): the
    method section gains ``trained`` (:func:`training_description`); the data section holds ``data_description``;
    ``tags`` come back where peft's update of the card dropped them; a base model that is no Hub repository (a
    local folder) is named, not linked to the Hub, and left out of the metadata."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    metadata, text = _split(content)
    if metadata is not None:
        present = list(metadata.get("tags") or [])
        metadata["tags"] = present + [tag for tag in tags if tag not in present]
    text = _unlink_local_base_model(text, metadata)
    text = re.sub(r"(?<!\n)\n## Training method \(hf_bpmod\)\n", "\n\n## Training method (hf_bpmod)\n", text)
    if data_description:
        text = _with_data_section(text, data_description.strip())
    text = text.rstrip("\n") + "\n" + "".join(f"- {key}: {value}\n" for key, value in trained.items())
    head = "" if metadata is None else f"---\n{yaml.dump(metadata, sort_keys=False)}---\n"
    write_atomically(path, (head + text).encode("utf-8"))


def _split(content: str) -> tuple[dict[str, Any] | None, str]:
    """A card's YAML metadata (``None`` without a metadata block) and its text."""
    if content.startswith("---\n") and "\n---\n" in content[3:]:
        block, text = content[4:].split("\n---\n", 1)
        try:
            metadata = yaml.safe_load(block)
        except yaml.YAMLError:  # e.g. a python object tag: the block is kept as it is, untouched
            return None, content
        if isinstance(metadata, dict):
            return metadata, text
    return None, content


def _unlink_local_base_model(text: str, metadata: dict[str, Any] | None) -> str:
    """A base model that is no Hub repository named instead of linked, and left out of the metadata (whose
    ``base_model`` and ``base_model:...`` tags must name Hub repositories)."""
    match = re.search(r"This model is a fine-tuned version of \[([^\]]+)\]\(https://huggingface\.co/[^)]*\)", text)
    if match is None or not _is_local(match.group(1)):
        return text
    base = match.group(1)
    text = text.replace(match.group(0), f"This model is a fine-tuned version of the local model `{base}`", 1)
    if metadata is not None:
        if metadata.get("base_model") == base:
            del metadata["base_model"]
        metadata["tags"] = [tag for tag in metadata.get("tags") or [] if not str(tag).endswith(f":{base}")]
    return text


def _is_local(name: str) -> bool:
    return os.path.isdir(os.path.expanduser(name)) or _HUB_ID.fullmatch(name) is None


def _with_data_section(text: str, data_description: str) -> str:
    """``text`` with the data section's placeholder (or, without that section, a new one) holding the description."""
    placeholder = f"{DATA_HEADING}\n\n{PLACEHOLDER}\n"
    section = f"{DATA_HEADING}\n\n{data_description}\n"
    if placeholder in text:
        return text.replace(placeholder, section, 1)
    if "\n## Training procedure\n" in text:
        return text.replace("\n## Training procedure\n", f"\n{section}\n## Training procedure\n", 1)
    return text.rstrip("\n") + f"\n\n{section}"
