"""Throughput of the file queue: a writer process → a reader process, records of ~200 bytes.

For each writer batch size, the writer appends N records with ``append_many`` (one fdatasync
per batch) while the reader reads up to ``--read-batch`` records at a time and acks each read
(two fsyncs per ack). Prints items/s end to end (first append to last ack) and fsyncs/s.

    python benchmarks/bench_queue.py [--batch-sizes 1 64 512] [--items 100000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from Queue import FileQueueReader, FileQueueWriter  # noqa: E402

RECORD_BYTES = 200
BATCH_ONE_ITEMS = 5_000  # one fsync per record: keep this case short


def run_writer(directory: str, items: int, batch_size: int, go, results) -> None:
    payload = bytes(range(256))[:RECORD_BYTES]
    with FileQueueWriter(directory) as writer:
        go.wait()
        started = time.monotonic()
        commits = 0
        for start in range(0, items, batch_size):
            writer.append_many([payload] * min(batch_size, items - start))
            commits += 1
        results.put(("writer", started, time.monotonic(), commits))


def run_reader(directory: str, items: int, read_batch: int, ready, results) -> None:
    with FileQueueReader(directory) as reader:
        ready.set()
        received = acks = 0
        while received < items:
            batch = reader.read(read_batch, timeout=10.0)
            if not batch:
                raise SystemExit("reader timed out: the writer stalled")
            received += len(batch)
            reader.ack(batch[-1].seq)
            acks += 1
        results.put(("reader", None, time.monotonic(), acks))


def measure(batch_size: int, items: int, read_batch: int, parent: Path | None) -> dict[str, float]:
    directory = tempfile.mkdtemp(prefix=f"bench-queue-{batch_size}-", dir=parent)
    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    reader = context.Process(target=run_reader, args=(directory, items, read_batch, ready, results))
    writer = context.Process(target=run_writer, args=(directory, items, batch_size, ready, results))
    reader.start()
    writer.start()
    reports = dict((role, rest) for role, *rest in (results.get(timeout=600) for _ in range(2)))
    reader.join()
    writer.join()
    shutil.rmtree(directory)
    started, writer_done, commits = reports["writer"]
    _, reader_done, acks = reports["reader"]
    elapsed = reader_done - started
    return {
        "batch": batch_size,
        "items": items,
        "seconds": elapsed,
        "items_per_s": items / elapsed,
        "writer_items_per_s": items / (writer_done - started),
        "fsyncs_per_s": (commits + 2 * acks) / elapsed,
        "commits_per_s": commits / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 512],
                        help="writer batch sizes (records per append_many) to measure")
    parser.add_argument("--items", type=int, default=100_000,
                        help=f"records per run (batch size 1 uses {BATCH_ONE_ITEMS})")
    parser.add_argument("--read-batch", type=int, default=1024, help="max records per read()")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to create the queue (default: the system temp directory)")
    args = parser.parse_args()
    print(f"{'batch':>6} {'items':>8} {'seconds':>8} {'items/s':>10} {'writer items/s':>15} "
          f"{'fsyncs/s':>9} {'commits/s':>10}")
    for batch_size in args.batch_sizes:
        items = BATCH_ONE_ITEMS if batch_size == 1 else args.items
        row = measure(batch_size, items, args.read_batch, args.dir)
        print(f"{row['batch']:>6} {row['items']:>8} {row['seconds']:>8.2f} {row['items_per_s']:>10.0f} "
              f"{row['writer_items_per_s']:>15.0f} {row['fsyncs_per_s']:>9.0f} "
              f"{row['commits_per_s']:>10.0f}")


if __name__ == "__main__":
    main()
