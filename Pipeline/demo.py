"""One-command demo: local broker + the four stages + sample images + a checked summary.

    python -m Pipeline.demo [--broker kafka|pubsub] [--count 200]

Starts the local Tansu broker (or the Pub/Sub emulator), then ``app_2.py``,
``model_server_sub.py`` and ``model_server_pub.py`` as separate processes, sends ``--count``
dataset images plus a few broken files with ``app_1.py``, shows predictions as they arrive and
ends with the invariant check (sent = results + dead letters, nothing lost or duplicated) and the
accuracy against the known labels. Everything is stopped on Ctrl-C or at the end; the run's
queue, DB, manifest and logs stay in ``run/demo/<time>/``. Tests reuse :class:`Stages`.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from MessageBroker.local_brokers import LocalBroker, start_kafka, start_pubsub
from Pipeline.checker import check, read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"app_1": "app_1.py", "app_2": "app_2.py", "sub": "model_server_sub.py", "pub": "model_server_pub.py"}


class Stages:
    """Runs pipeline scripts as processes sharing one broker, queue dir and DB dir."""

    def __init__(self, run_dir: Path, broker_env: dict[str, str], broker_name: str, *, topic_prefix: str = ""):
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.db_dir = run_dir / "db"
        self.queue_dir = run_dir / "queue"
        self.env = {**os.environ, **broker_env, "MESSAGE_BROKER": broker_name, "PYTHONUNBUFFERED": "1",
                    "PIPELINE_DB_DIR": str(self.db_dir), "PIPELINE_QUEUE_DIR": str(self.queue_dir),
                    "TF_CPP_MIN_LOG_LEVEL": "2"}
        if topic_prefix:
            self.env["PIPELINE_IMAGES_TOPIC"] = f"{topic_prefix}new_image_topic"
            self.env["PIPELINE_RESULTS_TOPIC"] = f"{topic_prefix}inference_topic"
            self.env["PIPELINE_GROUP_PREFIX"] = topic_prefix
        self.processes: dict[str, subprocess.Popen] = {}  # type: ignore[type-arg]

    def command(self, script: str, *args: str) -> list[str]:
        return [sys.executable, str(PROJECT_ROOT / SCRIPTS[script]), *args]

    def start(self, name: str, script: str, *args: str, pipe_stdout: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen:  # type: ignore[type-arg]
        """Start a long-running stage; stderr (and stdout unless piped) go to logs/<name>.log."""
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(self.command(script, *args), env={**self.env, **(env or {})}, cwd=PROJECT_ROOT,
                                   stdin=subprocess.DEVNULL, stderr=log,
                                   stdout=subprocess.PIPE if pipe_stdout else log)
        log.close()
        self.processes[name] = process
        return process

    def run(self, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
        """Run a script to completion (app_1.py, a query), capturing its output."""
        return subprocess.run(self.command(script, *args), env=self.env, cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal one stage and wait for it (SIGKILL after ``timeout``); returns its exit code."""
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout:
            process.stdout.close()
        return process.returncode

    def stop_all(self, timeout: float = 15.0) -> None:
        for name in list(self.processes):
            if self.processes[name].poll() is None:
                self.processes[name].send_signal(signal.SIGTERM)
        for name in list(self.processes):
            self.stop(name, timeout=timeout)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def write_broken_samples(directory: Path) -> list[Path]:
    """A few inputs the model server must dead-letter, each for its own reason."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = {"not_an_image.png": b"this is plain text, not a PNG",
               "truncated.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x1c",
               "empty.png": b""}
    for name, data in samples.items():
        (directory / name).write_bytes(data)
    return [directory / name for name in samples]


def follow(process: subprocess.Popen, expected: int, idle_timeout: float) -> Iterator[dict]:  # type: ignore[type-arg]
    """Rows app_2.py echoes, until ``expected`` arrived or nothing came for ``idle_timeout`` s."""
    selector = selectors.DefaultSelector()
    descriptor = process.stdout.fileno()
    selector.register(descriptor, selectors.EVENT_READ)
    pending, seen = b"", 0
    while seen < expected:
        if b"\n" not in pending:
            # Raw reads: a buffered readline could hold lines the selector never reports.
            if not selector.select(timeout=idle_timeout):
                return
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                return
            pending += chunk
            continue
        line, pending = pending.split(b"\n", 1)
        if line.strip():
            seen += 1
            yield json.loads(line)


def show(row: dict) -> str:  # type: ignore[type-arg]
    if row["kind"] == "dead_letter":
        return f"  dead letter {row['id'][:12]}  {row['reason']}"
    expected = row.get("expected_label")
    mark = "" if expected is None else ("  ok" if expected == row["label"] else f"  WRONG (expected {expected})")
    return f"  image {row['image_id'][:12]}  -> {row['label']}  ({row['confidence']:.1%}){mark}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole pipeline on a local broker and check the result.")
    parser.add_argument("--broker", choices=["kafka", "pubsub"], default="kafka", help="local broker (default: kafka)")
    parser.add_argument("--count", type=int, default=200, help="dataset images to send (default: 200)")
    parser.add_argument("--show", type=int, default=25, help="predictions to print one by one (default: 25)")
    parser.add_argument("--timeout", type=float, default=120, help="give up after this many idle seconds (default: 120)")
    args = parser.parse_args(argv)

    run_dir = PROJECT_ROOT / "run" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    print(f"demo on {args.broker}; files in {run_dir}")
    broker: LocalBroker | None = None
    stages: Stages | None = None
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        started = time.monotonic()
        broker = (start_kafka if args.broker == "kafka" else start_pubsub)(log_dir=run_dir / "logs")
        print(f"[1/4] local {args.broker} broker ready on {broker.address} ({time.monotonic() - started:.1f} s)")
        stages = Stages(run_dir, broker.env, args.broker)
        app_2 = stages.start("app_2", "app_2", "--echo", pipe_stdout=True)
        stages.start("model_server_sub", "sub")
        stages.start("model_server_pub", "pub")
        print("[2/4] started app_2.py, model_server_sub.py, model_server_pub.py (logs in logs/)")
        manifest = run_dir / "manifest.jsonl"
        sent = stages.run("app_1", "--count", str(args.count), "--manifest", str(manifest))
        broken = stages.run("app_1", "--manifest", str(manifest), *map(str, write_broken_samples(run_dir / "broken")))
        for result in (sent, broken):
            print("[3/4] app_1.py: " + result.stdout.strip().splitlines()[-1] if result.stdout.strip()
                  else f"app_1.py failed:\n{result.stderr}")
        expected = sum(bool(row.get("confirmed", True)) for row in read_jsonl(manifest))
        print(f"[4/4] predictions as they arrive ({expected} expected):")
        arrived = 0
        for row in follow(app_2, expected, args.timeout):
            arrived += 1
            if arrived <= args.show or row["kind"] == "dead_letter":
                print(show(row))
            elif arrived % 100 == 0 or arrived == expected:
                print(f"  ... {arrived}/{expected} stored")
        report = check([manifest], stages.db_dir)
        print("\nsummary: " + report.summary())
        if arrived < expected:
            print(f"stopped waiting after {args.timeout:g} idle seconds; see {stages.logs}")
        return 0 if report.ok and arrived >= expected else 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything")
        return 130
    finally:
        if stages:
            stages.stop_all()
        if broker:
            broker.stop()
        print("all stages and the broker stopped")


if __name__ == "__main__":
    sys.exit(main())
