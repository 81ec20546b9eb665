"""Every image of a ``datasets.Image`` column read far enough, before training, to know it will decode.

An image is opened (its header parsed) and verified (``PIL.Image.verify``: a PNG's chunks and their checksums); a
JPEG that does not end with its end-of-image marker, the mark of a cut-off file that both steps pass, is decoded at
1/8 scale to settle it. An image is named by its path, or by its row when it is bytes with no path.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from ._extras import require_extra

with require_extra("hf_bpmod.data"):
    import datasets
    from PIL import Image

#: Rows read at a time: the check holds one batch of encoded images in memory.
_BATCH_ROWS = 512
_JPEG_END = b"\xff\xd9"


@dataclass
class Unreadable:
    """An image that cannot be read: its row in the dataset, its name (path, or ``row N``) and why."""

    row: int
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def image_problem(stream: io.IOBase) -> str | None:
    """Why the image in the binary ``stream`` cannot be decoded, or ``None`` if it can."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning; its error is a reason like any other
            with Image.open(stream) as image:
                kind = image.format
                image.verify()
            if kind == "JPEG" and not _ends_with_jpeg_end(stream):
                stream.seek(0)
                with Image.open(stream) as image:
                    image.draft(image.mode, (1, 1))  # decode every block, at 1/8 scale
                    image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return None


def _ends_with_jpeg_end(stream: io.IOBase) -> bool:
    stream.seek(0, os.SEEK_END)
    stream.seek(max(0, stream.tell() - 64))
    return stream.read().rstrip(b"\x00\r\n ").endswith(_JPEG_END)


def unreadable_images(dataset: datasets.Dataset, column: str) -> list[Unreadable]:
    """The images of ``column`` (a ``datasets.Image``) that cannot be decoded, in row order. A path that is not a
    local file (a remote URL) is left to ``datasets``."""
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format("arrow")
    found, row = [], 0
    for batch in raw.iter(batch_size=_BATCH_ROWS):
        for value in batch[column].to_pylist():
            problem = _problem(value)
            if problem is not None:
                name, reason = problem
                found.append(Unreadable(row, name or f"row {row}", reason))
            row += 1
    return found


def _problem(value: dict | None) -> tuple[str, str] | None:
    """``(name, reason)`` for an unreadable stored image ``{"bytes", "path"}``, else ``None``."""
    if value is None or (value.get("bytes") is None and value.get("path") is None):
        return "an empty value", "no bytes and no path"
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        reason = image_problem(io.BytesIO(data))
        return None if reason is None else (path or "", reason)
    if "://" in path:
        return None
    if not os.path.isfile(path):
        return path, "no such file"
    with open(path, "rb") as f:
        reason = image_problem(f)
    return None if reason is None else (path, reason)
