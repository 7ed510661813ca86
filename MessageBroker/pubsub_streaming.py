"""The Pub/Sub consumer on streaming pull (``pull = streaming``): the SDK keeps the stream.

google-cloud-pubsub's subscriber holds one streaming pull per consumer, applies flow control
(``flow_control.max_messages`` / ``max_bytes``: it stops taking messages while that many are
handed out and unsettled) and extends the leases of what it holds. Its callback only drops each
message into an inbox; ``receive`` hands out what the inbox has. Ack and nack go through the
SDK's batched dispatcher, so they are sent shortly after the call returns (a lost ack means a
redelivery, never a loss). ``close`` stops the stream, then hands everything received and not
settled back with one direct call, so it comes again at once. Delivery semantics are otherwise those of the unary
consumer, in the spec sheet of :mod:`MessageBroker.google_pubsub_handler`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as api_errors
from google.cloud import pubsub_v1

from MessageBroker.broker_interface import Consumer, Message
from MessageBroker.errors import ReceiveError
from MessageBroker.pubsub_attributes import decode_attributes
from MessageBroker.pubsub_errors import describe, translate, unwrap

if TYPE_CHECKING:
    from MessageBroker.google_pubsub_handler import GooglePubSubHandler

logger = logging.getLogger(__name__)


class StreamingPubSubConsumer(Consumer):
    """Consumes through the SDK's streaming pull; ``receive`` drains what it delivered."""

    def __init__(self, broker: GooglePubSubHandler, topic: str, group: str, path: str, max_outstanding: int):
        super().__init__(broker, topic, group)
        settings = broker.settings
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: dict[str, Any] = {}  # ack_id -> SDK message handed out, neither acked nor nacked
        self._client, self._path = broker._subscriber_client(), path
        # Leases of ack_deadline_seconds, not the SDK's default 60 s and up: a consumer that dies
        # holds its messages only that long, as with unary pull.
        lease = settings.ack_deadline_seconds
        flow = pubsub_v1.types.FlowControl(
            max_messages=min(settings.flow_max_messages, max_outstanding), max_bytes=settings.flow_max_bytes,
            min_duration_per_lease_extension=lease, max_duration_per_lease_extension=lease)
        self._stream = self._client.subscribe(path, callback=self._inbox.put, flow_control=flow)

    def _receive(self, max_messages: int, timeout: float) -> list[Message]:
        received: list[Any] = []
        try:
            received.append(self._inbox.get(timeout=max(0.0, timeout)))
            while len(received) < max_messages:
                received.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if not received:
            self._raise_if_stream_failed()
            return []
        self._held.update((item.ack_id, item) for item in received)
        return [self._convert(item) for item in received]

    def _raise_if_stream_failed(self) -> None:
        if self._stream.done() and not self._stream.cancelled():
            exc = self._stream.exception()
            if exc is not None:
                raise translate(exc, self.topic, ReceiveError, f"streaming pull from {self.topic!r}") from exc

    def _convert(self, item: Any) -> Message:
        key, attributes = decode_attributes(item.attributes)
        return Message(id=item.message_id, topic=self.topic, data=item.data, key=key, attributes=attributes,
                       publish_time=item.publish_time, delivery_attempt=item.delivery_attempt or 1,
                       handle=item.ack_id)

    def _ack(self, messages: Sequence[Message]) -> None:
        for item in self._release(messages):
            item.ack()

    def _nack(self, messages: Sequence[Message]) -> None:
        for item in self._release(messages):
            item.nack()

    def _release(self, messages: Sequence[Message]) -> list[Any]:
        return [item for item in (self._held.pop(m.handle, None) for m in messages) if item is not None]

    def _close(self) -> None:
        self._stream.cancel()  # no more leases; the SDK nacks what it had not handed to the callback
        try:
            self._stream.result(timeout=self.broker.settings.connect_timeout)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - closing goes on; unsettled messages come again anyway
            logger.debug("streaming pull of %r ended: %s", self.topic, describe(unwrap(exc)))
        unsettled = [item.ack_id for item in self._held.values()]
        self._held.clear()
        while True:
            try:
                unsettled.append(self._inbox.get_nowait().ack_id)
            except queue.Empty:
                break
        # Sent here, not through the stopped SDK: delivered again now rather than after the ack
        # deadline. Bounded, as the broker may be gone; a failure only delays the redelivery.
        for start in range(0, len(unsettled), 1000):
            try:
                self._client.modify_ack_deadline(
                    request={"subscription": self._path, "ack_ids": unsettled[start:start + 1000],
                             "ack_deadline_seconds": 0},
                    timeout=self.broker.settings.connect_timeout, retry=None)  # type: ignore[attr-defined]
            except api_errors.GoogleAPIError as exc:
                logger.warning("handing %d messages of %r back failed (they come again after the ack "
                               "deadline): %s", len(unsettled[start:start + 1000]), self.topic, describe(unwrap(exc)))
        self._client.close()
