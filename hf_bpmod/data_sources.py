"""Image-classification data in every common form, as one :class:`ImageData`.

:func:`load_image_dataset` reads a Hub dataset name, the embedded Animal-Shape-MNIST data, a folder of images (one
sub-folder per class, or a ``metadata.csv``/``metadata.jsonl`` naming each image's ``file_name`` and label), a
``save_to_disk`` dataset or dataset dict, or parquet, arrow, csv and json(l) files or folders of them. It returns the
``train``/``validation``/``test`` splits with the image column as ``datasets.Image`` and the label column as one
``datasets.ClassLabel`` shared by every split, the label names, and where the data came from (for the model card).
Every problem (a missing file, an unknown format, a missing column, a label of the validation data that the training
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
from dataclasses import dataclass
from typing import Any

from . import compat
from ._extras import require_extra

with require_extra("hf_bpmod.data"):
    import datasets
    from PIL import Image

__all__ = ["IMAGE_COLUMN_CANDIDATES", "LABEL_COLUMN_CANDIDATES", "ImageData", "load_image_dataset"]

logger = logging.getLogger(__name__)

#: Column names taken for the images, in this order, when no ``image_column_name`` is given and no single column is
#: a ``datasets.Image``.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "file_name", "image_path", "filepath", "path", "file")
#: Column names taken for the labels, in this order, when no ``label_column_name`` is given and no single column is
#: a ``datasets.ClassLabel``.
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "category", "target")

SPLITS = ("train", "validation", "test")
#: Split names read from file names, folder names and datasets, as ``datasets.load_dataset`` reads a folder.
_SPLIT_KEYWORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
_DATA_FORMATS = {
    ".parquet": ("parquet", {}),
    ".arrow": ("arrow", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
_FILE_ARGUMENTS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


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
    """

    splits: datasets.DatasetDict
    image_column: str
    label_column: str
    label_names: list[str]
    sources: list[str]
    hub_name: str | None = None
    hub_config: str | None = None

    def has_labels(self, split: str) -> bool:
        """Whether ``split`` has the label column (a test split may be unlabelled)."""
        return self.label_column in self.splits[split].column_names

    def card_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``Trainer.create_model_card``/``push_to_hub`` naming this data: a Hub dataset is
        also linked in the card's metadata; local data is named by its paths and given no Hub tag."""
        if self.hub_name is not None:
            kwargs: dict[str, Any] = {"dataset": self.hub_name, "dataset_tags": [self.hub_name]}
            if self.hub_config:
                kwargs["dataset_args"] = [self.hub_config]
            return kwargs
        return {"dataset": self.sources[0] if len(self.sources) == 1 else list(self.sources), "dataset_tags": []}


@dataclass
class _Piece:
    """Part of a split as loaded, before its columns are checked: ``where`` names it in errors, ``base_dir`` is
    where relative image paths start."""

    split: str
    dataset: datasets.Dataset
    where: str
    base_dir: str


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

    Returns:
        An :class:`ImageData`.
    """
    from .data import EMBEDDED_DATASET_NAME, load_animal_shape_mnist

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
            pieces += [_Piece(split, piece.dataset, piece.where, piece.base_dir) for piece in loaded]
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
    return _assemble(pieces, image_column_name, label_column_name, sources, hub_name, dataset_config_name)


# --------------------------------------------------------------------------------------------------- loading


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path (a Hub name is ``name`` or ``owner/name``)."""
    extension = os.path.splitext(name)[1].lower()
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


def _pieces_of(loaded: datasets.DatasetDict | datasets.Dataset, where: str, base_dir: str) -> list[_Piece]:
    """The train/validation/test splits of a loaded dataset (dict), by their names or the usual aliases."""
    if isinstance(loaded, datasets.Dataset):
        return [_Piece("train", loaded, where, base_dir)]
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
    return [_Piece(split, loaded[name], f"{where} [{name}]", base_dir) for split, name in chosen.items()]


def _load_path(path: str, argument: str, infer_splits: bool = False, cache_dir: str | None = None) -> list[_Piece]:
    """A local file or folder as pieces (each of split ``train`` unless ``infer_splits``)."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise FileNotFoundError(f"`{argument}` {path!r} does not exist; check the path.")
    if os.path.isfile(full):
        module = _data_format(full)
        if module is None:
            raise ValueError(
                f"`{argument}` {path!r}: unknown file type; give a {', '.join(sorted(_DATA_FORMATS))} file or a "
                "folder (of images, of such files, or saved with save_to_disk)."
            )
        return [_Piece("train", _load_files(module, [full], cache_dir), path, os.path.dirname(full))]
    if os.path.isfile(os.path.join(full, "dataset_dict.json")):
        if not infer_splits:
            raise ValueError(
                f"`{argument}` {path!r} holds a dataset dict saved with save_to_disk; pass it as `dataset_name`, "
                "or pass the folder of one of its splits."
            )
        return _pieces_of(datasets.load_from_disk(full), path, full)
    if os.path.isfile(os.path.join(full, "state.json")) and os.path.isfile(os.path.join(full, "dataset_info.json")):
        return [_Piece("train", datasets.load_from_disk(full), path, full)]

    data_files, image_files, metadata_files, others = [], 0, [], []
    for root, dirs, files in os.walk(full):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = os.path.join(root, name)
            if name in _METADATA_FILES:
                metadata_files.append(file)
            elif _data_format(file) is not None:
                data_files.append(file)
            elif os.path.splitext(name)[1].lower() in _IMAGE_EXTENSIONS:
                image_files += 1
            elif len(others) < 5:
                others.append(os.path.relpath(file, full))
    # An image folder's metadata is read as a table of image paths, as an image folder's builder reads it.
    tables = metadata_files or data_files
    if tables:
        groups: dict[tuple[str, str, tuple], list[str]] = {}
        unsplit = []
        for file in tables:
            split = _split_of(os.path.relpath(file, full)) if infer_splits else "train"
            if split is None:
                unsplit.append(file)
                continue
            groups.setdefault((split, os.path.dirname(file), _data_format(file)), []).append(file)
        if unsplit and groups:
            logger.warning(
                f"`{argument}` {path!r}: {[os.path.relpath(f, full) for f in unsplit]} name no split "
                f"({'/'.join(SPLITS)}) while other files do, and are not used."
            )
        elif unsplit:
            for file in unsplit:
                groups.setdefault(("train", os.path.dirname(file), _data_format(file)), []).append(file)
        return [
            _Piece(split, _load_files(module, files, cache_dir), _describe(files, full, path), folder)
            for (split, folder, module), files in groups.items()
        ]
    if image_files:
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


def _data_format(file: str) -> tuple[str, tuple] | None:
    """``(datasets builder, its options)`` of a data file, or ``None``."""
    entry = _DATA_FORMATS.get(os.path.splitext(file)[1].lower())
    return None if entry is None else (entry[0], tuple(sorted(entry[1].items())))


def _split_of(relative_path: str) -> str | None:
    """The split a file's path names (its first split keyword, folders first), or ``None``."""
    for token in re.split(r"[-._ 0-9/\\]+", relative_path.lower()):
        if token in _SPLIT_KEYWORDS:
            return _SPLIT_KEYWORDS[token]
    return None


def _describe(files: list[str], folder: str, path: str) -> str:
    names = [os.path.relpath(f, folder) for f in files]
    return f"{path} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _load_files(module: tuple[str, tuple], files: list[str], cache_dir: str | None) -> datasets.Dataset:
    builder, options = module
    return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **dict(options))


# --------------------------------------------------------------------------------------------------- columns


def _assemble(
    pieces: list[_Piece],
    image_column_name: str | None,
    label_column_name: str | None,
    sources: list[str],
    hub_name: str | None,
    hub_config: str | None,
) -> ImageData:
    """Check and convert the columns of every piece, share one set of classes, and join the pieces of each split."""
    pieces = sorted(pieces, key=lambda piece: SPLITS.index(piece.split))
    reference = pieces[0]
    image_column = _find_column(reference, image_column_name, "image", datasets.Image, IMAGE_COLUMN_CANDIDATES)
    label_column = _find_column(
        reference, label_column_name, "label", datasets.ClassLabel, LABEL_COLUMN_CANDIDATES, exclude=image_column
    )
    if label_column == image_column:
        raise ValueError(f"`image_column_name` and `label_column_name` both name {image_column!r}; name two columns.")
    labels: list[list[str | None] | None] = []
    for piece in pieces:
        columns = piece.dataset.column_names
        if image_column not in columns:
            raise ValueError(
                f"{piece.where} has no image column {image_column!r} (columns: {columns}); "
                f"{'check' if image_column_name else 'name it with'} `image_column_name`."
            )
        piece.dataset = _as_images(piece, image_column)
        labels.append(_label_strings(piece, label_column) if label_column in columns else None)
        if labels[-1] is None and label_column in columns:  # a test file whose label column is empty
            piece.dataset = piece.dataset.remove_columns(label_column)
        if labels[-1] is None and piece.split != "test":
            raise ValueError(
                f"{piece.where} has no label column {label_column!r} (columns: {columns}); "
                f"{'check' if label_column_name else 'name it with'} `label_column_name`. Only test data may be "
                "unlabelled."
            )
    label_names = _label_names(pieces, labels, label_column)
    index = {name: i for i, name in enumerate(label_names)}
    test_labelled = {values is not None for piece, values in zip(pieces, labels) if piece.split == "test"}
    if len(test_labelled) > 1:
        raise ValueError("Some test files have labels and others have none: label all of them or none.")

    parts: dict[str, list[datasets.Dataset]] = {}
    for piece, values in zip(pieces, labels):
        dataset = piece.dataset
        if values is not None:
            unseen = sorted({value for value in values if value not in index})
            if unseen:
                raise ValueError(
                    f"{piece.where} has labels the training data lacks: {unseen[:10]}"
                    f"{' ...' if len(unseen) > 10 else ''} (training classes: {label_names[:20]}"
                    f"{' ...' if len(label_names) > 20 else ''}). Every {piece.split} class must occur in the "
                    "training data; drop those rows or add them to the training data."
                )
            feature = datasets.ClassLabel(names=label_names)
            if dataset.features[label_column] != feature:
                codes = [index[value] for value in values]
                dataset = dataset.remove_columns(label_column).add_column(label_column, codes, feature=feature)
        parts.setdefault(piece.split, []).append(dataset)

    splits = datasets.DatasetDict()
    for split, datasets_ in parts.items():
        if len(datasets_) == 1:
            splits[split] = datasets_[0]
            continue
        kept = [image_column] + ([label_column] if label_column in datasets_[0].column_names else [])
        try:
            splits[split] = datasets.concatenate_datasets([d.select_columns(kept) for d in datasets_])
        except ValueError as error:
            wheres = [piece.where for piece in pieces if piece.split == split]
            raise ValueError(f"The {split} files {wheres} cannot be joined: {error}") from error
    logger.info(
        f"Data from {', '.join(sources)}: { ({split: len(ds) for split, ds in splits.items()}) } images, "
        f"{len(label_names)} classes, columns {image_column!r} (images) and {label_column!r} (labels)."
    )
    return ImageData(splits, image_column, label_column, label_names, sources, hub_name, hub_config)


def _find_column(
    piece: _Piece,
    given: str | None,
    kind: str,
    feature_type: type,
    candidates: tuple[str, ...],
    exclude: str | None = None,
) -> str:
    """The named column, else the one column of ``feature_type``, else the first candidate present."""
    columns = piece.dataset.column_names
    if given is not None:
        if given not in columns:
            raise ValueError(f"`{kind}_column_name` {given!r} is not a column of {piece.where} (columns: {columns}).")
        return given
    typed = [c for c in columns if isinstance(piece.dataset.features[c], feature_type) and c != exclude]
    if len(typed) == 1:
        return typed[0]
    found = next((c for c in candidates if c in columns and c != exclude), None)
    if found is None:
        raise ValueError(
            f"Found no {kind} column in {piece.where} (columns: {columns}; looked for {list(candidates)}); name it "
            f"with `{kind}_column_name`."
        )
    return found


def _as_images(piece: _Piece, column: str) -> datasets.Dataset:
    """``piece``'s dataset with ``column`` a decoding ``datasets.Image``: paths (relative to ``piece.base_dir``)
    are checked to exist, encoded bytes are decoded when read."""
    dataset, feature = piece.dataset, piece.dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset if feature.decode else dataset.cast_column(column, datasets.Image())
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        resolved, missing = [], []
        for row, path in enumerate(dataset[column]):
            full = None if path is None else os.path.join(piece.base_dir, os.path.expanduser(path))
            if full is None or not os.path.isfile(full):
                missing.append((row, path, full))
            resolved.append(full)
        if missing:
            row, path, full = missing[0]
            raise FileNotFoundError(
                f"{piece.where}: {len(missing)} of {len(resolved)} images of column {column!r} were not found, e.g. "
                f"row {row}: {path!r} (looked for {full}). Paths are read relative to the folder of the file that "
                f"lists them ({piece.base_dir}); fix them or pass absolute paths."
            )
        # Added before the old column goes: a table left with no column would have no rows either.
        dataset = dataset.add_column(f"{column}__resolved", resolved).remove_columns(column)
        return dataset.rename_column(f"{column}__resolved", column).cast_column(column, datasets.Image())
    is_encoded = dtype in ("binary", "large_binary") or (isinstance(feature, dict) and "bytes" in feature)
    if is_encoded:
        return dataset.cast_column(column, datasets.Image())
    raise ValueError(
        f"{piece.where}: column {column!r} holds {feature}, not images. Give image files, their paths or their "
        "encoded bytes, or name the image column with `image_column_name`."
    )


def _label_strings(piece: _Piece, column: str) -> list[str | None] | None:
    """The labels of ``piece`` as class names (``None`` for a missing label), or ``None`` if it has none at all.

    Integers become their decimal strings (a ``ClassLabel`` its names; -1 is a missing label, as in Hub datasets).
    """
    feature, values = piece.dataset.features[column], list(piece.dataset[column])
    if isinstance(feature, datasets.ClassLabel):
        names = [None if value is None or value < 0 else feature.int2str(value) for value in values]
    else:
        names = []
        for row, value in enumerate(values):
            if isinstance(value, float) and value == value and value.is_integer():
                value = int(value)
            if value is None or (isinstance(value, float) and value != value):
                names.append(None)
            elif isinstance(value, (str, int)) and not isinstance(value, bool):
                names.append(str(value))
            else:
                raise ValueError(
                    f"{piece.where}: label {value!r} in row {row} of column {column!r} is not a class name or an "
                    "integer; give labels as names or integers, or name the label column with `label_column_name`."
                )
    missing = [row for row, name in enumerate(names) if name is None]
    if not missing:
        return names
    if piece.split == "test" and len(missing) == len(names):
        return None
    raise ValueError(
        f"{piece.where}: {len(missing)} of {len(names)} rows have no label (e.g. row {missing[0]}); label every row"
        f"{' (a test file may also be wholly unlabelled)' if piece.split == 'test' else ''}."
    )


def _label_names(pieces: list[_Piece], labels: list[list[str | None] | None], column: str) -> list[str]:
    """The classes: those of the training pieces (of the first labelled split if there is no training data), in
    their ``ClassLabel`` order if they share one, else sorted (numerically for integers)."""
    split = next((piece.split for piece, values in zip(pieces, labels) if values is not None), None)
    if split is None:
        raise ValueError("No split has labels: give labelled training or validation data.")
    chosen = [(piece, values) for piece, values in zip(pieces, labels) if piece.split == split]
    features = [piece.dataset.features[column] for piece, _ in chosen]
    if all(isinstance(f, datasets.ClassLabel) for f in features) and all(
        f.names == features[0].names for f in features
    ):
        return list(features[0].names)
    present = {value for _, values in chosen for value in values}
    if all(re.fullmatch(r"-?\d+", value) for value in present):
        return sorted(present, key=int)
    return sorted(present)
