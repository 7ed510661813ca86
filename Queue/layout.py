"""The files of a queue directory and the small helpers both roles share.

A queue directory holds::

    00000000000000000001.seg   segment files, append-only, named by a lower bound of their seqs
    00000000000000004097.seg   (the newest one is the writer's tail; older ones are sealed)
    acked                      JSON {"acked_seq": N}: everything <= N has been acked
    writer.lock / reader.lock  flock()ed by the live writer / reader; hold the owner's pid

A segment's name is strictly greater than every seq stored in any older segment, so "the next
segment's name - 1" bounds the seqs of a segment without reading it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from Durable.files import acquire_pid_lock, fsync_directory, write_all
from Queue.errors import QueueLockedError
from Queue.record_format import ParseResult, RawRecord, Stop, parse_records

logger = logging.getLogger(__name__)

ACKED_FILE = "acked"
WRITER_LOCK_FILE = "writer.lock"
READER_LOCK_FILE = "reader.lock"
READ_CHUNK_BYTES = 1024 * 1024

_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")


class Segment(NamedTuple):
    """A segment file and the lower bound of the seqs it holds."""

    first_seq: int
    path: Path


def segment_path(directory: Path, first_seq: int) -> Path:
    """Path of the segment whose records start at ``first_seq`` or later."""
    return directory / f"{first_seq:020d}.seg"


def list_segments(directory: Path) -> list[Segment]:
    """Segments of ``directory``, oldest first; a snapshot that may be stale at once."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _SEGMENT_NAME.match(entry.name)
            if match:
                found.append(Segment(int(match.group(1)), Path(entry.path)))
    found.sort()
    return found


def segment_holding(segments: list[Segment], seq: int) -> int:
    """Index of the segment in which ``seq`` (or the first seq after it) would be; -1 if none."""
    chosen = 0 if segments else -1
    for index, segment in enumerate(segments):
        if segment.first_seq <= seq:
            chosen = index
    return chosen


def next_segment_after(directory: Path, first_seq: int | None) -> Segment | None:
    """The oldest segment newer than ``first_seq`` (any segment when ``None``), or ``None``."""
    for segment in list_segments(directory):
        if first_seq is None or segment.first_seq > first_seq:
            return segment
    return None


def segments_size(directory: Path) -> int:
    """Total bytes of the segment files now on disk; tolerates concurrent deletion."""
    total = 0
    for segment in list_segments(directory):
        try:
            total += segment.path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def delete_acked_segments(directory: Path, acked_seq: int) -> int:
    """Unlink sealed segments whose every record is <= ``acked_seq``; returns bytes freed.

    Never deletes the newest segment (the writer's tail), so the writer and the reader may
    both call this at any time; losing a race to unlink is harmless.
    """
    segments = list_segments(directory)
    freed = 0
    for segment, newer in zip(segments, segments[1:]):
        if newer.first_seq - 1 > acked_seq:
            break
        try:
            size = segment.path.stat().st_size
            segment.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            # The ack itself is saved; the space comes back on a later call.
            logger.warning("could not delete acked segment %s: %s", segment.path, exc)
            continue
        freed += size
        logger.debug("reclaimed %s (%d bytes)", segment.path.name, size)
    return freed


def read_records(
    fd: int, offset: int, max_items: int | None = None, chunk_bytes: int = READ_CHUNK_BYTES
) -> ParseResult:
    """Parse whole records of an open segment from ``offset``; record ends are file offsets.

    ``stop`` is END or INCOMPLETE only when the file's current end was reached.
    """
    records: list[RawRecord] = []
    want = chunk_bytes
    while True:
        data = os.pread(fd, want, offset)
        remaining = None if max_items is None else max_items - len(records)
        result = parse_records(data, 0, remaining)
        records.extend(record._replace(end=offset + record.end) for record in result.records)
        offset += result.position
        if result.stop in (Stop.LIMIT, Stop.INVALID) or len(data) < want:
            return ParseResult(records, offset, result.stop, result.needed)
        want = max(chunk_bytes, result.needed)


class SegmentScan:
    """Iterates the whole records of an open segment from ``offset`` with bounded memory.

    After iteration, ``end`` is the offset just past the last whole record and ``stop`` says
    why the scan ended (END: clean end of file; INCOMPLETE / INVALID: bytes after ``end``).
    """

    _BATCH = 4096

    def __init__(self, fd: int, offset: int = 0) -> None:
        self.fd = fd
        self.end = offset
        self.stop = Stop.END

    def __iter__(self) -> Iterator[RawRecord]:
        while True:
            result = read_records(self.fd, self.end, self._BATCH)
            yield from result.records
            self.end = result.position
            self.stop = result.stop
            if result.stop is not Stop.LIMIT:
                return


def read_acked(directory: Path) -> int:
    """The persisted cumulative ack position (0 if nothing was ever acked); never blocks."""
    try:
        text = (directory / ACKED_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    try:
        return int(json.loads(text)["acked_seq"])
    except (ValueError, KeyError, TypeError):
        # Only a hand-edited file gets here (it is replaced atomically); starting from 0 means
        # redelivery, the safe direction for an at-least-once queue.
        logger.error("unreadable %s in %s; treating every record as un-acked", ACKED_FILE, directory)
        return 0


def write_acked(directory: Path, acked_seq: int) -> None:
    """Persist ``acked_seq`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    temporary = directory / (ACKED_FILE + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, json.dumps({"acked_seq": acked_seq}).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, directory / ACKED_FILE)
    fsync_directory(directory)


def acquire_role_lock(directory: Path, lock_name: str, role: str) -> int:
    """Take the exclusive, non-blocking flock of one role; returns its fd, to close on release.

    The kernel drops the lock when the holder dies, so a SIGKILLed process never blocks the
    next one. Raises QueueLockedError naming the holder's pid when another process holds it.
    """
    path = directory / lock_name
    return acquire_pid_lock(
        path,
        lambda holder: QueueLockedError(
            f"queue {directory} already has a {role} (pid {holder} holds {path})"
        ),
    )
