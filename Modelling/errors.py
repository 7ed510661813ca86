"""Typed errors of the Modelling package.

Every error raised on purpose by ``Modelling`` derives from :class:`ModellingError`::

    ModellingError
    ├── ImageError                  one input image is unusable; ``.reason`` says why
    │   ├── EmptyImageError         zero bytes / zero-sized array
    │   ├── ImageTooLargeError      encoded bytes or decoded pixels over a limit
    │   ├── UndecodableImageError   not an image, truncated or corrupt
    │   ├── UnsupportedImageError   decodable but not usable (animated, bad array shape/dtype)
    │   └── BlankImageError         decodes fine but holds no digit (uniform colour)
    ├── ModelLoadError              checkpoint missing, unreadable or of the wrong shape
    └── DatasetError                training data missing or malformed

An ``ImageError`` concerns one input only: batch APIs return it in place of that input's
prediction instead of raising, so one bad image never fails a batch. Library errors
(Pillow's, Keras') are translated with ``raise ... from exc`` so callers never need to
catch them.
"""

from __future__ import annotations


class ModellingError(Exception):
    """Base class of every error raised on purpose by the Modelling package."""


class ImageError(ModellingError):
    """One input image cannot be classified; ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EmptyImageError(ImageError):
    """The input holds no data (zero bytes or an array with no pixels)."""


class ImageTooLargeError(ImageError):
    """The encoded size or the declared pixel count is over the configured limit."""


class UndecodableImageError(ImageError):
    """The bytes are not an image in a known format, or the image is truncated or corrupt."""


class UnsupportedImageError(ImageError):
    """The image decodes but cannot be used: animated/multi-frame, or an unusable array."""


class BlankImageError(ImageError):
    """The image is (nearly) one uniform colour, so there is no digit to classify."""


class ModelLoadError(ModellingError):
    """The model checkpoint is missing, corrupt or not an MNIST classifier; names the path."""


class DatasetError(ModellingError):
    """A training data source is missing or malformed; the message names the file."""
