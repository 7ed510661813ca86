"""Publish and consume throughput of each broker backend through our API, and of bare confluent-kafka.

For every backend the script publishes ``--count`` messages of ``--size`` bytes with
``publish_batch`` in chunks of ``--chunk`` (each chunk blocks until the broker confirmed it: one
round trip per chunk), again with ``publish_async`` for every message and one wait at the end
(pipelined, like the bare client), then consumes the first run's messages with
``consumer.receive(--batch)`` + ``ack`` of each batch. On Kafka it also runs
bare confluent-kafka against the same Tansu broker with the same producer and consumer settings
(``Producer.produce`` for every message and one ``flush``; ``Consumer.consume`` in batches with an
asynchronous commit per batch, reading the topic our API wrote) and prints the ratio bare / ours.

Consume rates are timed from the first message received, so the group join is not counted.
Local brokers are started here (Tansu for kafka, Google's emulator for pubsub) and stopped at
the end; a backend that cannot run is reported as skipped.

    python benchmarks/bench_brokers.py [--backends memory,kafka,pubsub] [--count 100000]
                                       [--size 800] [--chunk 1000] [--batch 500] [--rounds 3]

Each backend runs ``--rounds`` times (the bare client right after each of our rounds) and the
medians are compared, so one noisy round does not decide the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script

from MessageBroker.broker_interface import BrokerInterface, OutgoingMessage
from MessageBroker.errors import BrokerError
from MessageBroker.message_broker_factory import MessageBrokerFactory

BACKENDS = ("memory", "kafka", "pubsub")
JOIN_TIMEOUT = 60.0  # longest wait for the first message (group join, subscription start)


def payloads(count: int, size: int) -> list[bytes]:
    """``count`` distinct messages of ``size`` bytes (an 8-byte sequence number, then filler)."""
    filler = bytes(range(256)) * (size // 256 + 1)
    return [i.to_bytes(8, "big") + filler[: max(0, size - 8)] for i in range(count)]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


@contextlib.contextmanager
def local_broker(name: str) -> Iterator[dict[str, str]]:
    """Start the local broker ``name`` needs; yields the environment that points at it."""
    if name == "memory":
        yield {}
        return
    from MessageBroker.local_brokers import start_kafka, start_pubsub

    broker = (start_kafka if name == "kafka" else start_pubsub)()
    previous = {key: os.environ.get(key) for key in broker.env}
    os.environ.update(broker.env)
    try:
        yield dict(broker.env)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        broker.stop()


def bench_api(broker: BrokerInterface, messages: list[bytes], chunk: int,
              batch: int) -> tuple[float, float, float, str]:
    """Publish (blocking chunks, then pipelined) and consume ``messages`` through the broker API.

    Returns (publish_batch/s, publish_async/s, consume/s, topic); the consumer reads the
    messages of the publish_batch run.
    """
    topic, group = f"bench_{uuid.uuid4().hex[:8]}", f"bench_{uuid.uuid4().hex[:8]}"
    spare = f"bench_async_{uuid.uuid4().hex[:8]}"
    for name in (topic, spare):
        broker.create_topic(name)
        broker.ensure_subscription(name, group)
    outgoing = [OutgoingMessage(data) for data in messages]
    started = time.perf_counter()
    for start in range(0, len(outgoing), chunk):
        broker.publish_batch(topic, outgoing[start:start + chunk])
    published = rate(len(outgoing), time.perf_counter() - started)
    started = time.perf_counter()
    for future in [broker.publish_async(spare, data) for data in messages]:
        future.result(timeout=broker.publish_timeout)
    pipelined = rate(len(messages), time.perf_counter() - started)
    consumer = broker.consumer(topic, group, max_outstanding=max(1000, batch))
    try:
        consumed = timed_drain(len(messages), lambda: consumer.receive(batch, timeout=1.0), consumer.ack)
    finally:
        consumer.close()
    return published, pipelined, consumed, topic


def timed_drain(count: int, receive: Callable[[], list], done: Callable[[list], None]) -> float:
    """Receive ``count`` messages; the rate counts from the first one received."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    first: list = []
    while not first:
        if time.monotonic() > deadline:
            raise SystemExit(f"no message arrived within {JOIN_TIMEOUT:g} s")
        first = receive()
    done(first)
    started, received = time.perf_counter(), len(first)
    while received < count:
        got = receive()
        if not got and time.monotonic() > deadline + 60:
            raise SystemExit(f"consumer stalled after {received} of {count} messages")
        done(got)
        received += len(got)
    return rate(count - len(first), time.perf_counter() - started)


def bench_bare_kafka(broker: BrokerInterface, messages: list[bytes], batch: int, read_topic: str) -> tuple[float, float]:
    """The same work with confluent-kafka directly and the handler's librdkafka settings.

    It consumes ``read_topic`` (the topic our API wrote, in another group): how a topic was
    written (record batch sizes) changes how fast it reads, so both read the same one.
    """
    import confluent_kafka

    settings = broker.settings  # type: ignore[attr-defined]
    topic = f"bench_bare_{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic)
    producer = confluent_kafka.Producer({**settings.client, **settings.producer})
    failures: list[object] = []

    def report(error: object, _message: object) -> None:
        if error is not None:
            failures.append(error)

    started = time.perf_counter()
    for data in messages:
        while True:
            try:
                producer.produce(topic, data, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.01)
    left = producer.flush(60)
    published = rate(len(messages), time.perf_counter() - started)
    if left or failures:
        raise SystemExit(f"bare producer: {left} left, {len(failures)} failed ({failures[:1]})")
    consumer = confluent_kafka.Consumer({**settings.client, **settings.consumer, "group.id": f"bench_bare_{uuid.uuid4().hex[:8]}"})
    consumer.subscribe([read_topic])

    def receive() -> list:
        return [m for m in consumer.consume(batch, timeout=1.0) if m.error() is None]

    def commit(got: list) -> None:
        if got:
            consumer.commit(message=got[-1], asynchronous=True)  # per batch, like our ack

    try:
        consumed = timed_drain(len(messages), receive, commit)
    finally:
        consumer.close()
    return published, consumed


def bench_backend(name: str, broker: BrokerInterface, messages: list[bytes], args: argparse.Namespace) -> None:
    """``args.rounds`` rounds of our API (and, on Kafka, the bare client right after each);
    prints every round and, with more than one, the medians and their ratio."""
    ours, bare = [], []
    for round_ in range(1, args.rounds + 1):
        label = f" r{round_}" if args.rounds > 1 else ""
        published, pipelined, consumed, topic = bench_api(broker, messages, args.chunk, args.batch)
        ours.append((published, pipelined, consumed))
        print(f"{name + ' (our API)' + label:<22}{published:>15,.0f}{pipelined:>15,.0f}{consumed:>15,.0f}", flush=True)
        if name == "kafka":
            bare_published, bare_consumed = bench_bare_kafka(broker, messages, args.batch, topic)
            bare.append((bare_published, bare_published, bare_consumed))
            print(f"{'kafka (bare client)' + label:<22}{bare_published:>15,.0f}{bare_published:>15,.0f}"
                  f"{bare_consumed:>15,.0f}", flush=True)
    if args.rounds > 1:
        mine = [statistics.median(column) for column in zip(*ours)]
        print(f"{name + ' (ours, median)':<22}" + "".join(f"{value:>15,.0f}" for value in mine))
    if bare:
        theirs = [statistics.median(column) for column in zip(*bare)]
        if args.rounds > 1:
            print(f"{'kafka (bare, median)':<22}" + "".join(f"{value:>15,.0f}" for value in theirs))
        mine = [statistics.median(column) for column in zip(*ours)]
        print(f"{'  bare / ours':<22}" + "".join(f"{b / o:>15.2f}" for b, o in zip(theirs, mine)), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")
    parser.add_argument("--count", type=int, default=100_000, help="messages per run (default 100000)")
    parser.add_argument("--size", type=int, default=800, help="message size in bytes (default 800)")
    parser.add_argument("--chunk", type=int, default=1000, help="messages per publish_batch call (default 1000)")
    parser.add_argument("--batch", type=int, default=500, help="messages per receive call (default 500)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="repetitions per backend; medians are compared (default 3)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    chosen = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; valid: {', '.join(BACKENDS)}")
    messages = payloads(args.count, args.size)
    print(f"{args.count} messages of {args.size} bytes; publish_batch chunks of {args.chunk}, "
          f"receive batches of {args.batch}")
    print(f"{'':<22}{'publish_batch':>15}{'publish_async':>15}{'consume':>15}   (msg/s)")
    for name in chosen:
        try:
            with local_broker(name):
                broker = MessageBrokerFactory.create(name)
                try:
                    bench_backend(name, broker, messages, args)
                finally:
                    broker.close()
        except (BrokerError, ImportError) as exc:
            print(f"{name:<22}skipped: {type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
