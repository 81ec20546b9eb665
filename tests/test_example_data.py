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
    broken_image,
    card_links,
    card_section,
    check_outputs,
    cifar_style,
    image,
    label,
    read_card,
    reload_full_model,
    save_pretrained_vit,
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


def make_form(form: str, root: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """The data of ``form`` under ``root``: the script's data arguments, where the card must say each split used
    came from (``train``, ``eval``, ``test``), and the class names in label order."""
    if form == "csv_files":  # paths relative to each csv; string labels; an unlabelled test file
        write_pngs(root / "images", [*TRAIN, *VAL, *TEST])
        files = [
            write_csv(root / "train.csv", TRAIN, "images/"),
            write_csv(root / "lists" / "val.csv", VAL, "../images/"),
            write_csv(root / "test.csv", TEST, "images/", labels=False),
        ]
        args = ["--train_file", str(files[0]), "--validation_file", str(files[1]), "--test_file", str(files[2])]
        return args, dict(zip(("train", "eval", "test"), map(str, files))), list(CLASSES)
    if form == "json_files":  # integer labels without a ClassLabel
        write_pngs(root / "images", [*TRAIN, *VAL])
        files = [write_jsonl(root / "train.jsonl", TRAIN, "images/"), write_jsonl(root / "val.json", VAL, "images/")]
        return (
            ["--train_file", str(files[0]), "--validation_file", str(files[1])],
            {"train": str(files[0]), "eval": str(files[1])},
            [str(c) for c in INT_CLASSES],
        )
    if form == "parquet_folder":  # shards named as the Hub names them, images as bytes
        write_parquet(root / "data" / "train-00000-of-00002.parquet", TRAIN[:9])
        write_parquet(root / "data" / "train-00001-of-00002.parquet", TRAIN[9:])
        write_parquet(root / "data" / "validation-00000-of-00001.parquet", VAL)
        sources = {
            "train": f"{root} (data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet)",
            "eval": f"{root} (data/validation-00000-of-00001.parquet)",
        }
        return ["--dataset_name", str(root)], sources, list(CLASSES)
    if form == "arrow_files":
        files = [write_arrow(root / "train.arrow", TRAIN), write_arrow(root / "val.arrow", VAL)]
        return (
            ["--train_file", str(files[0]), "--validation_file", str(files[1])],
            {"train": str(files[0]), "eval": str(files[1])},
            list(CLASSES),
        )
    if form == "save_to_disk_dict":  # CIFAR-style img/label, train and test: evaluation and prediction use test
        names = ("owl", "cat", "dog")
        datasets.DatasetDict({"train": cifar_style(TRAIN, names), "test": cifar_style(TEST, names)}).save_to_disk(
            str(root)
        )
        sources = {"train": f"{root} [train]", "eval": f"{root} [test]", "test": f"{root} [test]"}
        return ["--dataset_name", str(root)], sources, list(names)
    if form == "save_to_disk_datasets":
        cifar_style(TRAIN).save_to_disk(str(root / "train"))
        cifar_style(VAL).save_to_disk(str(root / "val"))
        return (
            ["--train_file", str(root / "train"), "--validation_file", str(root / "val")],
            {"train": str(root / "train"), "eval": str(root / "val")},
            list(CLASSES),
        )
    if form == "hub_name":
        for split, ids in (("train", TRAIN), ("validation", VAL)):
            write_parquet(root / HUB_FILES[split], ids)
        sources = {"train": "namespace/shapes [train]", "eval": "namespace/shapes [validation]"}
        return ["--dataset_name", "namespace/shapes"], sources, list(CLASSES)
    if form == "class_folders":  # one sub-folder per class, in separate train and validation folders
        train, val = write_class_folders(root / "train", TRAIN), write_class_folders(root / "val", VAL)
        return (
            ["--train_dir", str(train), "--validation_dir", str(val)],
            {"train": str(train), "eval": str(val)},
            list(CLASSES),
        )
    if form == "metadata_folder":  # an image folder whose metadata.csv gives each file's 'species'
        write_metadata_folder(root / "train", TRAIN)
        write_metadata_folder(root / "validation", VAL)
        sources = {"train": f"{root} (train/metadata.csv)", "eval": f"{root} (validation/metadata.csv)"}
        return ["--dataset_name", str(root), "--label_column_name", "species"], sources, list(CLASSES)
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
    # the card: trained on the training data only; each split used named with its role, size and source
    metadata, text = read_card(out / "README.md")
    trained_on = "namespace/shapes" if form == "hub_name" else sources["train"]
    assert f"\nThis model was trained from scratch on the {trained_on} dataset.\n" in text
    assert metadata.get("datasets") == (["namespace/shapes"] if form == "hub_name" else None)
    sizes = {"train": len(TRAIN), "eval": n_eval, "test": len(TEST)}
    roles = {"train": "Training data", "eval": "Evaluation data", "test": "Test data"}
    expected = [f"- {roles[split]} ({sizes[split]} images): {where}" for split, where in sources.items()]
    if form not in PREDICTS:  # a test split not predicted is not named
        expected = [line for line in expected if not line.startswith("- Test data")]
    expected.append(f"- Classes ({len(names)}): {', '.join(names)}")
    assert card_section(text, "Training and evaluation data") == "\n".join(expected)
    assert card_links(text) == [] and EMBEDDED_DATASET_NAME not in text
    if form in PREDICTS:
        check_predictions(out, model, names, labelled=form == "save_to_disk_dict")


def check_predictions(
    out: Path, model: torch.nn.Module, names: list[str], labelled: bool, ids=TEST, indices=None
) -> None:
    """``predictions.csv`` holds, for each test image ``ids`` in order, its row in the test file (``indices``,
    default ``0, 1, ...``), what the saved model predicts and its true class; ``predict_results.json`` the accuracy
    of those rows."""
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["index"]) for row in rows] == (list(range(len(ids))) if indices is None else indices)
    processor = AutoImageProcessor.from_pretrained(out)
    test = datasets.Dataset.from_dict(
        {"image": [image(i) for i in ids]}, features=datasets.Features({"image": datasets.Image()})
    )
    test = with_pixel_values(
        test, model.config.image_size, list(processor.image_mean), list(processor.image_std), label_column=None
    )
    with torch.no_grad():
        logits = model.eval()(pixel_values=collate_fn([test[i] for i in range(len(test))])["pixel_values"]).logits
    assert [row["prediction"] for row in rows] == [names[k] for k in logits.argmax(-1).tolist()]
    metrics = json.loads((out / "predict_results.json").read_text())
    assert metrics["predict_samples"] == len(ids)
    if labelled:
        assert [row["label"] for row in rows] == [label(i) for i in ids]
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


def test_unreadable_images_stop_the_run_before_the_model_or_are_skipped_with_the_flag(
    script, tmp_path, monkeypatch, capsys, caplog, logging_restored
):
    write_pngs(tmp_path / "images", [*TRAIN, *VAL])
    broken = {TRAIN[3]: "cut_jpeg", TRAIN[8]: "not_an_image"}
    for i, kind in broken.items():
        (tmp_path / "images" / f"{i}.png").write_bytes(broken_image(kind, i))
    train, val = write_csv(tmp_path / "train.csv", TRAIN, "images/"), write_csv(tmp_path / "val.csv", VAL, "images/")
    argv = [
        *script_args(tmp_path / "out", tmp_path / "cache"), *TINY_VIT, "--train_file", str(train),
        "--validation_file", str(val), "--max_steps", "2",
    ]  # fmt: skip
    build_model = script.build_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the images were checked")

    monkeypatch.setattr(script, "build_model", no_model)
    with pytest.raises(ValueError) as error:
        script.main(argv)
    message = str(error.value)
    assert message.startswith(f"{train}: 2 of 18 images of column 'image' cannot be read: ")
    assert all(str(tmp_path / "images" / f"{i}.png") in message for i in broken)
    assert "`--skip_unreadable_images` on the command line" in message
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(script, "build_model", build_model)
    with caplog.at_level(logging.WARNING):
        script.main([*argv, "--skip_unreadable_images", "true"])
    check_outputs(capsys.readouterr().out, tmp_path / "out", n_eval=len(VAL), n_train=len(TRAIN) - len(broken))
    assert "left out 2 of 18 images of column 'image' that cannot be read" in caplog.text


def test_predictions_of_a_test_file_with_skipped_images_keep_each_rows_number(
    script, tmp_path, capsys, logging_restored
):
    write_pngs(tmp_path / "images", [*TRAIN, *VAL, *TEST])
    (tmp_path / "images" / f"{TEST[2]}.png").write_bytes(broken_image("cut_png", TEST[2]))
    files = [write_csv(tmp_path / f"{name}.csv", ids, "images/") for name, ids in (("train", TRAIN), ("val", VAL))]
    test = write_csv(tmp_path / "test.csv", TEST, "images/")
    script.main(
        [
            *script_args(tmp_path / "out", tmp_path / "cache"), *TINY_VIT, "--train_file", str(files[0]),
            "--validation_file", str(files[1]), "--test_file", str(test), "--do_train", "--do_eval", "--do_predict",
            "--max_steps", "1", "--skip_unreadable_images", "true",
        ]
    )  # fmt: skip
    out = tmp_path / "out"
    kept = [i for i in TEST if i != TEST[2]]
    check_predictions(out, reload_full_model(out), list(CLASSES), labelled=True, ids=kept, indices=[0, 1, 3, 4, 5])


# --- the model card of a peft run ------------------------------------------------------------------------------------


def test_the_card_of_a_lora_run_on_a_local_model_names_the_adapters_and_links_nothing_missing(
    script, tmp_path, logging_restored
):
    from peft import PeftModel
    from transformers import ViTForImageClassification

    pretrained = save_pretrained_vit(tmp_path / "pretrained")
    write_pngs(tmp_path / "images", [*TRAIN, *VAL])
    train, val = write_csv(tmp_path / "train.csv", TRAIN, "images/"), write_csv(tmp_path / "val.csv", VAL, "images/")
    out = tmp_path / "out"
    script.main(
        [
            *script_args(out, tmp_path / "cache"), "--model_name_or_path", str(pretrained), "--train_file", str(train),
            "--validation_file", str(val), "--max_steps", "1", "--peft", "lora", "--peft_rank", "2",
            "--peft_alpha", "4",
        ]
    )  # fmt: skip
    metadata, text = read_card(out / "README.md")
    assert f"\nThis model is a fine-tuned version of the local model `{pretrained}` on the {train} dataset.\n" in text
    assert card_links(text) == []  # a local folder is no Hub page, the package is on no index
    assert "base_model" not in metadata and not any(str(pretrained) in tag for tag in metadata["tags"])
    # our tags survive peft's update of the card, which rewrites the tags
    assert {"hf_bpmod", "local-learning", "image-classification"} <= set(metadata["tags"])
    # what was trained, as the saved adapter reloads for training
    reloaded = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(pretrained), out, is_trainable=True)
    trained, total = reloaded.get_nb_trainable_parameters()
    targets = ", ".join(sorted(reloaded.peft_config["default"].target_modules))
    assert (
        f"- peft: LoRA\n- peft_r: 2\n- peft_alpha: 4.0\n- peft_target_modules: {targets}\n"
        f"- peft_modules_to_save: classifier\n- trained_parameters: {trained:,} of {total:,} ({trained / total:.2%})\n"
    ) in text
    assert 0 < trained < total
