"""Small file-system helpers for durable appends: full writes, directory fsync, a pid lock file."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` (os.write may write less than asked) or raise OSError."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make file creations, renames and deletions in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def acquire_pid_lock(path: Path, locked_error: Callable[[str], Exception]) -> int:
    """Take the exclusive, non-blocking flock at ``path``; returns its fd, to close on release.

    The file then holds this process's pid. The kernel drops the lock when the holder dies, so
    a SIGKILLed holder never blocks the next one. When another process holds it, raises
    ``locked_error(holder)``, ``holder`` being the pid read from the file (or "unknown"), so
    each caller keeps its own error type and message.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise locked_error(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
