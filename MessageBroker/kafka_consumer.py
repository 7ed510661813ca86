"""The Kafka consumer of the broker API: one librdkafka consumer, per-partition offset tracking.

Delivery semantics (commit up to the lowest unacked offset, nack = rewind) are in the spec sheet
of :mod:`MessageBroker.kafka_handler`; Tansu's group workarounds in :mod:`MessageBroker.kafka_tansu`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from MessageBroker.broker_interface import Consumer, Message
from MessageBroker.errors import ReceiveError
from MessageBroker.kafka_settings import AUTH_ERRORS, ClientLog
from MessageBroker.kafka_tansu import TansuGroupGuard

if TYPE_CHECKING:
    from MessageBroker.kafka_handler import KafkaHandler

logger = logging.getLogger(__name__)

_POLL_SLICE = 0.2  # longest poll while holding the consumer lock, so close() never waits long


@dataclass(eq=False)
class _Partition:
    """Offsets of one assigned partition; a new object per assignment makes stale handles inert."""

    next_offset: int | None = None  # one past the last offset delivered (rewound by nack)
    committed: int = -1
    outstanding: set[int] = field(default_factory=set)  # delivered, not acked, not handed back
    acked_ahead: set[int] = field(default_factory=set)  # acked at or above next_offset: drop on refetch

    def committable(self) -> int | None:
        return min(self.outstanding) if self.outstanding else self.next_offset


class KafkaConsumer(TansuGroupGuard, Consumer):
    """One librdkafka consumer in ``group`` subscribed to ``topic``."""

    def __init__(self, broker: KafkaHandler, topic: str, group: str):
        super().__init__(broker, topic, group)
        settings = broker.settings
        self._settings = settings
        self._lock = threading.RLock()  # close() may come from another thread than receive()
        self._partitions: dict[int, _Partition] = {}
        self._log = ClientLog(settings, f"consumer of {topic!r}")
        config = {**settings.client, **settings.consumer, "group.id": group, **self._log.hooks()}
        if settings.leave_settle:
            config.update(self._membership_hooks())
        try:
            self._kafka = confluent_kafka.Consumer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise settings.config_error(exc, {"consumer": settings.consumer, "security": settings.client}) from None
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
                if error.fatal() or error.code() in AUTH_ERRORS:
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
