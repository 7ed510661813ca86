"""Child-process harness shared by the store tests (``test_db.py``, ``test_queue.py``).

Each of those test modules is also the program of its child processes
(``python tests/test_x.py ROLE ARGS``); this module starts such children, and gives the
children the ways to make the kernel refuse their writes (file-size limit, full disk).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spawn(script: str, role: str, *args: object, **popen: object) -> subprocess.Popen[str]:
    """Start ``script ROLE ARGS`` in a new Python process (text mode) with the project importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, script, role, *map(str, args)], env=env, text=True, **popen
    )


@functools.cache
def can_mount_private_tmpfs() -> bool:
    """Whether this machine lets an unprivileged user mount a tmpfs in its own namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def run_in_small_tmpfs(
    script: str, role: str, directory: Path, size: str = "256k", timeout: float = 60
) -> dict:
    """Run ``script ROLE DIR`` in a private mount namespace where DIR is a tiny tmpfs.

    Asserts the child exited 0 and returns the JSON report it printed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    command = 'mount -t tmpfs -o size="$1" tmpfs "$2" && exec "$3" "$4" "$5" "$2"'
    completed = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command, "sh",
         size, str(directory), sys.executable, script, role],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def fill_file_system(directory: str | Path) -> Path:
    """Fill the file system of ``directory`` up with a ballast file; unlink it to free the space."""
    ballast = Path(directory) / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return ballast


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """Within the block, the kernel refuses writes past ``limit_bytes`` of a file (EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
