"""``hf_bpmod.data.load_image_dataset``: every form of data it reads, on data the tests make, and its errors.

Each loaded row is checked against the image it came from (the red value of every test image is its id), so a label
that drifts from its image, a path read from the wrong folder or a class remapped wrongly fails the test.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import (
    CLASSES,
    INT_CLASSES,
    broken_image,
    cifar_style,
    identity,
    label,
    png,
    write_arrow,
    write_class_folders,
    write_csv,
    write_jsonl,
    write_metadata_folder,
    write_parquet,
    write_pngs,
)

from hf_bpmod.data import EMBEDDED_DATASET_NAME, ImageData, load_image_dataset

pytestmark = pytest.mark.compat  # datasets' loaders, features and Hub arguments vary across releases

TRAIN, VAL, TEST = range(0, 12), range(12, 18), range(18, 24)


def assert_rows(data: ImageData, split: str, ids: Sequence[int], true_label=label) -> None:
    """``split`` holds exactly the images ``ids``, each with its own label, as a ``ClassLabel`` of the data's names."""
    ds = data.splits[split]
    assert isinstance(ds.features[data.image_column], datasets.Image)
    feature = ds.features[data.label_column]
    assert isinstance(feature, datasets.ClassLabel) and feature.names == data.label_names
    seen = []
    for row in ds:
        i = identity(row[data.image_column])
        assert data.label_names[row[data.label_column]] == str(true_label(i)), f"image {i}"
        seen.append(i)
    assert sorted(seen) == sorted(ids)


def load(**kwargs) -> ImageData:
    return load_image_dataset(**kwargs)


# --- every form -----------------------------------------------------------------------------------------------------


def test_csv_image_paths_are_relative_to_the_csv(tmp_path, monkeypatch):
    write_pngs(tmp_path / "data" / "images", [*TRAIN, *VAL, *TEST])
    train = write_csv(tmp_path / "data" / "train.csv", TRAIN, "images/")
    val = write_csv(tmp_path / "data" / "lists" / "val.csv", VAL, "../images/")
    test = write_csv(tmp_path / "data" / "test.tsv", TEST, str(tmp_path / "data" / "images") + "/")  # absolute
    test.write_text(test.read_text().replace(",", "\t"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    data = load(train_file=str(train), validation_file=str(val), test_file=str(test), cache_dir=str(tmp_path / "c"))
    assert (data.image_column, data.label_column, data.label_names) == ("image", "label", list(CLASSES))
    for split, ids in (("train", TRAIN), ("validation", VAL), ("test", TEST)):
        assert_rows(data, split, ids)
    assert data.sources == [str(train), str(val), str(test)]
    # the card says the model was trained on the training file; the others are evaluation and test data
    assert data.card_kwargs() == {"dataset": str(train), "dataset_tags": []}
    assert data.card_data_description({"train": 12, "validation": 6, "test": 6}) == (
        f"- Training data (12 images): {train}\n- Evaluation data (6 images): {val}\n"
        f"- Test data (6 images): {test}\n- Classes (3): cat, dog, owl"
    )


def test_json_with_integer_labels_without_classlabel(tmp_path):
    write_pngs(tmp_path / "images", [*TRAIN, *VAL])
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN, "images/")
    val = write_jsonl(tmp_path / "val.json", VAL, "images/", as_list=True)
    data = load(train_file=str(train), validation_file=str(val), cache_dir=str(tmp_path / "c"))
    assert data.label_names == ["3", "7", "10"]  # numeric order, not "10" < "3"
    for split, ids in (("train", TRAIN), ("validation", VAL)):
        assert_rows(data, split, ids, true_label=lambda i: INT_CLASSES[i % 3])


def test_parquet_folder_split_by_file_names(tmp_path):
    folder = tmp_path / "shapes"
    write_parquet(folder / "data" / "train-00000-of-00002.parquet", TRAIN[:5])
    write_parquet(folder / "data" / "train-00001-of-00002.parquet", TRAIN[5:])
    validation = cifar_style(VAL).rename_column("img", "image")  # saved with datasets' Image struct
    validation.to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", TEST)
    data = load(dataset_name=str(folder), cache_dir=str(tmp_path / "c"))
    assert set(data.splits) == {"train", "validation", "test"} and data.label_names == list(CLASSES)
    for split, ids in (("train", TRAIN), ("validation", VAL), ("test", TEST)):
        assert_rows(data, split, ids)
    assert data.card_kwargs() == {
        "dataset": f"{folder} (data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet)",
        "dataset_tags": [],
    }


def test_arrow_files(tmp_path):
    train, val = write_arrow(tmp_path / "train.arrow", TRAIN), write_arrow(tmp_path / "val.arrow", VAL)
    data = load(train_file=str(train), validation_file=str(val), cache_dir=str(tmp_path / "c"))
    assert_rows(data, "train", TRAIN)
    assert_rows(data, "validation", VAL)


def test_save_to_disk_dataset_dict_cifar_style(tmp_path, caplog):
    names = ("owl", "cat", "dog")  # a ClassLabel's own order is kept, not sorted
    saved = tmp_path / "saved"
    splits = {"train": cifar_style(TRAIN, names), "valid": cifar_style(VAL, names), "extra": cifar_style(TEST, names)}
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    before = sorted(str(p.relative_to(saved)) for p in saved.rglob("*"))
    with caplog.at_level(logging.WARNING, logger="hf_bpmod.data_sources"):
        data = load(dataset_name=str(saved))
    assert "['extra'] are not train, validation or test" in caplog.text
    assert (data.image_column, data.label_names, set(data.splits)) == ("img", list(names), {"train", "validation"})
    assert_rows(data, "train", TRAIN)
    assert_rows(data, "validation", VAL)
    assert sorted(str(p.relative_to(saved)) for p in saved.rglob("*")) == before  # nothing written next to the data


def test_save_to_disk_datasets_as_files(tmp_path):
    cifar_style(TRAIN).save_to_disk(str(tmp_path / "train"))
    cifar_style(VAL, names=("dog", "owl", "cat")).save_to_disk(str(tmp_path / "val"))
    data = load(train_file=str(tmp_path / "train"), validation_file=str(tmp_path / "val"))
    assert data.label_names == list(CLASSES)
    assert_rows(data, "train", TRAIN)
    assert_rows(data, "validation", VAL)  # its own ClassLabel order is mapped to train's


def test_image_folder_with_metadata(tmp_path):
    folder = tmp_path / "photos"
    write_metadata_folder(folder / "train", TRAIN)
    write_metadata_folder(folder / "test", TEST)
    data = load(dataset_name=str(folder), label_column_name="species", cache_dir=str(tmp_path / "c"))
    assert (data.image_column, data.label_column, set(data.splits)) == ("file_name", "species", {"train", "test"})
    assert_rows(data, "train", TRAIN)
    assert_rows(data, "test", TEST)


def test_image_folders_of_class_folders(tmp_path):
    train = write_class_folders(tmp_path / "train", TRAIN)
    val_ids = [i for i in VAL if label(i) != "cat"]  # validation lacks a class: its labels still follow train's
    val = write_class_folders(tmp_path / "val", val_ids)
    data = load(train_file=str(train), validation_file=str(val), cache_dir=str(tmp_path / "c"))
    assert data.label_names == list(CLASSES)
    assert_rows(data, "train", TRAIN)
    assert_rows(data, "validation", val_ids)


def test_unlabelled_test_data(tmp_path):
    write_pngs(tmp_path / "images", [*TRAIN, *TEST])
    train = write_csv(tmp_path / "train.csv", TRAIN, "images/")
    for name, text in (("none.csv", None), ("empty.csv", "image,label\n")):
        test = write_csv(tmp_path / name, TEST, "images/", labels=False)
        if text is not None:
            test.write_text(text + "".join(f"images/{i}.png,\n" for i in TEST))
        data = load(train_file=str(train), test_file=str(test), cache_dir=str(tmp_path / "c"))
        assert not data.has_labels("test") and data.has_labels("train")
        assert [identity(row["image"]) for row in data.splits["test"]] == list(TEST)


def test_hub_name_goes_to_load_dataset_without_running_code(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.DatasetDict({"train": cifar_style(TRAIN), "test": cifar_style(TEST)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load(dataset_name="namespace/shapes", dataset_config_name="small", cache_dir="/tmp/c", token="t")
    ((args, kwargs),) = calls
    assert args == ("namespace/shapes", "small") and kwargs["cache_dir"] == "/tmp/c" and kwargs["token"] == "t"
    if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:  # datasets < 4 ran scripts
        assert kwargs["trust_remote_code"] is False
    assert_rows(data, "train", TRAIN)
    assert_rows(data, "test", TEST)
    assert data.card_kwargs() == {
        "dataset": "namespace/shapes",
        "dataset_tags": ["namespace/shapes"],
        "dataset_args": ["small"],
    }


def test_unreachable_hub_name_says_what_to_check(monkeypatch):
    def offline(*args, **kwargs):
        raise FileNotFoundError("Couldn't find 'namespace/shapes' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        FileNotFoundError, match=r"`dataset_name` 'namespace/shapes' is not a local path.*HF_DATASETS_OFF"
    ):
        load(dataset_name="namespace/shapes")


def test_embedded_data_by_name(monkeypatch):
    import hf_bpmod.data_sources

    embedded = datasets.DatasetDict({"train": cifar_style(TRAIN), "test": cifar_style(TEST)})
    # the real one: test_data.py
    monkeypatch.setattr(hf_bpmod.data_sources, "load_animal_shape_mnist", lambda: embedded)
    data = load(dataset_name=EMBEDDED_DATASET_NAME)
    assert data.splits["train"] is embedded["train"] and data.label_names == list(CLASSES)
    assert data.sources == [EMBEDDED_DATASET_NAME]
    assert data.card_kwargs() == {"dataset": f"{EMBEDDED_DATASET_NAME} [train]", "dataset_tags": []}


def test_columns_found_by_type_then_by_usual_name(tmp_path):
    features = datasets.Features(
        {
            "photo": datasets.Image(),
            "coarse_label": datasets.ClassLabel(names=["x"]),
            "fine_label": datasets.ClassLabel(names=list(CLASSES)),
        }
    )
    rows = {"photo": [cifar_style([i])[0]["img"] for i in TRAIN], "coarse_label": [0] * 12}
    rows["fine_label"] = [CLASSES.index(label(i)) for i in TRAIN]
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    data = load(dataset_name=str(tmp_path / "saved"))  # the one Image column; of two ClassLabels, 'fine_label'
    assert (data.image_column, data.label_column) == ("photo", "fine_label")
    assert_rows(data, "train", TRAIN)
    named = load(dataset_name=str(tmp_path / "saved"), label_column_name="coarse_label")
    assert named.label_column == "coarse_label" and named.label_names == ["x"]


# --- errors: each names the argument or the file, and what to do ---------------------------------------------------


def _csv_setup(tmp_path: Path) -> dict[str, Path]:
    write_pngs(tmp_path / "images", [*TRAIN, *VAL])
    return {"train": write_csv(tmp_path / "train.csv", TRAIN, "images/"), "val": tmp_path / "val.csv"}


def _error_cases():
    def wrong_image_column(p):
        return {"train_file": str(p["train"]), "image_column_name": "pic"}

    def no_label_column(p):
        p["train"].write_text(p["train"].read_text().replace("image,label", "image,kind"))
        return {"train_file": str(p["train"])}

    def unknown_file_type(p):
        (p["train"].parent / "data.xlsx").write_bytes(b"PK")
        return {"train_file": str(p["train"].parent / "data.xlsx")}

    def nothing_readable(p):
        (p["train"].parent / "empty").mkdir()
        (p["train"].parent / "empty" / "notes.txt").write_text("hello")
        return {"dataset_name": str(p["train"].parent / "empty")}

    def unseen_validation_label(p):
        p["val"].write_text(f"image,label\nimages/{VAL[0]}.png,emu\nimages/{VAL[1]}.png,cat\n")
        return {"train_file": str(p["train"]), "validation_file": str(p["val"])}

    def missing_image(p):
        p["train"].write_text(p["train"].read_text() + "images/missing.png,cat\n")
        return {"train_file": str(p["train"])}

    def name_and_files(p):
        return {"dataset_name": "namespace/shapes", "train_file": str(p["train"])}

    def missing_file(p):
        return {"train_file": str(p["train"]), "validation_file": str(p["val"])}

    def missing_local_name(p):
        return {"dataset_name": "./no/such/folder"}

    def partly_labelled_test(p):
        p["val"].write_text(f"image,label\nimages/{VAL[0]}.png,cat\nimages/{VAL[1]}.png,\n")
        return {"train_file": str(p["train"]), "test_file": str(p["val"])}

    def unlabelled_validation(p):
        write_csv(p["val"], VAL, "images/", labels=False)
        return {"train_file": str(p["train"]), "validation_file": str(p["val"])}

    def not_images(p):
        p["train"].write_text("image,label\n1,cat\n2,dog\n")
        return {"train_file": str(p["train"])}

    def saved_dict_as_file(p):
        datasets.DatasetDict({"train": cifar_style(TRAIN)}).save_to_disk(str(p["train"].parent / "saved"))
        return {"train_file": str(p["train"].parent / "saved")}

    def no_usable_split(p):
        datasets.DatasetDict({"a": cifar_style(TRAIN)}).save_to_disk(str(p["train"].parent / "saved"))
        return {"dataset_name": str(p["train"].parent / "saved")}

    return {
        "wrong_image_column": (wrong_image_column, r"`image_column_name` 'pic' is not a column of .*train\.csv"),
        "no_label_column": (no_label_column, r"no label column in .*train\.csv .*name it with `label_column_name`"),
        "unknown_file_type": (unknown_file_type, r"`train_file` .*data\.xlsx.*: unknown file type; give a "),
        "nothing_readable": (nothing_readable, r"`dataset_name` .*empty.* holds nothing readable.*notes\.txt"),
        "unseen_validation_label": (
            unseen_validation_label,
            r"val\.csv has labels the training data lacks: \['emu'\].*must occur in the training data",
        ),
        "missing_image": (missing_image, r"train\.csv: 1 of 13 images .* row 12: 'images/missing\.png'.*relative to"),
        "name_and_files": (name_and_files, r"Pass either `dataset_name` .* or `train_file`"),
        "missing_file": (missing_file, r"`validation_file` .*val\.csv' does not exist"),
        "missing_local_name": (missing_local_name, r"`dataset_name` './no/such/folder' does not exist"),
        "partly_labelled_test": (partly_labelled_test, r"val\.csv: 1 of 2 rows have no label .*wholly unlabelled"),
        "unlabelled_validation": (unlabelled_validation, r"val\.csv has no label column 'label'.*Only test data"),
        "not_images": (not_images, r"train\.csv: column 'image' holds .*int64.*not images"),
        "saved_dict_as_file": (saved_dict_as_file, r"`train_file` .*saved.* holds a dataset dict .* `dataset_name`"),
        "no_usable_split": (no_usable_split, r"saved has no train, validation or test split \(splits: \['a'\]\)"),
    }


ERROR_CASES = _error_cases()


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_the_argument_or_file(tmp_path, case):
    make_kwargs, message = ERROR_CASES[case]
    kwargs = make_kwargs(_csv_setup(tmp_path))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load(cache_dir=str(tmp_path / "c"), **kwargs)


# --- unreadable images, empty class folders, labels out of range ----------------------------------------------------

BROKEN = {2: "cut_png", 5: "cut_jpeg", 7: "not_an_image"}  # images of TRAIN broken as the helpers break them
BROKEN_FORMS = ("csv_paths", "class_folders", "parquet_bytes", "saved_image_column")


def _broken_data(form: str, root: Path, broken: dict[int, str]) -> tuple[dict, str, dict[int, str]]:
    """Training data of ``form`` with the images ``broken``: the loader's arguments, the image column and the name
    an error must give each broken image (its path, or its row when it has none)."""

    def content(i):
        return broken_image(broken[i], i) if i in broken else png(i)

    rows = {i: f"row {TRAIN.index(i)}" for i in broken}
    if form == "csv_paths":
        write_pngs(root / "images", TRAIN)
        for i in broken:
            (root / "images" / f"{i}.png").write_bytes(content(i))
        paths = {i: str(root / "images" / f"{i}.png") for i in broken}
        return {"train_file": str(write_csv(root / "train.csv", TRAIN, "images/"))}, "image", paths
    if form == "class_folders":
        write_class_folders(root / "train", TRAIN)
        for i in broken:
            (root / "train" / label(i) / f"{i}.png").write_bytes(content(i))
        paths = {i: str(root / "train" / label(i) / f"{i}.png") for i in broken}
        return {"train_file": str(root / "train")}, "image", paths
    if form == "parquet_bytes":
        root.mkdir(parents=True, exist_ok=True)
        table = pa.table({"image": [content(i) for i in TRAIN], "label": [label(i) for i in TRAIN]})
        pq.write_table(table, root / "train.parquet")
        return {"train_file": str(root / "train.parquet")}, "image", rows
    if form == "saved_image_column":  # a datasets.Image column, its bytes embedded in the arrow file
        features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
        values = {"img": [{"bytes": content(i), "path": None} for i in TRAIN]}
        values["label"] = [CLASSES.index(label(i)) for i in TRAIN]
        datasets.Dataset.from_dict(values, features=features).save_to_disk(str(root / "saved"))
        return {"dataset_name": str(root / "saved")}, "img", rows
    raise KeyError(form)


@pytest.mark.parametrize("form", BROKEN_FORMS)
def test_unreadable_images_are_refused_before_training_naming_each_and_the_fix(tmp_path, form):
    kwargs, column, names = _broken_data(form, tmp_path / "data", BROKEN)
    with pytest.raises(ValueError) as error:
        load(cache_dir=str(tmp_path / "c"), **kwargs)
    message = str(error.value)
    assert f"3 of 12 images of column {column!r} cannot be read: " in message
    for i in BROKEN:
        assert f"{names[i]} (" in message, f"image {i} is not named"
    assert "image file is truncated" in message  # the cut JPEG, which opens and verifies
    assert "remove or replace them" in message
    assert "`skip_unreadable_images=True` (`--skip_unreadable_images` on the command line)" in message


@pytest.mark.parametrize("form", BROKEN_FORMS)
def test_skip_unreadable_images_leaves_them_out_naming_each_and_the_count(tmp_path, caplog, form):
    kwargs, column, names = _broken_data(form, tmp_path / "data", BROKEN)
    with caplog.at_level(logging.WARNING):
        data = load(cache_dir=str(tmp_path / "c"), skip_unreadable_images=True, **kwargs)
    assert_rows(data, "train", [i for i in TRAIN if i not in BROKEN])
    if form != "class_folders":  # rows in the order of the file (an image folder has its own)
        dropped = sorted(TRAIN.index(i) for i in BROKEN)
        assert data.left_out == {"train": dropped}
        assert data.rows_as_read("train") == [row for row in range(len(TRAIN)) if row not in dropped]
    (record,) = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"left out 3 of 12 images of column {column!r} that cannot be read: " in record.getMessage()
    assert all(f"{names[i]} (" in record.getMessage() for i in BROKEN)


def test_an_error_names_the_first_five_unreadable_images_and_the_count(tmp_path):
    broken = dict.fromkeys(TRAIN[:7], "not_an_image")
    kwargs, _, names = _broken_data("csv_paths", tmp_path / "data", broken)
    with pytest.raises(ValueError, match=r"7 of 12 images .* cannot be read: .*; and 2 more\. ") as error:
        load(cache_dir=str(tmp_path / "c"), **kwargs)
    assert [i for i in broken if f"{names[i]} (" in str(error.value)] == list(TRAIN[:5])


def test_skipping_every_image_is_an_error(tmp_path):
    kwargs, _, _ = _broken_data("parquet_bytes", tmp_path / "data", dict.fromkeys(TRAIN, "cut_png"))
    with pytest.raises(ValueError, match=r"train\.parquet: none of the 12 images of column 'image' can be read"):
        load(cache_dir=str(tmp_path / "c"), skip_unreadable_images=True, **kwargs)


def test_skip_unreadable_images_also_leaves_out_missing_files(tmp_path, caplog):
    paths = _csv_setup(tmp_path)
    paths["train"].write_text(paths["train"].read_text() + "images/missing.png,cat\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 13 images .* not found.*`skip_unreadable_images=True`"):
        load(train_file=str(paths["train"]), cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING):
        data = load(train_file=str(paths["train"]), cache_dir=str(tmp_path / "c"), skip_unreadable_images=True)
    assert_rows(data, "train", TRAIN)
    missing = tmp_path / "images" / "missing.png"
    assert f"left out 1 of 13 images of column 'image' that cannot be read: {missing} (no such file)" in caplog.text


def test_an_empty_class_folder_is_warned_about(tmp_path, caplog):
    folder = tmp_path / "photos"
    write_class_folders(folder / "train", TRAIN)
    write_class_folders(folder / "val", VAL)
    (folder / "train" / "emu").mkdir()
    (folder / "val" / "yak" / ".cache").mkdir(parents=True)  # nothing but a hidden folder: empty too
    with caplog.at_level(logging.WARNING):
        data = load(dataset_name=str(folder), cache_dir=str(tmp_path / "c"))
    assert data.label_names == list(CLASSES)
    assert_rows(data, "train", TRAIN)
    (warning,) = [r.getMessage() for r in caplog.records if "no images" in r.getMessage()]
    assert f"`dataset_name` {str(folder)!r}: the class folders ['train/emu', 'val/yak'] hold no images" in warning
    assert "their classes are left out" in warning


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_a_classlabel_value_out_of_range_names_the_file_the_column_and_the_range(tmp_path, form):
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})
    codes = [CLASSES.index(label(i)) for i in TRAIN]
    codes[4], codes[9] = 5, -3  # -1 would be a missing label
    images = pa.array([{"bytes": png(i), "path": None} for i in TRAIN], type=features.arrow_schema.field("img").type)
    table = pa.table({"img": images, "label": pa.array(codes, pa.int64())}, schema=features.arrow_schema)
    # as a tool other than datasets writes it, the ClassLabel in the schema's metadata (datasets checks its own writes)
    dataset = datasets.Dataset(table)
    assert dataset.features == features
    if form == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "saved"))
        kwargs, where = {"dataset_name": str(tmp_path / "saved")}, str(tmp_path / "saved")
    else:
        pq.write_table(table, tmp_path / "train.parquet")
        kwargs, where = {"train_file": str(tmp_path / "train.parquet")}, str(tmp_path / "train.parquet")
    with pytest.raises(ValueError) as error:
        load(cache_dir=str(tmp_path / "c"), **kwargs)
    assert str(error.value).startswith(
        f"{where}: 2 labels of column 'label' are outside its ClassLabel's range 0-2 ({list(CLASSES)}; -1 marks a "
        "missing label): 5 in row 4, -3 in row 9."
    )
