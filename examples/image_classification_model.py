"""The model side of ``run_image_classification.py``: which models it accepts, how it reaches the Hub
(:mod:`hf_bpmod.hub`), and how it builds a model from a config (:data:`SCRATCH_DEFAULTS`, ``--config_overrides``) or loads a
pretrained one, with its image processor."""

from __future__ import annotations

import ast
import logging
from typing import TYPE_CHECKING, Any

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from hf_bpmod.adapters import ADAPTERS
from hf_bpmod.hub import HubAccess, explained_load_errors, hub_access

if TYPE_CHECKING:  # the argument dataclasses live in the script, where HfArgumentParser parses them
    from run_image_classification import ModelArguments

logger = logging.getLogger(__name__)

#: Small starting configs for models built from a config (``--model_type``), changed by ``--config_overrides``. A
#: registered model type without an entry starts from transformers' default config. Either way ``image_size`` (where
#: the config has one) is ``--image_size``, else the training images' size, and ``num_channels`` is 3.
SCRATCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {
        "patch_size": 4,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    },
    "deit": {
        "patch_size": 4,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    },
    "beit": {
        "patch_size": 4,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "use_relative_position_bias": True,
    },
    "dinov2": {"patch_size": 4, "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4, "mlp_ratio": 2},
    "swin": {"patch_size": 2, "embed_dim": 32, "depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_size": 7},
    "swinv2": {"patch_size": 2, "embed_dim": 32, "depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_size": 7},
    "resnet": {
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
    },
    "convnext": {"num_stages": 3, "patch_size": 2, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2]},
    "convnextv2": {"num_stages": 3, "patch_size": 2, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2]},
    "regnet": {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "groups_width": 16},
}


def supported_model_types() -> list[str]:
    """The model types hf_bpmod can split into blocks: those with a registered architecture adapter."""
    return sorted(ADAPTERS)


def parse_config_overrides(overrides: str) -> dict[str, Any]:
    """Parse ``"a=1,b=[2,3],c=gelu,d=true"`` into ``{"a": 1, "b": [2, 3], "c": "gelu", "d": True}``.

    Commas inside brackets do not split; values are Python/JSON literals (``true``/``false``/``null`` too) or bare
    strings.
    """
    items, depth, current = [], 0, ""
    for char in overrides:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    parsed: dict[str, Any] = {}
    for item in (item.strip() for item in items):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"Bad --config_overrides entry {item!r}: use key=value pairs separated by commas, e.g. "
                "'hidden_size=64,num_hidden_layers=6'."
            )
        raw = raw.strip()
        literal = {"true": "True", "false": "False", "null": "None", "none": "None"}.get(raw.lower(), raw)
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError):
            value = raw
        parsed[key.strip()] = value
    return parsed


def image_size_from_processor(processor: Any) -> int | None:
    """The square input size an image processor resizes to (``height``, else ``shortest_edge``), if any."""
    size = getattr(processor, "size", None)
    if size is None:
        return None
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def make_plain_image_processor(image_size: int, mean: list[float], std: list[float]) -> Any:
    """A ViT-style image processor (resize, rescale, normalise) matching the script's preprocessing."""
    try:
        from transformers import ViTImageProcessorPil as processor_cls  # transformers >= 5 without torchvision
    except ImportError:
        from transformers import ViTImageProcessor as processor_cls
    return processor_cls(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
    )


def model_hub_access(model_args: ModelArguments) -> HubAccess:
    """The loading arguments of every model, config and image processor load (:func:`hf_bpmod.hub.hub_access`: the
    Hub is tried once, and an unreachable Hub means the local cache only)."""
    names = [model_args.model_name_or_path, model_args.config_name, model_args.image_processor_name]
    return hub_access(
        names,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )


def check_supported_model_type(model_type: str | None, source: str) -> None:
    """Refuse a model type that has no registered architecture adapter, listing the supported ones."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{source} is a {model_type!r} model, which hf_bpmod cannot split into blocks. Supported model types: "
            f"{', '.join(supported_model_types())}. Pick a model of one of these types."
        )


def check_model_source(model_args: ModelArguments, access: HubAccess) -> None:
    """Read only the config of ``--config_name`` / ``--model_name_or_path`` (no weights, no code) and refuse an
    unsupported model type, before any data is loaded."""
    if model_args.model_type is not None:
        return  # checked when the arguments were parsed
    argument = "config_name" if model_args.config_name else "model_name_or_path"
    name = getattr(model_args, argument)
    load_kwargs = {k: v for k, v in access.kwargs.items() if k != "trust_remote_code"}
    with explained_load_errors(f"--{argument}", name, access):
        config_dict, _ = transformers.PretrainedConfig.get_config_dict(name, **load_kwargs)
    check_supported_model_type(config_dict.get("model_type"), f"--{argument} {name!r}")


def _smallest_stage_size(default_config: Any, settings: dict[str, Any], overrides: dict[str, Any]) -> int:
    """Tokens per side in the last stage of a hierarchical transformer (Swin: patches, then halved, rounding up, at
    each further stage)."""
    merged = {**settings, **overrides}
    patch = merged.get("patch_size", default_config.patch_size)
    size = -(-merged["image_size"] // patch)
    for _ in range(len(merged.get("depths", default_config.depths)) - 1):
        size = -(-size // 2)
    return max(1, size)


def scratch_config(
    model_type: str, overrides: dict[str, Any], image_size: int, label_kwargs: dict[str, Any] | None = None
) -> transformers.PretrainedConfig:
    """The config of a ``model_type`` model built from scratch: :data:`SCRATCH_DEFAULTS` (or transformers' default
    config), ``image_size`` where the config has one, 3 channels, then ``overrides``."""
    default_config = AutoConfig.for_model(model_type)
    settings = dict(SCRATCH_DEFAULTS.get(model_type, {}))
    if hasattr(default_config, "image_size"):
        settings["image_size"] = image_size
    if hasattr(default_config, "num_channels"):
        settings["num_channels"] = 3
    unknown = sorted(key for key in overrides if not hasattr(default_config, key))
    if unknown:
        raise ValueError(
            f"--config_overrides sets {unknown}, which a {model_type} config does not have; valid keys include: "
            f"{sorted(k for k in default_config.to_dict() if not k.startswith('_'))}."
        )
    if "window_size" in settings and "window_size" not in overrides:  # Swin: a window fits in every stage
        settings["window_size"] = min(
            settings["window_size"], _smallest_stage_size(default_config, settings, overrides)
        )
    # Overrides go to the constructor (not setattr) so derived fields, e.g. ResNet's stage_names, follow.
    return AutoConfig.for_model(model_type, **{**settings, **overrides}, **(label_kwargs or {}))


def pin_image_classifier(config: Any) -> None:
    """Name the classifier class in ``config.architectures`` where transformers maps the model type to several (DeiT:
    the plain one first, then the one with a distillation token) and the config names none, so ``from_config`` can
    choose; the first is the plain classifier."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if isinstance(names, (list, tuple)) and not getattr(config, "architectures", None):
        config.architectures = [names[0]]


def config_image_size(config: Any) -> int | None:
    """The config's square input size, if it has one."""
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def _mismatched_names(info: dict[str, Any]) -> list[str]:
    """Names of the mismatched weights in ``from_pretrained``'s loading info (tuples in transformers >= 5)."""
    return sorted(key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", ()))


def build_model(
    model_args: ModelArguments,
    label_names: list[str],
    native_size: int,
    access: HubAccess | None = None,
    base_model_dir: str | None = None,
) -> tuple[torch.nn.Module, Any, int, list[float], list[float]]:
    """Build or load the model and its image processor; return them with the input size and mean/std.

    ``base_model_dir``: for a model built from a config, load these saved base weights instead of new random ones
    (resuming a peft run, whose adapters were trained on them).
    """
    access = access if access is not None else model_hub_access(model_args)
    label2id = {name: i for i, name in enumerate(label_names)}
    id2label = dict(enumerate(label_names))
    label_kwargs = {"num_labels": len(label_names), "label2id": label2id, "id2label": id2label}

    if model_args.from_config:
        if base_model_dir is not None:
            model = AutoModelForImageClassification.from_pretrained(
                base_model_dir, trust_remote_code=model_args.trust_remote_code
            )
            saved_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
            if saved_labels != list(label_names):
                raise ValueError(
                    f"The base weights in {base_model_dir} were built for the labels {saved_labels}, but the data has "
                    f"{list(label_names)}: resume with the data the run started with, or start a new run in another "
                    "--output_dir."
                )
            config = model.config
            logger.info(f"Loaded the untrained base weights of the run from {base_model_dir}.")
        elif model_args.config_name:
            with explained_load_errors("--config_name", model_args.config_name, access):
                config = AutoConfig.from_pretrained(model_args.config_name, **label_kwargs, **access.kwargs)
            if model_args.image_size and hasattr(config, "image_size"):
                config.image_size = model_args.image_size
        else:
            overrides = parse_config_overrides(model_args.config_overrides or "")
            if model_args.image_size and overrides.get("image_size", model_args.image_size) != model_args.image_size:
                raise ValueError(
                    f"--image_size {model_args.image_size} contradicts image_size={overrides['image_size']} in "
                    "--config_overrides; give it once."
                )
            config = scratch_config(
                model_args.model_type, overrides, model_args.image_size or native_size, label_kwargs
            )
        source = base_model_dir or (
            f"--config_name {model_args.config_name!r}"
            if model_args.config_name
            else f"--model_type {model_args.model_type!r}"
        )
        check_supported_model_type(config.model_type, source)
        if base_model_dir is None:
            pin_image_classifier(config)
            model = AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
            logger.info(f"Built a {config.model_type} model from a config: {config.to_diff_dict()}")
        image_size = config_image_size(config) or model_args.image_size or native_size
        channels = getattr(config, "num_channels", 3)
        mean, std = [0.5] * channels, [0.5] * channels
        processor = make_plain_image_processor(image_size, mean, std)
        return model, processor, image_size, mean, std

    name = model_args.model_name_or_path
    processor_name = model_args.image_processor_name or name
    try:
        with explained_load_errors(
            "--image_processor_name" if model_args.image_processor_name else "--model_name_or_path",
            processor_name,
            access,
        ):
            processor = AutoImageProcessor.from_pretrained(processor_name, **access.kwargs)
    except (OSError, ValueError) as error:
        if model_args.image_processor_name:
            raise
        logger.warning(f"No image processor found ({error}); normalising with mean/std 0.5.")
        processor = None
    config_argument = "config_name" if model_args.config_name else "model_name_or_path"
    with explained_load_errors(f"--{config_argument}", model_args.config_name or name, access):
        config = AutoConfig.from_pretrained(model_args.config_name or name, **label_kwargs, **access.kwargs)
    check_supported_model_type(config.model_type, f"--{config_argument} {model_args.config_name or name!r}")
    image_size = (
        model_args.image_size or image_size_from_processor(processor) or config_image_size(config) or native_size
    )
    pretrained_size = config_image_size(config)
    if pretrained_size is not None and pretrained_size != image_size:
        config.image_size = image_size
    # Mismatched weights are found by loading with ignore_mismatched_sizes=True, and refused unless it was asked for,
    # so the error names them and the flag on every transformers release.
    with explained_load_errors("--model_name_or_path", name, access):
        model, info = AutoModelForImageClassification.from_pretrained(
            name, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **access.model_kwargs()
        )
    mismatched = _mismatched_names(info)
    if mismatched and not model_args.ignore_mismatched_sizes:
        size_note = (
            f" (--image_size {image_size} is not the pretrained image_size {pretrained_size})"
            if pretrained_size is not None and pretrained_size != image_size
            else ""
        )
        raise ValueError(
            f"--model_name_or_path {name!r}: the pretrained weights {mismatched} have other shapes than this run "
            f"needs, with {len(label_names)} classes{size_note}. Pass --ignore_mismatched_sizes to re-initialise "
            "them (e.g. a new classifier head for your labels)."
        )
    if mismatched:
        logger.warning(f"--ignore_mismatched_sizes: re-initialised {mismatched}, whose pretrained shapes differ.")
    channels = getattr(config, "num_channels", 3)
    if processor is not None and getattr(processor, "do_normalize", True) and processor.image_mean is not None:
        mean, std = list(processor.image_mean), list(processor.image_std)
    elif processor is not None:
        mean, std = [0.0] * channels, [1.0] * channels
    else:
        mean, std = [0.5] * channels, [0.5] * channels
        processor = make_plain_image_processor(image_size, mean, std)
    return model, processor, image_size, mean, std
