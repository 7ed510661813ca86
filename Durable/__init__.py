"""Durable-file helpers shared by ``Queue/`` and ``DB/``: full writes, directory fsync, pid locks.

The package knows files only (no records, brokers or models), so both stores may use it
without knowing each other. See ``Durable.files``.
"""

from __future__ import annotations

from Durable.files import acquire_pid_lock, fsync_directory, write_all

__all__ = ["acquire_pid_lock", "fsync_directory", "write_all"]
