"""The embedded Animal-Shape-MNIST data: 10,000 grayscale 28x28 silhouettes of 10 animal classes (1,000 each), as the
``animal-shape-mnist`` PyPI wheel ships them.

The package's own loader imports TensorFlow, so it is *not* imported here: the two gzipped pickles are read straight
from the installed package folder, by an unpickler that rebuilds numpy arrays and nothing else. Nothing is
downloaded and nothing is written to disk. :mod:`hf_bpmod.data` re-exports every public name.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any

from ._extras import require_extra

with require_extra("hf_bpmod.data"):
    import datasets
    import numpy as np

__all__ = [
    "ANIMAL_SHAPE_CLASS_NAMES",
    "EMBEDDED_DATASET_NAME",
    "find_animal_shape_files",
    "load_animal_shape_mnist",
]

#: Name under which the embedded data set is selected (e.g. ``--dataset_name animal-shape-mnist``).
EMBEDDED_DATASET_NAME = "animal-shape-mnist"

#: Class names of Animal-Shape-MNIST, in label order (label 0 = "bear", ..., label 9 = "zebra"). The package
#: METADATA lists the ten classes alphabetically ("Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep,
#: Zebra"); the pickled labels are the integers 0-9 in that same order, which was checked by eye on samples of
#: each label.
ANIMAL_SHAPE_CLASS_NAMES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)

_PACKAGE = "animal_shape_mnist"
_DATA_SUBDIR = ("data", "Animal Shape")
_IMAGES_FILE = "animal_data_version_3.gz"
_LABELS_FILE = "animal_label_version_3.gz"
_NUM_EXAMPLES = 10_000
_IMAGE_HW = (28, 28)


def find_animal_shape_files() -> tuple[Path, Path]:
    """Locate the images and labels pickles inside the installed ``animal-shape-mnist`` package.

    The package has no ``__init__.py`` (it is a namespace package), so the folder comes from
    ``importlib.util.find_spec(...).submodule_search_locations``; importing the package's loader is avoided on
    purpose because it imports TensorFlow.

    Returns:
        ``(images_path, labels_path)``.

    Raises:
        FileNotFoundError: if the package is not installed or does not hold the data files.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The '{_PACKAGE}' package is not installed, so the embedded {EMBEDDED_DATASET_NAME} data cannot be "
            "loaded. Install it with `pip install animal-shape-mnist` (it is a dependency of hf_bpmod)."
        )
    searched = []
    for location in spec.submodule_search_locations:
        folder = Path(location).joinpath(*_DATA_SUBDIR)
        searched.append(str(folder))
        images, labels = folder / _IMAGES_FILE, folder / _LABELS_FILE
        if images.is_file() and labels.is_file():
            return images, labels
    raise FileNotFoundError(
        f"Could not find {_IMAGES_FILE} and {_LABELS_FILE} of the '{_PACKAGE}' package; looked in: "
        f"{', '.join(searched)}. Reinstall it with `pip install --force-reinstall animal-shape-mnist`."
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain numpy arrays (the data files hold nothing else).

    It also maps the ``numpy.core`` module path used by the pickles to ``numpy._core`` on numpy 2, which avoids
    numpy's deprecation warning for ``numpy.core``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            try:
                from numpy._core import multiarray  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core import multiarray
            return multiarray._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(
            f"Refusing to load {module}.{name} from the Animal-Shape-MNIST data: only numpy arrays are expected. "
            "The installed data files look corrupted; reinstall `animal-shape-mnist`."
        )


def _load_array(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        array = _NumpyOnlyUnpickler(handle).load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} should hold a numpy array, found {type(array).__name__}.")
    return array


def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read the raw ``(10000, 28, 28) uint8`` images and ``(10000,) int64`` labels and check their format."""
    images_path, labels_path = find_animal_shape_files()
    images, labels = _load_array(images_path), _load_array(labels_path)
    if images.shape != (_NUM_EXAMPLES, *_IMAGE_HW) or images.dtype != np.uint8:
        raise ValueError(
            f"Unexpected image array in {images_path}: shape {images.shape}, dtype {images.dtype} "
            f"(expected ({_NUM_EXAMPLES}, 28, 28) uint8). Reinstall `animal-shape-mnist`."
        )
    if labels.shape != (_NUM_EXAMPLES,) or labels.min() < 0 or labels.max() >= len(ANIMAL_SHAPE_CLASS_NAMES):
        raise ValueError(
            f"Unexpected label array in {labels_path}: shape {labels.shape}, range [{labels.min()}, {labels.max()}] "
            f"(expected ({_NUM_EXAMPLES},) with values 0-9). Reinstall `animal-shape-mnist`."
        )
    return images, labels.astype(np.int64)


def load_animal_shape_mnist(test_size: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """Load Animal-Shape-MNIST as a ``DatasetDict`` with a stratified, seeded ``train``/``test`` split.

    The images are stored as grayscale PNGs and decoded as PIL images in mode ``"RGB"`` (the gray value copied to
    three channels), so standard 3-channel ViT/ResNet image processors apply unchanged. Everything stays in memory:
    no files are downloaded or written.

    Args:
        test_size: Fraction of the 10,000 examples put in ``test``, strictly between 0 and 1. With the default
            0.2 the split is 8,000 / 2,000, i.e. 800 / 200 per class.
        seed: Seed of the split; the same ``(test_size, seed)`` always gives the same split.

    Returns:
        ``DatasetDict`` with splits ``"train"`` and ``"test"``, features ``image`` (``datasets.Image(mode="RGB")``)
        and ``label`` (``datasets.ClassLabel`` with :data:`ANIMAL_SHAPE_CLASS_NAMES`).
    """
    if not isinstance(test_size, float | int) or not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be a fraction strictly between 0 and 1 (e.g. 0.2), got {test_size!r}.")
    images, labels = _load_arrays()
    features = datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "label": datasets.ClassLabel(names=list(ANIMAL_SHAPE_CLASS_NAMES)),
        }
    )
    info = datasets.DatasetInfo(
        features=features,
        description=(
            "Animal-Shape-MNIST: 10,000 grayscale 28x28 animal silhouettes in 10 classes (1,000 each), "
            "from the animal-shape-mnist PyPI package."
        ),
        homepage="https://pypi.org/project/animal-shape-mnist/",
        license="MIT",
    )
    full = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features, info=info)
    split = full.train_test_split(
        test_size=float(test_size), seed=seed, stratify_by_column="label", keep_in_memory=True
    )
    return datasets.DatasetDict({"train": split["train"], "test": split["test"]})
