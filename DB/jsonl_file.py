"""One append-only JSON-lines file with an in-memory index on a key field.

The writer and the readers share this class. Only whole lines count: a line is whole once its
newline is on disk, so a torn last line (a crash mid-write, or a write still in progress seen
by a reader) is never indexed. The index keeps the first row of each key; later rows with the
same key can only exist if someone else wrote the file, and are ignored.

Memory per row: its offset (8 bytes) and length (4) in arrays, plus a ``KeyIndex`` entry (about
12 bytes); keys themselves stay in the file and are read back to confirm a hash hit.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from DB.errors import DBRowError, DBWriteError
from DB.key_index import NOT_FOUND, Key, KeyHash, KeyIndex
from Durable.files import write_all

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 4 * 1024 * 1024
_FINGERPRINT_BYTES = 64
_MAX_LINE_BYTES = 2**32 - 1  # lengths are kept as uint32


class PreparedRow(NamedTuple):
    """A validated row, its index key and its serialised line (newline included)."""

    key: Key
    key_hash: int
    line: bytes
    row: dict[str, Any]
    index: int  # position in the batch given to ``prepare``


@dataclass(slots=True)
class _RowBatch:
    """Rows to index, as parallel lists (an object per row would cost more time)."""

    keys: list[Key] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    counted: list[Any] = field(default_factory=list)  # value of the count field

    def select(self, numbers: list[int]) -> _RowBatch:
        columns = (self.keys, self.offsets, self.lengths, self.counted)
        return _RowBatch(*([column[number] for number in numbers] for column in columns))


def normalise_key(value: object) -> Key:
    """Index form of a key value: ints and strings, so 7 and "7" name the same row."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"a key must be a string or an integer, not {type(value).__name__}")
    return str(value)


class JsonlFile:
    """Index of one JSON-lines file; callers pass the open fd (the file may not exist yet).

    Not thread-safe on its own: the owning store serialises calls. ``key_hash`` is for tests
    (see ``KeyIndex``).
    """

    def __init__(
        self, path: Path, key_field: str, count_field: str | None = None, key_hash: KeyHash | None = None
    ) -> None:
        self.path = path
        self.key_field = key_field
        self.count_field = count_field
        self.counts: Counter[Any] = Counter()
        self.end = 0  # offset just past the last whole line indexed
        self._offsets = array("q")  # of each indexed row, in write order (its position)
        self._lengths = array("I")
        self._keys = KeyIndex(key_hash)  # key → position
        self._fingerprint = b""
        self._broken = False

    # ------------------------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._offsets)

    def contains(self, fd: int, key: Key) -> bool:
        """Whether a row is stored under ``key`` (may read one row to confirm)."""
        return self._find(fd, [key], [self._keys.key_hash(key)])[0] != NOT_FOUND

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
        confirmed: dict[int, dict[str, Any]] = {}  # the row read to confirm a hash hit
        position = self._find(fd, [key], [self._keys.key_hash(key)], confirmed)[0]
        if position == NOT_FOUND:
            return None
        return confirmed[position] if position in confirmed else self._read_row(fd, position)

    def last(self, fd: int, count: int) -> list[dict[str, Any]]:
        """The ``count`` most recently written rows, oldest first, read with one pread."""
        if count <= 0:
            return []
        return self._rows(fd, max(0, len(self._offsets) - count), len(self._offsets))

    def all(self, fd: int) -> list[dict[str, Any]]:
        """Every indexed row in write order."""
        return self._rows(fd, 0, len(self._offsets))

    def _rows(self, fd: int, start: int, stop: int) -> list[dict[str, Any]]:
        if start >= stop:
            return []
        offsets, lengths = self._offsets, self._lengths
        base = offsets[start]
        data = os.pread(fd, offsets[stop - 1] + lengths[stop - 1] - base, base)
        return [
            json.loads(data[offsets[i] - base : offsets[i] - base + lengths[i]]) for i in range(start, stop)
        ]

    def _read_row(self, fd: int, position: int) -> dict[str, Any] | None:
        """The row at ``position``, or None if it no longer reads as one (a reader racing a
        writer's roll-back; the next refresh re-indexes)."""
        try:
            return json.loads(os.pread(fd, self._lengths[position], self._offsets[position]))
        except ValueError:
            return None

    def _key_of(self, row: Mapping[str, Any]) -> Key | None:
        try:
            return normalise_key(row[self.key_field])
        except (KeyError, TypeError):
            return None

    def _find(self, fd: int, keys: Sequence[Key], hashes: Sequence[int],
              confirmed: dict[int, dict[str, Any]] | None = None) -> list[int]:
        """Position of each key, or NOT_FOUND; a hash hit is confirmed by reading its row
        (kept in ``confirmed``, if given, by position)."""

        def key_at(position: int) -> Key | None:
            row = self._read_row(fd, position)
            if row is None:
                return None
            if confirmed is not None:
                confirmed[position] = row
            return self._key_of(row)

        return self._keys.find(keys, hashes, key_at)

    def _first_new(self, fd: int, keys: Sequence[Key], hashes: Sequence[int]) -> list[int]:
        """Indexes (in ``keys``) of the keys not stored yet and not seen earlier in ``keys``."""
        seen: set[Key] = set()
        new = []
        for number, (key, position) in enumerate(zip(keys, self._find(fd, keys, hashes))):
            if position == NOT_FOUND and key not in seen:
                seen.add(key)
                new.append(number)
        return new

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
        self._offsets = array("q")
        self._lengths = array("I")
        self._keys.clear()
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
            self._index_lines(fd, data[:whole], position)
            position += whole
        self.end = position
        self._remember_fingerprint(fd)

    def _index_lines(self, fd: int, data: bytes, base: int) -> None:
        batch = _RowBatch()
        offset = base
        for line in data.split(b"\n")[:-1]:  # data ends with a newline; only it separates rows
            parsed = self._parse_line(line, offset)
            if parsed is not None:
                batch.keys.append(parsed[0])
                batch.counted.append(parsed[1])
                batch.offsets.append(offset)
                batch.lengths.append(len(line) + 1)
            offset += len(line) + 1
        hashes = list(map(self._keys.key_hash, batch.keys))
        new = self._first_new(fd, batch.keys, hashes)
        if len(new) < len(hashes):
            batch, hashes = batch.select(new), [hashes[number] for number in new]
        self._register(batch, hashes)

    def _parse_line(self, line: bytes, offset: int) -> tuple[Key, Any] | None:
        """The key and the counted value of a line, or None if it is not a row."""
        try:
            if len(line) >= _MAX_LINE_BYTES:
                raise ValueError(f"{len(line)} bytes is too long")
            row = json.loads(line)
            key = normalise_key(row[self.key_field])
            return key, (row.get(self.count_field) if self.count_field is not None else None)
        except (ValueError, KeyError, TypeError) as exc:
            # Not written by this package (it writes whole JSON lines only); keep the rest usable.
            logger.warning("skipping unreadable line at offset %d of %s: %s", offset, self.path, exc)
            return None

    def _register(self, batch: _RowBatch, hashes: list[int]) -> None:
        """Index rows whose keys are new and distinct."""
        first = len(self._offsets)
        self._offsets.extend(batch.offsets)
        self._lengths.extend(batch.lengths)
        if self.count_field is not None:
            self.counts.update(map(_hashable, batch.counted))
        self._keys.add(batch.keys, hashes, range(first, first + len(hashes)))

    def _remember_fingerprint(self, fd: int) -> None:
        length = min(_FINGERPRINT_BYTES, self.end)
        self._fingerprint = os.pread(fd, length, self.end - length) if length else b""

    # ------------------------------------------------------------------------------- writing

    def prepare(self, fd: int, rows: Iterable[Mapping[str, Any]]) -> tuple[list[PreparedRow], int]:
        """Validate and serialise ``rows``, dropping keys already stored or seen earlier in the
        batch; returns the new rows and the number of duplicates. Raises DBRowError."""
        prepared = [self._prepare_row(row, index) for index, row in enumerate(rows)]
        keys, hashes = [row.key for row in prepared], [row.key_hash for row in prepared]
        fresh = [prepared[number] for number in self._first_new(fd, keys, hashes)]
        return fresh, len(prepared) - len(fresh)

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
        line = text.encode("utf-8") + b"\n"
        if len(line) > _MAX_LINE_BYTES:
            raise DBRowError(f"row {index} is {len(line)} bytes; the limit is 4 GiB", field=None, index=index)
        return PreparedRow(key, self._keys.key_hash(key), line, dict(row), index)

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
        lengths = [len(prepared.line) for prepared in rows]
        offsets = list(itertools.accumulate(lengths, initial=start))[:-1]
        counted = [prepared.row.get(self.count_field) for prepared in rows]  # unused without a count field
        self._register(
            _RowBatch([prepared.key for prepared in rows], offsets, lengths, counted),
            [prepared.key_hash for prepared in rows],
        )
        self.end = start + len(data)
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
