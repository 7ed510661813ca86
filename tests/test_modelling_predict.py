"""Predictor: shipped checkpoint, batched compiled prediction, per-image errors, save/load, CLI."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from Modelling.data_preparation import load_dataset, prepare_images, split_dataset
from Modelling.errors import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    ModelLoadError,
    UndecodableImageError,
    UnsupportedImageError,
)
from Modelling.predict_cnn import DEFAULT_MODEL_PATH, MAX_BATCH, Prediction, Predictor

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load()


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = load_dataset()
    return images, labels


def encode(array: np.ndarray, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, image_format, **options)
    return buffer.getvalue()


def renderings(digit: np.ndarray) -> dict[str, bytes]:
    """One digit as users send it: plain, inverted, coloured, large, small, off-centre."""
    coverage = digit[..., None] / 255.0
    coloured = np.array([240, 240, 255]) * (1 - coverage) + np.array([200, 0, 0]) * coverage
    page = np.full((800, 1000), 255, np.uint8)
    page[100:700, 300:900] = 255 - np.asarray(
        Image.fromarray(digit).resize((600, 600), Image.Resampling.BICUBIC)
    )
    small = np.zeros((24, 24), np.uint8)
    small[4:20, 4:20] = np.asarray(
        Image.fromarray(digit).resize((16, 16), Image.Resampling.LANCZOS)
    )
    corner = np.zeros((90, 90), np.uint8)
    corner[:28, 60:88] = digit
    return {
        "plain": encode(digit),
        "inverted_jpeg": encode(255 - digit, "JPEG", quality=90),
        "coloured": encode(coloured.round().astype(np.uint8)),
        "large": encode(page),
        "small": encode(small),
        "off_centre": encode(corner),
    }


def test_shipped_checkpoint_loads_with_a_version(predictor: Predictor) -> None:
    assert DEFAULT_MODEL_PATH.is_file()
    assert len(predictor.model_version) == 12
    int(predictor.model_version, 16)


@pytest.mark.timeout(120)
def test_shipped_checkpoint_reaches_97_percent_on_held_out_split(
    predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    """The split train_cnn.py uses by default (seed 42, 10% test) — images the model never saw."""
    test = split_dataset(*dataset, seed=42, val_fraction=0.1, test_fraction=0.1).test
    probabilities = predictor.predict_arrays(prepare_images(test.images))
    assert np.mean(probabilities.argmax(axis=1) == test.labels) >= 0.97


def test_every_rendering_of_a_digit_gets_the_same_label(
    predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = dataset
    for digit in range(10):
        index = np.flatnonzero(labels == digit)[1]
        rendered = renderings(images[index])
        results = predictor.predict_many(list(rendered.values()))
        for name, result in zip(rendered, results, strict=True):
            assert isinstance(result, Prediction), f"{digit}/{name}: {result}"
            assert result.label == digit, f"digit {digit} rendered {name} read as {result.label}"


def test_prediction_fields(predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]) -> None:
    result = predictor.predict(encode(dataset[0][0]))
    assert isinstance(result.label, int) and 0 <= result.label <= 9
    assert len(result.probabilities) == 10 and sum(result.probabilities) == pytest.approx(
        1, abs=1e-4
    )
    assert result.confidence == max(result.probabilities) == result.probabilities[result.label]
    with pytest.raises(AttributeError):
        result.label = 3  # type: ignore[misc]  # frozen


def test_batch_and_single_predictions_agree(
    predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    inputs = prepare_images(dataset[0][:64])
    batched = predictor.predict_arrays(inputs)
    singles = np.concatenate([predictor.predict_arrays(inputs[i : i + 1]) for i in range(64)])
    assert batched.shape == (64, 10) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    encoded = [encode(image) for image in dataset[0][:16]]
    many = predictor.predict_many(encoded)
    one_by_one = [predictor.predict(data) for data in encoded]
    for left, right in zip(many, one_by_one, strict=True):
        assert isinstance(left, Prediction)
        assert left.label == right.label
        np.testing.assert_allclose(left.probabilities, right.probabilities, atol=1e-5)


def test_batches_larger_than_the_slice_size_and_empty_batches(
    predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    inputs = prepare_images(dataset[0][:100])
    big = np.concatenate([inputs] * (MAX_BATCH // 100 + 2))
    result = predictor.predict_arrays(big)
    assert result.shape == (len(big), 10)
    np.testing.assert_allclose(result[-100:], predictor.predict_arrays(inputs), atol=1e-5)
    assert predictor.predict_arrays(np.zeros((0, 28, 28), np.float32)).shape == (0, 10)
    assert predictor.predict_many([]) == []
    with pytest.raises(ValueError, match="28, 28"):
        predictor.predict_arrays(np.zeros((3, 32, 32)))


def test_bad_images_come_back_as_errors_without_failing_the_batch(
    predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = dataset
    frames = [Image.fromarray(np.full((16, 16), level, np.uint8)) for level in (0, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    noise_png = encode(np.random.default_rng(0).integers(0, 256, (100, 100), dtype=np.uint8))
    bomb = b"\x89PNG\r\n\x1a\n" + b"".join(  # declares 20000x20000 pixels in ~80 bytes
        struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        for tag, data in (
            (b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)),
            (b"IDAT", zlib.compress(bytes(1024))),
            (b"IEND", b""),
        )
    )
    batch = [
        encode(images[0]),
        b"",
        b"GIF89a not really",
        noise_png[: len(noise_png) // 2],
        bytes(50 * 1024 * 1024),
        bomb,
        gif.getvalue(),
        images[1],
    ]
    expected = [
        None,
        EmptyImageError,
        UndecodableImageError,
        UndecodableImageError,
        ImageTooLargeError,
        ImageTooLargeError,
        UnsupportedImageError,
        None,
    ]
    results = predictor.predict_many(batch)
    assert len(results) == len(batch)
    expected_labels = {0: labels[0], len(batch) - 1: labels[1]}
    for index, (result, error_type) in enumerate(zip(results, expected, strict=True)):
        if error_type is None:
            assert isinstance(result, Prediction) and result.label == expected_labels[index]
        else:
            assert type(result) is error_type, f"input {index}: {result!r}"
            assert isinstance(result, ImageError) and result.reason


@pytest.mark.timeout(120)
# Keras 3.15's own saving code trips numpy 2's __array__(copy=...) deprecation; not ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_save_load_round_trip(
    tmp_path: Path, predictor: Predictor, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    inputs = prepare_images(dataset[0][:32])
    expected = predictor.predict_arrays(inputs)
    for suffix in (".h5", ".keras"):
        path = tmp_path / f"copy{suffix}"
        predictor.model.save(path)
        reloaded = Predictor.load(path)
        np.testing.assert_allclose(reloaded.predict_arrays(inputs), expected, atol=1e-6)
        assert len(reloaded.model_version) == 12
    wrapped = Predictor(predictor.model, model_version="in-memory")
    np.testing.assert_allclose(wrapped.predict_arrays(inputs), expected, atol=1e-6)


def test_missing_checkpoint_raises_model_load_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.h5"
    with pytest.raises(ModelLoadError, match=str(path)):
        Predictor.load(path)


def test_corrupt_checkpoint_raises_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(500))
    with pytest.raises(ModelLoadError, match=r"corrupt\.h5"):
        Predictor.load(path)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_model_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    import keras

    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(10, activation="softmax")])
    path = tmp_path / "wrong.keras"
    model.save(path)
    with pytest.raises(ModelLoadError, match=r"wrong\.keras.*input shape"):
        Predictor.load(path)


def _run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "Modelling.predict_cnn", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )


@pytest.mark.timeout(150)
def test_cli_prints_one_line_per_file(
    tmp_path: Path, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = dataset
    written = []
    for digit in (2, 7):
        index = np.flatnonzero(labels == digit)[0]
        path = tmp_path / f"digit_{digit}.jpg"
        Image.fromarray(255 - images[index]).resize((280, 280)).save(path, quality=90)
        written.append(path.name)
    (tmp_path / "notes.png").write_text("not an image")
    completed = _run_cli(*written, "notes.png", "absent.png", cwd=tmp_path)
    lines = completed.stdout.splitlines()
    assert completed.returncode == 1, completed.stderr
    assert len(lines) == 4
    assert lines[0].startswith("digit_2.jpg: label=2 confidence=")
    assert lines[1].startswith("digit_7.jpg: label=7 confidence=")
    assert lines[2] == "notes.png: error: not a recognised image format"
    assert lines[3].startswith("absent.png: error: cannot read file")
    assert "oneDNN" not in completed.stderr and "absl" not in completed.stderr


@pytest.mark.timeout(150)
def test_cli_succeeds_when_all_images_are_read(
    tmp_path: Path, dataset: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "one.png"
    Image.fromarray(dataset[0][0]).save(path)
    completed = _run_cli(str(path), "--probabilities", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.count("probabilities=") == 1
    assert _run_cli("--help", cwd=tmp_path).returncode == 0
    missing_model = _run_cli("--model", "none.h5", str(path), cwd=tmp_path)
    assert missing_model.returncode == 2 and "none.h5" in missing_model.stderr
