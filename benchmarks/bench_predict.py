"""Benchmark the MNIST predictor: model throughput per batch size, latency, preprocessing cost.

Run from anywhere::

    python benchmarks/bench_predict.py [--model PATH] [--seconds 2] [--threads N]

Prints images/s of ``Predictor.predict_arrays`` at batch sizes 1, 8, 32, 128 and 512 (after
a warm-up), batch-1 latency (median and 99th percentile), the decode + preprocess cost per
image for a 28x28 PNG, a 640x480 JPEG and a raw array, and end-to-end ``predict_many``
throughput on PNG bytes. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from Modelling.data_preparation import load_dataset, prepare_images
from Modelling.predict_cnn import DEFAULT_MODEL_PATH, Predictor
from Modelling.preprocessing import preprocess

BATCH_SIZES = (1, 8, 32, 128, 512)


def _timed_calls(function: Callable[[], object], seconds: float) -> list[float]:
    """Call ``function`` for about ``seconds`` (at least 5 times); return each call's duration."""
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(durations) < 5:
        start = time.perf_counter()
        function()
        durations.append(time.perf_counter() - start)
    return durations


def _encode(array: np.ndarray, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, image_format, **options)
    return buffer.getvalue()


def _photo_like(digit: np.ndarray) -> np.ndarray:
    """A 640x480 RGB 'photo': dark ink on off-white paper with noise, digit off-centre."""
    rng = np.random.default_rng(0)
    ink = np.asarray(Image.fromarray(digit).resize((240, 240), Image.Resampling.BICUBIC)) / 255.0
    canvas = np.zeros((480, 640))
    canvas[100:340, 300:540] = ink
    paper = np.array([235.0, 230.0, 215.0]) * (1 - canvas[..., None]) + 40.0 * canvas[..., None]
    return np.clip(paper + rng.normal(0, 4, paper.shape), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="checkpoint to load")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument(
        "--threads", type=int, default=None, help="TensorFlow threads (default: all)"
    )
    args = parser.parse_args(argv)

    images, labels, _ = load_dataset()
    inputs = prepare_images(images[:512])
    predictor = Predictor.load(args.model, threads=args.threads)
    print(f"model {args.model.name} version {predictor.model_version}, {os.cpu_count()} CPU cores")

    print("\npredict_arrays (compiled tf.function):")
    print(f"{'batch':>6} {'images/s':>10} {'ms/batch':>9}")
    for batch_size in BATCH_SIZES:
        batch = inputs[:batch_size]
        for _ in range(3):  # warm-up: first calls allocate and pick kernels
            predictor.predict_arrays(batch)
        durations = _timed_calls(lambda batch=batch: predictor.predict_arrays(batch), args.seconds)
        mean = float(np.mean(durations))
        print(f"{batch_size:>6} {batch_size / mean:>10,.0f} {mean * 1e3:>9.2f}")
    single = inputs[:1]
    latencies = np.array(_timed_calls(lambda: predictor.predict_arrays(single), args.seconds)) * 1e3
    print(
        f"batch-1 latency: median {np.median(latencies):.3f} ms, "
        f"p99 {np.percentile(latencies, 99):.3f} ms"
    )

    digit = images[0]
    cases = {
        "28x28 PNG": _encode(digit, "PNG"),
        "640x480 JPEG photo": _encode(_photo_like(digit), "JPEG", quality=85),
        "28x28 uint8 array": digit,
    }
    print("\ndecode + preprocess per image:")
    for name, data in cases.items():
        durations = _timed_calls(lambda data=data: preprocess(data), args.seconds / 2)
        print(f"  {name:<20} {np.median(durations) * 1e6:>8.0f} µs")

    encoded = [_encode(image, "PNG") for image in images[:128]]
    durations = _timed_calls(lambda: predictor.predict_many(encoded), args.seconds)
    print(
        f"\npredict_many on 128 PNGs (decode + preprocess + predict): "
        f"{128 / float(np.mean(durations)):,.0f} images/s"
    )
    accuracy = np.mean(predictor.predict_arrays(inputs).argmax(1) == labels[:512])
    print(f"(sanity: accuracy on the first 512 subset images {accuracy:.3f}, mostly training data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
