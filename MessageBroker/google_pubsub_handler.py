"""Google Cloud Pub/Sub backend (real Google Cloud or Google's local emulator).

Spec sheet
- Config: ``pubsub_config.ini``, section ``[pubsub]``, every key commented there: ``project_id``
  (env PUBSUB_PROJECT_ID, then GOOGLE_CLOUD_PROJECT), ``emulator_host`` (env PUBSUB_EMULATOR_HOST;
  empty or absent = real Google Cloud), ``ack_deadline_seconds``, ``max_message_bytes``,
  ``publish_timeout_seconds``, ``connect_timeout_seconds``, ``flow_control.max_messages``,
  ``flow_control.max_bytes``, ``batch.max_messages``, ``batch.max_latency_seconds``,
  ``max_attempts``, ``dead_letter_suffix``, ``pull`` (env PUBSUB_PULL). Construction makes one cheap call (list topics) and
  fails within ``connect_timeout_seconds`` with an error naming the file and the key.
- Real Google Cloud: leave ``emulator_host`` empty and provide application-default credentials
  (GOOGLE_APPLICATION_CREDENTIALS=key.json, or ``gcloud auth application-default login``); the
  account needs roles/pubsub.editor on ``project_id`` (default: the credentials' project).
- Groups: group G of topic T is the subscription ``T--G``, characters of G outside
  ``[A-Za-z0-9._~+-]`` percent-encoded, ids over 255 characters shortened with a hash. Members of
  a group share its messages. A subscription keeps only messages published after it was
  created: producers call ``ensure_subscription`` for the groups downstream of them.
- Delivery: at-least-once, unordered (ordering keys are not used). The key travels in the
  attribute ``x-message-key`` (``x-message-key-b64`` if not UTF-8); user attributes named like
  publish() parameters or starting with ``x-message-`` travel as ``x-message-attr-<name>``; an
  empty message without attributes carries ``x-message-empty``. Receiving undoes all of this.
- Consuming, ``pull = unary`` (the default): ``receive`` pulls (unary Pull, up to 1000 messages;
  the emulator is polled, Google Cloud long-polled); nothing is fetched ahead, so a consumer
  holds only what it handed out, at most ``flow_control.max_messages`` / ``max_bytes``. Acks are
  sent before ``ack`` returns (a failed ack is logged: the message comes again). A thread per
  consumer extends the ack deadline of the messages it holds every ``ack_deadline_seconds / 3``.
- Consuming, ``pull = streaming``: the SDK's streaming pull with the same flow control and leases
  of ``ack_deadline_seconds`` (``pubsub_streaming``); it fetches ahead up to the flow-control
  limits, and acks leave through the SDK's batched dispatcher shortly after ``ack`` returns.
  Lower latency on Google Cloud. Not the default because on the emulator a closed or killed
  consumer's stream lives on and keeps taking messages, each then delayed by an ack deadline or
  more (also after ``close()``), and it was 8x slower there.
- Leases: if a consumer dies its messages come again after at most ``ack_deadline_seconds``;
  ``close()`` nacks them, so they come again at once.
- Nack = modify ack deadline 0: immediate redelivery, to any member of the group.
- Limits: 10,000,000 bytes per publish request (``max_message_bytes`` leaves headroom); at most
  100 attributes, names up to 256 bytes not starting with ``goog``, values up to 1024 bytes (the
  key counts as a value). Checked before sending (``pubsub_attributes``): the emulator enforces
  none of them, Google Cloud does.
- The emulator offers no exactly-once delivery and ignores dead-letter policies and delivery
  counts: ``delivery_attempt`` is counted by the shared layer and the consume loop publishes dead
  letters to ``<topic><dead_letter_suffix>``. It keeps everything in memory.
- Modules: this one holds the handler (clients, administration, publishing, close);
  ``pubsub_settings`` the ini parsing and validation and the project/credentials lookup;
  ``pubsub_consumer`` the pulling consumer and its leases; ``pubsub_streaming`` the
  streaming-pull consumer; ``pubsub_attributes`` the key and
  attribute mapping and limits; ``pubsub_errors`` retries and error translation. They import
  only the shared layer and google-cloud-pubsub.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import grpc
from google.api_core import exceptions as api_errors
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher import exceptions as publisher_errors
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from MessageBroker.broker_interface import BrokerInterface, Capabilities, CloseReport, Consumer, OutgoingMessage
from MessageBroker.errors import (
    AuthenticationError, BrokerClosedError, BrokerConfigError, BrokerConnectionError, BrokerError,
    MessageTooLargeError, PublishError,
)
from MessageBroker.pubsub_attributes import encode_attributes
from MessageBroker.pubsub_consumer import PubSubConsumer
from MessageBroker.pubsub_errors import describe, retry_policy, translate, unwrap
from MessageBroker.pubsub_settings import PubSubSettings, read_config, resolve_project
from MessageBroker.pubsub_streaming import StreamingPubSubConsumer

__all__ = ["GooglePubSubHandler", "PubSubSettings", "subscription_id"]

logger = logging.getLogger(__name__)

# No keepalive pings: the emulator answers them with GOAWAY "too_many_pings", breaking every stream.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def subscription_id(topic: str, group: str) -> str:
    """The Pub/Sub subscription id of ``group`` on ``topic`` (rule in the module docstring)."""
    escaped = re.sub(r"[^A-Za-z0-9._~+-]", lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), group)
    name = f"{topic}--{escaped}"
    return name if len(name) <= 255 else f"{name[:238]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


class GooglePubSubHandler(BrokerInterface):
    """Broker API over Pub/Sub: one thread-safe publisher client, one subscriber client per consumer."""

    name: ClassVar[str] = "pubsub"
    capabilities: ClassVar[Capabilities] = Capabilities(
        consumer_groups=True, retains_before_subscribe=False, ordered_by_key=False, cross_process=True
    )

    @classmethod
    def from_config(cls, path: Path,
                    overrides: Mapping[tuple[str, str], str] | None = None) -> GooglePubSubHandler:
        """Read ``[pubsub]`` of ``path`` (env vars and ``overrides`` win) and connect; fails fast."""
        return cls(read_config(path, overrides))

    def __init__(self, settings: PubSubSettings):
        super().__init__(max_message_bytes=settings.max_message_bytes, publish_timeout=settings.publish_timeout,
                         max_attempts=settings.max_attempts, dead_letter_suffix=settings.dead_letter_suffix)
        self.settings = settings
        self._credentials, self.project_id = resolve_project(settings)
        self._rpc = {"timeout": settings.publish_timeout, "retry": retry_policy(settings.publish_timeout)}
        self._pending: set[concurrent.futures.Future[str]] = set()
        self._pending_lock = threading.Lock()
        self._publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=settings.batch_max_messages, max_latency=settings.batch_max_latency),
            publisher_options=pubsub_v1.types.PublisherOptions(
                retry=retry_policy(settings.publish_timeout), timeout=settings.publish_timeout),
            transport=self._transport(PublisherGrpcTransport),
        )
        self._admin = self._subscriber_client()
        try:
            self._publisher.list_topics(request={"project": f"projects/{self.project_id}", "page_size": 1},
                                        timeout=settings.connect_timeout,
                                        retry=retry_policy(settings.connect_timeout))
        except api_errors.GoogleAPIError as exc:
            self._release_clients()
            raise self._start_error(exc) from exc

    def _transport(self, transport_class: type) -> Any:
        host = self.settings.emulator_host
        if host:  # our own channel: the ini picks the emulator even without PUBSUB_EMULATOR_HOST
            return transport_class(channel=grpc.insecure_channel(host, options=_CHANNEL_OPTIONS), host=host)
        return transport_class(credentials=self._credentials)

    def _subscriber_client(self) -> pubsub_v1.SubscriberClient:
        return pubsub_v1.SubscriberClient(transport=self._transport(SubscriberGrpcTransport))

    def _start_error(self, exc: api_errors.GoogleAPIError) -> BrokerError:
        s, cause = self.settings, unwrap(exc)
        if isinstance(cause, api_errors.InvalidArgument | api_errors.NotFound):
            return BrokerConfigError(f"Pub/Sub rejected project {self.project_id!r}: {describe(cause)}",
                                     file=s.source, key="pubsub.project_id")
        if isinstance(cause, api_errors.Unauthenticated | api_errors.PermissionDenied):
            return AuthenticationError(f"Google Cloud refused the credentials (GOOGLE_APPLICATION_CREDENTIALS) for "
                                       f"project {self.project_id!r} (key pubsub.project_id in {s.source}): {cause}")
        where = (f"the Pub/Sub emulator at {s.emulator_host} (key pubsub.emulator_host" if s.emulator_host else
                 f"Google Cloud Pub/Sub for project {self.project_id!r} (key pubsub.project_id")
        return BrokerConnectionError(f"cannot use {where} in {s.source}) within {s.connect_timeout:g} s: "
                                     f"{describe(cause)}")

    def _topic_path(self, topic: str) -> str:
        return f"projects/{self.project_id}/topics/{topic}"

    def _subscription_path(self, topic: str, group: str) -> str:
        return f"projects/{self.project_id}/subscriptions/{subscription_id(topic, group)}"

    # -- administration: blocking, bounded by publish_timeout_seconds ---------------------
    def create_topic(self, topic: str) -> None:
        self._check_open()
        try:
            self._publisher.create_topic(request={"name": self._topic_path(topic)}, **self._rpc)
        except api_errors.AlreadyExists:
            pass
        except api_errors.GoogleAPIError as exc:
            raise translate(exc, topic, BrokerError, f"creating topic {topic!r}") from exc

    def delete_topic(self, topic: str) -> None:
        """Delete the topic and every subscription attached to it; missing ones are fine."""
        self._check_open()
        request = {"topic": self._topic_path(topic)}
        try:
            for path in self._publisher.list_topic_subscriptions(request=request, **self._rpc):
                with contextlib.suppress(api_errors.NotFound):
                    self._admin.delete_subscription(request={"subscription": path}, **self._rpc)
            self._publisher.delete_topic(request=request, **self._rpc)
        except api_errors.NotFound:
            pass
        except api_errors.GoogleAPIError as exc:
            raise translate(exc, topic, BrokerError, f"deleting topic {topic!r}") from exc

    def ensure_subscription(self, topic: str, group: str) -> None:
        self._check_open()
        path, topic_path = self._subscription_path(topic, group), self._topic_path(topic)
        request = {"name": path, "topic": topic_path, "ack_deadline_seconds": self.settings.ack_deadline_seconds}
        try:
            try:
                self._admin.create_subscription(request=request, **self._rpc)
            except api_errors.AlreadyExists:
                existing = self._admin.get_subscription(request={"subscription": path}, **self._rpc)
                if existing.topic != topic_path:  # orphaned when a topic of that name was deleted
                    self._admin.delete_subscription(request={"subscription": path}, **self._rpc)
                    self._admin.create_subscription(request=request, **self._rpc)
        except api_errors.GoogleAPIError as exc:
            raise translate(exc, topic, BrokerError, f"subscribing group {group!r} to {topic!r}") from exc

    # -- publishing ---------------------------------------------------------------------
    def _publish_async(self, topic: str, message: OutgoingMessage) -> concurrent.futures.Future[str]:
        ours: concurrent.futures.Future[str] = concurrent.futures.Future()
        try:
            theirs = self._publisher.publish(self._topic_path(topic), message.data, **encode_attributes(message))
        except publisher_errors.MessageTooLargeError as exc:  # the request envelope pushed it over
            error: BrokerError = MessageTooLargeError(message.size(), self.max_message_bytes, topic=topic)
            error.__cause__ = exc
            ours.set_exception(error)
            return ours
        except PublishError as exc:
            ours.set_exception(exc)
            return ours
        except RuntimeError as exc:  # the publisher was stopped by a concurrent close()
            ours.set_exception(BrokerClosedError(f"pubsub broker is closed: {exc}"))
            return ours
        with self._pending_lock:
            self._pending.add(ours)
        theirs.add_done_callback(lambda done: self._settle(ours, done, topic))
        return ours

    def _settle(self, ours: concurrent.futures.Future[str], theirs: Any, topic: str) -> None:
        with self._pending_lock:
            self._pending.discard(ours)
        failure = theirs.exception()
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # close() already failed it
            if failure is None:
                ours.set_result(theirs.result())
            else:
                error = translate(failure, topic, PublishError, f"publishing to {topic!r}")
                error.__cause__ = failure
                ours.set_exception(error)

    # -- consuming and closing ----------------------------------------------------------
    def _open_consumer(self, topic: str, group: str, max_outstanding: int) -> Consumer:
        self.ensure_subscription(topic, group)
        kind = StreamingPubSubConsumer if self.settings.pull == "streaming" else PubSubConsumer
        return kind(self, topic, group, self._subscription_path(topic, group), max_outstanding)

    def _close(self, timeout: float) -> CloseReport:
        deadline, errors = time.monotonic() + timeout, []
        try:
            self._publisher.stop()  # sends the open batches; their RPCs finish in the background
        except Exception as exc:  # noqa: BLE001 - reported; closing goes on
            errors.append(f"stopping the publisher: {exc}")
        with self._pending_lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        with self._pending_lock:
            unconfirmed, self._pending = list(self._pending), set()
        for future in unconfirmed:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # confirmed just now
                future.set_exception(PublishError(f"not confirmed by Pub/Sub within close()'s {timeout:g} s"))
        if unconfirmed:
            errors.append(f"{len(unconfirmed)} messages not confirmed within {timeout:g} s")
            # The SDK's daemon threads retry them until publish_timeout_seconds; closing the channel
            # under them would only make them crash noisily.
            self._admin.close()
        else:
            self._release_clients()
        return CloseReport(undelivered=len(unconfirmed), errors=tuple(errors))

    def _release_clients(self) -> None:
        for close in (self._publisher.transport.close, self._admin.close):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                logger.debug("closing a Pub/Sub client failed: %s", exc)
