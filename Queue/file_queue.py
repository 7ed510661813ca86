"""File-backed FIFO of byte records between one writer process and one reader process.

Spec sheet
----------
Roles
    ``FileQueueWriter`` appends, ``FileQueueReader`` reads and acks. Each role takes an exclusive
    ``flock`` on its own lock file in the queue directory, so there is at most one writer and
    one reader per queue; a second one gets ``QueueLockedError``. Both may run concurrently,
    and ``queue_status()`` may read the directory at any time without a lock.
Durability
    ``append_many()`` returns only after its whole batch is written and ``fdatasync``ed (one
    sync per batch: group commit). A record whose append returned survives SIGKILL of either
    process, and a power loss as far as the disk honours fsync.
Delivery
    At-least-once, FIFO by sequence number. ``read()`` hands out records after an in-memory
    cursor; ``ack(seq)`` is cumulative and persisted atomically before it returns. Records not
    acked are delivered again after ``rewind()`` or when a reader reopens the queue. The reader
    may see a whole record while the writer's fsync is still running: a record is never lost
    that way (a crash of the writer keeps it in the page cache, and a power loss after the
    reader has published it only loses a copy that is already downstream).
Crash consistency
    A record is framed with a header CRC and a payload CRC (see ``record_format``). The reader
    never returns a torn record: an incomplete tail means "not written yet". On open the writer
    truncates a torn tail left by a crash. A segment cut short or corrupted by something else
    loses the records from the damage to its end, logged as an error; every other record is
    delivered whole and in order.
Space
    Segments roll over at ``segment_bytes``; a sealed segment is deleted as soon as all its
    records are acked. ``max_bytes`` bounds the total size of the segment files: an append that
    would pass it raises ``QueueFullError``. A kernel write error (ENOSPC, EDQUOT, EFBIG, EIO)
    raises ``QueueWriteError``. Either way the batch is rolled back (file truncated to its
    length before the batch) and the next append works once space is back.
Sequence numbers
    Strictly increasing, starting at 1. Gaps are possible: a batch whose write failed may have
    been seen by the reader before the rollback, so its numbers are never reused (reuse could
    make a later ack cover records that were never delivered); the writer moves on to a fresh
    segment after a failed write for the same reason. Depth figures count such gaps.
Wake-up
    The writer pokes the reader after each commit through an abstract unix datagram socket
    (``wakeup``); the reader's blocking ``read()`` waits on it, and re-checks the files at least
    every ``FALLBACK_POLL_SECONDS`` in case a poke was dropped.
Limits
    Linux only (flock, abstract sockets). One payload is at most ``MAX_PAYLOAD_BYTES``. The
    directory must be on a local filesystem (flock and rename semantics).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from Queue.errors import (
    QueueAckError,
    QueueClosedError,
    QueueFullError,
    QueueRecordTooLargeError,
    QueueWriteError,
)
from Queue.layout import (
    READER_LOCK_FILE,
    WRITER_LOCK_FILE,
    Segment,
    SegmentScan,
    acquire_role_lock,
    delete_acked_segments,
    fsync_directory,
    list_segments,
    next_segment_after,
    read_acked,
    read_records,
    segment_holding,
    segment_path,
    segments_size,
    write_acked,
    write_all,
)
from Queue.record_format import HEADER_SIZE, MAX_PAYLOAD_BYTES, Stop, encode_batch
from Queue.wakeup import WakeupListener, WakeupSender

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
FALLBACK_POLL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One delivered record: its sequence number, payload, and append time (epoch seconds)."""

    seq: int
    payload: bytes
    appended_at: float


class FileQueueWriter:
    """The single appending side of a queue directory (created if missing).

    Thread-safe: concurrent ``append_many`` calls are serialised. Raises ``QueueLockedError``
    if another writer holds the queue.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_bytes: int | None = None,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._broken = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_role_lock(self.directory, WRITER_LOCK_FILE, "writer")
        try:
            self._open_tail()
            self._bytes_estimate = segments_size(self.directory)
            self._wakeup = WakeupSender(self.directory)
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ----------------------------------------------------------------------------- public API

    @property
    def appended_seq(self) -> int:
        """Sequence number of the last record appended (0 if none yet); never blocks."""
        return self._next_seq - 1

    def append(self, payload: bytes) -> int:
        """Append one record durably and return its seq; see ``append_many``."""
        return self.append_many([payload])

    def append_many(self, payloads: Sequence[bytes]) -> int:
        """Append ``payloads`` as one durable group commit and return the last seq.

        Blocks for one write and one fdatasync. On return every record is on disk; on any
        exception none of them is (``QueueFullError``, ``QueueWriteError``,
        ``QueueRecordTooLargeError``). An empty batch writes nothing and returns
        ``appended_seq``. Thread-safe; raises ``QueueClosedError`` after close().
        """
        batch = [_as_bytes(payload) for payload in payloads]
        with self._lock:
            self._check_open()
            return self._append_locked(batch)

    def append_fitting(self, payloads: Sequence[bytes]) -> int:
        """Append the longest prefix of ``payloads`` that fits under ``max_bytes``; return its length.

        One durable group commit like ``append_many``. Raises ``QueueFullError`` when not even
        the first record fits, so a batch larger than the whole cap still drains record by
        record as the reader frees space instead of being refused forever. Without
        ``max_bytes`` it is ``append_many`` returning ``len(payloads)``.
        """
        batch = [_as_bytes(payload) for payload in payloads]
        with self._lock:
            self._check_open()
            if self.max_bytes is not None and batch:
                sizes = [HEADER_SIZE + len(payload) for payload in batch]
                room = self.max_bytes - self._bytes_estimate
                if sum(sizes) > room:  # the estimate ignores what the reader reclaimed since
                    self._reclaim_space()
                    room = self.max_bytes - self._bytes_estimate
                fitting = 0
                for size in sizes:
                    room -= size
                    if room < 0:
                        break
                    fitting += 1
                batch = batch[: max(1, fitting)]  # none fits: _ensure_room raises QueueFullError
            self._append_locked(batch)
            return len(batch)

    def close(self) -> None:
        """Release the files and the writer lock; idempotent. Appends after it raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wakeup.close()
            os.close(self._fd)
            os.close(self._lock_fd)

    def __enter__(self) -> FileQueueWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- opening

    def _append_locked(self, batch: list[bytes]) -> int:
        if not batch:
            return self._next_seq - 1
        self._check_payload_sizes(batch)
        first_seq = self._next_seq
        frames = encode_batch(first_seq, time.time_ns(), batch)
        self._ensure_room(len(frames))
        if self._needs_rollover(len(frames)):
            self._roll_over()
        self._write_batch(frames, len(batch))
        self._next_seq = first_seq + len(batch)
        self._wakeup.notify()
        return self._next_seq - 1

    def _open_tail(self) -> None:
        """Open (or create) the newest segment, truncating a torn tail left by a crash."""
        acked_seq = read_acked(self.directory)
        segments = list_segments(self.directory)
        if not segments:
            self._create_segment(max(acked_seq + 1, 1))
            return
        tail = segments[-1]
        self._segment = tail
        self._fd = os.open(tail.path, os.O_RDWR | os.O_APPEND)
        last_seq, valid_end = self._scan_tail()
        self._truncate_torn_tail(valid_end)
        self._segment_size = valid_end
        # acked_seq + 1 guards against reusing numbers the reader already acked, which could
        # happen if a power loss dropped unsynced records the reader had seen.
        self._next_seq = max(tail.first_seq, last_seq + 1, acked_seq + 1)
        self._must_roll = False

    def _scan_tail(self) -> tuple[int, int]:
        """Last whole record's seq (0 if none) and the offset just past it."""
        scan = SegmentScan(self._fd)
        last_seq = 0
        for record in scan:
            last_seq = record.seq
        return last_seq, scan.end

    def _truncate_torn_tail(self, valid_end: int) -> None:
        size = os.fstat(self._fd).st_size
        if size == valid_end:
            return
        logger.warning(
            "truncating %d torn bytes at the end of %s (a crash interrupted an append)",
            size - valid_end,
            self._segment.path,
        )
        os.ftruncate(self._fd, valid_end)
        os.fsync(self._fd)

    def _create_segment(self, first_seq: int) -> None:
        """Start a new, empty tail segment named ``first_seq`` and make its name durable."""
        path = segment_path(self.directory, first_seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
        try:
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._segment = Segment(first_seq, path)
        self._fd = fd
        self._segment_size = 0
        self._next_seq = first_seq
        self._must_roll = False

    # ------------------------------------------------------------------------------ appending

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosedError(f"writer of {self.directory} is closed")
        if self._broken:
            raise QueueWriteError(
                f"writer of {self.directory} could not roll back a failed write; "
                "close it and open a new one, which repairs the tail"
            )

    @staticmethod
    def _check_payload_sizes(batch: list[bytes]) -> None:
        for payload in batch:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise QueueRecordTooLargeError(
                    f"payload of {len(payload)} bytes is over the limit of {MAX_PAYLOAD_BYTES}",
                    size=len(payload),
                    limit=MAX_PAYLOAD_BYTES,
                )

    def _ensure_room(self, batch_bytes: int) -> None:
        """Raise QueueFullError unless ``batch_bytes`` more fit under ``max_bytes``."""
        if self.max_bytes is None or self._bytes_estimate + batch_bytes <= self.max_bytes:
            return
        # The estimate ignores what the reader reclaimed since; look at the disk before refusing.
        self._reclaim_space()
        if self._bytes_estimate + batch_bytes > self.max_bytes:
            raise QueueFullError(
                f"queue {self.directory} holds {self._bytes_estimate} bytes; a batch of "
                f"{batch_bytes} bytes would pass max_bytes={self.max_bytes}",
                needed_bytes=batch_bytes,
                max_bytes=self.max_bytes,
            )

    def _reclaim_space(self) -> None:
        """Delete fully acked segments, the tail too (by rolling over), and re-measure."""
        acked_seq = read_acked(self.directory)
        tail_fully_acked = acked_seq >= self._next_seq - 1 and self._segment_size > 0
        if tail_fully_acked:
            try:
                self._roll_over()
            except QueueWriteError:
                pass  # keep the old tail; the size check below reports the queue full
        delete_acked_segments(self.directory, acked_seq)
        self._bytes_estimate = segments_size(self.directory)

    def _needs_rollover(self, batch_bytes: int) -> bool:
        if self._must_roll:
            return True
        return self._segment_size > 0 and self._segment_size + batch_bytes > self.segment_bytes

    def _roll_over(self) -> None:
        """Seal the tail (already synced) and continue in a new segment."""
        old_fd = self._fd
        try:
            self._create_segment(self._next_seq)
        except OSError as exc:
            raise QueueWriteError(
                f"cannot create a new segment in {self.directory}: {exc.strerror}",
                errno=exc.errno,
            ) from exc
        os.close(old_fd)

    def _write_batch(self, frames: bytes, count: int) -> None:
        """Write and sync ``frames`` at the tail, or roll back and raise QueueWriteError."""
        start = self._segment_size
        try:
            write_all(self._fd, frames)
            os.fdatasync(self._fd)
        except OSError as exc:
            self._roll_back(start, count)
            raise QueueWriteError(
                f"append of {count} records ({len(frames)} bytes) to {self._segment.path} "
                f"failed and was rolled back: {exc.strerror or exc}",
                errno=exc.errno,
            ) from exc
        self._segment_size = start + len(frames)
        self._bytes_estimate += len(frames)

    def _roll_back(self, start: int, count: int) -> None:
        """Cut the segment back to ``start`` and burn the batch's seqs (the reader may have
        seen them), then continue in a fresh segment so no offset is ever rewritten."""
        self._next_seq += count
        self._must_roll = True
        try:
            os.ftruncate(self._fd, start)
            os.fdatasync(self._fd)
        except OSError as exc:
            # Appending after a torn batch would bury it mid-file; only a reopen can repair it.
            # Whole records that stay are found then: a duplicate, not a loss.
            self._broken = True
            logger.error("could not roll back %s to %d bytes: %s", self._segment.path, start, exc)


def _as_bytes(payload: object) -> bytes:
    # bytes(5) would silently make five zero bytes: accept only real byte buffers.
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"a queue payload must be bytes, not {type(payload).__name__}")
    return bytes(payload)


class FileQueueReader:
    """The single consuming side of a queue directory (created if missing).

    Starts at the first record after the persisted ack position. Thread-safe: ``ack()`` may be
    called from another thread (e.g. a broker's delivery callback) while ``read()`` blocks.
    Raises ``QueueLockedError`` if another reader holds the queue.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._read_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._closed = False
        self._fd: int | None = None
        self._segment_seq: int | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_role_lock(self.directory, READER_LOCK_FILE, "reader")
        try:
            # Listen before the first look at the files, so no commit can slip in between.
            self._wakeup = WakeupListener(self.directory)
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._acked_seq = read_acked(self.directory)
            self._delivered_seq = self._acked_seq
            self._position_at_acked()
        except BaseException:
            self._wakeup.close()
            os.close(self._lock_fd)
            raise

    # ----------------------------------------------------------------------------- public API

    @property
    def acked_seq(self) -> int:
        """The persisted cumulative ack position; never blocks."""
        return self._acked_seq

    def read(self, max_items: int = 1000, timeout: float | None = 0.0) -> list[QueueItem]:
        """Return up to ``max_items`` committed records after the cursor, in seq order.

        Blocks up to ``timeout`` seconds (``None``: until something arrives; 0: never) and
        returns ``[]`` if nothing came. Never returns a torn record. Raises
        ``QueueClosedError`` after close(), also in a read blocked when close() is called.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._read_lock:
            while True:
                self._check_open()
                self._wakeup.drain()
                items = self._poll(max_items)
                if items:
                    return items
                remaining = FALLBACK_POLL_SECONDS
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                self._wakeup.wait(min(remaining, FALLBACK_POLL_SECONDS))

    def ack(self, up_to_seq: int) -> None:
        """Mark every record with seq <= ``up_to_seq`` as done, durably, and free their space.

        Blocks for two fsyncs. Cumulative and idempotent (acking an old seq is a no-op). Raises
        ``QueueAckError`` for a seq beyond the last one delivered, ``QueueWriteError`` if the
        ack could not be saved (nothing changes: the records will come again),
        ``QueueClosedError`` after close(). Thread-safe.
        """
        with self._ack_lock:
            self._check_open()
            if up_to_seq > self._delivered_seq:
                raise QueueAckError(
                    f"cannot ack seq {up_to_seq}: the last seq delivered is {self._delivered_seq}"
                )
            if up_to_seq <= self._acked_seq:
                return
            try:
                write_acked(self.directory, up_to_seq)
            except OSError as exc:
                raise QueueWriteError(
                    f"could not save ack {up_to_seq} in {self.directory}: {exc.strerror or exc}",
                    errno=exc.errno,
                ) from exc
            self._acked_seq = up_to_seq
            delete_acked_segments(self.directory, up_to_seq)

    def rewind(self) -> None:
        """Move the cursor back to the persisted ack position: un-acked records come again.

        Thread-safe; waits for a read() in progress. Raises ``QueueClosedError`` after close().
        """
        with self._read_lock:
            self._check_open()
            self._position_at_acked()

    def close(self) -> None:
        """Release the files, the socket and the reader lock; idempotent.

        Wakes a read() blocked in another thread (it raises QueueClosedError) and waits for it.
        """
        with self._ack_lock:
            if self._closed:
                return
            self._closed = True
        self._wakeup.poke_self()
        with self._read_lock:
            self._wakeup.close()
            self._close_segment()
            os.close(self._lock_fd)

    def __enter__(self) -> FileQueueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- cursor

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosedError(f"reader of {self.directory} is closed")

    def _position_at_acked(self) -> None:
        """Point the cursor at the segment holding the first un-acked record."""
        self._skip_through = self._acked_seq
        segments = list_segments(self.directory)
        index = segment_holding(segments, self._acked_seq + 1)
        self._close_segment()
        if index >= 0:
            self._open_segment(segments[index])

    def _open_segment(self, segment: Segment) -> bool:
        try:
            fd = os.open(segment.path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # reclaimed meanwhile: fully acked, so nothing in it is wanted
        self._close_segment()
        self._fd = fd
        self._segment_seq = segment.first_seq
        self._offset = 0
        return True

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _poll(self, max_items: int) -> list[QueueItem]:
        """Collect up to ``max_items`` whole records now on disk, crossing sealed segments."""
        items: list[QueueItem] = []
        while len(items) < max_items:
            if self._fd is not None:
                stop = self._read_segment(items, max_items)
                if stop is Stop.LIMIT:
                    break
            if not self._advance_if_sealed(items, max_items):
                break
        return items

    def _read_segment(self, items: list[QueueItem], max_items: int) -> Stop:
        """Append records from the current segment to ``items``; returns why it stopped."""
        assert self._fd is not None
        while True:
            result = read_records(self._fd, self._offset, max_items - len(items))
            for record in result.records:
                # After a rewind, records up to the ack position are skipped, not delivered.
                if record.seq > self._skip_through:
                    items.append(QueueItem(record.seq, record.payload, record.appended_at_ns / 1e9))
                    self._delivered_seq = max(self._delivered_seq, record.seq)
            self._offset = result.position
            if result.stop is not Stop.LIMIT or len(items) >= max_items:
                return result.stop

    def _advance_if_sealed(self, items: list[QueueItem], max_items: int) -> bool:
        """Move to the next segment if the current one is sealed; False if there is none.

        The writer finishes a segment before it creates the next one, so once a newer segment
        is seen, one more read of the current one gets all it will ever hold.
        """
        newer = next_segment_after(self.directory, self._segment_seq)
        if newer is None:
            return False
        if self._fd is not None:
            stop = self._read_segment(items, max_items)
            if stop is Stop.LIMIT:
                return True
            self._report_damaged_tail(stop)
        if not self._open_segment(newer):
            self._segment_seq = newer.first_seq  # skip the reclaimed one; look past it next
            self._close_segment()
        return True

    def _report_damaged_tail(self, stop: Stop) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if stop is Stop.END and size <= self._offset:
            return
        logger.error(
            "skipping %d damaged bytes at offset %d of sealed segment %020d.seg (%s record)",
            max(size - self._offset, 0),
            self._offset,
            self._segment_seq,
            stop.value,
        )
