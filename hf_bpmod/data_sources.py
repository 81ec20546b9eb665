"""Image-classification data in every common form, as one :class:`ImageData`.

:func:`load_image_dataset` reads a Hub dataset name, the embedded Animal-Shape-MNIST data, a folder of images (one
sub-folder per class, or a ``metadata.csv``/``metadata.jsonl`` naming each image's ``file_name`` and label), a
``save_to_disk`` dataset or dataset dict, or parquet, arrow, csv and json(l) files or folders of them. It returns the
``train``/``validation``/``test`` splits with the image column as ``datasets.Image`` and the label column as one
``datasets.ClassLabel`` shared by every split, the label names, and where the data came from (for the model card).
Every image is checked to decode before anything trains. Every problem (a missing or unreadable image, an unknown
format, a missing column, a label out of its ``ClassLabel``'s range, a label of the validation data that the training
data lacks) raises an error naming the argument or file, before any model is built. Nothing loaded can run code and
nothing is written next to the user's data (``datasets`` caches what it converts in ``cache_dir``).

Example::

    from hf_bpmod.data import load_image_dataset, with_pixel_values

    data = load_image_dataset(train_file="train.csv", validation_file="val.csv")  # image paths relative to the csv
    train = with_pixel_values(data.splits["train"], 224, 0.5, 0.5, data.image_column, data.label_column)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import compat
from ._extras import require_extra
from ._image_columns import IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, SPLITS, Piece, assemble
from .embedded_data import EMBEDDED_DATASET_NAME, load_animal_shape_mnist

with require_extra("hf_bpmod.data"):
    import datasets
    from PIL import Image

__all__ = ["IMAGE_COLUMN_CANDIDATES", "LABEL_COLUMN_CANDIDATES", "ImageData", "load_image_dataset"]

logger = logging.getLogger(__name__)

#: Split names read from file names, folder names and datasets, as ``datasets.load_dataset`` reads a folder.
_SPLIT_KEYWORDS = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "val", "dev"), "validation"),
    **dict.fromkeys(("test", "testing", "eval", "evaluation"), "test"),
}
#: The ``datasets`` builder of each data file extension (a ``.tsv`` is a csv separated by tabs).
_DATA_FORMATS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
_FILE_ARGUMENTS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}
#: What each split is to the model card (the example names its evaluation split ``eval``).
_CARD_ROLES = {
    "train": "Training data",
    "validation": "Evaluation data",
    "eval": "Evaluation data",
    "test": "Test data",
}


@dataclass
class ImageData:
    """Data loaded by :func:`load_image_dataset`.

    Args:
        splits (`datasets.DatasetDict`): ``train``, ``validation`` and/or ``test``, each with the image column as
            ``datasets.Image`` and the label column as ``datasets.ClassLabel(names=label_names)`` (a test split may
            have no label column: unlabelled data to predict).
        image_column (`str`): The column holding the images.
        label_column (`str`): The column holding the labels.
        label_names (`list[str]`): Class names in label order.
        sources (`list[str]`): Where the data came from: the Hub name, the embedded data's name, or local paths.
        hub_name (`str`, *optional*): The Hub dataset, when the data came from the Hub.
        hub_config (`str`, *optional*): Its configuration, if one was named.
        split_sources (`dict[str, list[str]]`, *optional*): Where each split of ``splits`` came from (a path as
            given, or a file or split of ``sources``), for the model card.
        left_out (`dict[str, list[int]]`, *optional*): Per split, the rows left out as unreadable
            (``skip_unreadable_images=True``), numbered as in the split as read.
    """

    splits: datasets.DatasetDict
    image_column: str
    label_column: str
    label_names: list[str]
    sources: list[str]
    hub_name: str | None = None
    hub_config: str | None = None
    split_sources: dict[str, list[str]] = field(default_factory=dict)
    left_out: dict[str, list[int]] = field(default_factory=dict)

    def has_labels(self, split: str) -> bool:
        """Whether ``split`` has the label column (a test split may be unlabelled)."""
        return self.label_column in self.splits[split].column_names

    def rows_as_read(self, split: str) -> list[int]:
        """For each row of ``splits[split]``, its number in the split as read (before unreadable images were left
        out): what ties a prediction to its row of the test file."""
        dropped = set(self.left_out.get(split, []))
        return [row for row in range(len(self.splits[split]) + len(dropped)) if row not in dropped]

    def card_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Trainer.create_model_card``/``push_to_hub`` naming the training data, which the
        card says the model was trained on: a Hub dataset, also listed in the card's ``datasets:`` metadata; or the
        local paths of the training split only, with no Hub tag. :meth:`card_data_description` names the others."""
        if self.hub_name is not None:
            kwargs: dict[str, Any] = {"dataset": self.hub_name, "dataset_tags": [self.hub_name]}
            if self.hub_config:
                kwargs["dataset_args"] = [self.hub_config]
            return kwargs
        training = self.split_sources.get("train", []) if self.split_sources else self.sources
        return {"dataset": training[0] if len(training) == 1 else list(training), "dataset_tags": []}

    def card_data_description(self, counts: Mapping[str, int]) -> str:
        """Markdown for the model card's "Training and evaluation data" section (the ``data_description`` argument
        of ``BPModifiedTrainer.create_model_card``/``push_to_hub``): for each split of ``counts`` (a split of
        ``splits``, and how many of its images were used), its role, count and source; then the classes."""
        lines = []
        for split, count in counts.items():
            role = _CARD_ROLES.get(split, f"Split {split!r}")
            where = "; ".join(self.split_sources.get(split) or self.sources)
            lines.append(f"- {role} ({count:,} images): {where}")
        shown = ", ".join(self.label_names[:50]) + (", ..." if len(self.label_names) > 50 else "")
        lines.append(f"- Classes ({len(self.label_names)}): {shown}")
        return "\n".join(lines)


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    skip_unreadable_images: bool = False,
) -> ImageData:
    """Load image-classification data from a name or a folder (``dataset_name``) or from one path per split.

    Args:
        dataset_name: ``"animal-shape-mnist"`` (the embedded data), a local folder or file, or a Hub dataset for
            ``datasets.load_dataset``. A folder is read by what it holds: a ``save_to_disk`` dataset
            (``dataset_dict.json`` or ``state.json``); an image folder with a ``metadata.csv``/``metadata.jsonl``;
            parquet/arrow/csv/json(l) files; else images in one sub-folder per class. Its splits come from file and
            folder names (``train``, ``validation``/``valid``/``val``/``dev``, ``test``/``eval``), as
            ``datasets.load_dataset`` reads them; without any, everything is ``train``.
        dataset_config_name: Configuration of a Hub dataset.
        train_file, validation_file, test_file: A parquet, arrow, csv, tsv, json or jsonl file, a folder of such
            files, an image folder or a ``save_to_disk`` dataset, each read whole as that split. Not with
            ``dataset_name``.
        image_column_name: The image column; by default the one ``datasets.Image`` column, else the first of
            :data:`IMAGE_COLUMN_CANDIDATES`. A column of strings is read as image paths, relative to the file that
            lists them; a column of bytes as encoded images.
        label_column_name: The label column; by default the one ``datasets.ClassLabel`` column, else the first of
            :data:`LABEL_COLUMN_CANDIDATES`. Strings and integers become classes, sorted; the classes are those of
            the training data, and a validation or test label the training data lacks is an error.
        cache_dir: Where ``datasets`` keeps what it downloads and converts.
        token: Hub token for private datasets.
        skip_unreadable_images: Every image is opened and verified first (a JPEG without its end marker decoded
            at 1/8 scale); an image that is missing or cannot be decoded is an error naming it. ``True`` leaves
            such images out instead, with a warning naming each and the count.

    Returns:
        An :class:`ImageData`.
    """
    given = {split: path for split, path in zip(SPLITS, (train_file, validation_file, test_file)) if path}
    if dataset_name and given:
        raise ValueError(
            f"Pass either `dataset_name` ({dataset_name!r}) or `train_file`/`validation_file`/`test_file` "
            f"({', '.join(f'{_FILE_ARGUMENTS[s]}={p!r}' for s, p in given.items())}), not both."
        )
    hub_name = None
    if given:
        pieces = []
        for split, path in given.items():
            loaded = _load_path(path, _FILE_ARGUMENTS[split], cache_dir=cache_dir)
            pieces += [Piece(split, piece.dataset, piece.where, piece.base_dir) for piece in loaded]
        sources = list(given.values())
    elif not dataset_name:
        raise ValueError("No data: pass `dataset_name` or `train_file` (with `validation_file`/`test_file`).")
    elif dataset_name == EMBEDDED_DATASET_NAME:
        pieces = _pieces_of(load_animal_shape_mnist(), EMBEDDED_DATASET_NAME, os.getcwd())
        sources = [EMBEDDED_DATASET_NAME]
    elif os.path.exists(os.path.expanduser(dataset_name)):
        pieces = _load_path(dataset_name, "dataset_name", infer_splits=True, cache_dir=cache_dir)
        sources = [dataset_name]
    elif _looks_like_path(dataset_name):
        raise FileNotFoundError(f"`dataset_name` {dataset_name!r} does not exist; check the path.")
    else:
        pieces = _pieces_of(_load_hub(dataset_name, dataset_config_name, cache_dir, token), dataset_name, os.getcwd())
        sources, hub_name = [dataset_name], dataset_name
    splits, image_column, label_column, label_names, left_out = assemble(
        pieces, image_column_name, label_column_name, skip_unreadable_images
    )
    logger.info(
        f"Data from {', '.join(sources)}: { ({split: len(ds) for split, ds in splits.items()}) } images, "
        f"{len(label_names)} classes, columns {image_column!r} (images) and {label_column!r} (labels)."
    )
    config = dataset_config_name if hub_name else None
    split_sources: dict[str, list[str]] = {split: [path] for split, path in given.items()}
    for piece in pieces if not given else []:
        split_sources.setdefault(piece.split, []).append(piece.where)
    return ImageData(
        splits, image_column, label_column, label_names, sources, hub_name, config, split_sources, left_out
    )


# --------------------------------------------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path (a Hub name is ``name`` or ``namespace/name``)."""
    extension = _extension(name)
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or extension in _DATA_FORMATS
        or extension in _IMAGE_EXTENSIONS
    )


def _load_hub(
    name: str, config: str | None, cache_dir: str | None, token: str | bool | None
) -> datasets.DatasetDict | datasets.Dataset:
    try:
        return datasets.load_dataset(name, config, cache_dir=cache_dir, token=token, **compat.no_dataset_code())
    except (FileNotFoundError, ConnectionError) as error:
        raise FileNotFoundError(
            f"`dataset_name` {name!r} is not a local path, and datasets.load_dataset could not load it from the Hub "
            f"({error}). Check the name or the path; offline (HF_DATASETS_OFFLINE=1), a Hub dataset must already be "
            "in the datasets cache."
        ) from error


def _pieces_of(loaded: datasets.DatasetDict | datasets.Dataset, where: str, base_dir: str) -> list[Piece]:
    """The train/validation/test splits of a loaded dataset (dict), by their names or the usual aliases."""
    if isinstance(loaded, datasets.Dataset):
        return [Piece("train", loaded, where, base_dir)]
    chosen: dict[str, str] = {}
    for name in loaded:
        split = _SPLIT_KEYWORDS.get(str(name).lower())
        if split is not None and (split not in chosen or str(name) == split):
            chosen[split] = str(name)
    ignored = sorted(str(name) for name in loaded if str(name) not in chosen.values())
    if not chosen:
        raise ValueError(
            f"{where} has no train, validation or test split (splits: {sorted(map(str, loaded))}); name them "
            f"{'/'.join(SPLITS)} (aliases: {sorted(_SPLIT_KEYWORDS)})."
        )
    if ignored:
        logger.warning(f"{where}: splits {ignored} are not train, validation or test and are not used.")
    return [Piece(split, loaded[name], f"{where} [{name}]", base_dir) for split, name in chosen.items()]


def _load_path(path: str, argument: str, infer_splits: bool = False, cache_dir: str | None = None) -> list[Piece]:
    """A local file or folder as pieces (each of split ``train`` unless ``infer_splits``)."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise FileNotFoundError(f"`{argument}` {path!r} does not exist; check the path.")
    if os.path.isfile(full):
        if _extension(full) not in _DATA_FORMATS:
            raise ValueError(
                f"`{argument}` {path!r}: unknown file type; give a {', '.join(sorted(_DATA_FORMATS))} file or a "
                "folder (of images, of such files, or saved with save_to_disk)."
            )
        return [Piece("train", _load_files([full], cache_dir), path, os.path.dirname(full))]
    if os.path.isfile(os.path.join(full, "dataset_dict.json")):
        if not infer_splits:
            raise ValueError(
                f"`{argument}` {path!r} holds a dataset dict saved with save_to_disk; pass it as `dataset_name`, "
                "or pass the folder of one of its splits."
            )
        return _pieces_of(datasets.load_from_disk(full), path, full)
    if os.path.isfile(os.path.join(full, "state.json")) and os.path.isfile(os.path.join(full, "dataset_info.json")):
        return [Piece("train", datasets.load_from_disk(full), path, full)]

    data_files, image_files, metadata_files, others = [], 0, [], []
    folders_with_images: set[str] = set()
    for root, dirs, files in os.walk(full):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = os.path.join(root, name)
            if name in _METADATA_FILES:
                metadata_files.append(file)
            elif _extension(file) in _DATA_FORMATS:
                data_files.append(file)
            elif os.path.splitext(name)[1].lower() in _IMAGE_EXTENSIONS:
                image_files += 1
                folders_with_images.add(root)
            elif len(others) < 5:
                others.append(os.path.relpath(file, full))
    # An image folder's metadata is read as a table of image paths, as an image folder's builder reads it.
    tables = metadata_files or data_files
    if tables:
        splits = {file: _split_of(os.path.relpath(file, full)) if infer_splits else "train" for file in tables}
        if all(split is None for split in splits.values()):  # no file names a split: all of them are train
            splits = dict.fromkeys(tables, "train")
        unused = [os.path.relpath(file, full) for file, split in splits.items() if split is None]
        if unused:
            logger.warning(f"`{argument}` {path!r}: {unused} name no split while other files do, and are not used.")
        groups: dict[tuple[str, str, str], list[str]] = {}
        for file, split in splits.items():
            if split is not None:
                groups.setdefault((split, os.path.dirname(file), _extension(file)), []).append(file)
        return [
            Piece(split, _load_files(files, cache_dir), _describe(files, full, path), folder)
            for (split, folder, _), files in groups.items()
        ]
    if image_files:
        _warn_of_empty_class_folders(folders_with_images, full, argument, path)
        if infer_splits:
            loaded = datasets.load_dataset("imagefolder", data_dir=full, cache_dir=cache_dir)
        else:
            pattern = os.path.join(full, "**")
            loaded = datasets.load_dataset("imagefolder", data_files={"train": pattern}, cache_dir=cache_dir)
        return _pieces_of(loaded, path, full)
    raise ValueError(
        f"`{argument}` {path!r} holds nothing readable: no images, no {', '.join(sorted(_DATA_FORMATS))} files and "
        f"no save_to_disk dataset (found: {others or 'no files'}). Point it at the folder of your data."
    )


def _warn_of_empty_class_folders(folders_with_images: set[str], full: str, argument: str, path: str) -> None:
    """Warn of each class folder with no image in it (a sibling of a folder that has images), whose class the image
    folder's labels leave out."""
    holding = {os.path.dirname(folder) for folder in folders_with_images}  # where the class folders are
    empty = []
    for parent in sorted(holding):
        for name in sorted(os.listdir(parent)):
            folder = os.path.join(parent, name)
            if name.startswith((".", "__")) or not os.path.isdir(folder):
                continue
            if not any(f == folder or f.startswith(folder + os.sep) for f in folders_with_images):
                empty.append(os.path.relpath(folder, full))
    if empty:
        logger.warning(
            f"`{argument}` {path!r}: the class folders {empty} hold no images, so their classes are left out of the "
            "labels; put images in them, or remove them."
        )


def _extension(file: str) -> str:
    return os.path.splitext(file)[1].lower()


def _split_of(relative_path: str) -> str | None:
    """The split a file's path names (its first split keyword, folders first), or ``None``."""
    for token in re.split(r"[-._ 0-9/\\]+", relative_path.lower()):
        if token in _SPLIT_KEYWORDS:
            return _SPLIT_KEYWORDS[token]
    return None


def _describe(files: list[str], folder: str, path: str) -> str:
    names = [os.path.relpath(f, folder) for f in files]
    return f"{path} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _load_files(files: list[str], cache_dir: str | None) -> datasets.Dataset:
    """Data files of one extension as one dataset."""
    options = {"sep": "\t"} if _extension(files[0]) == ".tsv" else {}
    builder = _DATA_FORMATS[_extension(files[0])]
    return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **options)
