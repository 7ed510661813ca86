"""Crash consistency of the file queue: SIGKILL at random moments, truncation at random bytes.

Invariants checked (Jepsen's names): no lost write (every append that returned is delivered),
no torn or corrupt record, no poll skip and no non-monotonic poll (each reader session delivers
consecutive seqs), duplicates only of records that were not acked.

This module is also the program of its child processes: ``python tests/test_queue_crash.py ROLE``.
"""

from __future__ import annotations

import hashlib
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

from Queue import FileQueueReader, FileQueueWriter, queue_status  # noqa: E402
from Queue.record_format import Stop, encode_batch, parse_records  # noqa: E402

ROUNDS = 36
SEED = int(os.environ.get("QUEUE_CRASH_SEED", "20240611"))  # set another to soak-test more runs
SEGMENT_BYTES = 48 * 1024


def payload_for(item_id: str) -> bytes:
    """A payload that carries its id and a digest of it, so any torn byte is detected."""
    digest = hashlib.blake2b(item_id.encode(), digest_size=32).hexdigest()
    return f"{item_id}|{digest}{digest}".encode()


def id_of(payload: bytes) -> str:
    item_id = payload.split(b"|", 1)[0].decode(errors="replace")
    return item_id if payload == payload_for(item_id) else "CORRUPT"


def spawn(role: str, *args: object, stderr: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(stderr, "ab") as errors:
        return subprocess.Popen([sys.executable, __file__, role, *map(str, args)], env=env, stderr=errors)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def pause(rng: random.Random, low: float, high: float, watched: subprocess.Popen[bytes]) -> None:
    """Let the children run for a random while (returns early if the watched one exits)."""
    try:
        watched.wait(timeout=rng.uniform(low, high))
    except subprocess.TimeoutExpired:
        pass


# -------------------------------------------------------------------------- child programs


def child_writer(directory: str, round_: str, seed: str, log_path: str) -> None:
    """Append batches forever; after each append returns, log its "seq id" lines."""
    rng = random.Random(int(seed))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    writer = FileQueueWriter(directory, segment_bytes=SEGMENT_BYTES)
    counter = 0
    while True:
        # Mostly small batches; now and then one of several pages, which a kill can tear.
        size = rng.randint(1, 64) if rng.random() < 0.97 else rng.randint(200, 1500)
        ids = [f"{round_}.{counter + offset}" for offset in range(size)]
        counter += len(ids)
        last_seq = writer.append_many([payload_for(item_id) for item_id in ids])
        first_seq = last_seq - len(ids) + 1
        os.write(log, "".join(f"{first_seq + n} {item_id}\n" for n, item_id in enumerate(ids)).encode())


def child_reader(directory: str, seed: str, log_path: str) -> None:
    """Read forever; log "D seq id" for each item before acking, and "A seq" after ack returns."""
    rng = random.Random(int(seed))
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    reader = FileQueueReader(directory)
    while True:
        items = reader.read(rng.randint(1, 300), timeout=0.5)
        if not items:
            continue
        os.write(log, "".join(f"D {item.seq} {id_of(item.payload)}\n" for item in items).encode())
        if rng.random() < 0.8:
            reader.ack(items[-1].seq)
            os.write(log, f"A {items[-1].seq}\n".encode())


def tear_tail(queue: Path, rng: random.Random, round_: int) -> bool:
    """Leave what a writer killed inside write() leaves: whole records, then a cut one.

    SIGKILL rarely lands inside the write syscall itself, so the test makes that state
    explicitly (the kernel keeps exactly such a prefix of an interrupted write).
    """
    segments = sorted(queue.glob("*.seg"))
    if not segments:
        return False  # the writer was killed before it created one
    tail = segments[-1]
    parsed = parse_records(tail.read_bytes())
    if parsed.stop is not Stop.END:
        return False  # already torn: the next writer must repair it first
    next_seq = parsed.records[-1].seq + 1 if parsed.records else int(tail.stem)
    ids = [f"torn{round_}.{n}" for n in range(rng.randint(1, 40))]
    data = encode_batch(next_seq, time.time_ns(), [payload_for(item_id) for item_id in ids])
    with open(tail, "ab") as handle:
        handle.write(data[: rng.randrange(1, len(data))])
    return True


# -------------------------------------------------------------------------- log analysis


def read_committed(logs: list[Path]) -> dict[int, str]:
    committed: dict[int, str] = {}
    for log in logs:
        for line in log.read_text().splitlines() if log.exists() else []:
            seq, item_id = line.split()
            assert committed.setdefault(int(seq), item_id) == item_id, f"seq {seq} committed twice"
    return committed


def read_session(log: Path) -> tuple[list[tuple[int, str]], list[int]]:
    delivered: list[tuple[int, str]] = []
    acks: list[int] = []
    for line in log.read_text().splitlines() if log.exists() else []:
        kind, *fields = line.split()
        if kind == "D":
            delivered.append((int(fields[0]), fields[1]))
        else:
            acks.append(int(fields[0]))
    return delivered, acks


def check_sessions(sessions: list[tuple[list[tuple[int, str]], list[int]]], committed: dict[int, str]) -> int:
    """Assert the invariants; returns the number of redelivered (duplicate) items."""
    seen: dict[int, str] = {}
    acked_before = delivered_before = 0
    duplicates = 0
    for number, (delivered, acks) in enumerate(sessions):
        seqs = [seq for seq, _ in delivered]
        assert all(b == a + 1 for a, b in zip(seqs, seqs[1:])), f"session {number}: skip or reorder"
        if seqs:
            assert seqs[0] > acked_before, f"session {number} redelivered acked seq {seqs[0]}"
            assert seqs[0] <= delivered_before + 1, f"session {number} skipped to seq {seqs[0]}"
        for seq, item_id in delivered:
            assert item_id != "CORRUPT", f"session {number}: torn payload at seq {seq}"
            assert seen.setdefault(seq, item_id) == item_id, f"seq {seq} delivered with two payloads"
            duplicates += seq <= delivered_before
        acked_before = max([acked_before, *acks])
        delivered_before = max([delivered_before, *seqs])
    lost = sorted(seq for seq in committed if seq not in seen)
    assert not lost, f"{len(lost)} committed items never delivered, e.g. {lost[:5]}"
    assert all(seen[seq] == item_id for seq, item_id in committed.items())
    assert sorted(seen) == list(range(1, len(seen) + 1)), "a gap in delivered seqs"
    return duplicates


# --------------------------------------------------------------------------------- tests


@pytest.mark.timeout(120)
def test_sigkill_of_writer_and_reader_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    queue, logs = tmp_path / "queue", tmp_path / "logs"
    logs.mkdir()
    stderr = logs / "children.stderr"
    writer_logs: list[Path] = []
    reader_logs: list[Path] = []
    reader: subprocess.Popen[bytes] | None = None
    torn = 0
    for round_ in range(ROUNDS):
        writer_logs.append(logs / f"writer-{round_}.log")
        writer = spawn("writer", queue, round_, rng.randrange(1 << 30), writer_logs[-1], stderr=stderr)
        if reader is None:
            reader_logs.append(logs / f"reader-{len(reader_logs)}.log")
            reader = spawn("reader", queue, rng.randrange(1 << 30), reader_logs[-1], stderr=stderr)
        pause(rng, 0.1, 0.45, writer)
        kill(writer)
        if rng.random() < 0.3:
            torn += tear_tail(queue, rng, round_)
        if rng.random() < 0.5:  # else the reader lives on across the writer's restart
            pause(rng, 0.0, 0.1, reader)
            kill(reader)
            reader = None
        assert writer.returncode == -signal.SIGKILL, "the writer died on its own"
    if reader is not None:
        kill(reader)

    final_log = logs / "reader-final.log"
    with FileQueueReader(queue) as final_reader:
        lines = []
        while items := final_reader.read(10_000, timeout=0):
            lines += [f"D {item.seq} {id_of(item.payload)}\n" for item in items]
            final_reader.ack(items[-1].seq)
        final_log.write_text("".join(lines))
    committed = read_committed(writer_logs)
    sessions = [read_session(log) for log in [*reader_logs, final_log]]
    duplicates = check_sessions(sessions, committed)
    status = queue_status(queue)
    assert status.depth == 0 and status.oldest_age_seconds is None
    assert len(committed) > 1000, "the writers hardly ran: the test proved little"
    messages = stderr.read_text()
    assert "Traceback" not in messages and "damaged" not in messages, messages[-3000:]
    print(
        f"{len(committed)} committed, {duplicates} redelivered, {len(sessions)} reader sessions, "
        f"{torn} torn tails made, {messages.count('torn bytes')} repaired"
    )


def records_with_ends(path: Path) -> list[tuple[int, bytes, int]]:
    """(seq, payload, end offset) of every whole record of a segment file."""
    result = parse_records(path.read_bytes())
    return [(record.seq, record.payload, record.end) for record in result.records]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(12))
def test_segment_cut_or_corrupted_at_a_random_byte_keeps_whole_records(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with FileQueueWriter(tmp_path, segment_bytes=8000) as writer:
        for batch in range(40):
            writer.append_many([payload_for(f"{batch}.{n}") for n in range(rng.randint(1, 30))])
    segments = sorted(tmp_path.glob("*.seg"))
    damaged = segments[-1] if seed % 3 == 0 else rng.choice(segments)
    size = damaged.stat().st_size
    position = rng.randrange(0, size)
    before = {path: records_with_ends(path) for path in segments}
    if seed % 2:
        with open(damaged, "r+b") as handle:  # flip one byte
            handle.seek(position)
            byte = handle.read(1)
            handle.seek(position)
            handle.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.truncate(damaged, position)

    expected = []
    for path in segments:
        for seq, payload, end in before[path]:
            if path != damaged or end <= position:
                expected.append(payload)
    with FileQueueWriter(tmp_path, segment_bytes=8000) as writer:
        writer.append_many([payload_for(f"new.{n}") for n in range(5)])
    expected += [payload_for(f"new.{n}") for n in range(5)]
    with FileQueueReader(tmp_path) as reader:
        delivered = []
        while items := reader.read(1000, timeout=0):
            delivered += items
    assert [item.payload for item in delivered] == expected
    seqs = [item.seq for item in delivered]
    assert seqs == sorted(set(seqs))
    assert queue_status(tmp_path).appended_seq == seqs[-1]


CHILDREN = {"writer": child_writer, "reader": child_reader}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](*sys.argv[2:])
