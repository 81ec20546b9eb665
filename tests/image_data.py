"""Small image-classification data in every form ``hf_bpmod.data.load_image_dataset`` reads, made by the tests.

Image ``i`` is an 8x8 RGB PNG whose red value is ``i`` (so a loaded row says which image it is) and whose green value
is its class's brightness (so a model can learn the class); its class is ``CLASSES[i % 3]``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CLASSES = ("cat", "dog", "owl")
INT_CLASSES = (3, 7, 10)  # integer labels that are not 0..K-1


def image(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i, 40 + 90 * (i % 3), 0))


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    image(i).save(buffer, format="PNG")
    return buffer.getvalue()


def label(i: int) -> str:
    return CLASSES[i % 3]


def identity(loaded: Image.Image) -> int:
    """Which image a loaded one is."""
    return loaded.convert("RGB").getpixel((0, 0))[0]


def write_pngs(folder: Path, ids: Sequence[int]) -> list[str]:
    """``folder/<i>.png`` for each id; return the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        image(i).save(folder / f"{i}.png")
    return [f"{i}.png" for i in ids]


def write_csv(path: Path, ids: Sequence[int], image_prefix: str, labels: bool = True) -> Path:
    """A csv of image paths (``image_prefix`` + file name) and class names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image,label" if labels else "image"]
    lines += [f"{image_prefix}{i}.png" + (f",{label(i)}" if labels else "") for i in ids]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, ids: Sequence[int], image_prefix: str, as_list: bool = False) -> Path:
    """Json lines (or one json list) of image paths and integer labels ``INT_CLASSES[i % 3]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"image": f"{image_prefix}{i}.png", "label": INT_CLASSES[i % 3]} for i in ids]
    text = json.dumps(records) if as_list else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    return path


def table(ids: Sequence[int]) -> pa.Table:
    """Encoded images as plain bytes and class names, as pandas or pyarrow write them."""
    return pa.table({"image": [png(i) for i in ids], "label": [label(i) for i in ids]})


def write_parquet(path: Path, ids: Sequence[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(ids), path)
    return path


def write_arrow(path: Path, ids: Sequence[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table(ids)
    with pa.ipc.new_stream(str(path), data.schema) as writer:
        writer.write_table(data)
    return path


def cifar_style(ids: Sequence[int], names: Sequence[str] = CLASSES) -> datasets.Dataset:
    """``img`` (``datasets.Image``) and ``label`` (``ClassLabel(names)``), as ``uoft-cs/cifar10`` has them."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    rows = {"img": [image(i) for i in ids], "label": [names.index(label(i)) for i in ids]}
    return datasets.Dataset.from_dict(rows, features=features)


def write_metadata_folder(folder: Path, ids: Sequence[int]) -> Path:
    """An image folder whose ``metadata.csv`` names each ``file_name`` and its ``species``."""
    names = write_pngs(folder, ids)
    rows = [f"{name},{label(i)}" for name, i in zip(names, ids)]
    (folder / "metadata.csv").write_text("file_name,species\n" + "\n".join(rows) + "\n")
    return folder


def write_class_folders(folder: Path, ids: Sequence[int]) -> Path:
    """An image folder with one sub-folder per class."""
    for i in ids:
        write_pngs(folder / label(i), [i])
    return folder
