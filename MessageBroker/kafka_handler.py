"""Apache Kafka backend of the broker API, on confluent-kafka (librdkafka).

Spec sheet
- Config: ``MessageBroker/kafka_config.ini`` (every key commented there). ``[kafka]`` is ours:
  ``bootstrap.servers`` (env KAFKA_BOOTSTRAP_SERVERS), ``topic.partitions``,
  ``topic.replication.factor``, ``max.message.bytes``, ``publish.timeout.seconds``,
  ``connect.timeout.seconds``, ``group.leave.settle.ms``, ``max.attempts``, ``dead.letter.suffix``.
  ``[producer]``, ``[consumer]`` and ``[security]`` (given to both; env KAFKA_SASL_USERNAME /
  KAFKA_SASL_PASSWORD) go verbatim to librdkafka; settings that would break the guarantees below
  are rejected naming file and key. Construction fails fast: BrokerConnectionError (or
  AuthenticationError) if no broker answers within ``connect.timeout.seconds``. Secrets never
  reach logs or errors; librdkafka's own logging goes to ``kafka_settings``' logger, rate-limited.
- Topics are never created implicitly (``allow.auto.create.topics=false``): publishing to or
  consuming an unknown topic raises TopicNotFoundError. Message ids are ``"<partition>:<offset>"``.
- Groups are Kafka consumer groups (cooperative-sticky rebalancing): members share partitions, so
  at most ``topic.partitions`` members work at once. A new group starts at the oldest message.
- Delivery: at-least-once. A partition's offset is committed only up to its lowest unacked
  message: asynchronously after every ack, synchronously on revocation and close. So a crash
  redelivers every unacked message and, like a rebalance, may redeliver acked ones above an
  unacked one (duplicates, never losses). Idempotent producer: broker retries add no duplicates.
- Nack rewinds the message's partition to it: the later messages of that partition that were
  delivered but not yet acked come again too; those already acked are skipped on the refetch.
- Order: per key (key → partition, librdkafka's default partitioner), for one consumer without
  failures. ``max_outstanding`` is not enforced: librdkafka's prefetch bounds memory instead.
- Limits: ``max.message.bytes`` (1,000,000) for data + key + attribute names and values, checked
  before sending; producer ``message.max.bytes`` must leave 4 KiB above it for record framing.
- Close: the producer is flushed for ``timeout``, then what is left is purged, counted in the
  CloseReport and its futures fail. A consumer's close is bounded by 2 × connect.timeout.seconds
  even with the broker gone (librdkafka would retry the coordinator forever: librdkafka #3740).
- Tansu (the local broker) differs from Apache Kafka: it creates a topic on any metadata request
  for it unless the client forbids it (we do); a group's first join and every rejoin take a few
  seconds (~session.timeout.ms / 2); a group whose leader leaves while the group re-forms never
  forms again until Tansu restarts (hence ``group.leave.settle.ms``, worked around in
  ``kafka_tansu``: a closing consumer first waits until its membership is settled, which
  sequential closes make safe but members closing at the same instant can still race; a
  consumer whose group stays unformed for 90 s raises ReceiveError instead of waiting
  forever); a group's assignor is fixed by its first member for Tansu's lifetime (others get
  ReceiveError naming the key); static membership (``group.instance.id``) never expires
  members; DescribeGroups answers placeholders.
- Modules: this one holds the handler (producer, publishing, close); ``kafka_settings`` the ini
  parsing and validation, secret scrubbing and librdkafka log routing; ``kafka_topics`` topic
  existence (cached), creation and deletion; ``kafka_consumer`` the consumer and its per-partition
  offsets; ``kafka_tansu`` the Tansu group workarounds. They import only the shared layer and
  confluent-kafka.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from MessageBroker.broker_interface import BrokerInterface, Capabilities, CloseReport, Consumer, OutgoingMessage
from MessageBroker.errors import (
    AuthenticationError, BrokerConnectionError, BrokerError, MessageTooLargeError, PublishError, TopicNotFoundError,
)
from MessageBroker.kafka_consumer import KafkaConsumer
from MessageBroker.kafka_settings import AUTH_ERRORS, DEFAULT_CONFIG, ClientLog, KafkaSettings, read_config
from MessageBroker.kafka_topics import NOT_FOUND, KafkaTopics

__all__ = ["DEFAULT_CONFIG", "KafkaHandler", "KafkaSettings"]

logger = logging.getLogger(__name__)

# After these the idempotent producer cannot go on: it has to be recreated.
_PRODUCER_FATAL = {KafkaError._FATAL, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
                   KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.UNKNOWN_PRODUCER_ID}


class KafkaHandler(BrokerInterface):
    """Broker API over Kafka: one shared idempotent producer, one librdkafka consumer per consumer."""

    name: ClassVar[str] = "kafka"
    capabilities: ClassVar[Capabilities] = Capabilities(
        consumer_groups=True, retains_before_subscribe=True, ordered_by_key=True, cross_process=True
    )

    def __init__(self, settings: KafkaSettings, **options: Any):
        super().__init__(**options)
        self.settings = settings
        self._topics = KafkaTopics(settings, lambda: self._producer)
        self._known_topics = self._topics.known  # read on every publish: no indirection there
        self._purged = 0
        self._producer_log = ClientLog(settings, "producer")
        self._producer_lock = threading.Lock()
        self._producer_broken = False
        self._producer = self._new_producer()
        self._check_connection()
        self._poll_thread = threading.Thread(target=self._serve_delivery_reports, name="kafka-producer-poll",
                                             daemon=True)
        self._poll_thread.start()

    def _new_producer(self) -> confluent_kafka.Producer:
        settings = self.settings
        config = {**settings.client, **settings.producer, **self._producer_log.hooks()}
        try:
            return confluent_kafka.Producer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise settings.config_error(exc, {"producer": settings.producer, "security": settings.client}) from None

    def _replace_broken_producer(self) -> None:
        """Swap in a new producer after a fatal idempotence error (librdkafka: it must be recreated).

        Seen after a broker hang: the broker fences the producer's epoch and every later message
        fails. Messages still queued in the old producer fail; their callers retry them.
        """
        with self._producer_lock:
            if not self._producer_broken:
                return
            old, self._producer = self._producer, self._new_producer()
            self._producer_broken = False
        logger.warning("kafka producer hit a fatal error; replaced it with a new one")
        old.purge(in_queue=True, in_flight=True, blocking=False)
        old.flush(0)

    @classmethod
    def from_config(cls, path: Path | None = None, overrides: Mapping[tuple[str, str], str] | None = None) -> KafkaHandler:
        """Read ``kafka_config.ini`` (env and ``overrides`` win), validate it and connect."""
        settings, options = read_config(path, overrides)
        return cls(settings, **options)

    # -- connection and topics ----------------------------------------------------------
    def _check_connection(self) -> None:
        try:
            self._producer.list_topics(timeout=self.settings.connect_timeout)
        except KafkaException as exc:
            self._producer.poll(0)  # serve error_cb, which says why (refused, DNS, SASL ...)
            last = self._producer_log.last_error
            reason = self.settings.scrub(last.str() if last else exc.args[0].str())
            kind = AuthenticationError if last and last.code() in AUTH_ERRORS else BrokerConnectionError
            raise kind(f"no Kafka broker answered at {self.settings.bootstrap_servers} within "
                       f"{self.settings.connect_timeout:g} s: {reason} (file {self.settings.file}, "
                       "key 'kafka.bootstrap.servers')") from None

    def create_topic(self, topic: str) -> None:
        """Create ``topic`` with the configured partitions; blocks until metadata lists it."""
        self._check_open()
        self._topics.create(topic)

    def delete_topic(self, topic: str) -> None:
        """Delete ``topic``; a missing topic is fine. Blocks until metadata no longer lists it."""
        self._check_open()
        self._topics.delete(topic)

    def ensure_subscription(self, topic: str, group: str) -> None:
        """No-op on Kafka (a group reads from the oldest retained message); checks the topic exists."""
        self._check_open()
        self._topics.require(topic, fresh=True)

    # -- publishing ---------------------------------------------------------------------
    def _publish_async(self, topic: str, message: OutgoingMessage) -> concurrent.futures.Future[str]:
        future = _Delivery(self)
        error = self._produce(topic, message, future)
        if error is not None:
            future.set_exception(error)
        return future

    def _publish_many(self, topic: str, messages: Sequence[OutgoingMessage],
                      timeout: float) -> list[str | BaseException | None]:
        """Publish a batch with one countdown instead of a future per message (about twice as fast).

        Returns per message its id, its error, or None if unconfirmed after ``timeout``.
        """
        batch = _Batch(self, len(messages))
        for index, message in enumerate(messages):
            error = self._produce(topic, message, _Slot(batch, index))
            if error is not None:
                batch.settle(index, error)
        batch.done.wait(timeout)
        return list(batch.outcomes)

    def _produce(self, topic: str, message: OutgoingMessage, on_delivery: Any) -> BrokerError | None:
        """Queue one message (``on_delivery`` gets the broker's answer) or return why it was not."""
        if topic not in self._known_topics:
            try:
                self._topics.require(topic)
            except BrokerError as exc:
                return exc
        if self._producer_broken:
            self._replace_broken_producer()
        headers = message.attributes
        headers = (headers if type(headers) is dict else dict(headers)) if headers else None
        give_up = None
        while True:
            try:
                self._producer.produce(topic, message.data, message.key, headers=headers, on_delivery=on_delivery)
                return None
            except BufferError:  # local queue full: back-pressure while the poll thread drains it
                give_up = give_up or time.monotonic() + self.publish_timeout
                if time.monotonic() > give_up:
                    return PublishError(f"producer queue full for {self.publish_timeout:g} s")
                time.sleep(0.005)
            except KafkaException as exc:
                return self._publish_error(topic, message.size(), exc.args[0])

    def _outcome(self, error: KafkaError | None, record: confluent_kafka.Message) -> str | BrokerError:
        if error is None:
            return f"{record.partition()}:{record.offset()}"
        return self._publish_error(record.topic(), len(record.value() or b"") + len(record.key() or b""), error)

    def _publish_error(self, topic: str, size: int, error: KafkaError) -> BrokerError:
        code = error.code()
        if error.fatal() or code in _PRODUCER_FATAL:
            self._producer_broken = True
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            return MessageTooLargeError(size, self.max_message_bytes, topic=topic)
        if code in NOT_FOUND:
            self._known_topics.discard(topic)
            return TopicNotFoundError(topic, error.str())
        if code in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
            self._purged += 1
            return PublishError(f"not confirmed before the broker was closed ({error.str()})")
        if code in AUTH_ERRORS:
            return AuthenticationError(self.settings.scrub(error.str()))
        return PublishError(f"Kafka did not confirm a message to {topic!r}: {self.settings.scrub(error.str())}")

    def _serve_delivery_reports(self) -> None:
        while not self._closed:
            try:
                self._producer.poll(0.1)
            except Exception:  # keep serving reports whatever one callback did
                logger.exception("kafka delivery report callback failed")

    # -- consuming and closing ----------------------------------------------------------
    def _open_consumer(self, topic: str, group: str, max_outstanding: int) -> Consumer:
        self._topics.require(topic, fresh=True)
        return KafkaConsumer(self, topic, group)

    def _close(self, timeout: float) -> CloseReport:
        self._poll_thread.join(0.5)  # ends on its own: ``_closed`` is already set
        left = self._producer.flush(max(0.0, timeout))
        if left:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(1.0)  # serves the purge reports, failing the futures
        return CloseReport(undelivered=(self._purged or left) if left else 0)


class _Delivery(concurrent.futures.Future):
    """The future of one produced message, and its delivery report callback (no closure per message)."""

    def __init__(self, handler: KafkaHandler):
        super().__init__()
        self.handler = handler

    def __call__(self, error: KafkaError | None, record: confluent_kafka.Message) -> None:
        outcome = self.handler._outcome(error, record)
        try:
            if isinstance(outcome, str):
                self.set_result(outcome)
            else:
                self.set_exception(outcome)
        except concurrent.futures.InvalidStateError:
            pass  # the caller cancelled the future; the broker's answer has no one to go to


class _Batch:
    """Outcomes of one ``_publish_many`` call and a countdown to its last delivery report."""

    def __init__(self, handler: KafkaHandler, size: int):
        self.handler, self.outcomes, self.left = handler, [None] * size, size
        self.done, self._lock = threading.Event(), threading.Lock()
        if not size:
            self.done.set()

    def settle(self, index: int, outcome: str | BaseException) -> None:
        self.outcomes[index] = outcome
        with self._lock:
            self.left -= 1
            if not self.left:
                self.done.set()


class _Slot:
    """Delivery report callback of one message of a ``_Batch``."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: _Batch, index: int):
        self.batch, self.index = batch, index

    def __call__(self, error: KafkaError | None, record: confluent_kafka.Message) -> None:
        self.batch.settle(self.index, self.batch.handler._outcome(error, record))
