"""The one broker API every backend implements, and the behaviour shared by all of them.

A backend ("handler") translates five primitives to its SDK: ``create_topic``, ``delete_topic``,
``ensure_subscription``, ``_publish_async`` and ``_open_consumer`` (+ ``_close``). Everything
else is written once here and in :mod:`MessageBroker.consume_loop`: confirmed and batched
publishing, size checks, delivery-attempt counting, dead-lettering, the blocking consume loop
with retry/backoff and SIGINT/SIGTERM handling, and close/after-close behaviour.

Delivery is at-least-once on every backend: a message is acked only after its handler returned
(or after it was dead-lettered); anything not acked is delivered again.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from MessageBroker.errors import (
    BrokerClosedError,
    BrokerError,
    MessageTooLargeError,
    PublishError,
    TopicNotFoundError,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_DEAD_LETTER_SUFFIX = ".dlq"
# Pub/Sub caps one attribute value at 1024 bytes; keep reasons well below on every backend.
_MAX_REASON_BYTES = 900

# Attribute names a dead letter carries besides the original attributes.
DEAD_LETTER_REASON = "dead_letter_reason"
DEAD_LETTER_ATTEMPTS = "dead_letter_attempts"
DEAD_LETTER_SOURCE_TOPIC = "dead_letter_source_topic"
DEAD_LETTER_SOURCE_ID = "dead_letter_source_id"
DEAD_LETTER_TIME = "dead_letter_time"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise; the conformance suite asserts each flag both ways."""

    #: several consumers of one group share the work, each message handled by one of them
    consumer_groups: bool
    #: a group subscribing after messages were published still receives them
    retains_before_subscribe: bool
    #: messages with the same key are delivered in publish order (one consumer, no failures)
    ordered_by_key: bool
    #: consumers in other processes see the same topics (False for the in-process backend)
    cross_process: bool


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to publish: the body, an optional key (partition / ordering) and attributes."""

    data: bytes
    key: bytes | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls, data: bytes, key: bytes | str | None = None, attributes: Mapping[str, str] | None = None
    ) -> OutgoingMessage:
        """Validate argument types and normalise the key to bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"message data must be bytes, not {type(data).__name__}")
        if isinstance(key, str):
            key = key.encode("utf-8")
        elif key is not None and not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"message key must be bytes or str, not {type(key).__name__}")
        attrs = dict(attributes) if attributes else {}
        for name, value in attrs.items():
            if not isinstance(name, str) or not name or not isinstance(value, str):
                raise TypeError(f"attributes must map non-empty str to str; got {name!r}: {value!r}")
        return cls(data if type(data) is bytes else bytes(data), bytes(key) if key is not None else None, attrs)

    def size(self) -> int:
        """Bytes counted against the backend's message size limit."""
        size = len(self.data) + (len(self.key) if self.key else 0)
        if self.attributes:
            size += sum(len(k.encode()) + len(v.encode()) for k, v in self.attributes.items())
        return size


@dataclass(slots=True)
class Message:
    """A received message. ``delivery_attempt`` is 1 on the first delivery this consumer saw."""

    id: str
    topic: str
    data: bytes
    key: bytes | None
    attributes: dict[str, str]
    publish_time: datetime | None
    delivery_attempt: int = 1
    #: backend-private handle used to ack/nack (Kafka offset, Pub/Sub message, ...)
    handle: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class CloseReport:
    """What ``close()`` could not finish: messages never confirmed and errors met."""

    undelivered: int = 0
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.undelivered == 0 and not self.errors


class _AttemptCounter:
    """Counts deliveries of the messages this consumer handed back (bounded, oldest forgotten).

    Brokers do not all count deliveries (Kafka never does; Pub/Sub only with a dead-letter
    policy), so the shared layer counts. Only messages that were handed back (``nack``, or a
    rewind that takes unacked neighbours along) are tracked, so a stream without failures pays
    one emptiness check per batch. Counts live in this process: after a crash a poison message
    may get up to ``max_attempts`` more tries, never fewer.
    """

    def __init__(self, limit: int = 100_000):
        self._deliveries: dict[str, int] = {}  # message id -> deliveries so far
        self._limit = limit

    def handed_back(self, message_id: str, deliveries: int = 1) -> None:
        """Note that ``message_id``, delivered ``deliveries`` times, will come again."""
        counts = self._deliveries
        counts[message_id] = max(counts.pop(message_id, 0), deliveries)
        if len(counts) > self._limit:
            del counts[next(iter(counts))]

    def redelivered(self, messages: Sequence[Message]) -> None:
        """Set ``delivery_attempt`` of the handed-back messages among ``messages``."""
        if not self._deliveries:
            return
        counts = self._deliveries
        for message in messages:
            before = counts.get(message.id)
            if before is not None:
                message.delivery_attempt = counts[message.id] = max(before + 1, message.delivery_attempt)

    def forget(self, messages: Sequence[Message]) -> None:
        if self._deliveries:
            for message in messages:
                self._deliveries.pop(message.id, None)


class Consumer(abc.ABC):
    """Pull-style consumer of one topic in one group; used by one thread at a time.

    ``receive`` hands out messages; each must then be ``ack``-ed (done), ``nack``-ed (deliver
    again) or ``dead_letter``-ed. Messages neither acked nor nacked are delivered again after a
    crash or ``close()``.
    """

    def __init__(self, broker: BrokerInterface, topic: str, group: str):
        self.broker = broker
        self.topic = topic
        self.group = group
        self._attempts = _AttemptCounter()
        self._closed = False

    # -- primitives a handler implements ------------------------------------------------
    @abc.abstractmethod
    def _receive(self, max_messages: int, timeout: float) -> list[Message]:
        """Return what is available now (up to max), waiting up to timeout only when none is."""

    @abc.abstractmethod
    def _ack(self, messages: Sequence[Message]) -> None:
        """Mark messages done; acking twice must be harmless."""

    @abc.abstractmethod
    def _nack(self, messages: Sequence[Message]) -> None:
        """Hand messages back for redelivery."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the subscription; unacked messages become deliverable again."""

    # -- public API ---------------------------------------------------------------------
    def receive(self, max_messages: int = 100, timeout: float = 1.0) -> list[Message]:
        """Block up to ``timeout`` s for the first message, then return all available (≤ max).

        Returns an empty list when nothing arrived in time. Raises BrokerClosedError after close.
        """
        self._check_open()
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        messages = self._receive(max_messages, max(0.0, timeout))
        self._attempts.redelivered(messages)
        return messages

    def ack(self, messages: Message | Iterable[Message]) -> None:
        """Mark messages as done; they will not be delivered to this group again."""
        self._check_open()
        batch = _as_list(messages)
        if batch:
            self._ack(batch)
            self._attempts.forget(batch)

    def nack(self, messages: Message | Iterable[Message]) -> None:
        """Ask for messages to be delivered again (to this or another group member)."""
        self._check_open()
        batch = _as_list(messages)
        if batch:
            for message in batch:
                self._attempts.handed_back(message.id, message.delivery_attempt)
            self._nack(batch)

    def dead_letter(self, failures: Sequence[tuple[Message, str]]) -> None:
        """Publish each message with its reason to the dead-letter topic, then ack it.

        Blocks until the dead letters are confirmed; if that fails the originals stay unacked
        (and will be redelivered) and PublishError is raised.
        """
        self._check_open()
        if not failures:
            return
        now = datetime.now(timezone.utc).isoformat()
        letters = [
            OutgoingMessage(
                data=message.data,
                key=message.key,
                attributes={
                    **message.attributes,
                    DEAD_LETTER_REASON: _truncate(reason),
                    DEAD_LETTER_ATTEMPTS: str(message.delivery_attempt),
                    DEAD_LETTER_SOURCE_TOPIC: message.topic,
                    DEAD_LETTER_SOURCE_ID: message.id,
                    DEAD_LETTER_TIME: now,
                },
            )
            for message, reason in failures
        ]
        self.broker.publish_batch(self.broker.dead_letter_topic(self.topic), letters)
        self.ack([message for message, _ in failures])

    def close(self) -> None:
        """Stop consuming; unacked messages become deliverable to other members. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            self.broker._forget_consumer(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError(f"consumer of {self.topic!r} (group {self.group!r}) is closed")

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BrokerInterface(abc.ABC):
    """A connection to one broker. Publishing is thread-safe; each consumer is single-threaded.

    After ``close()`` every method raises BrokerClosedError.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(
        self,
        *,
        max_message_bytes: int,
        publish_timeout: float = 30.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        dead_letter_suffix: str = DEFAULT_DEAD_LETTER_SUFFIX,
    ):
        self.max_message_bytes = max_message_bytes
        self.publish_timeout = publish_timeout
        self.max_attempts = max_attempts
        self.dead_letter_suffix = dead_letter_suffix
        self._closed = False
        self._stop = threading.Event()
        self._consumers: set[Consumer] = set()
        self._lock = threading.Lock()

    # -- primitives a handler implements ------------------------------------------------
    @abc.abstractmethod
    def create_topic(self, topic: str) -> None:
        """Create the topic; creating an existing topic is not an error. Blocks until done."""

    @abc.abstractmethod
    def delete_topic(self, topic: str) -> None:
        """Delete the topic (and on Pub/Sub its subscriptions); a missing topic is not an error."""

    @abc.abstractmethod
    def ensure_subscription(self, topic: str, group: str) -> None:
        """Make sure ``group`` receives every message published to ``topic`` from now on.

        Pub/Sub keeps messages only for existing subscriptions, so producers call this for
        the groups downstream of them; on Kafka and in-process it is a cheap no-op.
        Raises TopicNotFoundError if the topic does not exist.
        """

    @abc.abstractmethod
    def _publish_async(self, topic: str, message: OutgoingMessage) -> concurrent.futures.Future[str]:
        """Send one message; the future resolves to the broker's id or fails with BrokerError."""

    @abc.abstractmethod
    def _open_consumer(self, topic: str, group: str, max_outstanding: int) -> Consumer:
        """Open a pull consumer; raises TopicNotFoundError for an unknown topic."""

    @abc.abstractmethod
    def _close(self, timeout: float) -> CloseReport:
        """Flush outstanding publishes (bounded by timeout) and release SDK resources."""

    def _publish_many(self, topic: str, messages: Sequence[OutgoingMessage],
                      timeout: float) -> list[str | BaseException | None]:
        """Send a batch; per message its id, its error, or None if unconfirmed after ``timeout``.

        Built on ``_publish_async``; a handler may override it with something cheaper.
        """
        futures = [self._publish_async(topic, message) for message in messages]
        done, _ = concurrent.futures.wait(futures, timeout=timeout)
        return [(f.exception() or f.result()) if f in done else None for f in futures]

    # -- publishing ---------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        data: bytes,
        key: bytes | str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Publish one message and block until the broker confirmed it; returns its id.

        Raises MessageTooLargeError at once for an oversize message, PublishError when the
        broker did not confirm within ``publish_timeout``. Thread-safe.
        """
        return self.publish_batch(topic, [OutgoingMessage.build(data, key, attributes)])[0]

    def publish_async(
        self,
        topic: str,
        data: bytes,
        key: bytes | str | None = None,
        attributes: Mapping[str, str] | None = None,
    ) -> concurrent.futures.Future[str]:
        """Start publishing one message; the future gives its id or a BrokerError. Thread-safe."""
        message = OutgoingMessage.build(data, key, attributes)
        self._check_open()
        self._check_size(topic, message)
        return self._publish_async(topic, message)

    def publish_batch(
        self, topic: str, messages: Iterable[OutgoingMessage | bytes]
    ) -> list[str]:
        """Publish many messages and block until all are confirmed; returns ids in order.

        Size limits are checked for the whole batch before anything is sent. If any message
        is not confirmed, PublishError lists the failed indexes (the others were delivered).
        """
        self._check_open()
        batch = [m if isinstance(m, OutgoingMessage) else OutgoingMessage.build(m) for m in messages]
        for message in batch:
            self._check_size(topic, message)
        ids: list[str | None] = []
        failures: list[tuple[int, str]] = []
        first_error: BaseException | None = None
        for index, outcome in enumerate(self._publish_many(topic, batch, self.publish_timeout)):
            if isinstance(outcome, str):
                ids.append(outcome)
                continue
            ids.append(None)
            if outcome is None:
                failures.append((index, f"not confirmed within {self.publish_timeout:g} s"))
            else:
                first_error = first_error or outcome
                failures.append((index, str(outcome)))
        if failures:
            # Errors that concern the whole batch keep their own type.
            if isinstance(first_error, (MessageTooLargeError, TopicNotFoundError)) and (
                len(failures) == len(batch)
            ):
                raise first_error
            reason = failures[0][1]
            raise PublishError(
                f"{len(failures)} of {len(batch)} messages to {topic!r} not delivered: {reason}",
                failures=failures,
                delivered_ids=ids,
            ) from first_error
        return [i for i in ids if i is not None]

    def dead_letter_topic(self, topic: str) -> str:
        """Name of the topic that receives ``topic``'s dead letters."""
        return topic + self.dead_letter_suffix

    # -- consuming ----------------------------------------------------------------------
    def consumer(self, topic: str, group: str, *, max_outstanding: int = 1000) -> Consumer:
        """Open a pull consumer of ``topic`` in ``group`` (see :class:`Consumer`)."""
        self._check_open()
        _check_name("group", group)
        consumer = self._open_consumer(topic, group, max_outstanding)
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def subscribe(
        self,
        topic: str,
        handler: Callable[[Message], object],
        group: str,
        **options: Any,
    ) -> Any:
        """Consume ``topic`` in ``group`` until ``stop()``, SIGINT or SIGTERM; blocks.

        Each message is acked after ``handler`` returned; an exception means redelivery with
        backoff, and after ``max_attempts`` the message goes to the dead-letter topic with the
        error text while the stream keeps flowing. Options: see
        :func:`MessageBroker.consume_loop.run`. Returns :class:`ConsumeStats`.
        """
        from MessageBroker.consume_loop import per_message, run

        return run(self, topic, group, per_message(handler), **options)

    def subscribe_batches(
        self,
        topic: str,
        handler: Callable[[list[Message]], Mapping[str, BaseException] | None],
        group: str,
        **options: Any,
    ) -> Any:
        """Like :meth:`subscribe`, but ``handler`` gets whole batches.

        The handler returns None (all done) or a mapping of message id → exception for the
        messages that failed; raising fails the whole batch.
        """
        from MessageBroker.consume_loop import run

        return run(self, topic, group, handler, **options)

    def stop(self) -> None:
        """Ask every running ``subscribe`` loop of this broker to finish its batch and return."""
        self._stop.set()

    @property
    def stop_requested(self) -> threading.Event:
        return self._stop

    # -- lifecycle ----------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> CloseReport:
        """Close consumers, flush outstanding publishes (at most ``timeout`` s) and report.

        Idempotent. Anything not confirmed is counted in the report and logged.
        """
        if self._closed:
            return CloseReport()
        self._stop.set()
        with self._lock:
            consumers = list(self._consumers)
        errors: list[str] = []
        for consumer in consumers:
            try:
                consumer.close()
            except BrokerError as exc:
                errors.append(f"closing consumer of {consumer.topic!r}: {exc}")
        self._closed = True
        report = self._close(timeout)
        report = CloseReport(report.undelivered, tuple(errors) + report.errors)
        if not report.ok:
            logger.warning("%s broker closed with problems: %s", self.name, report)
        return report

    @property
    def closed(self) -> bool:
        return self._closed

    def _forget_consumer(self, consumer: Consumer) -> None:
        with self._lock:
            self._consumers.discard(consumer)

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError(f"{self.name} broker is closed")

    def _check_size(self, topic: str, message: OutgoingMessage) -> None:
        size = message.size()
        if size > self.max_message_bytes:
            raise MessageTooLargeError(size, self.max_message_bytes, topic=topic)

    def __enter__(self) -> BrokerInterface:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_list(messages: Message | Iterable[Message]) -> list[Message]:
    return [messages] if isinstance(messages, Message) else list(messages)


def _truncate(reason: str) -> str:
    encoded = reason.encode("utf-8")
    if len(encoded) <= _MAX_REASON_BYTES:
        return reason
    return encoded[:_MAX_REASON_BYTES].decode("utf-8", errors="ignore") + "…"


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
