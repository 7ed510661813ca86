"""File-backed, crash-safe FIFO of byte records between one writer and one reader process.

Public API::

    FileQueueWriter(directory, *, segment_bytes=16 MiB, max_bytes=None)
        .append(payload) -> seq            .append_many(payloads) -> last seq (one fsync)
        .append_fitting(payloads) -> how many of the first records fitted under max_bytes
    FileQueueReader(directory)
        .read(max_items=1000, timeout=0.0) -> list[QueueItem]
        .ack(up_to_seq)  .rewind()
    queue_status(directory) -> QueueStatus       (also: python -m Queue status DIR [--json])

The package knows bytes only. See ``Queue.file_queue`` for the full contract and
``Queue.errors`` for the error tree.
"""

from __future__ import annotations

from Queue.errors import (
    QueueAckError,
    QueueClosedError,
    QueueError,
    QueueFullError,
    QueueLockedError,
    QueueNotFoundError,
    QueueRecordTooLargeError,
    QueueWriteError,
)
from Queue.file_queue import FileQueueReader, FileQueueWriter, QueueItem
from Queue.record_format import MAX_PAYLOAD_BYTES
from Queue.status import QueueStatus, queue_status

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "FileQueueReader",
    "FileQueueWriter",
    "QueueAckError",
    "QueueClosedError",
    "QueueError",
    "QueueFullError",
    "QueueItem",
    "QueueLockedError",
    "QueueNotFoundError",
    "QueueRecordTooLargeError",
    "QueueStatus",
    "QueueWriteError",
    "queue_status",
]
