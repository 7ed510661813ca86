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
  reach logs or errors; librdkafka's own logging goes to this module's logger, rate-limited.
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
  forms again until Tansu restarts (hence ``group.leave.settle.ms``: a closing consumer first
  waits until its membership is settled, which sequential closes make safe but members closing
  at the same instant can still race; a consumer whose group stays unformed for 90 s raises
  ReceiveError instead of waiting forever); a group's assignor is fixed by its first member for
  Tansu's lifetime (others get ReceiveError naming the key); static membership
  (``group.instance.id``) never expires members; DescribeGroups answers placeholders.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from MessageBroker.broker_interface import (
    BrokerInterface,
    Capabilities,
    CloseReport,
    Consumer,
    Message,
    OutgoingMessage,
)
from MessageBroker.errors import (
    AuthenticationError,
    BrokerConfigError,
    BrokerConnectionError,
    BrokerError,
    MessageTooLargeError,
    PublishError,
    ReceiveError,
    TopicNotFoundError,
)
from MessageBroker.settings import IniSettings

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "kafka_config.ini"
_FRAMING_BYTES = 4096  # record, header and batch overhead librdkafka counts on top of our size
_POLL_SLICE = 0.2  # longest poll while holding the consumer lock, so close() never waits long
_GROUP_WEDGED_AFTER = 90.0  # Tansu mode: a group not formed for this long never will
_MISSING_TOPIC_TTL = 1.0  # remember a missing topic this long: a failing batch asks the broker once
_SECRET_KEY = re.compile(r"password|secret|jaas|oauthbearer\.config", re.IGNORECASE)
_AUTH_ERRORS = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
                KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}
_ALIASES = {"request.required.acks": "acks", "queue.buffering.max.ms": "linger.ms",
            "compression.codec": "compression.type", "message.timeout.ms": "delivery.timeout.ms",
            "sasl.mechanism": "sasl.mechanisms"}
# After these the idempotent producer cannot go on: it has to be recreated.
_PRODUCER_FATAL = {KafkaError._FATAL, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
                   KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, KafkaError.UNKNOWN_PRODUCER_ID}
_NOT_FOUND = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION}


@dataclass(frozen=True)
class KafkaSettings:
    """Validated settings; ``client`` holds librdkafka keys shared by producer and consumer."""

    file: str
    bootstrap_servers: str
    partitions: int = 4
    replication_factor: int = 1
    connect_timeout: float = 5.0
    leave_settle: float = 0.0
    client: Mapping[str, str] = field(default_factory=dict)
    producer: Mapping[str, str] = field(default_factory=dict)
    consumer: Mapping[str, str] = field(default_factory=dict)

    def scrub(self, text: str) -> str:
        """``text`` with every secret value of the config replaced by ***."""
        for key, value in self.client.items():
            if _SECRET_KEY.search(key) and value:
                text = text.replace(value, "***")
        return text

    def config_error(self, exc: Exception, sections: Mapping[str, Mapping[str, str]]) -> BrokerConfigError:
        """Translate librdkafka's complaint about a setting into an error naming file and key."""
        text = self.scrub(str(exc.args[0].str() if isinstance(exc, KafkaException) else exc))
        match = re.search(r'property:? "([^"]+)"', text)
        name = match.group(1) if match else None
        # librdkafka names a property by its canonical name; the ini may use an alias.
        name = next((alias for alias in (name, _ALIASES.get(name)) if any(alias in keys for keys in sections.values())),
                    name)
        section = next((s for s, keys in sections.items() if name in keys), None)
        return BrokerConfigError(f"librdkafka rejected the configuration: {text}", file=self.file,
                                 key=f"{section}.{name}" if section and name else None)


class _ClientLog:
    """librdkafka errors and logs routed to logging, each kind at most once a minute above DEBUG."""

    def __init__(self, settings: KafkaSettings, client: str):
        self._settings, self._client = settings, client
        self._last_seen: dict[int, float] = {}
        self.last_error: KafkaError | None = None

    def error(self, error: KafkaError) -> None:
        self.last_error = error
        now = time.monotonic()
        quiet = now - self._last_seen.get(error.code(), -1e9) < 60
        self._last_seen[error.code()] = now
        level = logging.ERROR if error.fatal() else logging.DEBUG if quiet else logging.WARNING
        logger.log(level, "kafka %s: %s", self._client, self._settings.scrub(error.str()))

    def log(self, _level: int, fmt: str, *args: Any) -> None:
        logger.debug(fmt, *args)

    def hooks(self) -> dict[str, Any]:
        return {"error_cb": self.error, "logger": self}


class KafkaHandler(BrokerInterface):
    """Broker API over Kafka: one shared idempotent producer, one librdkafka consumer per consumer."""

    name: ClassVar[str] = "kafka"
    capabilities: ClassVar[Capabilities] = Capabilities(
        consumer_groups=True, retains_before_subscribe=True, ordered_by_key=True, cross_process=True
    )

    def __init__(self, settings: KafkaSettings, **options: Any):
        super().__init__(**options)
        self.settings = settings
        self._known_topics: set[str] = set()
        self._missing_until: dict[str, float] = {}
        self._purged = 0
        self._admin_client: AdminClient | None = None
        self._producer_log = _ClientLog(settings, "producer")
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
        ini = IniSettings(path or DEFAULT_CONFIG, overrides=overrides)
        file = str(ini.path)
        security = ini.section("security")
        for key, env in (("sasl.username", "KAFKA_SASL_USERNAME"), ("sasl.password", "KAFKA_SASL_PASSWORD")):
            if value := ini.get("security", key, env=env, default=""):
                security[key] = value
        producer, consumer = ini.section("producer"), ini.section("consumer")
        for section, values in (("producer", producer), ("consumer", consumer), ("security", security)):
            for key in ("bootstrap.servers", "group.id", "allow.auto.create.topics"):
                if key in values:
                    raise BrokerConfigError("set by the handler, remove it", file=file, key=f"{section}.{key}")
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if consumer.setdefault(key, "false").lower() != "false":
                raise BrokerConfigError("must be false: offsets are committed only after ack",
                                        file=file, key=f"consumer.{key}")
        publish_timeout = ini.get_float("kafka", "publish.timeout.seconds", default="30", minimum=1)
        delivery_key = "message.timeout.ms" if "message.timeout.ms" in producer else "delivery.timeout.ms"
        delivery_ms = int(producer.setdefault(delivery_key, str(int(publish_timeout * 1000))))
        if delivery_ms > publish_timeout * 1000:
            raise BrokerConfigError(f"must not exceed publish.timeout.seconds ({publish_timeout:g} s) so every "
                                    "publish gets an answer", file=file, key=f"producer.{delivery_key}")
        max_bytes = ini.get_int("kafka", "max.message.bytes", default="1000000", minimum=1)
        producer.setdefault("message.max.bytes", str(max_bytes + _FRAMING_BYTES))
        if int(producer["message.max.bytes"]) < max_bytes + _FRAMING_BYTES:
            raise BrokerConfigError(f"must be at least kafka.max.message.bytes + {_FRAMING_BYTES}",
                                    file=file, key="producer.message.max.bytes")
        bootstrap = ini.get("kafka", "bootstrap.servers", env="KAFKA_BOOTSTRAP_SERVERS")
        client = {"bootstrap.servers": bootstrap, "allow.auto.create.topics": "false", **security}
        settings = KafkaSettings(
            file=file, bootstrap_servers=bootstrap, client=client, producer=producer, consumer=consumer,
            partitions=ini.get_int("kafka", "topic.partitions", default="4", minimum=1),
            replication_factor=ini.get_int("kafka", "topic.replication.factor", default="1", minimum=1),
            connect_timeout=ini.get_float("kafka", "connect.timeout.seconds", default="5", minimum=0.1),
            leave_settle=ini.get_int("kafka", "group.leave.settle.ms", default="0", minimum=0) / 1000,
        )
        return cls(settings, max_message_bytes=max_bytes, publish_timeout=publish_timeout,
                   max_attempts=ini.get_int("kafka", "max.attempts", default="5", minimum=1),
                   dead_letter_suffix=ini.get("kafka", "dead.letter.suffix", default=".dlq"))

    # -- connection and topics ----------------------------------------------------------
    def _check_connection(self) -> None:
        try:
            self._producer.list_topics(timeout=self.settings.connect_timeout)
        except KafkaException as exc:
            self._producer.poll(0)  # serve error_cb, which says why (refused, DNS, SASL ...)
            last = self._producer_log.last_error
            reason = self.settings.scrub(last.str() if last else exc.args[0].str())
            kind = AuthenticationError if last and last.code() in _AUTH_ERRORS else BrokerConnectionError
            raise kind(f"no Kafka broker answered at {self.settings.bootstrap_servers} within "
                       f"{self.settings.connect_timeout:g} s: {reason} (file {self.settings.file}, "
                       "key 'kafka.bootstrap.servers')") from None

    def _admin(self) -> AdminClient:
        if self._admin_client is None:
            self._admin_client = AdminClient({**self.settings.client, **_ClientLog(self.settings, "admin").hooks()})
        return self._admin_client

    def _topic_exists(self, topic: str) -> bool:
        try:
            found = self._producer.list_topics(topic, timeout=self.settings.connect_timeout).topics.get(topic)
        except KafkaException as exc:
            raise BrokerConnectionError(f"metadata request for {topic!r} failed: "
                                        f"{self.settings.scrub(exc.args[0].str())}") from None
        if found is not None and found.error is not None and found.error.code() in _AUTH_ERRORS:
            raise AuthenticationError(f"not authorised for topic {topic!r}: {found.error.str()}")
        return found is not None and bool(found.partitions) and (found.error is None or found.error.code() not in _NOT_FOUND)

    def _require_topic(self, topic: str, *, fresh: bool = False) -> None:
        """Raise TopicNotFoundError unless ``topic`` exists (positive answers are cached)."""
        if topic in self._known_topics and not fresh:
            return
        if self._missing_until.get(topic, 0.0) > time.monotonic() or not self._topic_exists(topic):
            self._missing_until[topic] = time.monotonic() + _MISSING_TOPIC_TTL
            self._known_topics.discard(topic)
            raise TopicNotFoundError(topic)
        self._known_topics.add(topic)

    def _wait_for_metadata(self, topic: str, *, present: bool) -> None:
        deadline = time.monotonic() + 2 * self.settings.connect_timeout
        while self._topic_exists(topic) != present:
            if time.monotonic() > deadline:
                raise BrokerConnectionError(f"topic {topic!r} still {'missing' if present else 'listed'} "
                                            f"in metadata after {2 * self.settings.connect_timeout:g} s")
            time.sleep(0.05)

    def create_topic(self, topic: str) -> None:
        """Create ``topic`` with the configured partitions; blocks until metadata lists it."""
        self._check_open()
        new = NewTopic(topic, num_partitions=self.settings.partitions,
                       replication_factor=self.settings.replication_factor)
        self._admin_call(topic, self._admin().create_topics([new]), KafkaError.TOPIC_ALREADY_EXISTS)
        self._missing_until.pop(topic, None)
        self._wait_for_metadata(topic, present=True)
        self._known_topics.add(topic)

    def delete_topic(self, topic: str) -> None:
        """Delete ``topic``; a missing topic is fine. Blocks until metadata no longer lists it."""
        self._check_open()
        self._known_topics.discard(topic)
        self._admin_call(topic, self._admin().delete_topics([topic]), KafkaError.UNKNOWN_TOPIC_OR_PART)
        self._wait_for_metadata(topic, present=False)

    def _admin_call(self, topic: str, futures: Mapping[str, concurrent.futures.Future], tolerated: int) -> None:
        try:
            futures[topic].result(timeout=2 * self.settings.connect_timeout)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() != tolerated:
                kind = AuthenticationError if error.code() in _AUTH_ERRORS else BrokerError
                raise kind(f"topic {topic!r}: {self.settings.scrub(error.str())}") from None
        except concurrent.futures.TimeoutError:
            raise BrokerConnectionError(f"topic {topic!r}: no answer from the broker within "
                                        f"{2 * self.settings.connect_timeout:g} s") from None
        finally:
            self._admin().poll(0)

    def ensure_subscription(self, topic: str, group: str) -> None:
        """No-op on Kafka (a group reads from the oldest retained message); checks the topic exists."""
        self._check_open()
        self._require_topic(topic, fresh=True)

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
                self._require_topic(topic)
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
        if code in _NOT_FOUND:
            self._known_topics.discard(topic)
            return TopicNotFoundError(topic, error.str())
        if code in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT):
            self._purged += 1
            return PublishError(f"not confirmed before the broker was closed ({error.str()})")
        if code in _AUTH_ERRORS:
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
        self._require_topic(topic, fresh=True)
        return _KafkaConsumer(self, topic, group)

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


@dataclass(eq=False)
class _Partition:
    """Offsets of one assigned partition; a new object per assignment makes stale handles inert."""

    next_offset: int | None = None  # one past the last offset delivered (rewound by nack)
    committed: int = -1
    outstanding: set[int] = field(default_factory=set)  # delivered, not acked, not handed back
    acked_ahead: set[int] = field(default_factory=set)  # acked at or above next_offset: drop on refetch

    def committable(self) -> int | None:
        return min(self.outstanding) if self.outstanding else self.next_offset


class _KafkaConsumer(Consumer):
    """One librdkafka consumer in ``group`` subscribed to ``topic``."""

    def __init__(self, broker: KafkaHandler, topic: str, group: str):
        super().__init__(broker, topic, group)
        settings = broker.settings
        self._settings = settings
        self._lock = threading.RLock()  # close() may come from another thread than receive()
        self._partitions: dict[int, _Partition] = {}
        self._log = _ClientLog(settings, f"consumer of {topic!r}")
        config = {**settings.client, **settings.consumer, "group.id": group, **self._log.hooks()}
        if settings.leave_settle:
            config.update({"statistics.interval.ms": 200, "stats_cb": self._on_statistics})
        try:
            self._kafka = confluent_kafka.Consumer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise settings.config_error(exc, {"consumer": settings.consumer, "security": settings.client}) from None
        # Membership as librdkafka last reported it (Tansu mode): (when, group state, join state),
        # and since when it has not been settled.
        self._membership: tuple[float, str, str] = (time.monotonic(), "", "")
        self._unsettled_since: float | None = time.monotonic()
        self._kafka.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)

    # Rebalance callbacks run inside poll()/consume()/close(), i.e. under self._lock.
    def _on_assign(self, _kafka: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions[tp.partition] = _Partition()

    def _on_revoke(self, kafka: Any, partitions: list[TopicPartition]) -> None:
        self._commit([tp.partition for tp in partitions], asynchronous=False)
        self._on_lost(kafka, partitions)

    def _on_lost(self, _kafka: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions.pop(tp.partition, None)  # its next owner redelivers what we did not ack

    def _receive(self, max_messages: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self.closed:
                first = self._kafka.poll(max(0.0, min(_POLL_SLICE, deadline - time.monotonic())))
                if first is not None:
                    rest = self._kafka.consume(max_messages - 1, 0) if max_messages > 1 else []
                    batch = self._accept([first, *rest])
                    if batch:
                        return batch
                if time.monotonic() >= deadline:
                    break
        if self._settings.leave_settle:
            self._check_group_forms()
        error = self._log.last_error
        if error is not None and error.code() == KafkaError.INCONSISTENT_GROUP_PROTOCOL:
            raise ReceiveError(f"group {self.group!r} was formed with another partition.assignment.strategy "
                               f"(file {self._settings.file}, key 'consumer.partition.assignment.strategy')")
        return []

    def _accept(self, records: list[confluent_kafka.Message]) -> list[Message]:
        # Hot path (up to ~1M msg/s): local names, per-partition and per-timestamp reuse.
        batch: list[Message] = []
        append, topic, partitions = batch.append, self.topic, self._partitions
        number_seen, partition, offset, millis_seen, published = -1, None, -1, None, None
        for record in records:
            error = record.error()
            if error is not None:
                if error.fatal() or error.code() in _AUTH_ERRORS:
                    raise ReceiveError(f"consuming {topic!r}: {self._settings.scrub(error.str())}")
                self._log.error(error)
                continue
            number = record.partition()
            if number != number_seen:
                if partition is not None:
                    partition.next_offset = offset + 1
                number_seen = number
                partition = partitions.get(number) or partitions.setdefault(number, _Partition())
                ahead, track = partition.acked_ahead, partition.outstanding.add
            offset = record.offset()
            if ahead and offset in ahead:
                ahead.discard(offset)
                continue
            track(offset)
            kind, millis = record.timestamp()
            if millis != millis_seen:
                millis_seen = millis
                published = (datetime.fromtimestamp(millis / 1000, UTC)
                             if kind != confluent_kafka.TIMESTAMP_NOT_AVAILABLE else None)
            headers = record.headers()
            append(Message(f"{number}:{offset}", topic, record.value() or b"", record.key(),
                           {k: (v or b"").decode("utf-8", "replace") for k, v in headers} if headers else {},
                           published, 1, (number, offset, partition)))
        if partition is not None:
            partition.next_offset = offset + 1
        return batch

    def _ack(self, messages: Sequence[Message]) -> None:
        with self._lock:
            partitions, touched = self._partitions, set()
            for message in messages:
                number, offset, partition = message.handle
                if partition is not partitions.get(number):
                    continue  # revoked since delivery: the new owner will deliver it again
                if offset in partition.outstanding:
                    partition.outstanding.discard(offset)
                elif partition.next_offset is not None and offset >= partition.next_offset:
                    partition.acked_ahead.add(offset)  # rewound past it by a nack: skip the refetch
                touched.add(number)
            self._commit(touched, asynchronous=True)

    def _nack(self, messages: Sequence[Message]) -> None:
        with self._lock:
            rewind: dict[int, int] = {}
            for number, offset, partition in (m.handle for m in messages):
                if partition is self._partitions.get(number) and offset in partition.outstanding:
                    rewind[number] = min(offset, rewind.get(number, offset))
            for number, offset in rewind.items():
                partition = self._partitions[number]
                later = {o for o in partition.outstanding if o > offset}  # delivered, unacked: come again
                for again in later:
                    self._attempts.handed_back(f"{number}:{again}")
                # Offsets between the nacked one and the fetch position that are not outstanding
                # were acked: remember them, so the refetch does not run them again.
                partition.acked_ahead.update(set(range(offset + 1, partition.next_offset or offset)) - later)
                partition.outstanding -= later | {offset}
                partition.next_offset = offset
                try:
                    self._kafka.seek(TopicPartition(self.topic, number, offset))
                except KafkaException as exc:  # partition being revoked: its next owner redelivers
                    logger.debug("seek of %s[%d] failed: %s", self.topic, number, exc)

    def _commit(self, numbers: Any, *, asynchronous: bool) -> None:
        offsets = []
        for number in numbers:
            partition = self._partitions.get(number)
            position = partition.committable() if partition else None
            # Synchronous commits repeat the last position: an asynchronous one may have failed.
            if position is not None and (position > partition.committed or not asynchronous):
                partition.committed = position
                offsets.append(TopicPartition(self.topic, number, position))
        if offsets:
            try:
                self._kafka.commit(offsets=offsets, asynchronous=asynchronous)
            except KafkaException as exc:  # uncommitted means redelivered, never lost
                logger.warning("commit of %s failed: %s", self.topic, self._settings.scrub(exc.args[0].str()))

    def _close(self) -> None:
        with self._lock:
            if self._settings.leave_settle:
                self._settle_before_leaving()
            # librdkafka's close can retry an unreachable coordinator forever (librdkafka #3740).
            closer = threading.Thread(target=self._commit_and_close, name="kafka-consumer-close", daemon=True)
            closer.start()
            closer.join(2 * self._settings.connect_timeout)
            if closer.is_alive():
                logger.warning("consumer of %s not closed within %g s (broker unreachable?); left behind: its "
                               "unacked messages go to other members", self.topic, 2 * self._settings.connect_timeout)

    def _commit_and_close(self) -> None:
        try:
            self._commit(list(self._partitions), asynchronous=False)
            self._kafka.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("closing consumer of %s: %s", self.topic, exc)

    def _on_statistics(self, raw: str) -> None:
        group = json.loads(raw).get("cgrp", {})
        now, join_state = time.monotonic(), group.get("join_state", "")
        self._membership = (now, group.get("state", ""), join_state)
        if join_state == "steady":
            self._unsettled_since = None
        elif self._unsettled_since is None:
            self._unsettled_since = now

    def _check_group_forms(self) -> None:
        """Fail loudly instead of waiting forever in a group Tansu will never form again."""
        unsettled = self._unsettled_since
        if unsettled is not None and time.monotonic() - unsettled > _GROUP_WEDGED_AFTER:
            raise ReceiveError(
                f"group {self.group!r} has not formed for {_GROUP_WEDGED_AFTER:g} s: on Tansu this happens when "
                "the group's leader left while the group was re-forming (a Tansu bug); restart the broker "
                "or use another group name")

    def _settle_before_leaving(self) -> None:
        """Tansu wedges a group for good when its leader leaves while the group is (re)forming.

        So keep heartbeating for ``leave_settle`` (longer than a heartbeat interval: a rebalance
        another member started is noticed) and until librdkafka reports this member settled.
        Messages fetched meanwhile are not committed: the group gets them again. Best effort:
        members of one group closing at the same moment can still race.
        """
        started = time.monotonic()
        settle_from = started + self._settings.leave_settle
        give_up = settle_from + int(self._settings.consumer.get("session.timeout.ms", "45000")) / 1000
        while time.monotonic() < give_up:
            self._kafka.poll(0.1)
            when, state, join_state = self._membership
            if (when >= settle_from and join_state == "steady") or (when > started and state not in ("", "up")):
                return  # settled, or no coordinator to leave anyway
