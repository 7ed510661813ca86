"""Pub/Sub-only behaviour not covered by the shared conformance suite, against Google's emulator.

Leases longer than the ack deadline, close handing messages back at once, close/crash cycles
without delays, subscription naming, reserved attribute names and Pub/Sub's attribute limits,
orphaned subscriptions, emulator host selection and real-GCP configuration errors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest
from google.api_core import exceptions as google_errors

from MessageBroker.broker_interface import OutgoingMessage
from MessageBroker.errors import (
    BrokerConfigError, BrokerConnectionError, PublishError, TopicNotFoundError,
)
from MessageBroker.google_pubsub_handler import GooglePubSubHandler, subscription_id
from MessageBroker.local_brokers import LocalBroker, start_pubsub
from MessageBroker.message_broker_factory import MessageBrokerFactory

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    with start_pubsub(log_dir=tmp_path_factory.mktemp("pubsub")) as broker:
        yield broker


def overrides_for(emulator: LocalBroker) -> dict[tuple[str, str], str]:
    return {("pubsub", "emulator_host"): emulator.address,
            ("pubsub", "project_id"): emulator.env["PUBSUB_PROJECT_ID"]}


@pytest.fixture
def broker(emulator: LocalBroker) -> Iterator[GooglePubSubHandler]:
    handler = MessageBrokerFactory.create("pubsub", overrides=overrides_for(emulator))
    yield handler
    handler.close(timeout=5)


@pytest.fixture(params=["unary", "streaming"])
def any_pull(emulator: LocalBroker, request: pytest.FixtureRequest) -> Iterator[GooglePubSubHandler]:
    """The handler with each consumer kind: ``pull = unary`` (default) and ``pull = streaming``."""
    handler = MessageBrokerFactory.create("pubsub", overrides={**overrides_for(emulator), ("pubsub", "pull"): request.param})
    yield handler
    handler.close(timeout=5)


@pytest.fixture
def topic(broker: GooglePubSubHandler) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    broker.create_topic(name)
    broker.ensure_subscription(name, "g")
    return name


def receive_within(consumer, seconds: float, count: int = 1) -> tuple[list, float]:
    started, received = time.monotonic(), []
    while len(received) < count and time.monotonic() - started < seconds:
        received += consumer.receive(100, timeout=0.2)
    return received, time.monotonic() - started


def test_lease_is_extended_while_a_consumer_holds_a_message(any_pull, topic):
    broker = any_pull
    assert broker.settings.ack_deadline_seconds < 20
    holder, other = broker.consumer(topic, "g"), broker.consumer(topic, "g")
    broker.publish(topic, b"slow")
    [held], _ = receive_within(holder, 10)
    stolen, _ = receive_within(other, 16)  # past the ack deadline
    assert stolen == []
    holder.ack(held)
    holder.close()
    assert receive_within(other, 12)[0] == []


def test_close_hands_unacked_messages_back_at_once(any_pull, topic):
    broker = any_pull
    first = broker.consumer(topic, "g")
    broker.publish_batch(topic, [b"one", b"two"])
    received, _ = receive_within(first, 10, count=2)
    assert len(received) == 2
    first.close()
    # On the emulator a closed stream lives on and takes the handed-back messages once more, so
    # with streaming pull they come after one ack deadline (at once on Google Cloud).
    bound = 3 if broker.settings.pull == "unary" else broker.settings.ack_deadline_seconds + 3
    again, elapsed = receive_within(broker.consumer(topic, "g"), bound + 5, count=2)
    assert {m.data for m in again} == {b"one", b"two"} and elapsed < bound


HOLD_FOREVER = textwrap.dedent("""
    import sys, time
    from MessageBroker.message_broker_factory import MessageBrokerFactory
    consumer = MessageBrokerFactory.create().consumer(sys.argv[1], "g")
    consumer.receive(1, timeout=0.5)
    print("READY", flush=True)
    time.sleep(3600)
""")


def test_closed_and_killed_consumers_do_not_delay_later_messages(broker, topic, emulator):
    # Streaming pull on this emulator leaves dead streams that swallow later deliveries for an
    # ack deadline each (why ``pull = unary`` is the default); pulling on demand must not.
    for _ in range(3):
        broker.consumer(topic, "g").close()
    env = {**os.environ, **emulator.env, "MESSAGE_BROKER": "pubsub", "PYTHONPATH": PROJECT_ROOT}
    child = subprocess.Popen([sys.executable, "-c", HOLD_FOREVER, topic], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "READY"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    consumer = broker.consumer(topic, "g")
    for index in range(5):
        broker.publish(topic, b"%d" % index)
        received, elapsed = receive_within(consumer, 15)
        consumer.ack(received)
        assert [m.data for m in received] == [b"%d" % index] and elapsed < 3


def test_subscription_ids_are_valid_and_distinct_for_odd_group_names(broker, topic):
    groups = ["a b", "a_b", "ü/%", "x" * 300, "y" * 300]
    ids = {subscription_id(topic, group) for group in groups}
    assert len(ids) == len(groups) and all(len(i) <= 255 for i in ids)
    for group in groups:
        broker.ensure_subscription(topic, group)
        broker.ensure_subscription(topic, group)
    broker.publish(topic, b"fan-out")
    for group in groups:
        assert [m.data for m in receive_within(broker.consumer(topic, group), 10)[0]] == [b"fan-out"]


def test_reserved_attribute_names_round_trip_and_limits_fail_at_once(broker, topic):
    attributes = {name: f"value of {name}" for name in
                  ("self", "topic", "data", "ordering_key", "retry", "timeout", "x-message-key",
                   "x-message-attr-x", "x-message-empty")}
    broker.publish(topic, b"", key="k", attributes=attributes)
    [message], _ = receive_within(broker.consumer(topic, "g"), 10)
    assert message.data == b"" and message.key == b"k" and message.attributes == attributes
    too_many = {f"a{i}": "v" for i in range(101)}
    for bad in (OutgoingMessage.build(b"x", attributes=too_many),
                OutgoingMessage.build(b"x", attributes={"v": "é" * 513}),
                OutgoingMessage.build(b"x", attributes={"n" * 257: "v"}),
                OutgoingMessage.build(b"x", attributes={"googthing": "v"}),
                OutgoingMessage.build(b"x", key=b"k" * 1025)):
        started = time.monotonic()
        with pytest.raises(PublishError, match="Pub/Sub limits"):
            broker.publish_batch(topic, [bad])
        assert time.monotonic() - started < 1


def test_delete_topic_removes_its_subscriptions_and_orphans_are_replaced(broker, topic):
    broker.delete_topic(topic)
    broker.create_topic(topic)
    with pytest.raises(google_errors.NotFound):  # the old subscription went with the topic
        broker._admin.get_subscription(request={"subscription": broker._subscription_path(topic, "g")})
    broker.ensure_subscription(topic, "g")
    # A topic deleted behind our back leaves its subscription attached to "_deleted-topic_".
    broker._publisher.delete_topic(request={"topic": broker._topic_path(topic)})
    broker.create_topic(topic)
    broker.ensure_subscription(topic, "g")
    broker.publish(topic, b"after re-creation")
    assert [m.data for m in receive_within(broker.consumer(topic, "g"), 10)[0]] == [b"after re-creation"]


def test_receive_after_the_subscription_vanished_raises_not_found(any_pull, topic):
    consumer = any_pull.consumer(topic, "g")
    any_pull.delete_topic(topic)
    with pytest.raises(TopicNotFoundError):
        for _ in range(20):  # a stream notices within a few receives
            consumer.receive(1, timeout=0.5)


def test_emulator_host_from_the_ini_needs_no_environment_variable(emulator, monkeypatch, tmp_path):
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("PUBSUB_PROJECT_ID", raising=False)
    config = tmp_path / "pubsub.ini"
    config.write_text(f"[pubsub]\nproject_id = some-project\nemulator_host = {emulator.address}\n")
    handler = MessageBrokerFactory.create("pubsub", config_file=config)
    try:
        assert handler.project_id == "some-project"
        handler.create_topic("from_ini_topic")
    finally:
        handler.close()


def test_configuration_errors_name_file_and_key(emulator, monkeypatch, tmp_path):
    for variable in ("PUBSUB_EMULATOR_HOST", "PUBSUB_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    config = tmp_path / "pubsub.ini"
    for body, key in (("project_id = Not A Project!", "pubsub.project_id"),
                      ("ack_deadline_seconds = 5", "pubsub.ack_deadline_seconds"),
                      ("ack_deadline_seconds = 900", "pubsub.ack_deadline_seconds"),
                      ("batch.max_messages = 5000", "pubsub.batch.max_messages"),
                      ("max_message_bytes = 20000000", "pubsub.max_message_bytes"),
                      ("pull = sideways", "pubsub.pull")):
        project = "" if body.startswith("project_id") else "project_id = p-1234\n"
        config.write_text(f"[pubsub]\n{project}emulator_host = {emulator.address}\n{body}\n")
        with pytest.raises(BrokerConfigError) as raised:
            MessageBrokerFactory.create("pubsub", config_file=config)
        assert str(config) in str(raised.value) and key in str(raised.value)


def test_real_gcp_without_credentials_is_a_config_error(monkeypatch, tmp_path):
    for variable in ("PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud-config"))  # no gcloud login either
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # not on Google Compute Engine
    config = tmp_path / "pubsub.ini"
    config.write_text("[pubsub]\nproject_id = my-project\nemulator_host =\n")
    started = time.monotonic()
    with pytest.raises(BrokerConfigError) as raised:
        MessageBrokerFactory.create("pubsub", config_file=config)
    assert time.monotonic() - started < 10
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(raised.value) and "pubsub.emulator_host" in str(raised.value)


def test_close_with_the_emulator_gone_returns_in_time_and_counts_undelivered(tmp_path):
    with start_pubsub(log_dir=tmp_path) as doomed:
        handler = MessageBrokerFactory.create("pubsub", overrides=overrides_for(doomed))
        handler.create_topic("doomed_topic")
    futures = [handler.publish_async("doomed_topic", b"lost-%d" % i) for i in range(10)]
    started = time.monotonic()
    report = handler.close(timeout=2)
    assert time.monotonic() - started < 6
    assert report.undelivered == 10 and not report.ok
    assert all(isinstance(f.exception(timeout=0), PublishError) for f in futures)
    with pytest.raises(BrokerConnectionError):
        MessageBrokerFactory.create("pubsub", overrides=overrides_for(doomed))
