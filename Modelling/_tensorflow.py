"""Import TensorFlow once, quietly, with threading sized for this machine.

TensorFlow prints start-up chatter (oneDNN notices, "All log messages before
absl::InitializeLog()…") straight to file descriptor 2 before its own log-level setting
applies, so ``TF_CPP_MIN_LOG_LEVEL`` alone cannot silence it. While importing, stderr is
captured at the descriptor level and everything except those known notices is written back,
so no real error or warning is lost. Set ``TF_CPP_MIN_LOG_LEVEL=0`` to see everything.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from types import ModuleType

_NOISE = re.compile(
    rb"absl::InitializeLog|oneDNN custom operations|This TensorFlow binary is optimized"
)
_tensorflow: ModuleType | None = None
_import_lock = threading.Lock()  # fd 2 is process-wide: only one thread may swap it


def import_tensorflow(*, threads: int | None = None) -> ModuleType:
    """Return the ``tensorflow`` module, importing and configuring it on the first call.

    ``threads`` sets intra-op parallelism (default: all cores); inter-op parallelism is 1
    because a CNN forward pass is one chain of ops, and extra inter-op threads only compete
    for the same cores. Thread settings only take effect before TensorFlow's runtime starts;
    later calls return the already-configured module. Safe to call repeatedly.
    """
    global _tensorflow
    with _import_lock:
        if _tensorflow is not None:
            return _tensorflow
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("", "0") or "tensorflow" in sys.modules:
            import tensorflow as tf
        else:
            tf = _import_filtering_stderr()
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads or _usable_cores())
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # the runtime already started elsewhere in this process; keep its settings
        _tensorflow = tf
        return tf


def _usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's core count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _import_filtering_stderr() -> ModuleType:
    """Import tensorflow with fd 2 captured, then replay every line that is not known noise."""
    sys.stderr.flush()
    try:
        saved_fd = os.dup(2)
    except OSError:  # no usable stderr (e.g. a daemon): nothing to keep quiet
        import tensorflow as tf

        return tf
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(True) if not _NOISE.search(line)]
            if kept:
                os.write(2, b"".join(kept))
    return tf
