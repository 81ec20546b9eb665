#!/usr/bin/env python
"""What ``load_image_dataset``'s check of every image costs, against decoding every image once (what one epoch does).

For each data set the check (:func:`hf_bpmod._image_check.unreadable_images`: open, ``verify()``, a JPEG's end marker)
is timed whole, next to opening each image's header alone and to decoding every image with ``datasets`` (iterating
the split). The image files are written to a temporary folder first and read once before timing (a warm page cache);
each time is the best of ``--repeats`` runs.

    python benchmarks/image_check.py            # writes benchmarks/results/image_check.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import tempfile
import time

import datasets
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_bpmod._image_check import unreadable_images  # noqa: E402
from hf_bpmod.data import load_animal_shape_mnist, load_image_dataset  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "image_check.md")


def write_images(folder: str, count: int, size: int, fmt: str, classes: int = 10) -> None:
    """``count`` noise images of ``size`` px in ``classes`` class folders."""
    rng = random.Random(0)
    for i in range(count):
        os.makedirs(os.path.join(folder, f"class{i % classes}"), exist_ok=True)
        image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
        image.save(os.path.join(folder, f"class{i % classes}", f"{i}.{fmt}"))


def headers_only(dataset: datasets.Dataset, column: str) -> None:
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False)).with_format("arrow")
    for batch in raw.iter(batch_size=512):
        for value in batch[column].to_pylist():
            source = io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"]
            with Image.open(source) as image:
                image.size  # noqa: B018


def decode_all(dataset: datasets.Dataset, column: str) -> None:
    for batch in dataset.select_columns([column]).iter(batch_size=512):
        assert all(image.size for image in batch[column])


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for name, count, size, fmt in (
            ("png32", 8000, 32, "png"),
            ("jpg64", 8000, 64, "jpg"),
            ("jpg224", 2000, 224, "jpg"),
        ):
            folder = os.path.join(tmp, name)
            write_images(folder, count, size, fmt)
            start = time.perf_counter()
            data = load_image_dataset(train_file=folder, cache_dir=os.path.join(tmp, "cache"))
            loading = time.perf_counter() - start
            label = f"{count:,} {fmt.upper().replace('JPG', 'JPEG')} files, {size}x{size} px, in class folders"
            cases.append((label, data.splits["train"], data.image_column, loading))
        embedded = load_animal_shape_mnist()["train"]
        cases.append(("8,000 PNGs embedded in arrow (Animal-Shape-MNIST train, 28x28 px)", embedded, "image", None))
        for label, dataset, column, loading in cases:
            decode_all(dataset, column)  # the page cache warm for every method
            check = best(lambda d=dataset, c=column: unreadable_images(d, c), args.repeats)
            header = best(lambda d=dataset, c=column: headers_only(d, c), args.repeats)
            decode = best(lambda d=dataset, c=column: decode_all(d, c), args.repeats)
            n = len(dataset)
            rows.append((label, n, check, header, decode, loading))
            print(f"{label}: check {check:.3f} s, headers {header:.3f} s, decode {decode:.3f} s", flush=True)
    lines = [
        f"# The image check's cost ({platform.machine()}, {os.cpu_count()} cores, 1 process)",
        "",
        "| data | check (s) | check per image (us) | header only per image (us) | decoding every image (s) "
        "| check / decoding | load_image_dataset with the check (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, n, check, header, decode, loading in rows:
        lines.append(
            f"| {label} | {check:.2f} | {check / n * 1e6:.0f} | {header / n * 1e6:.0f} | {decode:.2f} | "
            f"{check / decode:.2f} | {'' if loading is None else f'{loading:.1f}'} |"
        )
    lines += [
        "",
        "The check opens each image and runs `PIL.Image.verify()` (a PNG's chunks and checksums); a JPEG that does "
        "not end with its end-of-image marker is also decoded at 1/8 scale. Decoding every image: iterating the split "
        "with `datasets`, as one epoch does before its transform. Best of "
        f"{args.repeats} runs, page cache warm. `load_image_dataset` with the check: the first load of the folder "
        "(`datasets` converting it into its cache, then the check).",
        "",
        "Command: `python benchmarks/image_check.py`.",
        "",
    ]
    with open(args.output, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
