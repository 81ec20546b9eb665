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

    # Fine-tune a pretrained ResNet-50 with LoKr on its convolutions, on a Hub dataset; its 1000-class ImageNet head
    # is replaced by a new 10-class one.
    python examples/run_image_classification.py --output_dir runs/resnet-lokr \\
        --model_name_or_path microsoft/resnet-50 --ignore_mismatched_sizes --peft lokr --dataset_name uoft-cs/cifar10

    # A model with random weights from a config file (or a Hub model's config).
    python examples/run_image_classification.py --output_dir runs/from-config --config_name path/to/config.json

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
the newest checkpoint in ``--output_dir``). The last line printed (once, by the main process) is ``final eval accuracy: 0.xxxx (top-5 0.xxxx)``.

Models: ``--model_type`` and the model types of ``--model_name_or_path``/``--config_name`` must be ones hf_bpmod
has an architecture adapter for (``--help`` lists them); anything else is refused before the data loads. A pretrained
model whose head does not fit the data's classes needs ``--ignore_mismatched_sizes``, as in transformers' script.
Nothing loaded runs code from the Hub unless ``--trust_remote_code`` is given. Offline: with ``HF_HUB_OFFLINE=1``
models load from the local cache (or pass a local folder); when the Hub is unreachable the script tries it once and
then uses the cache, instead of retrying each file.

What a training run saves in ``--output_dir``:

- no peft: the trained model (``AutoModelForImageClassification.from_pretrained(output_dir)``);
- ``--peft`` on a pretrained model: the adapter and the trained classifier, naming the pretrained model as its base
  (``PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base, num_labels=...), output_dir)``);
- ``--peft`` on a model built from a config: the trained model with the adapters merged into the base weights, a
  plain transformers model (``AutoModelForImageClassification.from_pretrained(output_dir)``), because the base
  weights are random and exist nowhere else: an adapter alone could not be reloaded. This is also what
  ``--push_to_hub`` uploads (with ``--hub_strategy end``). The checkpoints hold the adapters, for resuming, and name
  the untrained base weights, saved once in ``output_dir/_base_model`` (left out of Hub uploads), as their base.

The script logs what it saved and the line that reloads it.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
from hf_bpmod.adapters import ADAPTERS
from hf_bpmod.block_metrics import plot_block_accuracy
from hf_bpmod.data import EMBEDDED_DATASET_NAME, ImageData, collate_fn, load_image_dataset, with_pixel_values
from hf_bpmod.metrics import compute_accuracy_metrics

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
#: Where a peft run on a model built from a config keeps the untrained base weights its checkpoints' adapters need,
#: inside ``output_dir``; ``push_to_hub`` leaves ``_*`` folders out of the upload.
BASE_MODEL_DIR = "_base_model"
PEFT_METHODS = ("none", "lora", "lokr")


def supported_model_types() -> list[str]:
    """The model types hf_bpmod can split into blocks: those with a registered architecture adapter."""
    return sorted(ADAPTERS)


@dataclass
class ModelArguments:
    """Which model to train: a pretrained one (``model_name_or_path``) or one built from a config (``model_type`` or
    ``config_name``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained model: a Hub name (e.g. google/vit-base-patch16-224-in21k) or a local folder. Leave "
            "unset to build a model from a config (--model_type or --config_name)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Build a model from a config of this type, starting from a small config (SCRATCH_DEFAULTS in the "
            "script) changed by --config_overrides: one of "
            + ", ".join(supported_model_types())
            + " (the model types hf_bpmod has an adapter for). Default: vit, when neither --model_name_or_path nor "
            "--config_name is given."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained config name or path if not the same as model_name_or_path. Without "
            "--model_name_or_path, a model with random weights is built from this config."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config changes for a model built from --model_type, e.g. "
            "'hidden_size=64,num_hidden_layers=6,num_attention_heads=4' or 'hidden_sizes=[16,32],depths=[1,1]'."
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Input resolution. Defaults: the image processor's size for pretrained models, the config's "
            "image_size for --config_name, the native size of the training images for --model_type."
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
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Whether to trust the execution of code from models defined on the Hub (their own modeling or "
            "configuration files). Off by default, so nothing loaded runs code; set it only for repositories you "
            "trust and whose code you have read, as it executes that code on your machine. The model's type must "
            "still be a supported one."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Load a pretrained model whose weights have other shapes than this run needs (e.g. a 1000-class "
            "head for data with 10 classes, or position embeddings for another --image_size): those weights are "
            "re-initialised. Without it such a mismatch is an error."
        },
    )
    peft: str = field(
        default="none",
        metadata={
            "help": "Parameter-efficient fine-tuning: 'none', 'lora' or 'lokr', on the architecture's default "
            "targets (e.g. the attention query/value projections of a ViT, the convolutions of a ResNet); the "
            "classifier is trained in full. On a pretrained model the run saves the adapter; on a model built from a "
            "config it saves the adapters merged into the base weights (the base is random, so the adapter alone "
            "could not be reloaded), and its checkpoints keep the adapter with the untrained base in "
            f"output_dir/{BASE_MODEL_DIR}.",
            "choices": list(PEFT_METHODS),
        },
    )
    peft_rank: int = field(default=1, metadata={"help": "Rank r of the LoRA/LoKr adapters."})
    peft_alpha: float = field(default=4.0, metadata={"help": "Scaling alpha of the LoRA/LoKr adapters."})

    def __post_init__(self) -> None:
        if self.model_type and (self.model_name_or_path or self.config_name):
            given = "--model_name_or_path" if self.model_name_or_path else "--config_name"
            raise ValueError(
                f"Pass either {given} or --model_type (a model built from a small default config), not both: the "
                "config already names the model type."
            )
        if self.config_overrides and (self.model_name_or_path or self.config_name):
            raise ValueError(
                "--config_overrides only applies to a model built from --model_type; drop it, or change the config "
                "given by --config_name/--model_name_or_path."
            )
        if not self.model_name_or_path and not self.config_name and self.model_type is None:
            self.model_type = "vit"
        if self.model_type is not None and self.model_type not in ADAPTERS:
            raise ValueError(
                f"--model_type {self.model_type!r} is not supported: hf_bpmod can only split the model types it has "
                f"an adapter for into blocks: {', '.join(supported_model_types())}."
            )
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"--peft must be one of {PEFT_METHODS}, got {self.peft!r}.")
        if self.peft_rank < 1:
            raise ValueError(f"--peft_rank must be a positive int, got {self.peft_rank}.")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be positive, got {self.image_size}.")

    @property
    def from_config(self) -> bool:
        """Whether the model is built from a config (random weights) rather than loaded pretrained."""
        return self.model_name_or_path is None

    @property
    def merges_peft_on_save(self) -> bool:
        """Whether the final save merges the peft adapters into the base weights (a base built from a config)."""
        return self.peft != "none" and self.from_config


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


class HubAccess(NamedTuple):
    """How the model side loads: the keyword arguments of every ``from_pretrained`` call, and why the Hub cannot be
    used (``None`` when it can)."""

    kwargs: dict[str, Any]
    problem: str | None


def hub_unreachable_reason() -> str | None:
    """Try the Hub once (one HEAD request, no retries, ``HF_HUB_ETAG_TIMEOUT`` seconds at most); why it failed, or
    ``None`` if it answered."""
    from huggingface_hub import constants, utils

    try:
        response = utils.get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # requests' and httpx's connection and timeout errors share no base class
        return f"{type(error).__name__}: {error}"
    if response.status_code >= 500:
        return f"HTTP {response.status_code}"
    return None


def hub_access(model_args: ModelArguments) -> HubAccess:
    """The loading arguments of the model side. Where a name to load is not a local path and the Hub is unreachable
    (tried once), loading uses the local cache only (``local_files_only``), as huggingface_hub would after retrying
    each file for half a minute or more, so a cached model loads at once and a missing one fails at once."""
    from huggingface_hub import constants

    kwargs: dict[str, Any] = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    names = [model_args.model_name_or_path, model_args.config_name, model_args.image_processor_name]
    remote = [name for name in names if name is not None and not os.path.exists(name)]
    if not remote:
        return HubAccess(kwargs, None)
    if constants.HF_HUB_OFFLINE:
        return HubAccess(kwargs, "HF_HUB_OFFLINE is set, so nothing is downloaded")
    reason = hub_unreachable_reason()
    if reason is None:
        return HubAccess(kwargs, None)
    logger.warning(
        f"The Hugging Face Hub ({constants.ENDPOINT}) is unreachable ({reason}): loading {remote} from the local "
        "cache only."
    )
    kwargs["local_files_only"] = True
    return HubAccess(kwargs, f"the Hub ({constants.ENDPOINT}) is unreachable ({reason})")


def load_error_message(argument: str, name: str, access: HubAccess, error: BaseException) -> str:
    """What went wrong loading ``--argument name`` and how to fix it; for a Hub name, how to run offline."""
    if os.path.exists(name):
        return f"--{argument} {name!r} could not be loaded: {error}"
    offline = (
        "To run offline, pass a local folder (one written by save_pretrained), or download the model once where the "
        f"Hub is reachable (e.g. `hf download {name}`) and run with HF_HUB_OFFLINE=1 and the same cache (HF_HOME, or "
        "--cache_dir)."
    )
    if access.problem is not None:
        return (
            f"--{argument} {name!r} is neither a local folder nor in the local Hugging Face cache, and "
            f"{access.problem}. {offline} On a slow network, a larger HF_HUB_ETAG_TIMEOUT (seconds) gives the Hub "
            f"longer to answer. ({type(error).__name__}: {error})"
        )
    return (
        f"--{argument} {name!r} could not be loaded: {error} Check the name (a Hub model id or a local folder), and "
        f"--token for a private model. {offline}"
    )


@contextlib.contextmanager
def explained_load_errors(argument: str, name: str, access: HubAccess) -> Iterator[None]:
    """Re-raise a loading ``OSError`` (file not found, Hub unreachable, not in the cache) with its fix."""
    try:
        yield
    except OSError as error:
        raise OSError(load_error_message(argument, name, access, error)) from error


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
    with explained_load_errors(argument, name, access):
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
    access = access if access is not None else hub_access(model_args)
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
            with explained_load_errors("config_name", model_args.config_name, access):
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
            "image_processor_name" if model_args.image_processor_name else "model_name_or_path", processor_name, access
        ):
            processor = AutoImageProcessor.from_pretrained(processor_name, **access.kwargs)
    except (OSError, ValueError) as error:
        if model_args.image_processor_name:
            raise
        logger.warning(f"No image processor found ({error}); normalising with mean/std 0.5.")
        processor = None
    config_argument = "config_name" if model_args.config_name else "model_name_or_path"
    with explained_load_errors(config_argument, model_args.config_name or name, access):
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
    with explained_load_errors("model_name_or_path", name, access):
        model, info = AutoModelForImageClassification.from_pretrained(
            name, config=config, ignore_mismatched_sizes=True, output_loading_info=True, **access.kwargs
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

    # The model's config first (no weights): an unsupported model or an unreachable name fails before the data loads.
    access = hub_access(model_args)
    check_model_source(model_args, access)
    resume_base, save_base = peft_base_plan(model_args, training_args, checkpoint)

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
    model, image_processor, image_size, image_mean, image_std = build_model(
        model_args, label_names, native_size, access, base_model_dir=resume_base
    )
    if model_args.peft != "none":
        if save_base is not None and training_args.should_save:
            model.save_pretrained(save_base)  # the untrained base weights the checkpoints' adapters need
        base_path = save_base or resume_base
        model = apply_peft(model, model_args, os.path.abspath(base_path) if base_path else None)
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

    trainer = ExampleTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        compute_metrics=compute_accuracy_metrics,
        processing_class=image_processor,
    )
    trainer.merge_peft_on_save = model_args.merges_peft_on_save

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        logger.info(reload_instructions(model_args, training_args.output_dir, len(label_names)))
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

    if eval_metrics is not None and trainer.is_world_process_zero():  # once, not once per process
        print(
            f"final eval accuracy: {eval_metrics['eval_accuracy']:.4f} "
            f"(top-5 {eval_metrics['eval_top5_accuracy']:.4f})"
        )


if __name__ == "__main__":
    main()
