"""The data side of ``run_image_classification.py`` beyond ``hf_bpmod.data``: which split evaluation uses, and the
predictions file ``--do_predict`` writes."""

from __future__ import annotations

import csv
import io
import logging
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from hf_bpmod._files import write_atomically
from hf_bpmod.data import ImageData, load_image_dataset

if TYPE_CHECKING:  # the argument dataclasses live in the script, where HfArgumentParser parses them
    from run_image_classification import DataTrainingArguments, ModelArguments

logger = logging.getLogger(__name__)


def load_data(
    data_args: DataTrainingArguments, model_args: ModelArguments, seed: int, evaluate: bool = True
) -> ImageData:
    """Load the data with ``hf_bpmod.data.load_image_dataset`` and choose what evaluation uses; the returned
    ``splits`` hold ``train``, ``eval`` and ``test`` where the data has them.

    Evaluation uses the validation split; else, if ``--train_val_split`` is set, that share of train; else a labelled
    test split; else (``--train_val_split`` unset) 15% of train. ``--do_predict`` always uses the test split. The
    choice is logged only where the run ``evaluate``s.
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
        skip_unreadable_images=data_args.skip_unreadable_images,
    )
    splits, fraction, sources = data.splits, data_args.train_val_split, data.split_sources
    labelled_test = "test" in splits and data.has_labels("test")
    result = datasets.DatasetDict()
    data.split_sources = {split: sources[split] for split in ("train", "test") if split in sources}
    if "train" in splits:
        result["train"] = splits["train"]
    if "validation" in splits:
        result["eval"] = splits["validation"]
        data.split_sources["eval"] = sources["validation"]
        if fraction and evaluate:
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
        data.split_sources["eval"] = [f"held out of the training data ({fraction:.0%}, seed {seed})"]
        if evaluate:
            logger.info(f"No validation split: {fraction:.0%} of train is held out for evaluation.")
    elif labelled_test:
        result["eval"] = splits["test"]
        data.split_sources["eval"] = sources["test"]
        if evaluate:
            logger.warning(
                "No validation split: evaluation uses the test split. Pass --validation_file, or --train_val_split "
                "to hold out part of train instead."
            )
    if "test" in splits:
        result["test"] = splits["test"]
    data.splits = result
    return data


def write_predictions(
    path: str, predictions: Any, label_ids: Any, label_names: list[str], rows: list[int] | None = None
) -> None:
    """Write ``index,prediction,label`` rows (test row, predicted class, true class or empty) to ``path`` as one
    file, whole or not at all. ``rows``: each prediction's row in the test data as read (default ``0, 1, ...``),
    which differs once unreadable images were left out."""
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "prediction", "label"])
    for index, predicted in enumerate(np.asarray(logits).argmax(-1)):
        row = index if rows is None else rows[index]
        writer.writerow([row, label_names[predicted], "" if label_ids is None else label_names[label_ids[index]]])
    write_atomically(path, text.getvalue().encode("utf-8"))
