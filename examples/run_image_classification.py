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

    # Files (csv/json listing image paths relative to them, parquet/arrow holding the images), and predictions for
    # the test file. A folder of such files, or one saved with save_to_disk, goes in --dataset_name (docs/data.md).
    python examples/run_image_classification.py --output_dir runs/files --train_file data/train.csv \\
        --validation_file data/val.csv --test_file data/test.csv --do_train --do_eval --do_predict

    # All arguments from one JSON or YAML file (keys are the argument names without dashes).
    python examples/run_image_classification.py config.yaml

Without ``--do_train``/``--do_eval``/``--do_predict`` the script both trains and evaluates. ``--do_predict`` writes
``predict_results.json`` and ``predictions.csv`` (test row, predicted class, true class where known) for the test
split. Resume a run with ``--resume_from_checkpoint path/to/checkpoint-500`` (or ``--resume_from_checkpoint last`` for
the newest checkpoint in ``--output_dir``). The last line printed is ``final eval accuracy: 0.xxxx (top-5 0.xxxx)``.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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

from hf_bpmod._files import write_atomically
from hf_bpmod.data import EMBEDDED_DATASET_NAME, ImageData, collate_fn, load_image_dataset, with_pixel_values
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
    """Which data to train, evaluate and predict on (the forms read are in docs/data.md)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"'{EMBEDDED_DATASET_NAME}' (the default when no data is given) uses the data embedded in the "
            "animal-shape-mnist wheel (8,000 train / 2,000 test, no download); otherwise a Hub dataset name, or a "
            "local folder: a save_to_disk dataset, an image folder (one sub-folder per class, or a metadata.csv), or "
            "parquet/arrow/csv/json files, split by their names (train, validation, test)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of the Hub dataset, if it has several."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: a parquet, arrow, csv, tsv, json or jsonl file (image paths in it are relative "
            "to it), or a folder of such files, of images, or saved with save_to_disk. Not with --dataset_name."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation data, in the forms of --train_file (evaluation uses it)."}
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Test data, in the forms of --train_file (--do_predict predicts it; labels optional)."},
    )
    train_dir: str | None = field(default=None, metadata={"help": "A folder of training images (as --train_file)."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "A folder of validation images (as --validation_file)."}
    )
    image_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the images (default: the one image column, else 'image', 'img', ...)."},
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": "Column holding the labels (default: the one class-label column, else 'label', ...)."},
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of train split off for evaluation. Unset: evaluation uses the validation split, else "
            "a labelled test split, else 0.15 of train. Set, it is split off even when the data has a test split (which "
            "--do_predict then keeps to itself); 0 never splits."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many examples (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the evaluation set to this many examples (for quick runs)."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Predict only the first this many test examples (for quick runs)."}
    )

    def __post_init__(self) -> None:
        for alias, name in (("train_dir", "train_file"), ("validation_dir", "validation_file")):
            if getattr(self, alias) is not None:
                if getattr(self, name) is not None:
                    raise ValueError(f"--{alias} and --{name} both give the {name.split('_')[0]} data; pass one.")
                setattr(self, name, getattr(self, alias))
        files = [f"--{name}" for name in ("train_file", "validation_file", "test_file") if getattr(self, name)]
        if self.dataset_name is not None and files:
            raise ValueError(
                f"--dataset_name {self.dataset_name!r} and {'/'.join(files)} both give the data; pass --dataset_name "
                "(a Hub name or one folder) or the files, not both."
            )
        if self.dataset_name is None and not files:
            self.dataset_name = EMBEDDED_DATASET_NAME
        if self.train_val_split is not None and not 0.0 <= self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in [0, 1), got {self.train_val_split}.")
        for name in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
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


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> ImageData:
    """Load the data with ``hf_bpmod.data.load_image_dataset`` and choose what evaluation uses; the returned
    ``splits`` hold ``train``, ``eval`` and ``test`` where the data has them.

    Evaluation uses the validation split; else, if ``--train_val_split`` is set, that share of train; else a labelled
    test split; else (``--train_val_split`` unset) 15% of train. ``--do_predict`` always uses the test split.
    """
    data = load_image_dataset(
        data_args.dataset_name,
        data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        image_column_name=data_args.image_column_name,
        label_column_name=data_args.label_column_name,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    splits, fraction = data.splits, data_args.train_val_split
    labelled_test = "test" in splits and data.has_labels("test")
    result = datasets.DatasetDict()
    if "train" in splits:
        result["train"] = splits["train"]
    if "validation" in splits:
        result["eval"] = splits["validation"]
        if fraction:
            logger.warning("--train_val_split is not used: the data has a validation split, which evaluation uses.")
    elif "train" in splits and (fraction or (fraction is None and not labelled_test)):
        fraction = fraction or 0.15
        try:
            split = splits["train"].train_test_split(
                test_size=fraction, seed=seed, stratify_by_column=data.label_column
            )
        except ValueError as error:  # a class with too few images to be in both parts
            logger.warning(f"Splitting train without stratification ({error}).")
            split = splits["train"].train_test_split(test_size=fraction, seed=seed)
        result["train"], result["eval"] = split["train"], split["test"]
        logger.info(f"No validation split: {fraction:.0%} of train is held out for evaluation.")
    elif labelled_test:
        result["eval"] = splits["test"]
        logger.warning(
            "No validation split: evaluation uses the test split. Pass --validation_file, or --train_val_split to "
            "hold out part of train instead."
        )
    if "test" in splits:
        result["test"] = splits["test"]
    data.splits = result
    return data


def write_predictions(path: str, predictions: Any, label_ids: Any, label_names: list[str]) -> None:
    """Write ``index,prediction,label`` rows (test row, predicted class, true class or empty) to ``path`` as one
    file, whole or not at all."""
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["index", "prediction", "label"])
    for index, predicted in enumerate(np.asarray(logits).argmax(-1)):
        writer.writerow([index, label_names[predicted], "" if label_ids is None else label_names[label_ids[index]]])
    write_atomically(path, rows.getvalue().encode("utf-8"))


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
    with training_args.main_process_first(desc="loading the data"):  # one process fills the datasets cache
        data = load_data(data_args, model_args, training_args.seed)
    dataset, image_column, label_column = data.splits, data.image_column, data.label_column
    label_names = data.label_names
    source = ", ".join(data.sources)
    if training_args.do_train and "train" not in dataset:
        raise ValueError(f"--do_train needs training data, and {source} has none; pass --train_file.")
    if training_args.do_eval and "eval" not in dataset:
        raise ValueError(
            f"--do_eval needs evaluation data: {source} has no validation or labelled test split and "
            "--train_val_split is 0; pass --validation_file or set --train_val_split (e.g. 0.15)."
        )
    if training_args.do_predict and "test" not in dataset:
        raise ValueError(
            f"--do_predict needs a test split, and {source} has none; pass --test_file (or data with a 'test' "
            "split), or drop --do_predict."
        )
    if training_args.do_predict and training_args.do_eval and dataset.get("eval") is dataset["test"]:
        logger.warning("Evaluation and --do_predict both use the test split.")
    reference = next(dataset[split] for split in ("train", "eval", "test") if split in dataset)
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
        if max_samples is not None and split == "test":  # the first rows, so that predictions.csv follows the file
            ds = ds.select(range(min(max_samples, len(ds))))
        elif max_samples is not None:
            ds = ds.shuffle(seed=training_args.seed).select(range(min(max_samples, len(ds))))
        labels = label_column if label_column in ds.column_names else None
        return with_pixel_values(
            ds, image_size, image_mean, image_std, image_column, labels, num_channels=num_channels
        )

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        train_dataset = prepare("train", data_args.max_train_samples)
    if training_args.do_eval:
        eval_dataset = prepare("eval", data_args.max_eval_samples)
    if training_args.do_predict:
        predict_dataset = prepare("test", data_args.max_predict_samples)

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

    if training_args.do_predict:
        output = trainer.predict(predict_dataset, metric_key_prefix="predict")
        predict_metrics = output.metrics
        predict_metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", predict_metrics)
        trainer.save_metrics("predict", predict_metrics)
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, "predictions.csv")
            write_predictions(path, output.predictions, output.label_ids, label_names)
            logger.info(f"Wrote the predictions of {len(predict_dataset)} test images to {path}.")

    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        **data.card_kwargs(),  # the data actually used: its Hub name or its local paths
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
