"""Text-file result store: JSON lines, idempotent on ``image_id``, durable before return.

Public API::

    ResultStore(directory, *, max_bytes=None)          the one writer (flock), plus queries
        .add_results(rows, fitting=False) -> AddOutcome(written, duplicates)
        .add_dead_letters(rows, fitting=False) -> AddOutcome   (fitting: what fits of a capped store)
    ResultReader(directory)                            read-only view, no lock, any process
    queries on both: .get(image_id) .has(image_id) .last(n) .count() .label_counts()
                     .dead_letters() .dead_letter_count()

The package knows records (dicts) only. See ``DB.result_store`` for the full contract and
``DB.errors`` for the error tree.
"""

from __future__ import annotations

from DB.errors import DBClosedError, DBError, DBFullError, DBLockedError, DBRowError, DBWriteError
from DB.result_store import (
    DEAD_LETTER_KEY,
    DEAD_LETTERS_FILE,
    RESULT_KEY,
    RESULT_LABEL,
    RESULTS_FILE,
    AddOutcome,
    ResultQueries,
    ResultReader,
    ResultStore,
)

__all__ = [
    "DEAD_LETTERS_FILE",
    "DEAD_LETTER_KEY",
    "RESULTS_FILE",
    "RESULT_KEY",
    "RESULT_LABEL",
    "AddOutcome",
    "DBClosedError",
    "DBError",
    "DBFullError",
    "DBLockedError",
    "DBRowError",
    "DBWriteError",
    "ResultQueries",
    "ResultReader",
    "ResultStore",
]
