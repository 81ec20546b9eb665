"""``examples/run_image_classification.py`` on every form of data it reads, offline, on data the tests make.

One short run per form (a tiny ViT, two steps) trains and evaluates through the script's ``main(argv)``, in process.
The model card must name the data given. Two runs also predict (``--do_predict``) and their ``predictions.csv`` must
equal what the saved model predicts on the test images. How the script picks the evaluation split, and its refusals,
are checked in-process too.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from helpers import (
    CLASSES,
    INT_CLASSES,
    TINY_VIT,
    check_outputs,
    cifar_style,
    image,
    label,
    reload_full_model,
    script_args,
    write_arrow,
    write_class_folders,
    write_csv,
    write_jsonl,
    write_metadata_folder,
    write_parquet,
    write_pngs,
)
from transformers import AutoImageProcessor, HfArgumentParser

from hf_bpmod import BPModifiedTrainingArguments
from hf_bpmod.data import EMBEDDED_DATASET_NAME, collate_fn, with_pixel_values

TRAIN, VAL, TEST = range(0, 18), range(18, 24), range(24, 30)
HUB_FILES = {"train": "hub/train.parquet", "validation": "hub/validation.parquet"}  # 'namespace/shapes' under the root


def serve_hub_name(monkeypatch, root: Path) -> None:
    """``datasets.load_dataset("namespace/shapes")`` stands for a Hub dataset: the parquet files under ``root``."""
    real_load_dataset = datasets.load_dataset

    def hub(path, *args, **kwargs):
        if path != "namespace/shapes":
            return real_load_dataset(path, *args, **kwargs)
        assert args == (None,) and kwargs.get("trust_remote_code", False) is False  # no name, no code
        files = {split: str(root / name) for split, name in HUB_FILES.items()}
        return real_load_dataset("parquet", data_files=files, cache_dir=kwargs["cache_dir"])

    monkeypatch.setattr(datasets, "load_dataset", hub)


def make_form(form: str, root: Path) -> tuple[list[str], list[str], list[str]]:
    """The data of ``form`` under ``root``: the script's data arguments, the sources the card must name, and the
    class names in label order."""
    if form == "csv_files":  # paths relative to each csv; string labels; an unlabelled test file
        write_pngs(root / "images", [*TRAIN, *VAL, *TEST])
        files = [
            write_csv(root / "train.csv", TRAIN, "images/"),
            write_csv(root / "lists" / "val.csv", VAL, "../images/"),
            write_csv(root / "test.csv", TEST, "images/", labels=False),
        ]
        args = ["--train_file", str(files[0]), "--validation_file", str(files[1]), "--test_file", str(files[2])]
        return args, [str(f) for f in files], list(CLASSES)
    if form == "json_files":  # integer labels without a ClassLabel
        write_pngs(root / "images", [*TRAIN, *VAL])
        files = [write_jsonl(root / "train.jsonl", TRAIN, "images/"), write_jsonl(root / "val.json", VAL, "images/")]
        return (
            ["--train_file", str(files[0]), "--validation_file", str(files[1])],
            [str(f) for f in files],
            [str(c) for c in INT_CLASSES],
        )
    if form == "parquet_folder":  # shards named as the Hub names them, images as bytes
        write_parquet(root / "data" / "train-00000-of-00002.parquet", TRAIN[:9])
        write_parquet(root / "data" / "train-00001-of-00002.parquet", TRAIN[9:])
        write_parquet(root / "data" / "validation-00000-of-00001.parquet", VAL)
        return ["--dataset_name", str(root)], [str(root)], list(CLASSES)
    if form == "arrow_files":
        files = [write_arrow(root / "train.arrow", TRAIN), write_arrow(root / "val.arrow", VAL)]
        return (
            ["--train_file", str(files[0]), "--validation_file", str(files[1])],
            [str(f) for f in files],
            list(CLASSES),
        )
    if form == "save_to_disk_dict":  # CIFAR-style img/label, train and test: evaluation and prediction use test
        names = ("owl", "cat", "dog")
        datasets.DatasetDict({"train": cifar_style(TRAIN, names), "test": cifar_style(TEST, names)}).save_to_disk(
            str(root)
        )
        return ["--dataset_name", str(root)], [str(root)], list(names)
    if form == "save_to_disk_datasets":
        cifar_style(TRAIN).save_to_disk(str(root / "train"))
        cifar_style(VAL).save_to_disk(str(root / "val"))
        return (
            ["--train_file", str(root / "train"), "--validation_file", str(root / "val")],
            [
                str(root / "train"),
                str(root / "val"),
            ],
            list(CLASSES),
        )
    if form == "hub_name":
        for split, ids in (("train", TRAIN), ("validation", VAL)):
            write_parquet(root / HUB_FILES[split], ids)
        return ["--dataset_name", "namespace/shapes"], ["namespace/shapes"], list(CLASSES)
    if form == "class_folders":  # one sub-folder per class, in separate train and validation folders
        train, val = write_class_folders(root / "train", TRAIN), write_class_folders(root / "val", VAL)
        return ["--train_dir", str(train), "--validation_dir", str(val)], [str(train), str(val)], list(CLASSES)
    if form == "metadata_folder":  # an image folder whose metadata.csv gives each file's 'species'
        write_metadata_folder(root / "train", TRAIN)
        write_metadata_folder(root / "validation", VAL)
        return ["--dataset_name", str(root), "--label_column_name", "species"], [str(root)], list(CLASSES)
    raise ValueError(form)


FORMS = [
    "csv_files",
    "json_files",
    "parquet_folder",
    "arrow_files",
    "save_to_disk_dict",
    "save_to_disk_datasets",
    "class_folders",
    "metadata_folder",
    "hub_name",
]


PREDICTS = ("csv_files", "save_to_disk_dict")


@pytest.mark.parametrize("form", FORMS)
def test_every_form_trains_and_evaluates(script, tmp_path, monkeypatch, capsys, logging_restored, form):
    data, sources, names = make_form(form, tmp_path / "data")
    if form == "hub_name":
        serve_hub_name(monkeypatch, tmp_path / "data")
    argv = [
        *script_args(tmp_path / "out", tmp_path / "cache"), *TINY_VIT, *data, "--do_train", "--do_eval",
        "--max_steps", "2", *(["--do_predict"] if form in PREDICTS else []),
    ]  # fmt: skip
    script.main(argv)
    out = tmp_path / "out"
    n_eval = len(TEST) if form == "save_to_disk_dict" else len(VAL)
    check_outputs(capsys.readouterr().out, out, n_eval=n_eval, n_train=len(TRAIN))

    model = reload_full_model(out)
    assert list(model.config.id2label.values()) == names
    card = (out / "README.md").read_text()
    assert all(source in card for source in sources) and EMBEDDED_DATASET_NAME not in card
    if form == "hub_name":
        assert "on the namespace/shapes dataset" in card and "datasets:\n- namespace/shapes" in card
    if form in PREDICTS:
        check_predictions(out, model, names, labelled=form == "save_to_disk_dict")


def check_predictions(out: Path, model: torch.nn.Module, names: list[str], labelled: bool) -> None:
    """``predictions.csv`` holds, for each test image in order, what the saved model predicts and its true class;
    ``predict_results.json`` the accuracy of those rows."""
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["index"]) for row in rows] == list(range(len(TEST)))
    processor = AutoImageProcessor.from_pretrained(out)
    test = datasets.Dataset.from_dict(
        {"image": [image(i) for i in TEST]}, features=datasets.Features({"image": datasets.Image()})
    )
    test = with_pixel_values(
        test, model.config.image_size, list(processor.image_mean), list(processor.image_std), label_column=None
    )
    with torch.no_grad():
        logits = model.eval()(pixel_values=collate_fn([test[i] for i in range(len(test))])["pixel_values"]).logits
    assert [row["prediction"] for row in rows] == [names[k] for k in logits.argmax(-1).tolist()]
    metrics = json.loads((out / "predict_results.json").read_text())
    assert metrics["predict_samples"] == len(TEST)
    if labelled:
        assert [row["label"] for row in rows] == [label(i) for i in TEST]
        accuracy = sum(row["prediction"] == row["label"] for row in rows) / len(rows)
        assert metrics["predict_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    else:
        assert all(row["label"] == "" for row in rows) and "predict_accuracy" not in metrics


# --- in-process: which split evaluation uses, and the refusals ------------------------------------------------------


@pytest.fixture(scope="module")
def data_side(script):
    """``examples/image_classification_data.py``, as the script imported it: ``load_data`` and its logger."""
    return importlib.import_module("image_classification_data")


def parse(script, argv: list[str]):
    parser = HfArgumentParser((script.ModelArguments, script.DataTrainingArguments, BPModifiedTrainingArguments))
    return parser.parse_args_into_dataclasses(args=["--output_dir", "unused", "--report_to", "none", *argv])


@pytest.mark.parametrize(
    ("splits", "extra", "expected"),
    [  # each split the script keeps: the split of the data it is, or its size when it is a part of train
        (("train", "validation", "test"), [], {"train": "train", "eval": "validation", "test": "test"}),
        (("train", "test"), [], {"train": "train", "eval": "test", "test": "test"}),
        (("train", "test"), ["--train_val_split", "0.25"], {"train": 13, "eval": 5, "test": "test"}),
        (("train",), [], {"train": 15, "eval": 3}),
        (("train",), ["--train_val_split", "0"], {"train": "train"}),
        (("train", "unlabelled test"), [], {"train": 15, "eval": 3, "test": "test"}),
    ],
)
def test_evaluation_split(script, data_side, tmp_path, caplog, splits, extra, expected):
    ids = {"train": TRAIN, "validation": VAL, "test": TEST}
    saved = {s: cifar_style(ids[s]) for s in splits if s in ids}
    if "unlabelled test" in splits:
        saved["test"] = cifar_style(TEST).remove_columns("label")
    datasets.DatasetDict(saved).save_to_disk(str(tmp_path / "saved"))
    model_args, data_args, args = parse(script, ["--dataset_name", str(tmp_path / "saved"), *extra])
    with caplog.at_level(logging.INFO, logger=data_side.logger.name):
        data = data_side.load_data(data_args, model_args, args.seed)
    assert set(data.splits) == set(expected)
    kept = {split: [row["img"].getpixel((0, 0))[0] for row in ds] for split, ds in data.splits.items()}
    for split, value in expected.items():
        assert kept[split] == list(ids[value]) if isinstance(value, str) else len(kept[split]) == value
    if expected.get("eval") == "test":
        assert "evaluation uses the test split" in caplog.text
    if isinstance(expected.get("eval"), int):  # held out of train: the two parts partition it
        assert sorted(kept["train"] + kept["eval"]) == list(TRAIN)


def test_data_arguments_take_one_source(script):
    with pytest.raises(ValueError, match=r"--dataset_name 'namespace/x' and --train_file both give the data"):
        parse(script, ["--dataset_name", "namespace/x", "--train_file", "a.csv"])
    with pytest.raises(ValueError, match="--train_dir and --train_file both give the train data"):
        parse(script, ["--train_dir", "a", "--train_file", "b.csv"])
    _, data_args, _ = parse(script, [])
    assert data_args.dataset_name == EMBEDDED_DATASET_NAME
    _, data_args, _ = parse(script, ["--train_dir", "a", "--validation_dir", "b"])
    assert (data_args.dataset_name, data_args.train_file, data_args.validation_file) == (None, "a", "b")


@pytest.mark.parametrize(
    ("splits", "flags", "message"),
    [
        (
            ("train",),
            ["--do_train", "--do_predict"],  # predicting alone with a model built from a config is refused earlier
            r"--do_predict needs a test split, and .*saved has none; pass --test_file",
        ),
        (
            ("train",),
            ["--do_eval", "--train_val_split", "0"],
            r"--do_eval needs evaluation data: .*saved has no validation .* pass --validation_file",
        ),
        (("validation",), ["--do_train"], r"--do_train needs training data, and .*saved has none; pass --train_file"),
    ],
)
def test_missing_split_fails_before_the_model(script, tmp_path, monkeypatch, logging_restored, splits, flags, message):
    datasets.DatasetDict({s: cifar_style(TRAIN) for s in splits}).save_to_disk(str(tmp_path / "saved"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(script, "build_model", no_model)
    argv = ["--dataset_name", str(tmp_path / "saved"), *flags, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=message):
        script.main([*argv, "--report_to", "none"])
