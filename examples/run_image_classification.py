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

    # All arguments from one JSON or YAML file (keys are the argument names without dashes; each value means what
    # the same text means after its flag on the command line: `offset_seed: 017` is 17, `bp_modified: off` False).
    python examples/run_image_classification.py config.yaml

Without ``--do_train``/``--do_eval``/``--do_predict`` the script both trains and evaluates. ``--do_predict`` writes
``predict_results.json`` and ``predictions.csv`` (test row, predicted class, true class where known) for the test
split. Resume a run with ``--resume_from_checkpoint path/to/checkpoint-500`` (or ``--resume_from_checkpoint last`` for
the newest complete checkpoint in ``--output_dir``: one a kill left half-saved is skipped, with a warning, and kept). The last line printed (once, by the main process) is ``final eval accuracy: 0.xxxx (top-5 0.xxxx)``.

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

import logging
import os
import sys
from dataclasses import dataclass, field

import transformers

try:
    import datasets
except ImportError as error:  # the examples extra brings datasets, evaluate, peft, pillow and the embedded data
    raise SystemExit(f'{error}: this example needs hf_bpmod\'s examples extra: pip install ".[examples]"') from error
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

try:
    from hf_bpmod import BPModifiedTrainingArguments
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hf_bpmod import BPModifiedTrainingArguments

from hf_bpmod.adapters import ADAPTERS
from hf_bpmod.block_metrics import plot_block_accuracy
from hf_bpmod.checkpoint import last_complete_checkpoint
from hf_bpmod.config_file import parse_config_file, read_config_file
from hf_bpmod.data import EMBEDDED_DATASET_NAME, collate_fn, with_pixel_values
from hf_bpmod.metrics import compute_accuracy_metrics
from hf_bpmod.peft_from_config import BASE_MODEL_DIR

# The sibling modules sit next to this file: found when it runs as a script and when it is loaded by its path.
EXAMPLES_DIR = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES_DIR not in sys.path:
    sys.path.insert(0, EXAMPLES_DIR)
from image_classification_cli import (  # noqa: E402
    choose_defaults,
    describe_defaults,
    flags_in_messages,
    refuse_untrained_predictions,
)
from image_classification_data import load_data, write_predictions  # noqa: E402
from image_classification_model import (  # noqa: E402
    build_model,
    check_model_source,
    model_hub_access,
    supported_model_types,
)
from image_classification_peft import PEFT_METHODS, ExampleTrainer, apply_peft, peft_base_plan, reload_instructions  # noqa: E402

logger = logging.getLogger(__name__)
#: The loggers of the sibling modules and of hf_bpmod, set to the process's log level with the script's own.
SIBLING_MODULES = (
    "image_classification_cli",
    "image_classification_data",
    "image_classification_model",
    "image_classification_peft",
    "hf_bpmod",
)


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
            "help": "Build a model from a config of this type, starting from a small config (SCRATCH_DEFAULTS in "
            "image_classification_model.py, next to the script) changed by --config_overrides: one of "
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
    skip_unreadable_images: bool = field(
        default=False,
        metadata={
            "help": "Every image is opened and verified before training; one that is missing or cannot be decoded "
            "stops the run, naming it. Set this to leave such images out instead, each named in a warning."
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


def _flags_given(args: list[str]) -> set[str]:
    """The argument names the command line (or its one JSON/YAML file) gives: the flags the user did not give get
    the script's defaults (``image_classification_cli.choose_defaults``)."""
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        return set(read_config_file(args[0]))
    return {arg.lstrip("-").split("=")[0] for arg in args if arg.startswith("--")}


def parse_arguments(args: list[str]) -> tuple[ModelArguments, DataTrainingArguments, BPModifiedTrainingArguments]:
    """The script's arguments from the command line ``args``, or from its one JSON or YAML file, whose values mean
    what the same text means after its flag on the command line (:mod:`hf_bpmod.config_file`)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, BPModifiedTrainingArguments))
    describe_defaults(parser)
    if len(args) == 1 and args[0].endswith((".json", ".yaml", ".yml")):
        return parse_config_file(parser, os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


@flags_in_messages((ModelArguments, DataTrainingArguments, BPModifiedTrainingArguments))
def main(args: list[str] | None = None) -> None:
    """Train, evaluate and predict as the command line ``args`` (default: ``sys.argv[1:]``) says."""
    args = sys.argv[1:] if args is None else list(args)
    model_args, data_args, training_args = parse_arguments(args)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    for name in SIBLING_MODULES:
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    given = _flags_given(args)
    if not given & {"do_train", "do_eval", "do_predict"}:  # `eval_strategy` turns `do_eval` on by itself
        training_args.do_train = training_args.do_eval = True
    refuse_untrained_predictions(model_args, training_args)
    choose_defaults(given, model_args, training_args)
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
        flag = f"--resume_from_checkpoint {checkpoint}"
        warn = logger.warning if training_args.should_log else logger.info
        checkpoint = last_complete_checkpoint(training_args.output_dir, flag, warn)  # skips one a kill tore
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
    access = model_hub_access(model_args)
    check_model_source(model_args, access)
    resume_base, save_base = peft_base_plan(model_args, training_args, checkpoint)

    set_seed(training_args.seed)

    # Data.
    with training_args.main_process_first(desc="loading the data"):  # one process fills the datasets cache
        data = load_data(data_args, model_args, training_args.seed, evaluate=training_args.do_eval)
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
        title = training_args.run_name or training_args.output_dir
        if plot_block_accuracy(trainer.state.log_history, plot, title=title):  # every head, one line per epoch
            logger.info(f"Accuracy per block and epoch: {plot}")

    if training_args.do_predict:
        output = trainer.predict(predict_dataset, metric_key_prefix="predict")
        predict_metrics = output.metrics
        predict_metrics["predict_samples"] = len(predict_dataset)
        trainer.log_metrics("predict", predict_metrics)
        trainer.save_metrics("predict", predict_metrics)
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, "predictions.csv")
            rows = data.rows_as_read("test")[: len(predict_dataset)]  # its first rows, as prepare() took them
            write_predictions(path, output.predictions, output.label_ids, label_names, rows)
            logger.info(f"Wrote the predictions of {len(predict_dataset)} test images to {path}.")

    used = {"train": train_dataset, "eval": eval_dataset, "test": predict_dataset}
    kwargs = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        **data.card_kwargs(),  # the training data: its Hub name or its local paths
        # each split used, its size and source, and the classes
        "data_description": data.card_data_description({k: len(v) for k, v in used.items() if v is not None}),
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
