"""Typed errors of the file queue, in one flat module.

Tree (every error the package raises on purpose is a ``QueueError``)::

    QueueError                      base: catch this to handle any queue failure
    ├── QueueClosedError            a method was called after close()
    ├── QueueLockedError            another process holds the writer (or reader) lock
    ├── QueueNotFoundError          queue_status() of a directory that is not a queue
    ├── QueueAckError               ack() of a sequence number that was never delivered
    └── QueueWriteError             a write was refused: an append is rolled back (nothing of
        │                           the batch remains), an ack is not persisted (its records
        │                           will be delivered again)
        ├── QueueFullError          the configured ``max_bytes`` would be exceeded
        └── QueueRecordTooLargeError  one payload is over the format's size limit (not transient)

``QueueWriteError`` wraps the ``OSError`` the kernel raised (ENOSPC, EDQUOT, EFBIG, EIO …) as
``__cause__`` and keeps its ``errno``. A plain ``QueueWriteError`` and ``QueueFullError`` are
transient: the batch was rolled back, so the caller may keep its input un-acknowledged and retry
once space is back.
"""

from __future__ import annotations


class QueueError(Exception):
    """Base class of every error raised on purpose by ``Queue``."""


class QueueClosedError(QueueError):
    """The writer or reader was used after ``close()``."""


class QueueLockedError(QueueError):
    """Another live process already holds the writer (or reader) role of this queue."""


class QueueNotFoundError(QueueError):
    """The directory given to ``queue_status()`` does not exist."""


class QueueAckError(QueueError, ValueError):
    """``ack(seq)`` named a sequence number beyond the last one delivered by ``read()``."""


class QueueWriteError(QueueError):
    """A write was refused: an append rolled back (nothing of it is queued), or an ack not saved.

    ``errno`` is the OS error number when the kernel refused the write, else ``None``.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class QueueFullError(QueueWriteError):
    """The batch would take the queue over its ``max_bytes``; retry after the reader acks."""

    def __init__(self, message: str, *, needed_bytes: int, max_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.max_bytes = max_bytes


class QueueRecordTooLargeError(QueueWriteError):
    """One payload is larger than ``MAX_PAYLOAD_BYTES``; retrying will not help."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit
