"""In-process broker for fast single-process tests of code built on the broker API.

Spec sheet
- Config: none. Handlers built with the same ``namespace`` (default ``"default"``) share topics;
  ``InMemoryHandler.reset(namespace)`` forgets them.
- Storage: each topic is an append-only log kept in memory; every group has its own position,
  so a group that subscribes late still receives everything (like Kafka).
- Delivery: at-least-once. Members of one group take messages from a shared position (competing
  consumers); ``nack`` and ``close`` of a consumer hand its unacked messages back to the group.
- Order: publish order for one consumer without failures; redeliveries come first.
- Limits: 10 MB per message (as Pub/Sub). Nothing crosses a process boundary.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from MessageBroker.broker_interface import (
    BrokerInterface,
    Capabilities,
    CloseReport,
    Consumer,
    Message,
    OutgoingMessage,
)
from MessageBroker.errors import TopicNotFoundError

MAX_MESSAGE_BYTES = 10 * 1024 * 1024


class _Group:
    def __init__(self) -> None:
        self.position = 0
        self.redeliver: deque[int] = deque()
        self.in_flight: dict[int, int] = {}  # offset -> id() of the consumer holding it


class _Topic:
    def __init__(self) -> None:
        self.log: list[tuple[OutgoingMessage, datetime]] = []
        self.groups: dict[str, _Group] = {}
        self.changed = threading.Condition()

    def group(self, name: str) -> _Group:
        return self.groups.setdefault(name, _Group())


_NAMESPACES: dict[str, dict[str, _Topic]] = {}
_NAMESPACES_LOCK = threading.Lock()


class InMemoryHandler(BrokerInterface):
    """Broker API over in-process topics; thread-safe."""

    name: ClassVar[str] = "memory"
    capabilities: ClassVar[Capabilities] = Capabilities(
        consumer_groups=True, retains_before_subscribe=True, ordered_by_key=True, cross_process=False
    )

    def __init__(self, namespace: str = "default", **options: Any):
        options.setdefault("max_message_bytes", MAX_MESSAGE_BYTES)
        super().__init__(**options)
        with _NAMESPACES_LOCK:
            self._topics = _NAMESPACES.setdefault(namespace, {})

    @classmethod
    def from_config(cls, path: Path | None, overrides: dict[Any, str] | None = None) -> InMemoryHandler:
        """The in-process broker has no config file; ``overrides`` may name a namespace."""
        return cls(namespace=(overrides or {}).get(("memory", "namespace"), "default"))

    @staticmethod
    def reset(namespace: str = "default") -> None:
        """Forget every topic of ``namespace`` (tests call this between cases)."""
        with _NAMESPACES_LOCK:
            _NAMESPACES.get(namespace, {}).clear()

    def create_topic(self, topic: str) -> None:
        self._check_open()
        with _NAMESPACES_LOCK:
            self._topics.setdefault(topic, _Topic())

    def delete_topic(self, topic: str) -> None:
        self._check_open()
        with _NAMESPACES_LOCK:
            self._topics.pop(topic, None)

    def ensure_subscription(self, topic: str, group: str) -> None:
        self._check_open()
        found = self._topic(topic)
        with found.changed:
            found.group(group)

    def _topic(self, topic: str) -> _Topic:
        try:
            return self._topics[topic]
        except KeyError:
            raise TopicNotFoundError(topic) from None

    def _publish_async(self, topic: str, message: OutgoingMessage) -> concurrent.futures.Future[str]:
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        try:
            found = self._topic(topic)
        except TopicNotFoundError as exc:
            future.set_exception(exc)
            return future
        with found.changed:
            found.log.append((message, datetime.now(timezone.utc)))
            offset = len(found.log) - 1
            found.changed.notify_all()
        future.set_result(str(offset))
        return future

    def _open_consumer(self, topic: str, group: str, max_outstanding: int) -> Consumer:
        return _InMemoryConsumer(self, topic, group, self._topic(topic))

    def _close(self, timeout: float) -> CloseReport:
        return CloseReport()


class _InMemoryConsumer(Consumer):
    def __init__(self, broker: InMemoryHandler, topic: str, group: str, found: _Topic):
        super().__init__(broker, topic, group)
        self._found = found
        with found.changed:
            found.group(group)

    def _receive(self, max_messages: int, timeout: float) -> list[Message]:
        found = self._found
        with found.changed:
            group = found.groups[self.group]
            found.changed.wait_for(
                lambda: self.closed or group.redeliver or group.position < len(found.log), timeout
            )
            offsets: list[int] = []
            while group.redeliver and len(offsets) < max_messages:
                offsets.append(group.redeliver.popleft())
            while group.position < len(found.log) and len(offsets) < max_messages:
                offsets.append(group.position)
                group.position += 1
            for offset in offsets:
                group.in_flight[offset] = id(self)
            return [self._message(offset) for offset in offsets]

    def _message(self, offset: int) -> Message:
        outgoing, published = self._found.log[offset]
        return Message(
            id=str(offset), topic=self.topic, data=outgoing.data, key=outgoing.key,
            attributes=dict(outgoing.attributes), publish_time=published, handle=offset,
        )

    def _ack(self, messages: list[Message]) -> None:
        with self._found.changed:
            group = self._found.groups[self.group]
            for message in messages:
                group.in_flight.pop(message.handle, None)

    def _nack(self, messages: list[Message]) -> None:
        with self._found.changed:
            group = self._found.groups[self.group]
            for message in messages:
                if group.in_flight.pop(message.handle, None) is not None:
                    group.redeliver.append(message.handle)
            self._found.changed.notify_all()

    def _close(self) -> None:
        with self._found.changed:
            group = self._found.groups[self.group]
            mine = sorted(o for o, holder in group.in_flight.items() if holder == id(self))
            for offset in mine:
                del group.in_flight[offset]
            group.redeliver.extendleft(reversed(mine))
            self._found.changed.notify_all()
