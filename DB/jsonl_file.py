"""One append-only JSON-lines file with an in-memory index on a key field.

The writer and the readers share this class. Only whole lines count: a line is whole once its
newline is on disk, so a torn last line (a crash mid-write, or a write still in progress seen
by a reader) is never indexed. The index keeps the first row of each key; later rows with the
same key can only exist if someone else wrote the file, and are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from DB.errors import DBRowError, DBWriteError
from Durable.files import write_all

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 4 * 1024 * 1024
_FINGERPRINT_BYTES = 64

Key = str


class PreparedRow(NamedTuple):
    """A validated row, its index key and its serialised line (newline included)."""

    key: Key
    line: bytes
    row: dict[str, Any]


def normalise_key(value: object) -> Key:
    """Index form of a key value: ints and strings, so 7 and "7" name the same row."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"a key must be a string or an integer, not {type(value).__name__}")
    return str(value)


class JsonlFile:
    """Index of one JSON-lines file; callers pass the open fd (the file may not exist yet).

    Not thread-safe on its own: the owning store serialises calls.
    """

    def __init__(self, path: Path, key_field: str, count_field: str | None = None) -> None:
        self.path = path
        self.key_field = key_field
        self.count_field = count_field
        self.counts: Counter[Any] = Counter()
        self.end = 0  # offset just past the last whole line indexed
        self._entries: list[tuple[int, int]] = []  # (offset, length) of each indexed row
        self._index: dict[Key, int] = {}
        self._fingerprint = b""
        self._broken = False

    # ------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._index

    def refresh(self, fd: int) -> None:
        """Index whole lines appended since the last call; rebuild if the file was rewritten."""
        size = os.fstat(fd).st_size
        if not self._still_continuous(fd, size):
            # A writer rolled back a failed batch that this reader had already indexed.
            self._reset()
        if size > self.end:
            self._index_range(fd, size)

    def get(self, fd: int, key: Key) -> dict[str, Any] | None:
        """The row stored under ``key``, or None."""
        position = self._index.get(key)
        if position is None:
            return None
        offset, length = self._entries[position]
        return json.loads(os.pread(fd, length, offset))

    def last(self, fd: int, count: int) -> list[dict[str, Any]]:
        """The ``count`` most recently written rows, oldest first, read with one pread."""
        if count <= 0 or not self._entries:
            return []
        return self._rows(fd, self._entries[-count:])

    def all(self, fd: int) -> list[dict[str, Any]]:
        """Every indexed row in write order."""
        return self._rows(fd, self._entries)

    def _rows(self, fd: int, entries: list[tuple[int, int]]) -> list[dict[str, Any]]:
        base = entries[0][0]
        last_offset, last_length = entries[-1]
        data = os.pread(fd, last_offset + last_length - base, base)
        return [json.loads(data[offset - base : offset - base + length]) for offset, length in entries]

    def _still_continuous(self, fd: int, size: int) -> bool:
        if self.end == 0:
            return True
        if size < self.end:
            return False
        start = self.end - len(self._fingerprint)
        return os.pread(fd, len(self._fingerprint), start) == self._fingerprint

    def _reset(self) -> None:
        logger.info("%s changed under the reader; re-indexing it", self.path)
        self.counts.clear()
        self.end = 0
        self._entries.clear()
        self._index.clear()
        self._fingerprint = b""

    def _index_range(self, fd: int, size: int) -> None:
        position = self.end
        chunk = _CHUNK_BYTES
        while position < size:
            data = os.pread(fd, min(chunk, size - position), position)
            whole = data.rfind(b"\n") + 1
            if whole == 0:
                if position + len(data) >= size:
                    break  # only a torn (or still being written) last line remains
                chunk *= 2  # one line longer than the chunk: read more at once
                continue
            self._index_lines(data[:whole], position)
            position += whole
        self.end = position
        self._remember_fingerprint(fd)

    def _index_lines(self, data: bytes, base: int) -> None:
        offset = base
        for line in data.split(b"\n")[:-1]:  # data ends with a newline; only it separates rows
            self._index_line(line, offset, len(line) + 1)
            offset += len(line) + 1

    def _index_line(self, line: bytes, offset: int, length: int) -> None:
        try:
            row = json.loads(line)
            key = normalise_key(row[self.key_field])
        except (ValueError, KeyError, TypeError) as exc:
            # Not written by this package (it writes whole JSON lines only); keep the rest usable.
            logger.warning("skipping unreadable line at offset %d of %s: %s", offset, self.path, exc)
            return
        if key not in self._index:
            self._register(key, offset, length, row)

    def _register(self, key: Key, offset: int, length: int, row: Mapping[str, Any]) -> None:
        self._index[key] = len(self._entries)
        self._entries.append((offset, length))
        if self.count_field is not None:
            self.counts[_hashable(row.get(self.count_field))] += 1

    def _remember_fingerprint(self, fd: int) -> None:
        length = min(_FINGERPRINT_BYTES, self.end)
        self._fingerprint = os.pread(fd, length, self.end - length) if length else b""

    # ------------------------------------------------------------------------------- writing

    def prepare(self, rows: Iterable[Mapping[str, Any]]) -> tuple[list[PreparedRow], int]:
        """Validate and serialise ``rows``, dropping keys already stored or seen earlier in the
        batch; returns the new rows and the number of duplicates. Raises DBRowError."""
        fresh: list[PreparedRow] = []
        seen: set[Key] = set()
        total = 0
        for index, row in enumerate(rows):
            total += 1
            prepared = self._prepare_row(row, index)
            if prepared.key in self._index or prepared.key in seen:
                continue
            seen.add(prepared.key)
            fresh.append(prepared)
        return fresh, total - len(fresh)

    def _prepare_row(self, row: Mapping[str, Any], index: int) -> PreparedRow:
        if not isinstance(row, Mapping):
            raise DBRowError(f"row {index} is a {type(row).__name__}, not a dict", field=None, index=index)
        for field in (self.key_field, self.count_field):
            if field is not None and field not in row:
                raise DBRowError(f"row {index} has no {field!r} field", field=field, index=index)
        try:
            key = normalise_key(row[self.key_field])
        except TypeError as exc:
            message = f"row {index}: {self.key_field!r}: {exc}"
            raise DBRowError(message, field=self.key_field, index=index) from exc
        if self.count_field is not None and isinstance(row[self.count_field], (dict, list)):
            raise DBRowError(
                f"row {index}: {self.count_field!r} must be a scalar", field=self.count_field, index=index
            )
        try:
            text = json.dumps(row, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DBRowError(f"row {index} is not JSON-serialisable: {exc}", field=None, index=index) from exc
        return PreparedRow(key, text.encode("utf-8") + b"\n", dict(row))

    def append(self, fd: int, rows: list[PreparedRow]) -> None:
        """Append ``rows`` with one write and one fdatasync, then index them.

        The caller holds the writer lock, so ``end`` is the file's size. On OSError the file is
        cut back to its size before the batch and DBWriteError is raised.
        """
        if self._broken:
            raise DBWriteError(
                f"{self.path} could not be rolled back after a failed write; close the store "
                "and open it again, which drops the torn line"
            )
        data = b"".join(prepared.line for prepared in rows)
        start = self.end
        try:
            write_all(fd, data)
            os.fdatasync(fd)
        except OSError as exc:
            self._roll_back(fd, start)
            raise DBWriteError(
                f"writing {len(rows)} rows ({len(data)} bytes) to {self.path} failed and was "
                f"rolled back: {exc.strerror or exc}",
                errno=exc.errno,
            ) from exc
        offset = start
        for prepared in rows:
            self._register(prepared.key, offset, len(prepared.line), prepared.row)
            offset += len(prepared.line)
        self.end = offset
        self._remember_fingerprint(fd)

    def _roll_back(self, fd: int, start: int) -> None:
        try:
            os.ftruncate(fd, start)
            os.fdatasync(fd)
        except OSError as exc:
            # Appending after a torn line would merge it with the next row; a reopen drops it.
            # Whole lines left are rows not reported written, which the caller retries: the
            # key index makes that harmless.
            self._broken = True
            logger.error("could not roll back %s to %d bytes: %s", self.path, start, exc)

    def truncate_torn_tail(self, fd: int) -> None:
        """Writer only: cut a last line that has no newline (a crash mid-write), durably."""
        size = os.fstat(fd).st_size
        whole = _end_of_last_line(fd, size)
        if whole == size:
            return
        logger.warning("dropping a torn last line of %d bytes from %s", size - whole, self.path)
        os.ftruncate(fd, whole)
        os.fsync(fd)


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just past the last newline in the file (0 if there is none)."""
    position = size
    while position > 0:
        start = max(0, position - _CHUNK_BYTES)
        data = os.pread(fd, position - start, start)
        newline = data.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else json.dumps(value)
