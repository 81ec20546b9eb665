"""The columns of image-classification data: found, checked and converted for :mod:`hf_bpmod.data_sources`.

The image column becomes a decoding ``datasets.Image`` (paths are read relative to the file that lists them, encoded
bytes are decoded when read) whose every image is checked to decode (:mod:`hf_bpmod._image_check`); the label column
one ``datasets.ClassLabel`` shared by every split, whose classes are those of the training data.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from ._extras import require_extra
from ._image_check import unreadable_images

with require_extra("hf_bpmod.data"):
    import datasets

logger = logging.getLogger(__name__)

#: Column names taken for the images, in this order, when no ``image_column_name`` is given and no single column is
#: a ``datasets.Image``.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "file_name", "image_path", "filepath", "path", "file")
#: Column names taken for the labels, in this order, when no ``label_column_name`` is given and no single column is
#: a ``datasets.ClassLabel``.
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "category", "target")
SPLITS = ("train", "validation", "test")
#: How to get past unreadable images, in the words of the API and of the example's command line.
SKIP_HINT = "pass `skip_unreadable_images=True` (`--skip_unreadable_images` on the command line) to leave them out"
#: Unreadable images an error names (a warning names them all).
_NAMED = 5


@dataclass
class Piece:
    """Part of a split as loaded, before its columns are checked: ``where`` names it in errors, ``base_dir`` is
    where relative image paths start."""

    split: str
    dataset: datasets.Dataset
    where: str
    base_dir: str


def assemble(
    pieces: list[Piece], image_column_name: str | None, label_column_name: str | None, skip_unreadable: bool = False
) -> tuple[datasets.DatasetDict, str, str, list[str], dict[str, list[int]]]:
    """Check and convert the columns of every piece, give all one set of classes, and join the pieces of each split.
    Images that are missing or cannot be decoded are an error, or with ``skip_unreadable`` left out with a warning.

    Returns:
        ``(splits, image_column, label_column, label_names, left_out)``: ``left_out`` holds, per split, the numbers
        of the rows left out, counted in the split as read.
    """
    pieces = sorted(pieces, key=lambda piece: SPLITS.index(piece.split))
    reference = pieces[0]
    image_column = _find_column(reference, image_column_name, "image", datasets.Image, IMAGE_COLUMN_CANDIDATES)
    label_column = _find_column(
        reference, label_column_name, "label", datasets.ClassLabel, LABEL_COLUMN_CANDIDATES, exclude=image_column
    )
    if label_column == image_column:
        raise ValueError(f"`image_column_name` and `label_column_name` both name {image_column!r}; name two columns.")
    labels: list[list[str | None] | None] = []
    left_out: dict[str, list[int]] = {}
    read: dict[str, int] = {}  # rows of each split read so far, its pieces joined in this order
    for piece in pieces:
        columns = piece.dataset.column_names
        if image_column not in columns:
            raise ValueError(
                f"{piece.where} has no image column {image_column!r} (columns: {columns}); "
                f"{'check' if image_column_name else 'name it with'} `image_column_name`."
            )
        images = _as_images(piece, image_column, keep_missing=skip_unreadable)
        piece.dataset, dropped = _readable(images, piece.where, image_column, skip_unreadable)
        offset = read.get(piece.split, 0)
        read[piece.split] = offset + len(images)
        if dropped:
            left_out.setdefault(piece.split, []).extend(offset + row for row in dropped)
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
    return splits, image_column, label_column, label_names, left_out


def _values(dataset: datasets.Dataset, column: str) -> list[Any]:
    """A column's raw values, read as one arrow column (not row by row)."""
    return dataset.with_format("arrow")[column].to_pylist()


def _find_column(
    piece: Piece,
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


def _as_images(piece: Piece, column: str, keep_missing: bool = False) -> datasets.Dataset:
    """``piece``'s dataset with ``column`` a decoding ``datasets.Image``: paths (relative to ``piece.base_dir``)
    are checked to exist (a missing one is an error unless ``keep_missing``), encoded bytes are decoded when read."""
    dataset, feature = piece.dataset, piece.dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset if feature.decode else dataset.cast_column(column, datasets.Image())
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        resolved, missing = [], []
        for row, path in enumerate(_values(dataset, column)):
            full = None if path is None else os.path.join(piece.base_dir, os.path.expanduser(path))
            if full is None or not os.path.isfile(full):
                missing.append((row, path, full))
            resolved.append(full)
        if missing and not keep_missing:
            row, path, full = missing[0]
            raise FileNotFoundError(
                f"{piece.where}: {len(missing)} of {len(resolved)} images of column {column!r} were not found, e.g. "
                f"row {row}: {path!r} (looked for {full}). Paths are read relative to the folder of the file that "
                f"lists them ({piece.base_dir}); fix them or pass absolute paths, or {SKIP_HINT}."
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


def _readable(dataset: datasets.Dataset, where: str, column: str, skip: bool) -> tuple[datasets.Dataset, list[int]]:
    """``dataset`` once every image of ``column`` is known to decode, and the rows left out: an unreadable image is
    an error naming the first few and the count, or with ``skip`` its row is left out, each named in a warning."""
    bad = unreadable_images(dataset, column)
    if not bad:
        return dataset, []
    total = len(dataset)
    named = "; ".join(map(str, bad[:_NAMED])) + (f"; and {len(bad) - _NAMED} more" if len(bad) > _NAMED else "")
    if not skip:
        raise ValueError(
            f"{where}: {len(bad)} of {total} images of column {column!r} cannot be read: {named}. Training would stop "
            f"at the first of them: remove or replace them, or {SKIP_HINT}."
        )
    if len(bad) == total:
        raise ValueError(f"{where}: none of the {total} images of column {column!r} can be read: {named}.")
    logger.warning(
        f"{where}: left out {len(bad)} of {total} images of column {column!r} that cannot be read: "
        + "; ".join(map(str, bad))
    )
    dropped = {item.row for item in bad}
    return dataset.select([row for row in range(total) if row not in dropped]), sorted(dropped)


def _label_strings(piece: Piece, column: str) -> list[str | None] | None:
    """The labels of ``piece`` as class names (``None`` for a missing label), or ``None`` if it has none at all.

    Integers become their decimal strings (a ``ClassLabel`` its names; -1 is a missing label, as in Hub datasets).
    """
    feature, values = piece.dataset.features[column], _values(piece.dataset, column)
    if isinstance(feature, datasets.ClassLabel):
        _check_range(piece, column, feature, values)
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


def _check_range(piece: Piece, column: str, feature: datasets.ClassLabel, values: list[int | None]) -> None:
    """Every code of a ``ClassLabel`` column is one of its classes, or -1 (missing)."""
    wrong = [(row, v) for row, v in enumerate(values) if v is not None and not -1 <= v < feature.num_classes]
    if wrong:
        shown = ", ".join(f"{value} in row {row}" for row, value in wrong[:10]) + (" ..." if len(wrong) > 10 else "")
        names = feature.names[:20] + (["..."] if feature.num_classes > 20 else [])
        raise ValueError(
            f"{piece.where}: {len(wrong)} labels of column {column!r} are outside its ClassLabel's range "
            f"0-{feature.num_classes - 1} ({names}; -1 marks a missing label): {shown}. Fix those labels, or give "
            "the ClassLabel every class name."
        )


def _label_names(pieces: list[Piece], labels: list[list[str | None] | None], column: str) -> list[str]:
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
