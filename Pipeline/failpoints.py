"""Fault injection for tests and drills, off unless ``PIPELINE_FAILPOINTS`` is set.

``PIPELINE_FAILPOINTS`` holds ``name=value`` pairs separated by ``;``:

- ``predict_fail_marker=TEXT``: the model raises for every image whose bytes contain TEXT
  (a model that fails on particular inputs);
- ``predict_delay_ms=N``: a prediction batch takes N ms longer (a slow handler);
- ``predict_delay_batches=K``: only the first K batches are slowed (default: all).

The model server logs a warning at start when any failpoint is active.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)
ENV = "PIPELINE_FAILPOINTS"


class InjectedModelError(RuntimeError):
    """The failure a failpoint injects into the model."""


def active() -> dict[str, str]:
    """The failpoints set in the environment (empty: none)."""
    pairs = [part.split("=", 1) for part in os.environ.get(ENV, "").split(";") if "=" in part]
    return {name.strip(): value.strip() for name, value in pairs}


class FailpointPredictor:
    """Wraps a predictor, adding the configured failures; same ``predict_many`` contract."""

    def __init__(self, predictor, points: dict[str, str]):  # type: ignore[no-untyped-def]
        self._predictor = predictor
        self.model_version = predictor.model_version
        self._marker = points.get("predict_fail_marker", "").encode() or None
        self._delay = int(points.get("predict_delay_ms", "0")) / 1000
        self._slow_batches = int(points.get("predict_delay_batches", "-1"))
        logger.warning("FAILPOINTS ACTIVE (%s): %s", ENV, points)

    def predict_many(self, images: Sequence[object]) -> list[object]:
        if self._delay and self._slow_batches != 0:
            self._slow_batches -= 1
            time.sleep(self._delay)  # the injected slowness itself
        if self._marker and any(isinstance(i, bytes) and self._marker in i for i in images):
            raise InjectedModelError("injected model failure (failpoint predict_fail_marker)")
        return self._predictor.predict_many(images)


def wrap_predictor(predictor):  # type: ignore[no-untyped-def]
    """The predictor itself, or wrapped with the active failpoints."""
    points = active()
    return FailpointPredictor(predictor, points) if points else predictor
