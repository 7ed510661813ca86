"""Behaviour of the text-file result store with real files and real processes (no mocks).

This module is also the program of its child processes: ``python tests/test_db.py ROLE ...``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from DB import (  # noqa: E402
    RESULTS_FILE,
    AddOutcome,
    DBClosedError,
    DBFullError,
    DBLockedError,
    DBRowError,
    DBWriteError,
    ResultReader,
    ResultStore,
)
from tests import child_harness  # noqa: E402
from tests.child_harness import can_mount_private_tmpfs  # noqa: E402

spawn = functools.partial(child_harness.spawn, __file__)


def result(image_id: object, label: int = 3, **extra: object) -> dict:
    return {"image_id": image_id, "label": label, "probability": 0.97, **extra}


def lines_of(directory: Path, name: str = RESULTS_FILE) -> list[dict]:
    """Every line of a data file, parsed; fails on a torn or non-JSON line."""
    text = (directory / name).read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "torn last line"
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------- idempotency


@pytest.mark.timeout(30)
def test_same_id_in_a_batch_across_batches_and_across_reopen_gives_one_row(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        assert store.add_results([result("a"), result("b"), result("a", label=9)]) == AddOutcome(2, 1)
        assert store.add_results([result("a"), result("c")]) == AddOutcome(1, 1)
        assert store.add_results([result("a")] * 5) == AddOutcome(0, 5)
        assert store.add_results([]) == AddOutcome(0, 0)
    with ResultStore(tmp_path) as store:
        assert store.add_results([result("b"), result("c"), result("d")]) == AddOutcome(1, 2)
        assert store.count() == 4
        assert store.get("a") == result("a")  # the first row wins; redeliveries are dropped
    assert [row["image_id"] for row in lines_of(tmp_path)] == ["a", "b", "c", "d"]


@pytest.mark.timeout(30)
def test_integer_and_string_ids_are_the_same_key(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        assert store.add_results([result(7), result("7")]) == AddOutcome(1, 1)
        assert store.get("7") == store.get(7) == result(7)
        assert store.has(7) and not store.has(8)


@pytest.mark.timeout(30)
def test_dead_letters_are_idempotent_on_id_and_listed(tmp_path: Path) -> None:
    letters = [{"id": "m1", "reason": "not an image", "attempts": 3}, {"id": "m2", "reason": "empty"}]
    with ResultStore(tmp_path) as store:
        assert store.add_dead_letters(letters + letters[:1]) == AddOutcome(2, 1)
    with ResultStore(tmp_path) as store:
        assert store.add_dead_letters(letters) == AddOutcome(0, 2)
        assert store.dead_letters() == letters
        assert store.dead_letter_count() == 2
        assert store.count() == 0
    assert ResultReader(tmp_path).dead_letters() == letters


# --------------------------------------------------------------------------------- queries


@pytest.mark.timeout(30)
def test_queries_by_id_last_n_and_label_counts(tmp_path: Path) -> None:
    rows = [result(f"img-{n}", label=n % 3, note="ünïcode ✓") for n in range(100)]
    with ResultStore(tmp_path) as store:
        store.add_results(rows[:60])
        store.add_results(rows[60:])
        for view in (store, ResultReader(tmp_path)):
            assert view.get("img-42") == rows[42]
            assert view.get("missing") is None
            assert view.last(3) == rows[-3:]
            assert view.last(1000) == rows
            assert view.last(0) == []
            assert view.count() == 100
            assert view.label_counts() == {0: 34, 1: 33, 2: 33}


@pytest.mark.timeout(30)
def test_an_empty_or_missing_store_reads_as_empty(tmp_path: Path) -> None:
    reader = ResultReader(tmp_path / "not-yet")
    assert (reader.count(), reader.last(5), reader.label_counts(), reader.dead_letters()) == (0, [], {}, [])
    assert reader.get("x") is None
    with ResultStore(tmp_path / "not-yet") as store:
        store.add_results([result("x")])
        assert reader.get("x") == result("x")  # the reader catches up on its next query
    reader.close()
    with pytest.raises(DBClosedError):
        reader.count()


# --------------------------------------------------------------------------- bad rows


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("bad_row", "field"),
    [
        ({"label": 1}, "image_id"),
        ({"image_id": "x"}, "label"),
        ({"image_id": 1.5, "label": 1}, "image_id"),
        ({"image_id": None, "label": 1}, "image_id"),
        ({"image_id": "x", "label": [1, 2]}, "label"),
        ({"image_id": "x", "label": 1, "score": float("nan")}, None),
        ({"image_id": "x", "label": 1, "raw": b"bytes"}, None),
        ("not a dict", None),
    ],
)
def test_a_bad_row_refuses_the_whole_batch_and_names_the_field(
    tmp_path: Path, bad_row: object, field: str | None
) -> None:
    with ResultStore(tmp_path) as store:
        store.add_results([result("kept")])
        with pytest.raises(DBRowError) as caught:
            store.add_results([result("good"), bad_row])  # type: ignore[list-item]
        assert caught.value.field == field and caught.value.index == 1
        if field:
            assert repr(field) in str(caught.value)
        assert store.count() == 1 and not store.has("good")
    assert [row["image_id"] for row in lines_of(tmp_path)] == ["kept"]


@pytest.mark.timeout(30)
def test_a_dead_letter_without_id_is_refused(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store, pytest.raises(DBRowError, match="'id'"):
        store.add_dead_letters([{"reason": "no id"}])


# ---------------------------------------------------------------------- locks and closing


@pytest.mark.timeout(30)
def test_one_writer_at_a_time_and_use_after_close_raises(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    with pytest.raises(DBLockedError, match=str(os.getpid())):
        ResultStore(tmp_path)
    holder = spawn("hold-writer", tmp_path, stdout=subprocess.PIPE)
    try:
        store.close()
        store.close()
        with pytest.raises(DBClosedError):
            store.add_results([result("late")])
        with pytest.raises(DBClosedError):
            store.get("late")
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(DBLockedError, match=str(holder.pid)):
            ResultStore(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    ResultStore(tmp_path).close()  # the kernel released the dead holder's lock


def child_hold_writer(directory: str) -> None:
    ResultStore(directory)
    print("locked", flush=True)
    signal.pause()


# ----------------------------------------------------------------------- crash recovery


@pytest.mark.timeout(30)
def test_a_torn_last_line_is_ignored_by_readers_and_dropped_on_reopen(tmp_path: Path) -> None:
    with ResultStore(tmp_path) as store:
        store.add_results([result("a"), result("b")])
    with open(tmp_path / RESULTS_FILE, "ab") as handle:
        handle.write(b'{"image_id":"c","lab')
    reader = ResultReader(tmp_path)
    assert reader.count() == 2 and reader.get("c") is None
    with ResultStore(tmp_path) as store:
        assert store.count() == 2
        assert store.add_results([result("c")]) == AddOutcome(1, 0)
    assert [row["image_id"] for row in lines_of(tmp_path)] == ["a", "b", "c"]
    assert reader.get("c") == result("c")


@pytest.mark.timeout(60)
def test_sigkill_of_a_writing_process_loses_no_acknowledged_row(tmp_path: Path) -> None:
    rng = random.Random(7)
    acknowledged: set[str] = set()
    for round_ in range(8):
        log = tmp_path / f"acked-{round_}.log"
        # Each round re-sends ids of earlier rounds too: redeliveries must not add rows.
        child = spawn("writer", tmp_path / "store", round_, log, stderr=subprocess.PIPE)
        try:
            child.wait(timeout=rng.uniform(0.2, 0.6))
        except subprocess.TimeoutExpired:
            pass
        child.send_signal(signal.SIGKILL)
        _, errors = child.communicate()
        assert child.returncode == -signal.SIGKILL, errors
        acknowledged |= set(log.read_text().split()) if log.exists() else set()
        reader = ResultReader(tmp_path / "store")  # before any repair: the torn line is ignored
        assert acknowledged <= {row["image_id"] for row in reader.last(10**9)}
        reader.close()
    with ResultStore(tmp_path / "store") as store:
        stored = [row["image_id"] for row in lines_of(tmp_path / "store")]
        assert len(stored) == len(set(stored)) == store.count()
        assert acknowledged <= set(stored)
        assert all(store.get(image_id)["image_id"] == image_id for image_id in acknowledged)
    assert len(acknowledged) > 500, "the writers hardly ran: the test proved little"


def child_writer(directory: str, round_: str, log_path: str) -> None:
    """Add batches forever (ids overlap earlier rounds); log ids once add_results returned."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rng = random.Random(int(round_))
    with ResultStore(directory) as store:
        number = 0
        while True:
            ids = [f"img-{rng.randrange(0, 400 * (int(round_) + 1))}" for _ in range(rng.randint(1, 50))]
            ids.append(f"img-r{round_}-{number}")
            number += 1
            store.add_results([result(image_id, blob="x" * rng.randint(0, 3000)) for image_id in ids])
            os.write(log, ("\n".join(ids) + "\n").encode())


# ------------------------------------------------------------------- reader in parallel


@pytest.mark.timeout(60)
def test_a_reader_process_sees_consistent_rows_while_a_writer_writes(tmp_path: Path) -> None:
    total = 3000
    reader = spawn("poll-reader", tmp_path, total, stdout=subprocess.PIPE)
    with ResultStore(tmp_path) as store:
        for start in range(0, total, 25):
            store.add_results([result(f"img-{n}", label=n % 10) for n in range(start, start + 25)])
    out, _ = reader.communicate(timeout=50)
    assert reader.returncode == 0, out
    report = json.loads(out)
    assert report["final_count"] == total
    assert report["monotonic"] and report["rows_ok"]
    assert report["label_total"] == total


def child_poll_reader(directory: str, total: str) -> None:
    reader = ResultReader(directory)
    previous, monotonic, rows_ok = 0, True, True
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        count = reader.count()
        monotonic &= count >= previous
        previous = count
        last = reader.last(30)  # may include rows written since count() was asked
        numbers = [int(row["image_id"][4:]) for row in last]
        rows_ok &= all(row == result(f"img-{n}", label=n % 10) for row, n in zip(last, numbers))
        rows_ok &= numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True
        rows_ok &= not numbers or numbers[-1] + 1 >= count
        if count == int(total):
            break
    print(json.dumps({
        "final_count": reader.count(),
        "monotonic": monotonic,
        "rows_ok": rows_ok,
        "label_total": sum(reader.label_counts().values()),
    }))


# ------------------------------------------------------------------------- space limits


@pytest.mark.timeout(30)
def test_max_bytes_refuses_a_batch_whole_and_recovers(tmp_path: Path) -> None:
    with ResultStore(tmp_path, max_bytes=2000) as store:
        written = 0
        with pytest.raises(DBFullError) as caught:
            while True:
                store.add_results([result(f"img-{written}"), result(f"img-{written + 1}")])
                written += 2
        assert caught.value.max_bytes == 2000
        size = (tmp_path / RESULTS_FILE).stat().st_size
        assert size <= 2000 and store.count() == written
        assert store.add_results([result("img-0")]) == AddOutcome(0, 1)  # duplicates need no room
        store.max_bytes = 4000  # the operator grants more room
        assert store.add_results([result("more")]) == AddOutcome(1, 0)
    assert len(lines_of(tmp_path)) == written + 1
    with ResultStore(tmp_path, max_bytes=1000) as store:  # reopened under a smaller limit
        with pytest.raises(DBFullError):
            store.add_dead_letters([{"id": "d1"}])
        assert store.count() == written + 1


@pytest.mark.timeout(30)
def test_fitting_stores_the_leading_part_of_a_batch_larger_than_the_cap(tmp_path: Path) -> None:
    with ResultStore(tmp_path, max_bytes=2000) as store:
        store.add_results([result("old")])
        batch = [result("old")] + [result(f"img-{index}") for index in range(40)]  # ~3 kB, a duplicate first
        outcome = store.add_results(batch, fitting=True)
        done = outcome.written + outcome.duplicates
        assert outcome.duplicates == 1 and 1 < done < len(batch)
        assert (tmp_path / RESULTS_FILE).stat().st_size <= 2000
        assert [row["image_id"] for row in lines_of(tmp_path)] == ["old"] + [row["image_id"] for row in batch[1:done]]
        with pytest.raises(DBFullError):  # full as far as whole rows go; the rest waits
            store.add_results(batch[done:], fitting=True)
        with pytest.raises(DBFullError):  # without fitting, a batch is still all or nothing
            store.add_results(batch, fitting=False)
        store.max_bytes = None  # space is back
        assert store.add_results(batch[done:], fitting=True) == AddOutcome(len(batch) - done, 0)
        assert store.count() == len(batch)


@pytest.mark.timeout(60)
def test_kernel_write_error_rolls_back_and_writes_recover(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), partial write included."""
    child = spawn("fsize-limit", tmp_path, stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=50)
    assert child.returncode == 0, out
    report = json.loads(out)
    assert report["errno"] == errno.EFBIG
    assert report["size_after_error"] == report["size_before_error"]
    stored = [row["image_id"] for row in lines_of(tmp_path)]
    assert stored == report["returned_ids"]


def child_fsize_limit(directory: str) -> None:
    store = ResultStore(directory)
    path, returned, number = Path(directory) / RESULTS_FILE, [], 0
    with child_harness.file_size_limit(32 * 1024):
        while True:
            ids = [f"img-{number + n}" for n in range(10)]
            size_before = path.stat().st_size
            try:
                store.add_results([result(image_id, blob="y" * 300) for image_id in ids])
            except DBWriteError as exc:
                error, size_after = exc.errno, path.stat().st_size
                break
            returned += ids
            number += 10
    assert store.add_results([result(image_id) for image_id in ids]) == AddOutcome(10, 0)
    store.close()
    print(json.dumps({"errno": error, "size_before_error": size_before,
                      "size_after_error": size_after, "returned_ids": returned + ids}))


@pytest.mark.timeout(60)
@pytest.mark.skipif(not can_mount_private_tmpfs(), reason="needs unshare + tmpfs in a user namespace")
def test_disk_full_raises_typed_error_leaves_nothing_and_recovers(tmp_path: Path) -> None:
    report = child_harness.run_in_small_tmpfs(
        __file__, "disk-full", tmp_path / "tiny", size="128k", timeout=50
    )
    assert report["errno"] == errno.ENOSPC
    assert report["unchanged"] and report["lines_whole"]
    assert report["rows_after_recovery"] == report["rows_before"] + 1


def child_disk_full(directory: str) -> None:
    store = ResultStore(directory)
    store.add_results([result(f"img-{n}") for n in range(20)])
    ballast = child_harness.fill_file_system(directory)
    path = Path(directory) / RESULTS_FILE
    before = path.read_bytes()
    try:
        store.add_results([result(f"big-{n}", blob="z" * 1000) for n in range(50)])
        raise SystemExit("a write to a full disk did not fail")
    except DBWriteError as exc:
        error = exc.errno
    unchanged = path.read_bytes() == before
    ballast.unlink()
    rows_before = store.count()
    store.add_results([result("after")])
    store.close()
    print(json.dumps({"errno": error, "unchanged": unchanged, "rows_before": rows_before,
                      "rows_after_recovery": ResultReader(directory).count(),
                      "lines_whole": path.read_bytes().endswith(b"\n")}))


CHILDREN = {
    "hold-writer": child_hold_writer,
    "writer": child_writer,
    "poll-reader": child_poll_reader,
    "fsize-limit": child_fsize_limit,
    "disk-full": child_disk_full,
}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](*sys.argv[2:])
