"""One conformance suite for every backend (in-process, Kafka via Tansu, Pub/Sub emulator).

Each test runs once per backend. Where a backend lacks a capability, the test asserts the
backend's documented alternative behaviour (it never skips).
"""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from MessageBroker.broker_interface import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE_TOPIC,
    BrokerInterface,
    Consumer,
    Message,
    OutgoingMessage,
)
from MessageBroker.consume_loop import Backoff
from MessageBroker.errors import (
    BrokerClosedError,
    MessageTooLargeError,
    TopicNotFoundError,
)

pytestmark = pytest.mark.timeout(300)


def make_topic(broker: BrokerInterface, name: str, *groups: str) -> str:
    broker.create_topic(name)
    for group in groups:
        broker.ensure_subscription(name, group)
    return name


def drain(consumer: Consumer, count: int, timeout: float = 60.0, *, ack: bool = True) -> list[Message]:
    """Receive until ``count`` messages arrived (duplicates included) or ``timeout`` passed."""
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        batch = consumer.receive(500, timeout=0.5)
        if ack:
            consumer.ack(batch)
        received.extend(batch)
    return received


def receive_quietly(consumer: Consumer, seconds: float) -> list[Message]:
    """Everything that arrives within ``seconds`` (acked)."""
    received: list[Message] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = consumer.receive(500, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        consumer.ack(batch)
        received.extend(batch)
    return received


# -- 1. round trip ----------------------------------------------------------------------------

def test_many_messages_from_many_threads_all_arrive(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    threads, per_thread = 4, 2500
    errors: list[BaseException] = []

    def produce(worker: int) -> None:
        try:
            for start in range(0, per_thread, 250):
                broker.publish_batch(topic, [f"{worker}-{i}".encode() for i in range(start, start + 250)])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    consumer = broker.consumer(topic, "g")
    workers = [threading.Thread(target=produce, args=(w,)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    expected = {f"{w}-{i}".encode() for w in range(threads) for i in range(per_thread)}
    received = drain(consumer, len(expected), timeout=120)
    bodies = [m.data for m in received]
    duplicates = len(bodies) - len(set(bodies))
    print(f"{backend.name}: {len(expected)} published, {len(set(bodies))} distinct received, {duplicates} duplicates")
    assert set(bodies) == expected


# -- 2. fidelity ------------------------------------------------------------------------------

def test_payloads_keys_and_attributes_are_byte_exact(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    odd_attributes = {"plain": "value", "spaces in name": " padded value ", "équation": "a=b;c=d",
                      "emoji": "🙂 ünïcödé", "empty-ish": "-", "json": '{"k": [1, 2]}'}
    sent = [
        OutgoingMessage.build(b""),
        OutgoingMessage.build(bytes(range(256)), key=b"\x00\xffbinary-key"),
        OutgoingMessage.build(b"\xff\xfe\xfd not utf-8 \x80", key="text-key", attributes=odd_attributes),
        OutgoingMessage.build(b"x" * 100_000, attributes={"n": "1"}),
    ]
    for message in sent:
        broker.publish_batch(topic, [message])
    received = drain(broker.consumer(topic, "g"), len(sent))
    assert sorted((m.data, m.key, m.attributes) for m in received) == sorted(
        (m.data, m.key, dict(m.attributes)) for m in sent
    )
    assert all(m.id and m.topic == topic for m in received)
    assert all(m.publish_time is not None for m in received)


# -- 3. size limits ---------------------------------------------------------------------------

def test_oversize_message_fails_at_once_with_typed_error(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    for size in (broker.max_message_bytes + 1, 20 * 1024 * 1024):
        started = time.monotonic()
        with pytest.raises(MessageTooLargeError) as raised:
            broker.publish(topic, b"x" * size)
        assert time.monotonic() - started < 2
        assert raised.value.size == size and raised.value.limit == broker.max_message_bytes
        assert str(size) in str(raised.value) and str(broker.max_message_bytes) in str(raised.value)


def test_message_just_under_the_limit_is_delivered(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    # Backends count protocol overhead differently; a message well inside the limit must pass.
    size = broker.max_message_bytes // 2
    broker.publish(topic, b"y" * size)
    received = drain(broker.consumer(topic, "g"), 1)
    assert [len(m.data) for m in received] == [size]


# -- 4. isolation, fan-out, competing consumers ----------------------------------------------

def test_topics_are_isolated(backend, topic_name):
    broker = backend.make()
    first, second = make_topic(broker, topic_name("a"), "g"), make_topic(broker, topic_name("b"), "g")
    broker.publish_batch(first, [b"first-%d" % i for i in range(20)])
    broker.publish_batch(second, [b"second-%d" % i for i in range(20)])
    got_first = drain(broker.consumer(first, "g"), 20)
    got_second = drain(broker.consumer(second, "g"), 20)
    assert {m.data for m in got_first} == {b"first-%d" % i for i in range(20)}
    assert {m.data for m in got_second} == {b"second-%d" % i for i in range(20)}


def test_two_groups_each_receive_everything(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g1", "g2")
    sent = {b"m-%d" % i for i in range(200)}
    broker.publish_batch(topic, sorted(sent))
    assert {m.data for m in drain(broker.consumer(topic, "g1"), len(sent))} == sent
    assert {m.data for m in drain(broker.consumer(topic, "g2"), len(sent))} == sent


def test_consumers_in_one_group_share_the_work(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "workers")
    members = 3
    consumers = [broker.consumer(topic, "workers") for _ in range(members)]
    handled: dict[int, list[bytes]] = collections.defaultdict(list)
    stop = threading.Event()

    def work(index: int) -> None:
        while not stop.is_set():
            batch = consumers[index].receive(10, timeout=0.2)
            handled[index].extend(m.data for m in batch)
            consumers[index].ack(batch)
            if batch:
                time.sleep(0.01)  # a little work per batch, so one member cannot take everything

    threads = [threading.Thread(target=work, args=(i,)) for i in range(members)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(5)  # let every member join the group before the messages flow
        sent = [b"job-%d" % i for i in range(600)]
        for start in range(0, len(sent), 20):
            broker.publish_batch(topic, sent[start:start + 20])
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len({d for h in handled.values() for d in h}) < len(sent):
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    everything = [d for h in handled.values() for d in h]
    print(f"{backend.name}: per member {[len(handled[i]) for i in range(members)]}, "
          f"{len(everything) - len(set(everything))} duplicates")
    assert set(everything) == set(sent)
    assert sum(1 for i in range(members) if handled[i]) >= 2, "work was not shared"


def test_group_created_after_publish(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name())
    broker.publish_batch(topic, [b"early-%d" % i for i in range(5)])
    consumer = broker.consumer(topic, "late-group")
    if broker.capabilities.retains_before_subscribe:
        assert len(drain(consumer, 5, timeout=30)) == 5
    else:
        assert receive_quietly(consumer, 3) == []
        broker.publish(topic, b"after")
        assert [m.data for m in drain(consumer, 1, timeout=30)] == [b"after"]


# -- 5. nack and handler errors ---------------------------------------------------------------

def test_nack_redelivers_while_others_keep_flowing(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    broker.publish_batch(topic, [b"a", b"b", b"c"])
    consumer = broker.consumer(topic, "g")
    first = drain(consumer, 3, ack=False)
    rejected = next(m for m in first if m.data == b"b")
    consumer.ack([m for m in first if m is not rejected])
    consumer.nack(rejected)
    broker.publish(topic, b"d")
    again = drain(consumer, 2)
    assert {m.data for m in again} >= {b"b", b"d"}
    redelivered = next(m for m in again if m.data == b"b")
    assert redelivered.delivery_attempt == 2


def test_handler_exception_leads_to_redelivery(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    broker.publish_batch(topic, [b"flaky", b"fine"])
    attempts: collections.Counter[bytes] = collections.Counter()
    done: set[bytes] = set()

    def handler(message: Message) -> None:
        attempts[message.data] += 1
        if message.data == b"flaky" and attempts[message.data] < 3:
            raise RuntimeError("temporary failure")
        done.add(message.data)
        if done == {b"flaky", b"fine"}:
            broker.stop()

    stats = broker.subscribe(topic, handler, "g", backoff=Backoff(0.01, 0.05), handle_signals=False)
    assert done == {b"flaky", b"fine"}
    assert attempts[b"flaky"] == 3 and stats.retried == 2 and stats.dead_lettered == 0


def test_poison_message_is_dead_lettered_and_stream_continues(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    dlq = make_topic(broker, broker.dead_letter_topic(topic), "inspect")
    good = [b"good-%d" % i for i in range(10)]
    messages = [OutgoingMessage.build(b"poison", key="k1", attributes={"origin": "test"})]
    messages += [OutgoingMessage.build(body, key="k1") for body in good]
    broker.publish_batch(topic, messages)
    handled: list[bytes] = []

    def handler(message: Message) -> None:
        if message.data == b"poison":
            raise ValueError("cannot parse this")
        handled.append(message.data)

    stop = threading.Event()
    runner = threading.Thread(target=lambda: broker.subscribe(
        topic, handler, "g", max_attempts=3, backoff=Backoff(0.01, 0.05), stop_event=stop, handle_signals=False))
    runner.start()
    try:
        letters = drain(broker.consumer(dlq, "inspect"), 1, timeout=60)
    finally:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(handled) < set(good):
            time.sleep(0.1)
        stop.set()
        runner.join()
    assert set(handled) == set(good)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.data == b"poison" and letter.key == b"k1"
    assert letter.attributes["origin"] == "test"
    assert letter.attributes[DEAD_LETTER_ATTEMPTS] == "3"
    assert letter.attributes[DEAD_LETTER_SOURCE_TOPIC] == topic
    assert "ValueError: cannot parse this" in letter.attributes[DEAD_LETTER_REASON]


def test_per_key_order(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    keys = ["alpha", "beta", "gamma"]
    batch = [OutgoingMessage.build(f"{key}:{i}".encode(), key=key) for i in range(100) for key in keys]
    broker.publish_batch(topic, batch)
    received = drain(broker.consumer(topic, "g"), len(batch))
    sequences: dict[str, list[int]] = collections.defaultdict(list)
    for message in received:
        key, number = message.data.decode().split(":")
        sequences[key].append(int(number))
    assert {k: sorted(v) for k, v in sequences.items()} == {k: list(range(100)) for k in keys}
    if broker.capabilities.ordered_by_key:
        assert all(seq == sorted(seq) for seq in sequences.values())


# -- 6. crash before ack ----------------------------------------------------------------------

CONSUME_AND_HANG = textwrap.dedent("""
    import sys, time
    from MessageBroker.message_broker_factory import MessageBrokerFactory
    broker = MessageBrokerFactory.create()
    consumer = broker.consumer(sys.argv[1], sys.argv[2])
    while True:
        batch = consumer.receive(10, timeout=1.0)
        if batch:
            print("GOT", *[m.data.decode() for m in batch], flush=True)
            time.sleep(3600)  # never acks: the parent kills this process
""")


def test_consumer_killed_before_ack_message_is_redelivered(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    if not broker.capabilities.cross_process:
        # In-process only: another process cannot see the topic at all; the in-process
        # analogue of a crash (close without ack) must hand the message back.
        child = subprocess.run([sys.executable, "-c", CONSUME_AND_HANG, topic, "g"], env=backend.subprocess_env(),
                               capture_output=True, text=True, timeout=60)
        assert child.returncode != 0 and "TopicNotFoundError" in child.stderr
        broker.publish(topic, b"unacked")
        first = broker.consumer(topic, "g")
        assert [m.data for m in drain(first, 1, ack=False)] == [b"unacked"]
        first.close()
        assert [m.data for m in drain(broker.consumer(topic, "g"), 1)] == [b"unacked"]
        return
    child = subprocess.Popen([sys.executable, "-c", CONSUME_AND_HANG, topic, "g"], env=backend.subprocess_env(),
                             stdout=subprocess.PIPE, text=True)
    try:
        broker.publish(topic, b"unacked")
        line = child.stdout.readline()  # blocks until the child received the message
        assert line.split() == ["GOT", "unacked"]
    finally:
        child.kill()
        child.wait()
    received = drain(broker.consumer(topic, "g"), 1, timeout=120)
    assert [m.data for m in received] == [b"unacked"]


# -- 7-10. ack rules, close, empty receive ----------------------------------------------------

def test_double_ack_is_harmless_and_ack_after_close_raises(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    broker.publish(topic, b"once")
    consumer = broker.consumer(topic, "g")
    [message] = drain(consumer, 1, ack=False)
    consumer.ack(message)
    consumer.ack(message)
    consumer.close()
    with pytest.raises(BrokerClosedError):
        consumer.ack(message)
    with pytest.raises(BrokerClosedError):
        consumer.receive(1, timeout=0)
    assert receive_quietly(broker.consumer(topic, "g"), 3) == []


def test_close_flushes_pending_publishes_and_later_use_raises(backend, topic_name):
    publisher = backend.make()
    topic = make_topic(publisher, topic_name(), "g")
    futures = [publisher.publish_async(topic, b"pending-%d" % i) for i in range(500)]
    report = publisher.close()
    assert report.ok, report
    assert all(f.done() and f.exception() is None for f in futures)
    for action in (lambda: publisher.publish(topic, b"late"), lambda: publisher.consumer(topic, "g"),
                   lambda: publisher.create_topic(topic)):
        with pytest.raises(BrokerClosedError):
            action()
    reader = backend.make()
    assert {m.data for m in drain(reader.consumer(topic, "g"), 500)} == {b"pending-%d" % i for i in range(500)}


def test_timed_receive_on_empty_topic_returns_nothing(backend, topic_name):
    broker = backend.make()
    topic = make_topic(broker, topic_name(), "g")
    consumer = broker.consumer(topic, "g")
    consumer.receive(1, timeout=2)  # lets a Kafka consumer join its group first
    started = time.monotonic()
    assert consumer.receive(10, timeout=1.0) == []
    assert time.monotonic() - started < 5


# -- 11. unknown topics ------------------------------------------------------------------------

def test_unknown_topic_gives_typed_error_quickly(backend, topic_name):
    broker = backend.make()
    missing = topic_name("missing")
    for action in (lambda: broker.publish(missing, b"x"), lambda: broker.consumer(missing, "g"),
                   lambda: broker.ensure_subscription(missing, "g")):
        started = time.monotonic()
        with pytest.raises(TopicNotFoundError):
            action()
        assert time.monotonic() - started < 15


def test_create_topic_is_idempotent_and_delete_removes_it(backend, topic_name):
    broker = backend.make()
    topic = topic_name()
    broker.create_topic(topic)
    broker.create_topic(topic)
    broker.publish(topic, b"x")
    broker.delete_topic(topic)
    broker.delete_topic(topic)
    with pytest.raises(TopicNotFoundError):
        broker.consumer(topic, "g")
