"""Turn any image of a handwritten digit into the 28x28 array the CNN was trained on.

Only numpy and Pillow are imported here (never TensorFlow), so producers and tests can
validate and preprocess images cheaply.

Pipeline (the same for training data and for served images, so both see identical inputs):

1. ``decode_image`` — bytes → grey float32 array in [0, 1] (0 = black). Size limits are
   enforced *before* pixel data is decoded: the byte length first, then the width x height
   declared in the header. Transparency is flattened, EXIF rotation applied, animated images
   refused, and very large images reduced by an integer factor so memory stays bounded.
2. ``extract_ink`` — detects the polarity (dark-on-light images are inverted, because MNIST
   digits are light on dark), subtracts the background and stretches the contrast, so the
   ink is 1 and the background 0 whatever the colours were.
3. ``centre_digit`` — finds the digit, scales it so its longer side is 20 px (keeping the
   aspect ratio) and places its centre of mass at the centre of a 28x28 field, which is how
   the MNIST digits were made.

``preprocess`` runs all three for one image; ``normalise`` is the single definition of the
integer → [0, 1] scaling, shared by training (``data_preparation``) and serving.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from Modelling.errors import (
    BlankImageError,
    EmptyImageError,
    ImageTooLargeError,
    UndecodableImageError,
    UnsupportedImageError,
)

logger = logging.getLogger(__name__)

#: Largest encoded image accepted, in bytes (checked before anything is parsed).
MAX_ENCODED_BYTES = 10 * 1024 * 1024
#: Largest width x height accepted, checked on the header before pixel data is decoded.
MAX_PIXELS = 25_000_000
#: Decoded images with a longer side are reduced by an integer factor (box average) first;
#: a 28x28 result never needs more, and it caps the float working copy at 16 MB.
MAX_WORKING_SIDE = 2048
#: Side of the model's square input, in pixels.
IMAGE_SIDE = 28
#: Side of the box the digit is scaled into, as in MNIST (20x20 inside 28x28).
DIGIT_BOX = 20
#: Ink contrast (on the 0-1 scale) below which an image counts as blank.
MIN_CONTRAST = 0.05
#: Ink fainter than this share of full contrast is dropped: paper texture and JPEG noise
#: otherwise widen the digit's bounds and pull its centre of mass.
NOISE_FLOOR = 0.1
#: Share of ink mass ignored at each side when bounding the digit, so a stray speck far
#: from the digit does not shrink the digit to fit it into the box.
BOUNDS_MASS_QUANTILE = 0.005

# Pillow warns about images between its own limit and twice it; MAX_PIXELS, checked right
# after the header is read, is stricter, so that warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: Pillow formats decode_image opens. Each declares its true size in a header that is read
#: before any pixel: ICO and ICNS, for instance, decode embedded PNGs inside ``Image.open``
#: (so before MAX_PIXELS can be checked), and EPS would run Ghostscript on the input.
#: JPEG includes MPO (multi-picture JPEGs from cameras), which Pillow opens as JPEG's variant.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Pillow's parsers report corrupt data through all of these; fuzzing found TypeError (TIFF tags
# of the wrong type), struct.error (truncated GIF) and ZeroDivisionError escaping besides.
_PILLOW_DATA_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, ArithmeticError, struct.error,
)

_HIGH_DEPTH_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}


def normalise(pixels: np.ndarray) -> np.ndarray:
    """Return ``pixels`` as float32 grey levels in [0, 1]; the only place scaling is defined.

    uint8 (and other unsigned integer) arrays are divided by their type's maximum; bool maps
    to 0/1; float arrays are taken as already on the 0-1 scale unless a value exceeds 1, in
    which case they are taken as 0-255 (e.g. MNIST rows loaded as float). Never modifies its
    argument.
    """
    array = np.asarray(pixels)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.unsignedinteger):
        return array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    if np.issubdtype(array.dtype, np.signedinteger):
        # Signed integer grey levels (e.g. int64 from a CSV reader) are 0-255 by convention.
        return np.clip(array.astype(np.float32) / np.float32(255.0), 0.0, 1.0)
    if np.issubdtype(array.dtype, np.floating):
        result = array.astype(np.float32)
        if result.size and float(np.nanmax(result)) > 1.0:
            result = result / np.float32(255.0)
        return np.clip(result, 0.0, 1.0)
    raise UnsupportedImageError(f"unsupported array dtype {array.dtype}")


def check_encoded_size(size: int, max_bytes: int = MAX_ENCODED_BYTES) -> None:
    """Raise EmptyImageError / ImageTooLargeError if an encoded image of ``size`` bytes is refused.

    Callers that read files can call this on ``os.stat().st_size`` before reading.
    """
    if size == 0:
        raise EmptyImageError("image is empty (0 bytes)")
    if size > max_bytes:
        raise ImageTooLargeError(
            f"encoded image is {size:,} bytes; the limit is {max_bytes:,} bytes"
        )


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_ENCODED_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode an encoded PNG, JPEG, BMP, GIF, TIFF or WebP image to a grey float32 array.

    Returns a 2-D array in [0, 1] (0 = black) with any transparency flattened and EXIF
    orientation applied; images whose longer side exceeds ``MAX_WORKING_SIDE`` come back
    reduced by an integer factor. Raises an ``ImageError`` subclass, never a Pillow error:
    the byte limit is checked before parsing, the pixel limit on the header before decoding,
    so an oversized or hostile input costs no more than its header to refuse.
    """
    check_encoded_size(len(data), max_bytes)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            _check_header(image, max_pixels)
            return _decode_opened(image)
    except Image.DecompressionBombError as exc:
        # Pillow refuses absurd sizes inside open(), before our check sees the header.
        raise ImageTooLargeError(
            f"image is over the limit of {max_pixels:,} pixels (Pillow: {exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise UndecodableImageError("not a recognised image format") from exc
    except _PILLOW_DATA_ERRORS as exc:
        raise UndecodableImageError(f"corrupt or truncated image: {exc}") from exc


def _check_header(image: Image.Image, max_pixels: int) -> None:
    """Refuse images by what their header declares, before any pixel data is decoded."""
    width, height = image.size
    if width == 0 or height == 0:
        raise EmptyImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,} pixels"
        )
    if getattr(image, "is_animated", False):
        frames = getattr(image, "n_frames", "several")
        raise UnsupportedImageError(
            f"animated or multi-frame {image.format} image ({frames} frames) is not supported"
        )


def _decode_opened(image: Image.Image) -> np.ndarray:
    """Decode an opened, header-checked image to grey [0, 1] with bounded memory.

    Peak memory is the decoded image (at most 4 bytes x MAX_PIXELS = 100 MB) plus one or
    two 8-bit bands, about 160 MB for the largest RGBA image accepted: large images are
    reduced while still 8 bits per band, so every float copy is at most MAX_WORKING_SIDE².
    """
    factor = math.ceil(max(image.size) / MAX_WORKING_SIDE)
    if factor > 1:
        # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: far less memory than full size.
        # At least 1 px a side: Pillow divides by the requested size (a 1x5000 JPEG asked for 0).
        image.draft("L", (max(1, image.size[0] // factor), max(1, image.size[1] // factor)))
    image.load()
    _apply_exif_orientation(image)
    grey, alpha = _grey_bands(image)
    factor = math.ceil(max(grey.size) / MAX_WORKING_SIDE)
    if factor > 1:
        # Bands are reduced one by one: Pillow's reduce of RGBA/LA would first make a
        # premultiplied full-size copy.
        grey = grey.reduce(factor)
        alpha = alpha.reduce(factor) if alpha is not None else None
    grey_array = normalise(np.asarray(grey))
    if alpha is None:
        return grey_array
    return _flatten_alpha(grey_array, normalise(np.asarray(alpha)))


def _apply_exif_orientation(image: Image.Image) -> None:
    """Rotate photos in place the way viewers show them; a broken EXIF block is ignored."""
    try:
        # In place: the default returns a full copy even when there is nothing to rotate.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # EXIF parsing can fail in many ways; the pixels are still fine
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)


def _grey_bands(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Grey band ("L", or "F" in [0, 1] for 16/32-bit images) and alpha band if transparent."""
    if image.mode in _HIGH_DEPTH_MODES or image.mode in ("I", "F"):
        return Image.fromarray(_high_depth_grey(image)), None
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        if image.mode not in ("LA", "RGBA"):
            image = image.convert("RGBA")
        return image.convert("L"), image.getchannel("A")
    if image.mode == "L":
        return image, None
    try:
        return image.convert("L"), None
    except ValueError:
        return image.convert("RGB").convert("L"), None


def _high_depth_grey(image: Image.Image) -> np.ndarray:
    """16/32-bit grey to [0, 1]; Pillow's own conversion to 8 bits clips instead of scaling."""
    values = np.asarray(image, dtype=np.float32)
    if not np.isfinite(values).all():
        # As in array_to_grey: NaN would otherwise reach centre_digit's centre of mass.
        raise UnsupportedImageError("floating-point image contains NaN or infinite values")
    if image.mode in _HIGH_DEPTH_MODES:
        full_scale = _HIGH_DEPTH_MODES[image.mode]
    else:
        peak = float(values.max()) if values.size else 0.0
        full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    return np.clip(values / np.float32(full_scale), 0.0, 1.0)


def _flatten_alpha(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite a transparent image onto a backdrop that keeps the digit visible.

    When most of the image is transparent, the opaque pixels are the ink (a drawing on a
    transparent canvas), so the backdrop is chosen to contrast with them: white under dark
    ink, black under light ink. Otherwise the image is an opaque picture with transparent
    holes, which are filled with the picture's own median colour so they look like paper.
    """
    if float(alpha.min()) >= 1.0:
        return grey
    opaque = alpha >= 0.5
    if float(np.mean(opaque)) < 0.5:
        weight = float(alpha.sum())
        ink_level = float((grey * alpha).sum()) / weight if weight > 0 else 0.0
        backdrop = 1.0 if ink_level < 0.5 else 0.0
    else:
        backdrop = float(np.median(grey[opaque]))
    return (grey * alpha + np.float32(backdrop) * (1.0 - alpha)).astype(np.float32)


def _reduce_to_working_size(grey: np.ndarray) -> np.ndarray:
    """Box-average images whose longer side exceeds MAX_WORKING_SIDE by an integer factor."""
    factor = math.ceil(max(grey.shape) / MAX_WORKING_SIDE)
    if factor <= 1:
        return grey
    reduced = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32)).reduce(factor)
    return np.asarray(reduced, dtype=np.float32)


def array_to_grey(image: np.ndarray, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Convert a decoded image array to grey [0, 1].

    Accepts (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; scaling follows
    ``normalise``. Raises EmptyImageError, ImageTooLargeError or
    UnsupportedImageError (wrong shape, dtype, NaN/inf) — never a numpy error.
    """
    array = np.asarray(image)
    if array.size == 0:
        raise EmptyImageError(f"image array has no pixels (shape {array.shape})")
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        height, width, channels = array.shape
    elif array.ndim == 2:
        (height, width), channels = array.shape, 1
    else:
        raise UnsupportedImageError(
            f"image array has shape {array.shape}; "
            "expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if height * width > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,} pixels"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise UnsupportedImageError("image array contains NaN or infinite values")
    values = normalise(array)
    if channels == 1:
        grey = values.reshape(height, width)
    else:
        # ITU-R 601 luma, the same weights Pillow uses for convert("L").
        grey = values[..., 0] * 0.299 + values[..., 1] * 0.587 + values[..., 2] * 0.114
        if channels == 4:
            grey = _flatten_alpha(grey.astype(np.float32), values[..., 3])
    return _reduce_to_working_size(np.ascontiguousarray(grey, dtype=np.float32))


def extract_ink(grey: np.ndarray) -> np.ndarray:
    """Map a grey [0, 1] image to ink intensity: 1 = full-contrast stroke, 0 = background.

    The background is the median grey level (a digit covers a minority of the picture);
    the polarity is whichever side of it reaches further, so black-on-white, white-on-black
    and any two colours all give light-on-dark ink like MNIST. Raises BlankImageError when
    the contrast is below MIN_CONTRAST.
    """
    # A regular sample of ~65k pixels estimates the background level as well as all of them
    # would, at a fraction of the cost of a full median on a photo.
    step = max(1, math.isqrt(grey.size // 65536))
    background = float(np.median(grey[::step, ::step]))
    darker = background - float(grey.min())
    lighter = float(grey.max()) - background
    contrast = max(darker, lighter)
    if contrast < MIN_CONTRAST:
        raise BlankImageError(
            f"image holds no digit: contrast {contrast:.3f} is below {MIN_CONTRAST}"
        )
    ink = (background - grey) if darker > lighter else (grey - background)
    # Stretch so full contrast is 1 and NOISE_FLOOR maps to 0, in one pass.
    ink = ink.astype(np.float32, copy=False) * np.float32(1.0 / (contrast * (1.0 - NOISE_FLOOR)))
    ink -= np.float32(NOISE_FLOOR / (1.0 - NOISE_FLOOR))
    return np.clip(ink, 0.0, 1.0, out=ink)


def _mass_bounds(profile: np.ndarray) -> tuple[int, int]:
    """Half-open index range holding all but BOUNDS_MASS_QUANTILE of the mass at each end."""
    cumulative = np.cumsum(profile, dtype=np.float64)
    total = cumulative[-1]
    start = int(np.searchsorted(cumulative, total * BOUNDS_MASS_QUANTILE, side="right"))
    stop = int(np.searchsorted(cumulative, total * (1.0 - BOUNDS_MASS_QUANTILE), side="left")) + 1
    return start, max(stop, start + 1)


def centre_digit(ink: np.ndarray) -> np.ndarray:
    """Scale the digit in ``ink`` into a 20x20 box and centre its mass in a 28x28 float32 field.

    Keeps the aspect ratio; resampling is area-weighted (antialiased) when shrinking and
    placement is sub-pixel, so the same digit drawn at any size or position gives nearly
    the same array. The result's maximum is 1. Raises BlankImageError when ``ink`` is empty.
    """
    rows, cols = ink.sum(axis=1), ink.sum(axis=0)
    if float(rows.sum()) <= 0.0:
        raise BlankImageError("image holds no digit: no ink above the noise floor")
    top, bottom = _mass_bounds(rows)
    left, right = _mass_bounds(cols)
    digit = ink[top:bottom, left:right]
    mass = float(digit.sum())
    # Centre of mass in continuous coordinates (pixel i spans [i, i + 1)).
    centre_y = top + float(np.dot(digit.sum(axis=1), np.arange(digit.shape[0]) + 0.5)) / mass
    centre_x = left + float(np.dot(digit.sum(axis=0), np.arange(digit.shape[1]) + 0.5)) / mass
    half_span = (IMAGE_SIDE / 2) * max(bottom - top, right - left) / DIGIT_BOX
    window, origin_y, origin_x = _padded_window(
        ink, centre_y - half_span, centre_x - half_span, centre_y + half_span, centre_x + half_span
    )
    box = (
        centre_x - half_span - origin_x,
        centre_y - half_span - origin_y,
        centre_x + half_span - origin_x,
        centre_y + half_span - origin_y,
    )
    field = Image.fromarray(window).resize(
        (IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR, box=box
    )
    result = np.clip(np.asarray(field, dtype=np.float32), 0.0, 1.0)
    peak = float(result.max())
    if peak <= 0.0:
        raise BlankImageError("image holds no digit: nothing left after scaling")
    # Thin strokes of large drawings fade when shrunk; restoring full contrast keeps them
    # as bright as MNIST strokes.
    return result / np.float32(peak)


def _padded_window(
    array: np.ndarray, top: float, left: float, bottom: float, right: float
) -> tuple[np.ndarray, int, int]:
    """Copy ``array[top:bottom, left:right]`` (rounded outwards), zero-padded where it lies outside.

    Pillow's resize refuses boxes outside the image; padding just the needed window keeps
    the cost proportional to the digit, not to the picture. Returns the window and its origin.
    """
    y0, x0 = math.floor(top) - 1, math.floor(left) - 1
    y1, x1 = math.ceil(bottom) + 1, math.ceil(right) + 1
    window = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    src_y0, src_x0 = max(y0, 0), max(x0, 0)
    src_y1, src_x1 = min(y1, array.shape[0]), min(x1, array.shape[1])
    if src_y1 > src_y0 and src_x1 > src_x0:
        window[src_y0 - y0 : src_y1 - y0, src_x0 - x0 : src_x1 - x0] = array[
            src_y0:src_y1, src_x0:src_x1
        ]
    return window, y0, x0


def preprocess(
    image: bytes | bytearray | memoryview | np.ndarray,
    *,
    max_bytes: int = MAX_ENCODED_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Return the (28, 28) float32 model input in [0, 1] for one encoded image or array.

    Accepts encoded bytes (any format Pillow reads) or a decoded array (see
    ``array_to_grey``) of any size and colour mode. Deterministic, thread-safe, and the
    exact transformation applied to the training data. Raises an ``ImageError`` subclass
    for unusable input, never anything else for bad data.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        grey = decode_image(image, max_bytes=max_bytes, max_pixels=max_pixels)
    elif isinstance(image, np.ndarray):
        grey = array_to_grey(image, max_pixels=max_pixels)
    else:
        raise UnsupportedImageError(
            f"expected encoded image bytes or a numpy array, got {type(image).__name__}"
        )
    return centre_digit(extract_ink(grey))
