"""Image-classification data for the BP-modified trainer.

Three things live here:

* :func:`load_animal_shape_mnist` (from :mod:`hf_bpmod.embedded_data`) builds a :class:`datasets.DatasetDict` from
  the Animal-Shape-MNIST data that the ``animal-shape-mnist`` PyPI wheel ships (10,000 grayscale 28x28 silhouettes,
  10 animal classes, 1,000 each), with nothing downloaded and nothing written to disk.
* :func:`load_image_dataset` (from :mod:`hf_bpmod.data_sources`) reads any other data: a Hub name, an image folder,
  a ``save_to_disk`` dataset, parquet/arrow/csv/json files; it returns the splits, the image and label columns, the
  class names and where the data came from.
* :func:`make_transform`, :func:`with_pixel_values` and :func:`collate_fn` turn any image-classification dataset
  (``image`` + ``label`` columns) into ``pixel_values``/``labels`` batches for a ``transformers`` image classifier,
  with PIL + numpy + torch only (no torchvision): resize, scale to [0, 1], normalise, no augmentation.

Example::

    from hf_bpmod.data import collate_fn, load_animal_shape_mnist, with_pixel_values

    dataset = load_animal_shape_mnist()
    train = with_pixel_values(dataset["train"], image_size=28, image_mean=0.5, image_std=0.5)
    batch = collate_fn([train[0], train[1]])  # pixel_values: (2, 3, 28, 28), labels: (2,)

When such a dataset goes to a ``transformers.Trainer``, set ``remove_unused_columns=False`` in the training
arguments: the Trainer would otherwise drop the raw ``image``/``label`` columns the on-the-fly transform reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._extras import require_extra
from .data_sources import ImageData, load_image_dataset
from .embedded_data import (
    ANIMAL_SHAPE_CLASS_NAMES,
    EMBEDDED_DATASET_NAME,
    find_animal_shape_files,
    load_animal_shape_mnist,
)

with require_extra("hf_bpmod.data"):
    import datasets
    import numpy as np
    from PIL import Image

__all__ = [
    "ANIMAL_SHAPE_CLASS_NAMES",
    "EMBEDDED_DATASET_NAME",
    "ImageData",
    "collate_fn",
    "find_animal_shape_files",
    "load_animal_shape_mnist",
    "load_image_dataset",
    "make_transform",
    "with_pixel_values",
]


def _as_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or a (height, width) pair, got {image_size!r}.")
    return size  # type: ignore[return-value]


def _as_channel_vector(values: float | Sequence[float], name: str) -> np.ndarray:
    vector = np.atleast_1d(np.asarray(values, dtype=np.float32))
    if vector.ndim != 1 or vector.size not in (1, 3):
        raise ValueError(f"{name} must be one number or one per channel (1 or 3 numbers), got {values!r}.")
    return vector


def make_transform(
    image_size: int | Sequence[int],
    mean: float | Sequence[float] = 0.5,
    std: float | Sequence[float] = 0.5,
    image_column: str = "image",
    label_column: str | None = "label",
    num_channels: int = 3,
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Build a batched ``set_transform``/``with_transform`` function giving ``pixel_values`` and ``labels``.

    Each image is converted to RGB (``num_channels=3``) or grayscale (``num_channels=1``), resized to
    ``image_size`` with bilinear filtering if its size differs, scaled to [0, 1] and normalised with
    ``(x - mean) / std`` per channel; there is no augmentation (the paper's preprocessing). ``pixel_values`` are
    float32 tensors of shape ``(num_channels, height, width)``.

    Args:
        image_size: Output size, an int (square) or ``(height, width)``.
        mean: Per-channel mean (one number or ``num_channels`` numbers), e.g. an image processor's ``image_mean``.
        std: Per-channel standard deviation, e.g. an image processor's ``image_std``.
        image_column: Column holding PIL images.
        label_column: Column holding integer labels, copied to ``labels``; ``None`` (or a batch without that
            column) gives no ``labels``.
        num_channels: 3 for RGB models, 1 for grayscale models.

    Returns:
        A function mapping a batch (dict of lists) to ``{"pixel_values": [...], "labels": [...]}``.
    """
    height, width = _as_hw(image_size)
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
    mean_vec = _as_channel_vector(mean, "mean")
    std_vec = _as_channel_vector(std, "std")
    for name, vec in (("mean", mean_vec), ("std", std_vec)):
        if vec.size not in (1, num_channels):
            raise ValueError(f"{name} has {vec.size} values but the images have {num_channels} channels.")
    if np.any(std_vec <= 0):
        raise ValueError(f"std must be positive, got {std!r}.")
    mean_chw = mean_vec.reshape(-1, 1, 1)
    inv_std_chw = (1.0 / std_vec).reshape(-1, 1, 1)
    mode = "RGB" if num_channels == 3 else "L"

    def to_pixel_values(image: Any) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            else:
                raise TypeError(
                    f"Column '{image_column}' should hold PIL images (a datasets.Image feature), got "
                    f"{type(image).__name__}. Cast it with dataset.cast_column('{image_column}', datasets.Image())."
                )
        if image.mode != mode:
            image = image.convert(mode)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray((array - mean_chw) * inv_std_chw, dtype=np.float32))

    def transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if image_column not in batch:
            raise KeyError(
                f"The dataset has no '{image_column}' column (columns: {sorted(batch)}); pass the right image_column."
            )
        output: dict[str, list[Any]] = {"pixel_values": [to_pixel_values(image) for image in batch[image_column]]}
        if label_column is not None and label_column in batch:
            output["labels"] = [int(label) for label in batch[label_column]]
        return output

    return transform


def with_pixel_values(
    dataset: datasets.Dataset,
    image_size: int | Sequence[int],
    image_mean: float | Sequence[float] = 0.5,
    image_std: float | Sequence[float] = 0.5,
    image_column: str = "image",
    label_column: str | None = "label",
    num_channels: int = 3,
) -> datasets.Dataset:
    """Return ``dataset`` with an on-the-fly transform yielding ``pixel_values`` and ``labels``.

    The input dataset is left untouched (``with_transform`` returns a new view); see :func:`make_transform` for
    the preprocessing. Use ``remove_unused_columns=False`` when the result goes to a ``transformers.Trainer``. A
    ``datasets.Image`` column is decoded in the transform, with the column's own settings, so that an image that
    cannot be decoded stops training with an error naming it (its path) and the fix.
    """
    if image_column not in dataset.column_names:
        raise KeyError(
            f"The dataset has no '{image_column}' column (columns: {dataset.column_names}); pass image_column=..."
        )
    if label_column is not None and label_column not in dataset.column_names:
        raise KeyError(
            f"The dataset has no '{label_column}' column (columns: {dataset.column_names}); pass label_column=... "
            "or label_column=None for unlabelled data."
        )
    transform = make_transform(
        image_size,
        image_mean,
        image_std,
        image_column=image_column,
        label_column=label_column,
        num_channels=num_channels,
    )
    feature = dataset.features.get(image_column) if dataset.features is not None else None
    if isinstance(feature, datasets.Image) and feature.decode:
        tokens = getattr(dataset, "_token_per_repo_id", None)  # what datasets itself decodes private Hub files with
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        transform = _decoding_first(transform, feature, image_column, tokens)
    return dataset.with_transform(transform)


def _decoding_first(
    transform: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    feature: datasets.Image,
    image_column: str,
    tokens: dict[str, Any] | None,
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """``transform`` behind the decoding of the stored images of ``image_column`` by ``feature``."""

    def decode(value: Any) -> Any:
        try:
            return feature.decode_example(value, token_per_repo_id=tokens)
        except Exception as error:  # PIL and the file system raise many types; each is this image's fault
            path, data = (value.get("path"), value.get("bytes")) if isinstance(value, dict) else (value, None)
            name = f"Image {path}" if path else f"An image of {len(data or b'')} bytes (no path)"
            raise ValueError(
                f"{name} of column {image_column!r} cannot be read ({type(error).__name__}: {error}): remove or "
                "replace it. hf_bpmod.data.load_image_dataset checks every image before training, and leaves those "
                "it cannot read out with `skip_unreadable_images=True`."
            ) from error

    def decoded(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if image_column in batch:
            batch = {**batch, image_column: [decode(value) for value in batch[image_column]]}
        return transform(batch)

    return decoded


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into ``{"pixel_values": (B, C, H, W) float, "labels": (B,) long}``.

    ``labels`` is left out when the examples have none (unlabelled prediction data).
    """
    if not examples:
        raise ValueError("collate_fn got an empty list of examples.")
    if "pixel_values" not in examples[0]:
        raise KeyError(
            "Examples have no 'pixel_values'; apply hf_bpmod.data.with_pixel_values (or make_transform) to the "
            f"dataset first. Keys found: {sorted(examples[0])}."
        )
    batch = {"pixel_values": torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch
