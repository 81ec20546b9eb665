"""Tests for the embedded Animal-Shape-MNIST loader, the preprocessing helpers and the shipped accuracy metric."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_bpmod.data import (
    ANIMAL_SHAPE_CLASS_NAMES,
    EMBEDDED_DATASET_NAME,
    collate_fn,
    find_animal_shape_files,
    load_animal_shape_mnist,
    make_transform,
    with_pixel_values,
)
from hf_bpmod.metrics import ACCURACY_TOPK_PATH, compute_accuracy_metrics, load_accuracy_metric

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def animal() -> datasets.DatasetDict:
    return load_animal_shape_mnist()


def _png_hashes(dataset: datasets.Dataset) -> Counter:
    """Hashes of the stored (encoded) images, without decoding them."""
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    return Counter(hashlib.sha1(item["bytes"]).hexdigest() for item in raw["image"])


# --- data loading -------------------------------------------------------------------------------------------------


def test_data_files_are_found() -> None:
    images, labels = find_animal_shape_files()
    assert images.name == "animal_data_version_3.gz" and images.is_file()
    assert labels.name == "animal_label_version_3.gz" and labels.is_file()


def test_splits_sizes_and_features(animal: datasets.DatasetDict) -> None:
    assert EMBEDDED_DATASET_NAME == "animal-shape-mnist"
    assert set(animal) == {"train", "test"}
    assert (len(animal["train"]), len(animal["test"])) == (8000, 2000)
    for split in animal.values():
        assert isinstance(split.features["image"], datasets.Image)
        label_feature = split.features["label"]
        assert isinstance(label_feature, datasets.ClassLabel)
        assert label_feature.num_classes == 10
        assert tuple(label_feature.names) == ANIMAL_SHAPE_CLASS_NAMES
        assert split.cache_files == []  # nothing written to disk


def test_split_is_stratified(animal: datasets.DatasetDict) -> None:
    assert Counter(animal["train"]["label"]) == dict.fromkeys(range(10), 800)
    assert Counter(animal["test"]["label"]) == dict.fromkeys(range(10), 200)


def test_images_are_rgb_28x28(animal: datasets.DatasetDict) -> None:
    for split in ("train", "test"):
        for index in (0, 1, len(animal[split]) - 1):
            image = animal[split][index]["image"]
            assert isinstance(image, Image.Image)
            assert image.mode == "RGB" and image.size == (28, 28)
            pixels = np.asarray(image)
            # grayscale data: the three channels are equal
            assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])


def test_split_is_deterministic_and_seeded(animal: datasets.DatasetDict) -> None:
    again = load_animal_shape_mnist()
    assert again["train"]["label"] == animal["train"]["label"]
    assert again["test"]["label"] == animal["test"]["label"]
    first = [np.asarray(animal["test"][i]["image"]) for i in range(5)]
    second = [np.asarray(again["test"][i]["image"]) for i in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other_seed = load_animal_shape_mnist(seed=1)
    assert other_seed["test"]["label"] != animal["test"]["label"]


def test_split_partitions_the_data(animal: datasets.DatasetDict) -> None:
    other = load_animal_shape_mnist(test_size=0.5, seed=3)
    assert (len(other["train"]), len(other["test"])) == (5000, 5000)
    everything = _png_hashes(animal["train"]) + _png_hashes(animal["test"])
    assert everything == _png_hashes(other["train"]) + _png_hashes(other["test"])


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, "0.2"])
def test_bad_test_size_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="test_size"):
        load_animal_shape_mnist(test_size=bad)  # type: ignore[arg-type]


# --- preprocessing ------------------------------------------------------------------------------------------------


def test_pixel_values_shape_and_normalisation(animal: datasets.DatasetDict) -> None:
    train = with_pixel_values(animal["train"], image_size=28, image_mean=0.5, image_std=0.5)
    example = train[0]
    assert set(example) == {"pixel_values", "labels"}
    pixel_values = example["pixel_values"]
    assert pixel_values.shape == (3, 28, 28) and pixel_values.dtype == torch.float32
    raw = np.asarray(animal["train"][0]["image"], dtype=np.float32).transpose(2, 0, 1)
    expected = (raw / 255.0 - 0.5) / 0.5
    assert torch.allclose(pixel_values, torch.from_numpy(expected), atol=1e-6)
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    assert example["labels"] == animal["train"][0]["label"]
    # the source dataset keeps its raw columns
    assert set(animal["train"][0]) == {"image", "label"}


def test_pixel_values_resize_and_per_channel_stats(animal: datasets.DatasetDict) -> None:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    test = with_pixel_values(animal["test"], image_size=32, image_mean=mean, image_std=std)
    pixel_values = test[0]["pixel_values"]
    assert pixel_values.shape == (3, 32, 32)
    # undo the normalisation: the grayscale image gives the same [0, 1] values in every channel
    unnormalised = pixel_values * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert torch.allclose(unnormalised[0], unnormalised[1], atol=1e-5)
    assert torch.allclose(unnormalised[0], unnormalised[2], atol=1e-5)
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5


def test_transform_grayscale_and_rectangular() -> None:
    transform = make_transform((16, 24), mean=0.0, std=1.0, num_channels=1)
    image = Image.fromarray(np.full((28, 28), 255, dtype=np.uint8), mode="L")
    out = transform({"image": [image, image.convert("RGB")], "label": [3, 4]})
    assert [tuple(p.shape) for p in out["pixel_values"]] == [(1, 16, 24), (1, 16, 24)]
    assert torch.allclose(out["pixel_values"][0], torch.ones(1, 16, 24))
    assert out["labels"] == [3, 4]
    assert "labels" not in transform({"image": [image]})


def test_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="std must be positive"):
        make_transform(28, mean=0.5, std=0.0)
    with pytest.raises(ValueError, match="one per channel"):
        make_transform(28, mean=[0.5, 0.5], std=0.5)
    with pytest.raises(ValueError, match="has 3 values but the images have 1 channels"):
        make_transform(28, mean=[0.5, 0.5, 0.5], std=0.5, num_channels=1)
    with pytest.raises(ValueError, match="image_size"):
        make_transform(0)
    with pytest.raises(KeyError, match="no 'img' column"):
        make_transform(28, image_column="img")({"image": []})


def test_with_pixel_values_checks_columns(animal: datasets.DatasetDict) -> None:
    with pytest.raises(KeyError, match="image_column"):
        with_pixel_values(animal["test"], 28, image_column="img")
    with pytest.raises(KeyError, match="label_column"):
        with_pixel_values(animal["test"], 28, label_column="fine_label")


def test_an_image_that_cannot_be_decoded_in_training_is_named_with_the_fix(tmp_path: Path) -> None:
    """Data that did not come through ``load_image_dataset``'s check: the transform names the image that fails."""
    from helpers import broken_image, png

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(broken_image("cut_jpeg", 1))
    (tmp_path / "good.png").write_bytes(png(40))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = [str(tmp_path / "good.png"), str(cut), {"bytes": broken_image("not_an_image", 2), "path": None}]
    dataset = datasets.Dataset.from_dict({"image": rows, "label": [0, 1, 1]}, features=features)
    train = with_pixel_values(dataset, image_size=8, image_mean=0.0, image_std=1.0)
    assert dataset.features["image"].decode  # the given dataset is left as it was
    good = train[0]["pixel_values"]
    assert good.shape == (3, 8, 8) and round(good[0, 0, 0].item() * 255) == 40  # the red value of image 40
    with pytest.raises(ValueError) as error:
        train[1]
    assert str(error.value).startswith(
        f"Image {cut} of column 'image' cannot be read (OSError: image file is truncated"
    )
    assert "remove or replace it" in str(error.value) and "skip_unreadable_images=True" in str(error.value)
    with pytest.raises(ValueError, match=r"^An image of 27 bytes \(no path\) of column 'image' cannot be read \("):
        train[2]


def test_collate_fn(animal: datasets.DatasetDict) -> None:
    train = with_pixel_values(animal["train"], image_size=28)
    batch = collate_fn([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == animal["train"][:4]["label"]
    unlabelled = collate_fn([{"pixel_values": torch.zeros(3, 2, 2)}])
    assert set(unlabelled) == {"pixel_values"}
    with pytest.raises(KeyError, match="with_pixel_values"):
        collate_fn([{"image": None, "label": 0}])
    with pytest.raises(ValueError, match="empty"):
        collate_fn([])


# --- accuracy metric ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric():
    return load_accuracy_metric(keep_in_memory=True)


# Six classes; the label's rank among the scores is noted on each row.
LOGITS = [
    [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 5
    [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 6
    [0.0, 0.0, 3.0, 1.0, 2.0, 0.5],  # label 4: rank 2
]
LABELS = [0, 1, 5, 4]


def test_metric_hand_computed(metric) -> None:
    result = metric.compute(predictions=LOGITS, references=LABELS)
    assert result == pytest.approx({"accuracy": 1 / 4, "top5_accuracy": 3 / 4})


def test_metric_fewer_than_five_classes(metric) -> None:
    result = metric.compute(predictions=[[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]], references=[1, 0, 1])
    assert result == pytest.approx({"accuracy": 1 / 3, "top5_accuracy": 1.0})


def test_metric_ties_follow_argmax(metric) -> None:
    # equal scores: the lower class index ranks first, as with np.argmax
    result = metric.compute(predictions=[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], references=[0, 1])
    assert result["accuracy"] == 0.5


def test_metric_custom_k(metric) -> None:
    result = metric.compute(predictions=LOGITS, references=LABELS, top_k=2)
    assert result == pytest.approx({"accuracy": 1 / 4, "top2_accuracy": 2 / 4})


def test_metric_rejects_bad_inputs(metric) -> None:
    with pytest.raises(ValueError, match=r"references must lie in \[0, 6\)"):
        metric.compute(predictions=LOGITS, references=[0, 1, 6, 4])
    with pytest.raises(ValueError):  # argmax ids instead of logits
        metric.compute(predictions=[1, 2], references=[1, 2])


def test_compute_accuracy_metrics_for_trainer() -> None:
    from transformers import EvalPrediction

    logits = np.asarray(LOGITS, dtype=np.float32)
    labels = np.asarray(LABELS)
    expected = {"accuracy": 0.25, "top5_accuracy": 0.75}
    assert compute_accuracy_metrics(EvalPrediction(predictions=logits, label_ids=labels)) == pytest.approx(expected)
    # a model returning several outputs: the logits come first
    extra = np.zeros((4, 2, 3), dtype=np.float32)
    assert compute_accuracy_metrics(EvalPrediction(predictions=(logits, extra), label_ids=labels)) == pytest.approx(
        expected
    )
    assert compute_accuracy_metrics((logits, labels)) == pytest.approx(expected)

    rng = np.random.default_rng(0)
    random_logits = rng.normal(size=(200, 10)).astype(np.float32)
    random_labels = rng.integers(0, 10, size=200)
    top5 = np.argsort(-random_logits, axis=1)[:, :5]
    result = compute_accuracy_metrics(EvalPrediction(predictions=random_logits, label_ids=random_labels))
    assert result["accuracy"] == pytest.approx(np.mean(random_logits.argmax(axis=1) == random_labels))
    assert result["top5_accuracy"] == pytest.approx(np.mean((top5 == random_labels[:, None]).any(axis=1)))


def test_metric_loads_offline(tmp_path: Path) -> None:
    """``evaluate.load`` on the shipped folder works with every Hub access switched off."""
    code = (
        "import evaluate, json, sys\n"
        "m = evaluate.load(sys.argv[1])\n"
        "print(json.dumps(m.compute(predictions=[[0.1, 2.0, 0.3], [1.0, 0.2, 0.5]], references=[1, 2])))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", code, str(ACCURACY_TOPK_PATH)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"accuracy": 0.5, "top5_accuracy": 1.0}
