"""Soak run: many images through the whole pipeline; throughput over time and memory growth.

    python benchmarks/soak.py [--count 100000] [--broker kafka|pubsub] [--interval 5]

Starts a local broker and the four stages as processes (like the demo), sends ``--count``
dataset images with ``app_1.py``, samples every ``--interval`` seconds the stored results, the
queue depth and each stage's resident memory, and ends with the invariant check. Memory growth
is measured from the end of warm-up (the first sample after 20 % of the images were stored) to
the end; the target is under 10 % per stage. Exit status 1 if the invariant is broken.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from DB import ResultReader  # noqa: E402
from MessageBroker.local_brokers import start_kafka, start_pubsub  # noqa: E402
from Pipeline.checker import check  # noqa: E402
from Pipeline.demo import PROJECT_ROOT, Stages  # noqa: E402
from Queue import queue_status  # noqa: E402

STAGES = ("sub", "pub", "app_2")


def resident_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Push many images through the pipeline; report throughput and memory.")
    parser.add_argument("--count", type=int, default=100_000, help="images to send (default: 100000)")
    parser.add_argument("--broker", choices=["kafka", "pubsub"], default="kafka")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default: 5)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    args = parser.parse_args(argv)

    run_dir = PROJECT_ROOT / "run" / "soak" / datetime.now().strftime("%Y%m%d-%H%M%S")
    broker = (start_kafka if args.broker == "kafka" else start_pubsub)(log_dir=run_dir / "logs")
    stages = Stages(run_dir, broker.env, args.broker)
    try:
        for name in STAGES:
            stages.start(name, name, "--log-level", "WARNING")
        manifest = run_dir / "manifest.jsonl"
        sender = stages.start("app_1", "app_1", "--count", str(args.count), "--manifest", str(manifest),
                              "--log-level", "WARNING")
        started = time.monotonic()
        print(f"soak: {args.count} images on {args.broker}; files in {run_dir}")
        print(f"{'t (s)':>7} {'stored':>8} {'img/s':>8} {'queue':>7} " + " ".join(f"{n + ' MB':>9}" for n in STAGES))
        warm: dict[str, float] | None = None
        last_rows, last_time = 0, started
        with ResultReader(stages.db_dir) as db:
            while True:
                time.sleep(args.interval)  # sampling period of the report
                now, rows = time.monotonic(), db.count()
                memory = {n: resident_mb(stages.processes[n].pid) for n in STAGES}
                depth = queue_status(stages.queue_dir).depth if stages.queue_dir.exists() else 0
                rate = (rows - last_rows) / (now - last_time)
                print(f"{now - started:7.0f} {rows:8d} {rate:8.0f} {depth:7d} "
                      + " ".join(f"{memory[n]:9.0f}" for n in STAGES), flush=True)
                last_rows, last_time = rows, now
                if warm is None and rows >= args.count * 0.2:
                    warm = memory
                if rows >= args.count or now - started > args.timeout:
                    break
                dead = [n for n in STAGES if stages.processes[n].poll() is not None]
                if dead:
                    print(f"stage(s) exited: {dead}; see {stages.logs}")
                    break
        elapsed = time.monotonic() - started
        sender.wait(timeout=60)
        report = check([manifest], stages.db_dir)
        print(f"\n{report.summary()}")
        print(f"throughput: {report.results / elapsed:.0f} images/s end to end over {elapsed:.0f} s")
        if warm:
            for name in STAGES:
                growth = (memory[name] - warm[name]) / warm[name] * 100
                verdict = "ok" if growth < 10 else "over the 10% target"
                print(f"memory {name}: {warm[name]:.0f} MB after warm-up -> {memory[name]:.0f} MB ({growth:+.1f}%, {verdict})")
        return 0 if report.ok and report.results == report.sent else 1
    finally:
        stages.stop_all()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
