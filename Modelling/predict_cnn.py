"""Batched digit prediction with the trained CNN, for any image, plus a small CLI.

``Predictor`` loads the checkpoint once and runs batches through one compiled
``tf.function`` with a fixed ``[None, 28, 28]`` input signature, so no batch size ever
causes a retrace and no per-call ``model.predict`` overhead is paid. Images are prepared
by :func:`Modelling.preprocessing.preprocess`, the same transformation used in training.

Importing this module does not import TensorFlow; ``Predictor.load`` does, quietly.

CLI::

    python -m Modelling.predict_cnn digit.png photo.jpg
    digit.png: label=7 confidence=0.998
    photo.jpg: error: not a recognised image format

Exit status: 0 if every image was classified, 1 if any failed, 2 if the model cannot load.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from Modelling.errors import ImageError, ModelLoadError, UndecodableImageError
from Modelling.preprocessing import IMAGE_SIDE, check_encoded_size, preprocess

logger = logging.getLogger(__name__)

#: The checkpoint shipped with the repository, found beside this module (not the cwd).
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "model_checkpoints" / "mnist_cnn_model.h5"
#: Larger batches are run in slices of this size: beyond it throughput no longer grows
#: on CPU, while activation memory keeps growing.
MAX_BATCH = 512
NUM_CLASSES = 10


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image: most likely digit, its probability, all ten."""

    label: int
    confidence: float
    probabilities: tuple[float, ...]

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray) -> Prediction:
        """Build from one row of class probabilities (length 10)."""
        label = int(np.argmax(probabilities))
        return cls(
            label=label,
            confidence=float(probabilities[label]),
            probabilities=tuple(float(p) for p in probabilities),
        )


def file_version(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256: names the exact weights behind a result."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


class Predictor:
    """A loaded MNIST classifier. All methods are thread-safe and never modify the model."""

    def __init__(self, model: Any, *, model_version: str = "unsaved") -> None:
        """Wrap a Keras model mapping (N, 28, 28[, 1]) inputs in [0, 1] to (N, 10) probabilities.

        Compiles and warms up the forward pass; raises ModelLoadError if the model does not
        have that shape contract.
        """
        from Modelling._tensorflow import import_tensorflow

        tf = import_tensorflow()
        self.model = model
        self.model_version = model_version
        input_shape = tuple(model.input_shape)
        if input_shape[1:] not in ((IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE, 1)):
            raise ModelLoadError(f"model input shape {input_shape} is not (N, 28, 28[, 1])")
        needs_channel = len(input_shape) == 4

        def forward(batch: Any) -> Any:
            inputs = batch[..., tf.newaxis] if needs_channel else batch
            return model(inputs, training=False)

        self._forward = tf.function(
            forward,
            input_signature=[tf.TensorSpec([None, IMAGE_SIDE, IMAGE_SIDE], tf.float32)],
        )
        self._check_outputs()

    @classmethod
    def load(cls, path: str | Path | None = None, *, threads: int | None = None) -> Predictor:
        """Load a .h5 or .keras checkpoint (default: the shipped one) and compile it.

        ``threads`` bounds TensorFlow's intra-op threads (default: all cores; only honoured
        before TensorFlow first runs in this process). Raises ModelLoadError naming the path
        if the file is missing, unreadable or not an MNIST classifier.
        """
        checkpoint = Path(path) if path is not None else DEFAULT_MODEL_PATH
        if not checkpoint.is_file():
            raise ModelLoadError(f"model checkpoint not found: {checkpoint}")
        from Modelling._tensorflow import import_tensorflow

        import_tensorflow(threads=threads)
        import keras

        try:
            model = keras.models.load_model(checkpoint, compile=False)
        except Exception as exc:  # Keras/h5py report corrupt files in many types
            raise ModelLoadError(f"cannot load model checkpoint {checkpoint}: {exc}") from exc
        try:
            predictor = cls(model, model_version=file_version(checkpoint))
        except ModelLoadError as exc:
            raise ModelLoadError(f"{checkpoint}: {exc}") from exc
        logger.info("loaded model %s (version %s)", checkpoint, predictor.model_version)
        return predictor

    def _check_outputs(self) -> None:
        """Trace the compiled function once and check it yields a probability per class."""
        try:
            output = self.predict_arrays(np.zeros((1, IMAGE_SIDE, IMAGE_SIDE), np.float32))
        except Exception as exc:  # any failure here means an unusable model
            raise ModelLoadError(f"model cannot run on a 28x28 input: {exc}") from exc
        if output.shape != (1, NUM_CLASSES) or not np.isclose(output.sum(), 1.0, atol=1e-3):
            raise ModelLoadError(
                f"model does not output {NUM_CLASSES} class probabilities (got {output.shape})"
            )

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Return float32 (N, 10) class probabilities for already-preprocessed (N, 28, 28) inputs.

        Inputs must come from ``preprocess`` (float32 in [0, 1]); raises ValueError for any
        other shape. Batches over MAX_BATCH are run in slices, so memory stays bounded.
        """
        array = np.asarray(batch, dtype=np.float32)
        if array.ndim != 3 or array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(f"expected a (N, 28, 28) batch, got shape {array.shape}")
        if len(array) == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        slices = [
            self._forward(np.ascontiguousarray(array[start : start + MAX_BATCH])).numpy()
            for start in range(0, len(array), MAX_BATCH)
        ]
        return np.concatenate(slices) if len(slices) > 1 else slices[0]

    def predict_many(
        self, images: Sequence[bytes | bytearray | memoryview | np.ndarray]
    ) -> list[Prediction | ImageError]:
        """Classify each encoded image or array: a Prediction or its ImageError, in input order.

        One bad image never fails the batch: its slot holds the error (with ``.reason``)
        and the others are still predicted together in one compiled call.
        """
        results: list[Prediction | ImageError | None] = [None] * len(images)
        prepared: list[np.ndarray] = []
        positions: list[int] = []
        for index, image in enumerate(images):
            try:
                prepared.append(preprocess(image))
                positions.append(index)
            except ImageError as exc:
                results[index] = exc
            except Exception as exc:  # isolate one input's unforeseen decoder failure
                logger.exception("unexpected failure preparing image %d", index)
                results[index] = UndecodableImageError(f"unexpected decoding failure: {exc!r}")
        if prepared:
            probabilities = self.predict_arrays(np.stack(prepared))
            for index, row in zip(positions, probabilities, strict=True):
                results[index] = Prediction.from_probabilities(row)
        return results  # type: ignore[return-value]  # every slot is filled above

    def predict(self, image: bytes | bytearray | memoryview | np.ndarray) -> Prediction:
        """Classify one image; raises its ImageError instead of returning it."""
        result = self.predict_many([image])[0]
        if isinstance(result, ImageError):
            raise result
        return result


def _read_image_file(path: Path) -> bytes | ImageError:
    """The file's bytes, or an ImageError; a huge file is refused from its size, unread."""
    try:
        check_encoded_size(path.stat().st_size)
        return path.read_bytes()
    except ImageError as exc:
        return exc
    except OSError as exc:
        return UndecodableImageError(f"cannot read file: {exc.strerror or exc}")


def _format_result(result: Prediction | ImageError, *, show_probabilities: bool) -> str:
    if isinstance(result, ImageError):
        return f"error: {result.reason}"
    line = f"label={result.label} confidence={result.confidence:.3f}"
    if show_probabilities:
        line += " probabilities=" + ",".join(f"{p:.3f}" for p in result.probabilities)
    return line


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m Modelling.predict_cnn",
        description="Classify images of handwritten digits (any format, size or colours); "
        "prints 'PATH: label=D confidence=C' or 'PATH: error: REASON' per file.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL_PATH,
        help="checkpoint (.h5 or .keras) to load (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="files decoded and predicted together; bounds memory (default: %(default)s)",
    )
    parser.add_argument(
        "--probabilities", action="store_true", help="also print all ten class probabilities"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="TensorFlow threads (default: all cores)"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 all classified, 1 some failed, 2 no model)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        predictor = Predictor.load(args.model, threads=args.threads)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        contents = [_read_image_file(path) for path in paths]
        readable = [item for item in contents if not isinstance(item, ImageError)]
        predicted = iter(predictor.predict_many(readable))
        for path, item in zip(paths, contents, strict=True):
            result = item if isinstance(item, ImageError) else next(predicted)
            failed += isinstance(result, ImageError)
            print(f"{path}: {_format_result(result, show_probabilities=args.probabilities)}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
