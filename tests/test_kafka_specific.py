"""Kafka-only behaviour the shared conformance suite does not pin down, against a real Tansu broker."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from MessageBroker.broker_interface import Message, OutgoingMessage
from MessageBroker.errors import BrokerConfigError, PublishError
from MessageBroker.kafka_handler import KafkaHandler
from MessageBroker.local_brokers import start_kafka

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def kafka(kafka_broker):
    """A handler on the session's Tansu broker; closed after the test."""
    handler = KafkaHandler.from_config(overrides={("kafka", "bootstrap.servers"): kafka_broker.address})
    yield handler
    handler.close(timeout=5)


def group() -> str:
    return f"g_{uuid.uuid4().hex[:8]}"


def receive(consumer, count: int, timeout: float = 60.0) -> list[Message]:
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        received += consumer.receive(100, timeout=0.5)
    return received


def test_same_key_goes_to_one_partition_in_order(kafka, topic_name):
    topic = topic_name()
    kafka.create_topic(topic)
    ids = kafka.publish_batch(topic, [OutgoingMessage.build(b"%d" % i, key=f"k{i % 3}") for i in range(30)])
    partitions: dict[str, set[str]] = {}
    for i, message_id in enumerate(ids):
        partitions.setdefault(f"k{i % 3}", set()).add(message_id.split(":")[0])
    assert all(len(found) == 1 for found in partitions.values())
    offsets = [int(message_id.split(":")[1]) for i, message_id in enumerate(ids) if i % 3 == 0]
    assert offsets == sorted(offsets)


def one_partition(kafka, topic_name, count):  # type: ignore[no-untyped-def]
    """A new consumer and the messages m0, m1, ... of one partition it received, in order."""
    topic = topic_name()
    kafka.create_topic(topic)
    kafka.publish_batch(topic, [OutgoingMessage.build(b"m%d" % i, key="one-partition") for i in range(count)])
    consumer = kafka.consumer(topic, group())
    return consumer, sorted(receive(consumer, count), key=lambda m: m.data)


def test_nack_rewinds_the_partition_but_skips_what_was_acked(kafka, topic_name):
    consumer, first = one_partition(kafka, topic_name, 5)
    assert [m.data for m in first] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    consumer.ack([first[0], first[2], first[4]])
    consumer.nack(first[1])  # m3 is neither acked nor nacked: the rewind brings it again too
    again = receive(consumer, 2, timeout=30)
    assert sorted(m.data for m in again) == [b"m1", b"m3"]
    assert {m.data: m.delivery_attempt for m in again} == {b"m1": 2, b"m3": 2}
    consumer.ack(again)
    assert consumer.receive(10, timeout=2) == []


def test_acking_after_a_nack_of_a_lower_offset_skips_the_refetch(kafka, topic_name):
    consumer, first = one_partition(kafka, topic_name, 3)
    consumer.nack(first[0])
    consumer.ack(first[1:])  # acked after the rewind was requested
    again = receive(consumer, 1, timeout=30)
    assert [m.data for m in again] == [b"m0"]
    consumer.ack(again)
    assert consumer.receive(10, timeout=2) == []


def test_an_unacked_message_holds_back_the_commit_of_later_ones(kafka, topic_name):
    topic, members = topic_name(), group()
    kafka.create_topic(topic)
    kafka.publish_batch(topic, [OutgoingMessage.build(b"m%d" % i, key="one-partition") for i in range(3)])
    consumer = kafka.consumer(topic, members)
    first = sorted(receive(consumer, 3), key=lambda m: m.data)
    consumer.ack(first[1:])
    consumer.close()  # m0 was never acked: the group resumes at m0 (m1, m2 are tolerated duplicates)
    again = receive(kafka.consumer(topic, members), 3)
    assert sorted(m.data for m in again) == [b"m0", b"m1", b"m2"]


def test_sequential_closes_do_not_wedge_a_tansu_group(kafka, topic_name):
    """Tansu never re-forms a group whose leader left while it was re-forming (see spec sheet)."""
    members = group()
    first, second, third = topic_name("a"), topic_name("b"), topic_name("c")
    for topic in (first, second, third):
        kafka.create_topic(topic)
        kafka.publish(topic, topic.encode())
    leader = kafka.consumer(first, members)  # joins first: the group's leader
    assert len(receive(leader, 1)) == 1
    follower = kafka.consumer(second, members)
    assert len(receive(follower, 1)) == 1
    follower.close()  # the group re-forms ...
    leader.close()  # ... and its leader leaves right after
    assert [m.data for m in receive(kafka.consumer(third, members), 1, timeout=30)] == [third.encode()]


def test_close_with_the_broker_gone_is_bounded_and_reports_losses(tmp_path, topic_name):
    broker = start_kafka(log_dir=tmp_path)
    try:
        handler = KafkaHandler.from_config(overrides={("kafka", "bootstrap.servers"): broker.address})
        topic = topic_name()
        handler.create_topic(topic)
        consumer = handler.consumer(topic, group())
        handler.publish(topic, b"before")
        assert len(receive(consumer, 1)) == 1
        os.killpg(broker.pid, signal.SIGKILL)
        futures = [handler.publish_async(topic, b"lost-%d" % i) for i in range(50)]
        started = time.monotonic()
        report = handler.close(timeout=2)
        assert time.monotonic() - started < 30
        assert report.undelivered == 50
        assert all(isinstance(f.exception(timeout=1), PublishError) for f in futures)
    finally:
        broker.stop()


@pytest.mark.parametrize("section,key,value", [
    ("consumer", "enable.auto.commit", "true"),
    ("consumer", "enable.auto.offset.store", "true"),
    ("consumer", "group.id", "fixed"),
    ("producer", "delivery.timeout.ms", "600000"),
    ("producer", "message.max.bytes", "1000"),
    ("producer", "no.such.librdkafka.key", "1"),
])
def test_settings_that_would_break_the_guarantees_are_rejected(section, key, value):
    with pytest.raises(BrokerConfigError) as raised:
        KafkaHandler.from_config(overrides={("kafka", "bootstrap.servers"): "127.0.0.1:1", (section, key): value})
    assert f"{section}.{key}" in str(raised.value) and "kafka_config.ini" in str(raised.value)
