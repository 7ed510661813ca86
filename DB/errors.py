"""Typed errors of the result store, in one flat module.

Tree (every error the package raises on purpose is a ``DBError``)::

    DBError                 base: catch this to handle any store failure
    ├── DBClosedError       a method was called after close()
    ├── DBLockedError       another process already holds the store for writing
    ├── DBRowError          a row cannot be stored (missing key field, bad key, not JSON);
    │                       the whole batch is refused; ``field`` and ``index`` say where
    └── DBWriteError        the write was refused and rolled back; nothing of the batch remains
        └── DBFullError     the batch would take the files over the configured ``max_bytes``

``DBWriteError`` wraps the kernel's ``OSError`` (ENOSPC, EDQUOT, EFBIG, EIO …) as ``__cause__``
and keeps its ``errno``; it and ``DBFullError`` are transient: retry once space is back.
"""

from __future__ import annotations


class DBError(Exception):
    """Base class of every error raised on purpose by ``DB``."""


class DBClosedError(DBError):
    """The store was used after ``close()``."""


class DBLockedError(DBError):
    """Another live process holds the writer lock of this store directory."""


class DBRowError(DBError, ValueError):
    """A row of the batch cannot be stored; nothing of the batch was written.

    ``field`` names the offending key (``None`` when the row as a whole is bad) and ``index``
    is the row's position in the batch.
    """

    def __init__(self, message: str, *, field: str | None, index: int) -> None:
        super().__init__(message)
        self.field = field
        self.index = index


class DBWriteError(DBError):
    """A batch was refused and rolled back; ``errno`` is the OS error number if any."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class DBFullError(DBWriteError):
    """The batch would pass ``max_bytes``; raise the limit or free space, then retry."""

    def __init__(self, message: str, *, needed_bytes: int, max_bytes: int) -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.max_bytes = max_bytes
