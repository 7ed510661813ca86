"""Read-only look at a queue directory: depth, age of the oldest record, bytes on disk.

Takes no lock, so it runs while the writer and the reader work; it sees a consistent-enough
snapshot (the ack file is replaced atomically; a segment reclaimed mid-look makes it retry).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from Queue.errors import QueueNotFoundError
from Queue.layout import Segment, SegmentScan, list_segments, read_acked, segment_holding
from Queue.record_format import RawRecord

_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """Snapshot of a queue.

    ``depth`` is ``appended_seq - acked_seq``: records waiting for an ack, plus any seqs
    burnt by failed appends. ``oldest_age_seconds`` is ``None`` when nothing is waiting.
    """

    depth: int
    oldest_age_seconds: float | None
    bytes_on_disk: int
    appended_seq: int
    acked_seq: int
    segments: int

    def as_dict(self) -> dict[str, object]:
        """Plain dict for JSON output."""
        return asdict(self)


def queue_status(directory: str | os.PathLike[str]) -> QueueStatus:
    """Snapshot the queue in ``directory``; never blocks on the writer or reader.

    Raises ``QueueNotFoundError`` if the directory does not exist.
    """
    path = Path(directory)
    if not path.is_dir():
        raise QueueNotFoundError(f"no queue directory at {path}")
    for _ in range(_ATTEMPTS):
        try:
            return _snapshot(path)
        except FileNotFoundError:
            continue  # the reader reclaimed a segment while we looked at it: look again
    return _snapshot(path)


def _snapshot(directory: Path) -> QueueStatus:
    acked_seq = read_acked(directory)
    segments = list_segments(directory)
    sizes = [segment.path.stat().st_size for segment in segments]
    appended_seq = max(acked_seq, _last_seq(segments))
    oldest = _oldest_unacked_time(segments, acked_seq) if appended_seq > acked_seq else None
    return QueueStatus(
        depth=appended_seq - acked_seq,
        oldest_age_seconds=None if oldest is None else max(time.time() - oldest, 0.0),
        bytes_on_disk=sum(sizes),
        appended_seq=appended_seq,
        acked_seq=acked_seq,
        segments=len(segments),
    )


def _last_seq(segments: list[Segment]) -> int:
    """Seq of the newest whole record (0 if there is none)."""
    for segment in reversed(segments):
        last = 0
        for record in _scan(segment):
            last = record.seq
        if last:
            return last
    return 0


def _oldest_unacked_time(segments: list[Segment], acked_seq: int) -> float | None:
    """Append time (epoch seconds) of the first record after ``acked_seq``."""
    start = segment_holding(segments, acked_seq + 1)
    for segment in segments[max(start, 0) :]:
        for record in _scan(segment):
            if record.seq > acked_seq:
                return record.appended_at_ns / 1e9
    return None


def _scan(segment: Segment) -> Iterator[RawRecord]:
    """Whole records of ``segment``; reads through one fd, so a concurrent unlink is harmless."""
    fd = os.open(segment.path, os.O_RDONLY)
    try:
        yield from SegmentScan(fd)
    finally:
        os.close(fd)
