"""A short soak run (the full one is ``python benchmarks/soak.py``, 100,000 images)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from Pipeline.demo import PROJECT_ROOT

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_short_soak_on_kafka_keeps_the_invariant():
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "soak.py"), "--count", "8000",
                             "--interval", "2"], capture_output=True, text=True, timeout=540)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "lost 0 |" in result.stdout and "duplicated rows 0 |" in result.stdout
    assert "results 8000 |" in result.stdout
