"""Behaviour of the file queue with real files and real processes (no mocks).

This module is also the program of its child processes: ``python tests/test_queue.py ROLE ...``.
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
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from Queue import (  # noqa: E402
    FileQueueReader,
    FileQueueWriter,
    QueueAckError,
    QueueClosedError,
    QueueFullError,
    QueueLockedError,
    QueueNotFoundError,
    QueueRecordTooLargeError,
    QueueWriteError,
    queue_status,
)
from Queue.record_format import (  # noqa: E402
    HEADER_SIZE,
    MAX_PAYLOAD_BYTES,
    Stop,
    encode_batch,
    parse_records,
)
from tests import child_harness  # noqa: E402
from tests.child_harness import can_mount_private_tmpfs, run_in_small_tmpfs  # noqa: E402

spawn = functools.partial(child_harness.spawn, __file__)


def payload_for(index: int, size: int = 200) -> bytes:
    """A ~size-byte payload that names its index, so a reader can check every byte."""
    head = f"item-{index:09d}|".encode()
    return head + bytes((index + offset) % 256 for offset in range(size - len(head)))


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def drain(reader: FileQueueReader) -> list:
    items = []
    while batch := reader.read(10_000, timeout=0):
        items.extend(batch)
    return items


# --------------------------------------------------------------------------------- basics


@pytest.mark.timeout(30)
def test_fifo_round_trip_keeps_every_byte(tmp_path: Path) -> None:
    payloads = [b"", b"\x00\xff\x80binary\n", "nön-ascii".encode("utf-16"), os.urandom(70_000)]
    payloads += [payload_for(index) for index in range(1000)]
    with FileQueueWriter(tmp_path, segment_bytes=32_768) as writer:
        assert writer.append(payloads[0]) == 1
        for start in range(1, 501, 50):  # a batch never spans segments: use several
            assert writer.append_many(payloads[start : start + 50]) == start + 50  # seq = index + 1
        assert writer.append_many([]) == 501
        assert writer.append_many(payloads[501:]) == len(payloads)
    with FileQueueReader(tmp_path) as reader:
        items = []
        while batch := reader.read(random.randint(1, 97), timeout=0):
            items.extend(batch)
    assert [item.payload for item in items] == payloads
    assert [item.seq for item in items] == list(range(1, len(payloads) + 1))
    assert all(abs(item.appended_at - time.time()) < 60 for item in items)
    assert len(segment_files(tmp_path)) > 3


@pytest.mark.timeout(30)
def test_timed_read_of_an_empty_queue_returns_empty(tmp_path: Path) -> None:
    with FileQueueReader(tmp_path) as reader:
        assert reader.read(10, timeout=0) == []
        started = time.monotonic()
        assert reader.read(10, timeout=0.3) == []
        assert 0.25 <= time.monotonic() - started < 5


@pytest.mark.timeout(30)
def test_unacked_items_come_back_after_rewind_and_reopen(tmp_path: Path) -> None:
    with FileQueueWriter(tmp_path) as writer:
        writer.append_many([payload_for(index) for index in range(10)])
    with FileQueueReader(tmp_path) as reader:
        assert [item.seq for item in reader.read(6)] == [1, 2, 3, 4, 5, 6]
        reader.ack(4)
        assert [item.seq for item in reader.read(100)] == [7, 8, 9, 10]
        reader.rewind()
        assert [item.seq for item in reader.read(100)] == [5, 6, 7, 8, 9, 10]
    with FileQueueReader(tmp_path) as reader:
        assert reader.acked_seq == 4
        assert [item.seq for item in reader.read(100)] == [5, 6, 7, 8, 9, 10]
        reader.ack(10)
    with FileQueueReader(tmp_path) as reader:
        assert reader.read(100) == []


@pytest.mark.timeout(30)
def test_ack_is_cumulative_idempotent_and_bounded(tmp_path: Path) -> None:
    with FileQueueWriter(tmp_path) as writer, FileQueueReader(tmp_path) as reader:
        writer.append_many([b"a", b"b", b"c"])
        with pytest.raises(QueueAckError):
            reader.ack(1)  # nothing delivered yet
        reader.read(2)
        reader.ack(2)
        reader.ack(2)
        reader.ack(1)
        assert reader.acked_seq == 2
        with pytest.raises(QueueAckError, match="last seq delivered is 2"):
            reader.ack(3)


@pytest.mark.timeout(30)
def test_acked_segments_are_deleted(tmp_path: Path) -> None:
    with FileQueueWriter(tmp_path, segment_bytes=10_000) as writer, FileQueueReader(tmp_path) as reader:
        for start in range(0, 2000, 40):
            writer.append_many([payload_for(index) for index in range(start, start + 40)])
        before = queue_status(tmp_path)
        assert before.segments >= 40
        items = drain(reader)
        assert len(items) == 2000
        reader.ack(items[999].seq)
        middle = queue_status(tmp_path)
        assert middle.segments < before.segments * 0.6
        assert middle.bytes_on_disk < before.bytes_on_disk * 0.6
        reader.ack(items[-1].seq)
        after = queue_status(tmp_path)
        assert after.segments == 1  # the writer's tail stays
        assert after.depth == 0 and after.oldest_age_seconds is None
        assert after.bytes_on_disk <= 10_000


@pytest.mark.timeout(30)
def test_use_after_close_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    writer, reader = FileQueueWriter(tmp_path), FileQueueReader(tmp_path)
    writer.append(b"x")
    reader.read(1)
    writer.close()
    writer.close()
    reader.close()
    reader.close()
    with pytest.raises(QueueClosedError):
        writer.append(b"y")
    with pytest.raises(QueueClosedError):
        reader.read(1)
    with pytest.raises(QueueClosedError):
        reader.ack(1)


@pytest.mark.timeout(30)
def test_close_wakes_a_blocked_reader(tmp_path: Path) -> None:
    reader = FileQueueReader(tmp_path)
    outcome: list[BaseException] = []

    def blocked_read() -> None:
        try:
            reader.read(10, timeout=None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=blocked_read)
    thread.start()
    assert not thread.join(0.2) and thread.is_alive()
    reader.close()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome[0], QueueClosedError)


@pytest.mark.timeout(30)
def test_reader_is_woken_by_a_commit_not_by_its_fallback_timer(tmp_path: Path) -> None:
    with FileQueueWriter(tmp_path) as writer, FileQueueReader(tmp_path) as reader:
        timer = threading.Timer(0.3, writer.append, args=(b"wake",))
        timer.start()
        started = time.monotonic()
        items = reader.read(10, timeout=10)
        waited = time.monotonic() - started
        timer.join()
    assert [item.payload for item in items] == [b"wake"]
    assert waited < 0.3 + 0.6  # the fallback re-check is every 1 s; a poke comes at once


@pytest.mark.timeout(30)
def test_payload_type_and_size_are_checked(tmp_path: Path) -> None:
    with FileQueueWriter(tmp_path) as writer:
        with pytest.raises(TypeError):
            writer.append_many([b"ok", 5])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            writer.append("text")  # type: ignore[arg-type]
        with pytest.raises(QueueRecordTooLargeError) as caught:
            writer.append(bytes(MAX_PAYLOAD_BYTES + 1))
        assert caught.value.limit == MAX_PAYLOAD_BYTES
        assert writer.append(b"still fine") == 1


# ---------------------------------------------------------------------------------- locks


@pytest.mark.timeout(30)
def test_a_second_writer_or_reader_is_refused(tmp_path: Path) -> None:
    with FileQueueWriter(tmp_path), FileQueueReader(tmp_path):
        with pytest.raises(QueueLockedError, match="writer"):
            FileQueueWriter(tmp_path)
        with pytest.raises(QueueLockedError, match="reader"):
            FileQueueReader(tmp_path)
    FileQueueWriter(tmp_path).close()  # released on close


@pytest.mark.timeout(30)
def test_lock_held_by_another_process_and_released_when_it_is_killed(tmp_path: Path) -> None:
    holder = spawn("hold-writer", tmp_path, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(QueueLockedError, match=f"pid {holder.pid}"):
            FileQueueWriter(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FileQueueWriter(tmp_path) as writer:
        assert writer.appended_seq == 1


def child_hold_writer(directory: str) -> None:
    writer = FileQueueWriter(directory)
    writer.append(b"held")
    print("locked", flush=True)
    threading.Event().wait()  # until killed


# --------------------------------------------------------------------------- space limits


@pytest.mark.timeout(30)
def test_append_fitting_drains_a_batch_larger_than_the_cap(tmp_path: Path) -> None:
    limit = 10_000
    payloads = [payload_for(index, 1000) for index in range(25)]  # ~25 kB: never fits at once
    stored: list[bytes] = []
    with FileQueueWriter(tmp_path, segment_bytes=4_000, max_bytes=limit) as writer, FileQueueReader(tmp_path) as reader:
        rest = payloads
        while rest:
            fitted = writer.append_fitting(rest)
            assert 1 <= fitted < len(payloads)
            assert queue_status(tmp_path).bytes_on_disk <= limit
            rest = rest[fitted:]
            if rest:  # the cap was filled as far as whole records go
                with pytest.raises(QueueFullError):
                    writer.append_fitting(rest)
            items = drain(reader)
            stored += [item.payload for item in items]
            reader.ack(items[-1].seq)
    assert stored == payloads  # every record once, in order


@pytest.mark.timeout(30)
def test_max_bytes_refuses_whole_batches_and_recovers_after_acks(tmp_path: Path) -> None:
    limit = 20_000
    with FileQueueWriter(tmp_path, segment_bytes=4_000, max_bytes=limit) as writer:
        with pytest.raises(QueueFullError) as caught:
            writer.append_many([payload_for(0, 1000)] * 25)  # alone larger than the limit
        assert caught.value.max_bytes == limit
        appended = 0
        with pytest.raises(QueueFullError):
            while True:
                writer.append_many([payload_for(appended + offset) for offset in range(5)])
                appended += 5
        full = queue_status(tmp_path)
        assert full.bytes_on_disk <= limit and full.appended_seq == appended
        with pytest.raises(QueueFullError):  # still full: nothing partial was left behind
            writer.append_many([payload_for(appended + offset) for offset in range(5)])
        assert queue_status(tmp_path).bytes_on_disk == full.bytes_on_disk

        with FileQueueReader(tmp_path) as reader:
            items = drain(reader)
            assert [item.payload for item in items] == [payload_for(index) for index in range(appended)]
            reader.ack(items[-1].seq)
            for round_ in range(3):  # fill, drain and refill: space comes back every time
                writer.append_many([payload_for(9) for _ in range(5)])
                while True:
                    try:
                        writer.append(payload_for(round_))
                    except QueueFullError:
                        break
                batch = drain(reader)
                reader.ack(batch[-1].seq)
                assert queue_status(tmp_path).bytes_on_disk <= limit


CHILD_FSIZE_LIMIT = 64 * 1024


@pytest.mark.timeout(60)
def test_kernel_write_error_rolls_back_the_batch_and_appends_recover(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), partial write included."""
    child = spawn("fsize-limit", tmp_path, stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=50)
    assert child.returncode == 0, out
    report = json.loads(out)
    assert report["errno"] == errno.EFBIG
    assert report["size_after_error"] == report["size_before_error"]
    assert report["appended_after_recovery"] > report["failed_last_seq"]
    with FileQueueReader(tmp_path) as reader:
        seqs = [item.seq for item in drain(reader)]
    assert seqs == sorted(seqs)
    assert len(seqs) == report["returned"]  # every returned append, and nothing of the failed one
    assert not set(range(report["failed_first_seq"], report["failed_last_seq"] + 1)) & set(seqs)


def child_fsize_limit(directory: str) -> None:
    writer = FileQueueWriter(directory, segment_bytes=1 << 30)
    returned = 0
    segment = max(Path(directory).glob("*.seg"))
    with child_harness.file_size_limit(CHILD_FSIZE_LIMIT):
        while True:
            size_before = segment.stat().st_size
            batch = [payload_for(returned + offset, 700) for offset in range(7)]
            try:
                writer.append_many(batch)
            except QueueWriteError as exc:
                size_after = segment.stat().st_size
                failed_first, failed_last = writer.appended_seq - len(batch) + 1, writer.appended_seq
                error = exc.errno
                break
            returned += len(batch)
    recovered = writer.append_many([payload_for(returned + offset) for offset in range(3)])
    print(json.dumps({
        "errno": error,
        "size_before_error": size_before,
        "size_after_error": size_after,
        "failed_first_seq": failed_first,
        "failed_last_seq": failed_last,
        "appended_after_recovery": recovered,
        "returned": returned + 3,
    }))


@pytest.mark.timeout(60)
@pytest.mark.skipif(not can_mount_private_tmpfs(), reason="needs unshare + tmpfs in a user namespace")
def test_disk_full_raises_typed_error_leaves_nothing_and_recovers(tmp_path: Path) -> None:
    report = run_in_small_tmpfs(__file__, "disk-full", tmp_path / "tiny")
    assert report["errno"] == errno.ENOSPC
    assert report["segment_bytes_unchanged"]
    assert report["delivered"] == report["returned"]


def child_disk_full(directory: str) -> None:
    writer = FileQueueWriter(directory)
    returned = [writer.append_many([payload_for(index) for index in range(50)])]
    ballast = child_harness.fill_file_system(directory)
    segments_before = {path.name: path.stat().st_size for path in Path(directory).glob("*.seg")}
    try:
        writer.append_many([payload_for(index) for index in range(200)])
        raise SystemExit("append on a full disk did not fail")
    except QueueWriteError as exc:
        error = exc.errno
    segments_after = {path.name: path.stat().st_size for path in Path(directory).glob("*.seg")}
    ballast.unlink()
    returned.append(writer.append_many([payload_for(index) for index in range(50)]))
    with FileQueueReader(directory) as reader:
        delivered = drain(reader)
    print(json.dumps({
        "errno": error,
        "segment_bytes_unchanged": segments_after == segments_before,
        "returned": 100,
        "delivered": len(delivered),
    }))


# ------------------------------------------------------------------------ torn and partial


@pytest.mark.timeout(30)
@pytest.mark.parametrize("garbage", [b"\x00" * 7, b"QRC1 not a header at all, just junk", "half-record"])
def test_torn_tail_is_truncated_on_reopen(tmp_path: Path, garbage: object) -> None:
    with FileQueueWriter(tmp_path) as writer:
        writer.append_many([payload_for(index) for index in range(20)])
    tail = segment_files(tmp_path)[-1]
    whole_size = tail.stat().st_size
    if garbage == "half-record":
        record = encode_batch(21, time.time_ns(), [payload_for(20)])
        garbage = record[: len(record) // 2]
    with open(tail, "ab") as handle:
        handle.write(garbage)  # type: ignore[arg-type]
    with FileQueueReader(tmp_path) as reader:  # before the writer repairs: whole records only
        assert [item.seq for item in drain(reader)] == list(range(1, 21))
    with FileQueueWriter(tmp_path) as writer:
        assert tail.stat().st_size == whole_size
        assert writer.append(b"after repair") == 21
    with FileQueueReader(tmp_path) as reader:
        items = drain(reader)
    assert [item.payload for item in items] == [payload_for(index) for index in range(20)] + [b"after repair"]


@pytest.mark.timeout(30)
def test_reader_waits_for_a_record_being_written(tmp_path: Path) -> None:
    FileQueueWriter(tmp_path).close()
    tail = segment_files(tmp_path)[-1]
    record = encode_batch(1, time.time_ns(), [payload_for(1, 5000)])
    with FileQueueReader(tmp_path) as reader:
        for cut in (3, HEADER_SIZE, HEADER_SIZE + 100, len(record) - 1):
            with open(tail, "wb") as handle:
                handle.write(record[:cut])
            assert reader.read(10) == []
        with open(tail, "wb") as handle:
            handle.write(record)
        assert [item.payload for item in reader.read(10)] == [payload_for(1, 5000)]


def test_parser_returns_only_whole_records_for_every_prefix() -> None:
    payloads = [payload_for(index, size) for index, size in enumerate([0, 1, 31, 32, 33, 500])]
    data = encode_batch(7, 123, payloads)
    ends = [parse_records(data).records[index].end for index in range(len(payloads))]
    for cut in range(len(data) + 1):
        result = parse_records(data[:cut])
        whole = sum(1 for end in ends if end <= cut)
        assert [record.payload for record in result.records] == payloads[:whole]
        assert result.stop is (Stop.END if cut in ends or cut == 0 else Stop.INCOMPLETE)
    flipped = bytearray(data)
    flipped[ends[2] + HEADER_SIZE + 5] ^= 0x01  # one bit in the payload of record 3
    result = parse_records(bytes(flipped))
    assert len(result.records) == 3 and result.stop is Stop.INVALID


# -------------------------------------------------------------------- processes in parallel

TRANSFER_ITEMS = 50_000


@pytest.mark.timeout(90)
def test_writer_process_and_reader_process_move_50000_items_in_order(tmp_path: Path) -> None:
    reader = spawn("transfer-reader", tmp_path, TRANSFER_ITEMS, stdout=subprocess.PIPE)
    writer = spawn("transfer-writer", tmp_path, TRANSFER_ITEMS, stdout=subprocess.PIPE)
    writer_out, _ = writer.communicate(timeout=80)
    reader_out, _ = reader.communicate(timeout=80)
    assert writer.returncode == 0 and reader.returncode == 0, (writer_out, reader_out)
    assert json.loads(writer_out) == {"last_seq": TRANSFER_ITEMS}
    report = json.loads(reader_out)
    assert report == {"received": TRANSFER_ITEMS, "in_order": True, "payloads_ok": True,
                      "last_seq": TRANSFER_ITEMS, "empty_reads": report["empty_reads"]}
    status = queue_status(tmp_path)
    assert status.depth == 0 and status.acked_seq == TRANSFER_ITEMS and status.segments == 1


def child_transfer_writer(directory: str, items: str) -> None:
    total, rng, sent = int(items), random.Random(1), 0
    with FileQueueWriter(directory, segment_bytes=256 * 1024) as writer:
        while sent < total:
            size = min(rng.choice([1, 7, 64, 300, 512]), total - sent)
            last = writer.append_many([payload_for(sent + offset) for offset in range(size)])
            sent += size
    print(json.dumps({"last_seq": last}))


def child_transfer_reader(directory: str, items: str) -> None:
    total, rng = int(items), random.Random(2)
    received, in_order, payloads_ok, empty_reads, last_seq = 0, True, True, 0, 0
    with FileQueueReader(directory) as reader:
        while received < total:
            batch = reader.read(rng.choice([1, 50, 1000]), timeout=30)
            if not batch:
                empty_reads += 1
                if empty_reads > 3:
                    break
                continue
            for item in batch:
                in_order &= item.seq == last_seq + 1
                payloads_ok &= item.payload == payload_for(received)
                last_seq = item.seq
                received += 1
            reader.ack(last_seq)
    print(json.dumps({"received": received, "in_order": in_order, "payloads_ok": payloads_ok,
                      "last_seq": last_seq, "empty_reads": empty_reads}))


@pytest.mark.timeout(60)
def test_status_while_writer_and_reader_run(tmp_path: Path) -> None:
    writer = spawn("status-writer", tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "appended 100"
        status = queue_status(tmp_path)
        assert (status.depth, status.appended_seq, status.acked_seq) == (100, 100, 0)
        assert status.oldest_age_seconds is not None and 0 <= status.oldest_age_seconds < 60
        with FileQueueReader(tmp_path) as reader:
            reader.read(40)
            reader.ack(40)
            status = queue_status(tmp_path)
            assert (status.depth, status.acked_seq) == (60, 40)
            cli = subprocess.run(
                [sys.executable, "-m", "Queue", "status", str(tmp_path), "--json"],
                cwd=ROOT, capture_output=True, text=True, timeout=30,
            )
            assert cli.returncode == 0, cli.stderr
            assert json.loads(cli.stdout)["depth"] == 60
            text = subprocess.run(
                [sys.executable, "-m", "Queue", "status", str(tmp_path)],
                cwd=ROOT, capture_output=True, text=True, timeout=30,
            )
            assert "depth:" in text.stdout and "60" in text.stdout
    finally:
        writer.kill()
        writer.wait()


def child_status_writer(directory: str) -> None:
    with FileQueueWriter(directory) as writer:
        writer.append_many([payload_for(index) for index in range(100)])
        print("appended 100", flush=True)
        sys.stdin.read()


@pytest.mark.timeout(30)
def test_status_cli_help_and_errors(tmp_path: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "Queue", "status", "--help"],
                               cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "--json" in help_text.stdout
    missing = subprocess.run([sys.executable, "-m", "Queue", "status", str(tmp_path / "nope")],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "no queue directory" in missing.stderr
    with pytest.raises(QueueNotFoundError):
        queue_status(tmp_path / "nope")


CHILDREN = {
    "hold-writer": child_hold_writer,
    "fsize-limit": child_fsize_limit,
    "disk-full": child_disk_full,
    "transfer-writer": child_transfer_writer,
    "transfer-reader": child_transfer_reader,
    "status-writer": child_status_writer,
}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](*sys.argv[2:])
