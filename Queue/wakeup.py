"""Commit notifications from the writer to the reader over a Linux abstract datagram socket.

Why a socket and not inotify: it needs nothing outside the standard library, a "poke" is one
``sendto`` per group commit, and abstract-namespace addresses vanish with their process, so a
SIGKILLed reader leaves nothing to clean up. The address is derived from the queue directory
(device, inode and real path), so both processes find it without any file.

Notifications are hints, never the source of truth: the reader always re-reads the segment
files, and its waits are bounded so that a lost poke costs latency, never progress.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import socket
from pathlib import Path

logger = logging.getLogger(__name__)

_POKE = b"!"


def wakeup_address(directory: Path) -> bytes:
    """Abstract socket address of the reader of the queue in ``directory``."""
    status = os.stat(directory)
    digest = hashlib.sha1(os.path.realpath(directory).encode()).hexdigest()[:16]
    return f"\0file-queue/{status.st_dev:x}/{status.st_ino:x}/{digest}".encode()


class WakeupSender:
    """Writer side: ``notify()`` never blocks and never fails (no reader is a normal case)."""

    def __init__(self, directory: Path) -> None:
        self._address = wakeup_address(directory)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def notify(self) -> None:
        """Poke the reader if one is listening; drops the poke when its inbox is already full."""
        try:
            self._socket.sendto(_POKE, self._address)
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError):
            pass  # no reader, or it already has pokes waiting: it will re-read the files anyway
        except OSError as exc:
            logger.debug("could not notify the reader: %s", exc)

    def close(self) -> None:
        """Release the socket; idempotent."""
        self._socket.close()


class WakeupListener:
    """Reader side: receives pokes; falls back to timed polling if the address is taken."""

    def __init__(self, directory: Path) -> None:
        self._address = wakeup_address(directory)
        self._socket: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        try:
            self._socket.bind(self._address)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # Only a reader of a deleted directory whose inode was reused can hold it.
            logger.warning("wake-up address of %s is in use; reader will poll", directory)
            self._socket.close()
            self._socket = None

    def drain(self) -> None:
        """Discard pending pokes; call before re-reading the files so no poke is missed."""
        if self._socket is None:
            return
        while True:
            try:
                self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                return

    def wait(self, timeout: float) -> bool:
        """Block until a poke arrives or ``timeout`` seconds pass; True if poked."""
        if self._socket is None:
            select.select([], [], [], timeout)  # no socket: the bounded wait is the poll interval
            return False
        readable, _, _ = select.select([self._socket], [], [], timeout)
        return bool(readable)

    def poke_self(self) -> None:
        """Wake a thread blocked in ``wait()`` (used by close())."""
        if self._socket is None:
            return
        try:
            self._socket.sendto(_POKE, self._address)
        except OSError:
            pass

    def close(self) -> None:
        """Unbind; idempotent."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
