"""The Pub/Sub consumer of the broker API: unary pulls on request, leases kept by a thread.

Delivery semantics (pull, leases, nack = ack deadline 0, close nacks what is held) are in the
spec sheet of :mod:`MessageBroker.google_pubsub_handler`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as api_errors

from MessageBroker.broker_interface import Consumer, Message
from MessageBroker.errors import ReceiveError
from MessageBroker.pubsub_attributes import decode_attributes
from MessageBroker.pubsub_errors import describe, translate, unwrap

if TYPE_CHECKING:
    from MessageBroker.google_pubsub_handler import GooglePubSubHandler

logger = logging.getLogger(__name__)

_IDLE_POLL_SECONDS = 0.05  # longest pause between empty pulls from the emulator


class PubSubConsumer(Consumer):
    """Pulls when asked (no background stream); a lease keeper extends what it holds."""

    def __init__(self, broker: GooglePubSubHandler, topic: str, group: str, path: str, max_outstanding: int):
        super().__init__(broker, topic, group)
        self._path, self._settings, self._rpc = path, broker.settings, broker._rpc
        self._max_held = min(broker.settings.flow_max_messages, max_outstanding)
        self._held: dict[str, int] = {}  # ack_id -> data bytes, handed out, neither acked nor nacked
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._client = broker._subscriber_client()
        self._leaser = threading.Thread(target=self._keep_leases, name=f"pubsub-lease-{topic}", daemon=True)
        self._leaser.start()

    def _receive(self, max_messages: int, timeout: float) -> list[Message]:
        deadline, pause = time.monotonic() + timeout, 0.005
        while True:
            with self._lock:
                full = sum(self._held.values()) >= self._settings.flow_max_bytes
                room = 0 if full else min(max_messages, self._max_held - len(self._held), 1000)
            received = self._pull(room, deadline) if room > 0 else []
            remaining = deadline - time.monotonic()
            if received or remaining <= 0:
                break
            pause = min(pause * 2, _IDLE_POLL_SECONDS)
            self._stopped.wait(min(pause, remaining))
        with self._lock:
            self._held.update((item.ack_id, len(item.message.data)) for item in received)
        return [self._convert(item) for item in received]

    def _pull(self, count: int, deadline: float) -> Sequence[Any]:
        wait = max(0.0, deadline - time.monotonic())
        # The emulator is polled: a pull it holds and the client then cancels would swallow messages.
        long_poll = not self._settings.emulator_host and wait > 0
        request = {"subscription": self._path, "max_messages": count, "return_immediately": not long_poll}
        try:
            return self._client.pull(request=request, timeout=max(wait, 1.0), retry=None).received_messages
        except (api_errors.DeadlineExceeded, api_errors.ServiceUnavailable) as exc:
            logger.debug("pull from %r got nothing: %s", self.topic, exc)
            return []
        except api_errors.GoogleAPIError as exc:
            raise translate(exc, self.topic, ReceiveError, f"pulling from {self.topic!r}") from exc

    def _convert(self, item: Any) -> Message:
        key, attributes = decode_attributes(item.message.attributes)
        return Message(id=item.message.message_id, topic=self.topic, data=item.message.data, key=key,
                       attributes=attributes, publish_time=item.message.publish_time,
                       delivery_attempt=item.delivery_attempt or 1, handle=item.ack_id)

    def _ack(self, messages: Sequence[Message]) -> None:
        self._send(self._release(messages), None)

    def _nack(self, messages: Sequence[Message]) -> None:
        self._send(self._release(messages), 0)

    def _release(self, messages: Sequence[Message]) -> list[str]:
        with self._lock:
            for message in messages:
                self._held.pop(message.handle, None)
        return [message.handle for message in messages]

    def _send(self, ack_ids: list[str], deadline: int | None, **rpc: Any) -> None:
        """Ack (deadline None) or set the ack deadline; a failure only means redelivery, so it is logged."""
        for start in range(0, len(ack_ids), 1000):
            request: dict[str, Any] = {"subscription": self._path, "ack_ids": ack_ids[start:start + 1000]}
            try:
                if deadline is None:
                    self._client.acknowledge(request=request, **(rpc or self._rpc))
                else:
                    self._client.modify_ack_deadline(request={**request, "ack_deadline_seconds": deadline},
                                                     **(rpc or self._rpc))
            except api_errors.GoogleAPIError as exc:
                logger.warning("%s for %d messages of %r failed (they will be delivered again): %s",
                               "ack" if deadline is None else "ack deadline change", len(request["ack_ids"]),
                               self.topic, describe(unwrap(exc)))

    def _keep_leases(self) -> None:
        deadline = self._settings.ack_deadline_seconds
        while not self._stopped.wait(deadline / 3):
            with self._lock:  # held across the call, so a nack cannot be overtaken by an extension
                if self._held:
                    self._send(list(self._held), deadline, timeout=deadline / 3, retry=None)

    def _close(self) -> None:
        self._stopped.set()
        self._leaser.join(timeout=self._settings.ack_deadline_seconds)
        with self._lock:
            unsettled, self._held = list(self._held), {}
        # Deliver them again now rather than after the ack deadline; bounded, as the broker may be gone.
        self._send(unsettled, 0, timeout=self._settings.connect_timeout, retry=None)
        self._client.close()
