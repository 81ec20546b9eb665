#!/usr/bin/env python
"""Train an image classifier with BP-modified local losses inside the Hugging Face Trainer.

Shaped like transformers' ``examples/pytorch/image-classification/run_image_classification.py``, with
``BPModifiedTrainer``/``BPModifiedTrainingArguments`` from ``hf_bpmod`` in place of ``Trainer``/``TrainingArguments``.
Preprocessing follows the paper: resize to the model's input size and normalise, no augmentation.

Run from the repository root (``pip install -e .`` first, or the script adds the repository to ``sys.path``)::

    # Defaults: a small ViT built from a config (28x28 input, patch 4, hidden 64, 6 layers, 4 heads,
    # intermediate 128), trained on the Animal-Shape-MNIST data embedded in the `animal-shape-mnist` wheel.
    python examples/run_image_classification.py --output_dir runs/vit-animal

    # The same with explicit hyperparameters and BP-modified local losses over a horizon of 2 blocks (a ViT trains
    # without the offset unless asked: docs/results.md).
    python examples/run_image_classification.py --output_dir runs/vit-animal-h2 \\
        --local_horizon 2 --bp_modified true --learning_rate 1e-3 --per_device_train_batch_size 64 \\
        --num_train_epochs 5 --eval_strategy epoch --save_strategy epoch --logging_steps 50 --seed 0

    # Every head's accuracy after each epoch (eval_block_{s}_accuracy), plotted in <output_dir>/block_accuracy.png.
    python examples/run_image_classification.py --output_dir runs/vit-blocks --eval_block_accuracy true \\
        --num_train_epochs 3 --eval_strategy epoch

    # A small ResNet from a config.
    python examples/run_image_classification.py --output_dir runs/resnet-animal --model_type resnet \\
        --config_overrides "embedding_size=16,hidden_sizes=[16,32,64],depths=[1,1,1],layer_type=basic"

    # A quick smoke run (a few steps on a subset).
    python examples/run_image_classification.py --output_dir runs/smoke --max_train_samples 256 \\
        --max_eval_samples 128 --max_steps 10 --per_device_train_batch_size 32

    # Fine-tune a pretrained ViT with LoRA (rank 1, alpha 4) on the query/value projections.
    python examples/run_image_classification.py --output_dir runs/vit-lora \\
        --model_name_or_path google/vit-base-patch16-224-in21k --peft lora --peft_rank 1 --peft_alpha 4

    # Fine-tune a pretrained ResNet-50 with LoKr on its convolutions, on a Hub dataset.
    python examples/run_image_classification.py --output_dir runs/resnet-lokr \\
        --model_name_or_path microsoft/resnet-50 --peft lokr --dataset_name uoft-cs/cifar10

    # A local image folder (one sub-folder per class), or separate train/validation folders.
    python examples/run_image_classification.py --output_dir runs/folder --dataset_name path/to/images
    python examples/run_image_classification.py --output_dir runs/folders \\
        --train_dir path/to/train --validation_dir path/to/val

    # All arguments from one JSON or YAML file (keys are the argument names without dashes).
    python examples/run_image_classification.py config.yaml

Without ``--do_train``/``--do_eval`` the script both trains and evaluates. Resume a run with
``--resume_from_checkpoint path/to/checkpoint-500`` (or ``--resume_from_checkpoint last`` for the newest checkpoint
in ``--output_dir``). The last line printed is ``final eval accuracy: 0.xxxx (top-5 0.xxxx)``.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
import yaml

try:
    import datasets
except ImportError as error:  # the examples extra brings datasets, evaluate, peft, pillow and the embedded data
    raise SystemExit(f'{error}: this example needs hf_bpmod\'s examples extra: pip install ".[examples]"') from error
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

try:
    from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_bpmod import BPModifiedTrainer, BPModifiedTrainingArguments, get_adapter

from hf_bpmod.block_metrics import plot_block_accuracy
from hf_bpmod.data import EMBEDDED_DATASET_NAME, collate_fn, load_animal_shape_mnist, with_pixel_values
from hf_bpmod.metrics import compute_accuracy_metrics

logger = logging.getLogger(__name__)

#: Model types that can be built from a config (``--model_type``) and their small default configs.
SCRATCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {
        "image_size": 28,
        "patch_size": 4,
        "num_channels": 3,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    },
    "resnet": {
        "num_channels": 3,
        "embedding_size": 32,
        "hidden_sizes": [32, 64, 128, 256],
        "depths": [1, 1, 1, 1],
        "layer_type": "basic",
    },
}
PEFT_METHODS = ("none", "lora", "lokr")
IMAGE_COLUMN_CANDIDATES = ("image", "img")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label")


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one (``model_name_or_path``) or one built from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained model: a Hub name (e.g. google/vit-base-patch16-224-in21k) or a local folder. Its "
            "classifier is re-initialised for the data's labels. Leave unset to build a model from a config "
            "(--model_type)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Build a model from scratch: 'vit' (default when no --model_name_or_path) or 'resnet', starting "
            "from a small config (see SCRATCH_DEFAULTS) changed by --config_overrides."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config changes for a model built from scratch, e.g. "
            "'hidden_size=64,num_hidden_layers=6,num_attention_heads=4' or 'hidden_sizes=[16,32],depths=[1,1]'."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input resolution. Defaults: the image processor's size for pretrained models, the native size "
            "of the training images for models built from scratch."
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path, if not the same as model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store models and data sets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Model revision to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models or data sets (default: the stored login)."}
    )
    peft: str = field(
        default="none",
        metadata={
            "help": "Parameter-efficient fine-tuning: 'none', 'lora' or 'lokr'. Adapters go on the attention "
            "query/value projections of transformers (ViT) or on the convolutions of CNNs (ResNet); the "
            "classifier is trained in full.",
            "choices": list(PEFT_METHODS),
        },
    )
    peft_rank: int = field(default=1, metadata={"help": "Rank r of the LoRA/LoKr adapters."})
    peft_alpha: float = field(default=4.0, metadata={"help": "Scaling alpha of the LoRA/LoKr adapters."})

    def __post_init__(self) -> None:
        if self.model_name_or_path and self.model_type:
            raise ValueError(
                "Pass either --model_name_or_path (a pretrained model) or --model_type (a model built from a "
                "config), not both."
            )
        if self.model_name_or_path and self.config_overrides:
            raise ValueError(
                "--config_overrides only applies to a model built from scratch (--model_type); drop it or drop "
                "--model_name_or_path."
            )
        if not self.model_name_or_path and self.model_type is None:
            self.model_type = "vit"
        if self.model_type is not None and self.model_type not in SCRATCH_DEFAULTS:
            raise ValueError(
                f"--model_type {self.model_type!r} is not supported; choose one of {sorted(SCRATCH_DEFAULTS)}, or "
                "pass --model_name_or_path for any other image classifier."
            )
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft must be one of {PEFT_METHODS}, got {self.peft!r}.")
        if self.peft_rank < 1:
            raise ValueError(f"--peft_rank must be a positive int, got {self.peft_rank}.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be positive, got {self.image_size}.")


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    dataset_name: str | None = field(
        default=EMBEDDED_DATASET_NAME,
        metadata={
            "help": f"'{EMBEDDED_DATASET_NAME}' (default) uses the data embedded in the animal-shape-mnist wheel "
            "(8,000 train / 2,000 test, no download); otherwise a Hub dataset name for datasets.load_dataset, or a "
            "local folder loaded as an imagefolder. Ignored when --train_dir/--validation_dir are given."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of the Hub dataset, if it has several."}
    )
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images (imagefolder)."})
    validation_dir: str | None = field(default=None, metadata={"help": "A folder of validation images (imagefolder)."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images (default: auto-detect 'image' or 'img')."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the labels (default: auto-detect 'label', 'labels' or 'fine_label')."},
    )
    train_val_split: float | None = field(
        default=0.15,
        metadata={"help": "Fraction of train split off for evaluation when the data has no validation/test split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many examples (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set to this many examples (for quick runs)."}
    )

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError(
                "No data: pass --dataset_name (a Hub dataset, a local folder, or the default "
                f"'{EMBEDDED_DATASET_NAME}') or --train_dir/--validation_dir."
            )
        if self.train_val_split is not None and not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in [0, 1), got {self.train_val_split}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive int, got {value}.")


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


def _first_present(candidates: tuple[str, ...], columns: list[str]) -> str | None:
    return next((name for name in candidates if name in columns), None)


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> datasets.DatasetDict:
    """Load the data as a ``DatasetDict`` with a ``train`` split and, where possible, an ``eval`` split."""
    if data_args.train_dir is not None or data_args.validation_dir is not None:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    elif data_args.dataset_name == EMBEDDED_DATASET_NAME:
        dataset = load_animal_shape_mnist()
    elif os.path.isdir(data_args.dataset_name):
        dataset = datasets.load_dataset("imagefolder", data_dir=data_args.dataset_name, cache_dir=model_args.cache_dir)
    else:
        dataset = datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    if not isinstance(dataset, datasets.DatasetDict):
        dataset = datasets.DatasetDict({"train": dataset})

    # Evaluation split: validation, else test, else split off from train.
    eval_split = next((name for name in ("validation", "valid", "test") if name in dataset), None)
    if "train" not in dataset:
        if eval_split is None:
            raise ValueError(f"The data has no 'train', 'validation' or 'test' split; splits found: {list(dataset)}.")
        logger.warning("The data has no 'train' split; only evaluation is possible.")
    result = datasets.DatasetDict()
    if "train" in dataset:
        result["train"] = dataset["train"]
    if eval_split is not None:
        result["eval"] = dataset[eval_split]
    elif data_args.train_val_split:
        label_column = data_args.label_column_name or _first_present(
            LABEL_COLUMN_CANDIDATES, dataset["train"].column_names
        )
        stratify = (
            label_column
            if label_column and isinstance(dataset["train"].features.get(label_column), datasets.ClassLabel)
            else None
        )
        split = dataset["train"].train_test_split(
            test_size=data_args.train_val_split, seed=seed, stratify_by_column=stratify
        )
        result["train"], result["eval"] = split["train"], split["test"]
        logger.info(f"Split {data_args.train_val_split:.0%} of train off for evaluation.")
    return result


def resolve_columns(dataset: datasets.DatasetDict, data_args: DataTrainingArguments) -> tuple[str, str]:
    """Find the image and label columns (given or auto-detected) and check that every split has them."""
    first = next(iter(dataset.values()))
    columns = first.column_names
    image_column = data_args.image_column_name or _first_present(IMAGE_COLUMN_CANDIDATES, columns)
    label_column = data_args.label_column_name or _first_present(LABEL_COLUMN_CANDIDATES, columns)
    if image_column is None or label_column is None:
        raise ValueError(
            f"Could not find the {'image' if image_column is None else 'label'} column among {columns}; pass "
            "--image_column_name and --label_column_name."
        )
    for split, ds in dataset.items():
        for column in (image_column, label_column):
            if column not in ds.column_names:
                raise ValueError(
                    f"Split '{split}' has no column '{column}' (columns: {ds.column_names}); pass "
                    "--image_column_name/--label_column_name."
                )
    return image_column, label_column


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


def build_model(
    model_args: ModelArguments, label_names: list[str], native_size: int
) -> tuple[torch.nn.Module, Any, int, list[float], list[float]]:
    """Build or load the model and its image processor; return them with the input size and mean/std."""
    label2id = {name: i for i, name in enumerate(label_names)}
    id2label = dict(enumerate(label_names))
    label_kwargs = {"num_labels": len(label_names), "label2id": label2id, "id2label": id2label}

    if model_args.model_name_or_path is None:
        settings = dict(SCRATCH_DEFAULTS[model_args.model_type])
        if model_args.model_type == "vit":
            settings["image_size"] = model_args.image_size or native_size
        overrides = parse_config_overrides(model_args.config_overrides or "")
        if model_args.image_size and overrides.get("image_size", model_args.image_size) != model_args.image_size:
            raise ValueError(
                f"--image_size {model_args.image_size} contradicts image_size={overrides['image_size']} in "
                "--config_overrides; give it once."
            )
        default_config = AutoConfig.for_model(model_args.model_type)
        unknown = sorted(key for key in overrides if not hasattr(default_config, key))
        if unknown:
            raise ValueError(
                f"--config_overrides sets {unknown}, which a {model_args.model_type} config does not have; valid "
                f"keys include: {sorted(k for k in default_config.to_dict() if not k.startswith('_'))}."
            )
        # Overrides go to the constructor (not setattr) so derived fields, e.g. ResNet's stage_names, follow.
        config = AutoConfig.for_model(model_args.model_type, **{**settings, **overrides}, **label_kwargs)
        image_size = getattr(config, "image_size", None) or model_args.image_size or native_size
        model = AutoModelForImageClassification.from_config(config)
        mean, std = [0.5] * config.num_channels, [0.5] * config.num_channels
        processor = make_plain_image_processor(image_size, mean, std)
        logger.info(f"Built a {model_args.model_type} model from a config: {config.to_diff_dict()}")
        return model, processor, image_size, mean, std

    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    try:
        processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or model_args.model_name_or_path, **hub_kwargs
        )
    except (OSError, ValueError) as error:
        logger.warning(f"No image processor found ({error}); normalising with mean/std 0.5.")
        processor = None
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **label_kwargs, **hub_kwargs)
    image_size = (
        model_args.image_size
        or image_size_from_processor(processor)
        or getattr(config, "image_size", None)
        or native_size
    )
    config_size = getattr(config, "image_size", None)
    if isinstance(config_size, int) and config_size != image_size:
        logger.warning(
            f"Input size {image_size} differs from the pretrained image_size {config_size}: the position "
            "embeddings are re-initialised for the new size."
        )
        config.image_size = image_size
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True, **hub_kwargs
    )
    channels = getattr(config, "num_channels", 3)
    if processor is not None and getattr(processor, "do_normalize", True) and processor.image_mean is not None:
        mean, std = list(processor.image_mean), list(processor.image_std)
    elif processor is not None:
        mean, std = [0.0] * channels, [1.0] * channels
    else:
        mean, std = [0.5] * channels, [0.5] * channels
        processor = make_plain_image_processor(image_size, mean, std)
    return model, processor, image_size, mean, std


def peft_target_modules(model: torch.nn.Module) -> list[str]:
    """Adapter targets: the architecture adapter's default (ViT: the attention's query/value projections, named
    ``q_proj``/``v_proj`` in transformers >= 5.9 and ``query``/``value`` before; ResNet: every convolution)."""
    try:
        return get_adapter(model).peft_target_modules(model)
    except (NotImplementedError, ValueError) as err:
        raise ValueError(f"{err} Or use --peft none.") from err


def apply_peft(model: torch.nn.Module, model_args: ModelArguments) -> torch.nn.Module:
    """Wrap ``model`` with LoRA or LoKr adapters; the classifier head is trained in full."""
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
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        f"{model_args.peft} adapters on {targets} (+ full {head!r}): {trainable:,} of {total:,} parameters trainable."
    )
    return model


def _modes_given(argv: list[str]) -> bool:
    """Whether the command line (or its one JSON/YAML file) names `do_train`, `do_eval` or `do_predict`."""
    modes = ("do_train", "do_eval", "do_predict")
    if len(argv) == 2 and argv[1].endswith((".json", ".yaml", ".yml")):
        with open(argv[1]) as f:
            config = json.load(f) if argv[1].endswith(".json") else yaml.safe_load(f)
        return any(mode in (config or {}) for mode in modes)
    return any(arg.lstrip("-").split("=")[0] in modes for arg in argv[1:] if arg.startswith("--"))


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, BPModifiedTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    elif len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        model_args, data_args, training_args = parser.parse_yaml_file(yaml_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    if not _modes_given(sys.argv):  # `eval_strategy` turns `do_eval` on by itself: look at what the user wrote
        training_args.do_train = training_args.do_eval = True
    # The transform reads the raw image/label columns, which the Trainer would otherwise drop.
    training_args.remove_unused_columns = False
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    checkpoint = training_args.resume_from_checkpoint
    if isinstance(checkpoint, str) and checkpoint.lower() in ("last", "true"):
        checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if checkpoint is None:
            raise ValueError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint} found no checkpoint-* folder in "
                f"{training_args.output_dir}; pass a checkpoint path or drop the flag."
            )
    elif training_args.do_train and checkpoint is None and os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.warning(
                f"{training_args.output_dir} holds {last} but training starts from scratch; pass "
                "--resume_from_checkpoint last to resume from it."
            )

    set_seed(training_args.seed)

    # Data.
    dataset = load_data(data_args, model_args, training_args.seed)
    image_column, label_column = resolve_columns(dataset, data_args)
    reference = dataset["train"] if "train" in dataset else dataset["eval"]
    if not isinstance(reference.features[label_column], datasets.ClassLabel):
        dataset = dataset.class_encode_column(label_column)
        reference = dataset["train"] if "train" in dataset else dataset["eval"]
    label_names = list(reference.features[label_column].names)
    native_size = reference[0][image_column].size[1]
    logger.info(f"Data: { {k: len(v) for k, v in dataset.items()} }, {len(label_names)} classes: {label_names}")

    # Model.
    model, image_processor, image_size, image_mean, image_std = build_model(model_args, label_names, native_size)
    if model_args.peft != "none":
        model = apply_peft(model, model_args)
    num_channels = getattr(getattr(model, "config", None), "num_channels", 3)
    logger.info(
        f"Preprocessing: resize to {image_size}x{image_size}, normalise with mean {image_mean}, std {image_std}"
    )

    def prepare(split: str, max_samples: int | None) -> datasets.Dataset:
        ds = dataset[split]
        if max_samples is not None:
            ds = ds.shuffle(seed=training_args.seed).select(range(min(max_samples, len(ds))))
        return with_pixel_values(
            ds, image_size, image_mean, image_std, image_column, label_column, num_channels=num_channels
        )

    train_dataset = eval_dataset = None
    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train needs a train split, and the data has none.")
        train_dataset = prepare("train", data_args.max_train_samples)
    if training_args.do_eval:
        if "eval" not in dataset:
            raise ValueError(
                "--do_eval needs a validation/test split: the data has none and --train_val_split is 0; set "
                "--train_val_split (e.g. 0.15)."
            )
        eval_dataset = prepare("eval", data_args.max_eval_samples)

    trainer = BPModifiedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        compute_metrics=compute_accuracy_metrics,
        processing_class=image_processor,
    )

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    eval_metrics = None
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    per_epoch = training_args.eval_strategy == "epoch"
    if training_args.eval_block_accuracy and per_epoch and trainer.is_world_process_zero():
        plot = os.path.join(training_args.output_dir, "block_accuracy.png")
        if plot_block_accuracy(trainer.state.log_history, plot):  # accuracy of every head, one line per epoch
            logger.info(f"Accuracy per block and epoch: {plot}")

    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.dataset_name,
        "tags": ["image-classification", "vision", "hf_bpmod"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    elif training_args.do_train:
        trainer.create_model_card(**kwargs)

    if eval_metrics is not None:
        print(
            f"final eval accuracy: {eval_metrics['eval_accuracy']:.4f} "
            f"(top-5 {eval_metrics['eval_top5_accuracy']:.4f})"
        )


if __name__ == "__main__":
    main()
