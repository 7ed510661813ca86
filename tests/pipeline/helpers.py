"""Helpers for whole-pipeline tests."""

from __future__ import annotations

import io
import time
from pathlib import Path

from Pipeline.checker import CheckReport, check
from Pipeline.demo import Stages


def start_pipeline(stages: Stages, *skip: str) -> None:
    """Start app_2.py, model_server_sub.py and model_server_pub.py (minus ``skip``)."""
    for name in ("app_2", "sub", "pub"):
        if name not in skip:
            stages.start(name, name)


def send(stages: Stages, *args: str, manifest: Path) -> None:
    """Run app_1.py to completion, recording what it sent in ``manifest``."""
    result = stages.run("app_1", "--manifest", str(manifest), *args)
    assert result.returncode == 0, result.stderr[-3000:]


def wait_for(stages: Stages, manifests: list[Path], timeout: float = 300, *, alive: bool = True) -> CheckReport:
    """Wait until every sent image is a result or a dead letter (or timeout); return the check."""
    deadline = time.monotonic() + timeout
    while True:
        report = check(manifests, stages.db_dir)
        if not report.lost or time.monotonic() > deadline:
            return report
        if alive:
            for name, process in stages.processes.items():
                assert process.poll() is None, f"{name} exited early:\n{stages.log_tail(name)}"
        time.sleep(0.5)


def wait_until(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def digit_pngs(directory: Path, count: int, *, offset: int = 0, text: str | None = None) -> list[Path]:
    """Write ``count`` dataset digits as PNG files (optionally with a tEXt chunk) and return them."""
    from PIL import Image, PngImagePlugin

    from Modelling.data_preparation import load_dataset

    images, _, _ = load_dataset()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(offset, offset + count):
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_text("comment", text)
        buffer = io.BytesIO()
        Image.fromarray(images[index]).save(buffer, format="PNG", pnginfo=info)
        paths.append(directory / f"digit_{index}{'_' + text if text else ''}.png")
        paths[-1].write_bytes(buffer.getvalue())
    return paths
