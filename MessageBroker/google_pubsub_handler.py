"""Google Cloud Pub/Sub backend (real Google Cloud or Google's local emulator).

Spec sheet
- Config: ``pubsub_config.ini``, section ``[pubsub]``, every key commented there: ``project_id``
  (env PUBSUB_PROJECT_ID, then GOOGLE_CLOUD_PROJECT), ``emulator_host`` (env PUBSUB_EMULATOR_HOST;
  empty or absent = real Google Cloud), ``ack_deadline_seconds``, ``max_message_bytes``,
  ``publish_timeout_seconds``, ``connect_timeout_seconds``, ``flow_control.max_messages``,
  ``flow_control.max_bytes``, ``batch.max_messages``, ``batch.max_latency_seconds``,
  ``max_attempts``, ``dead_letter_suffix``. Construction makes one cheap call (list topics) and
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
- Consuming: ``receive`` pulls (unary Pull, up to 1000 messages; the emulator is polled, Google
  Cloud long-polled); nothing is fetched ahead, so a consumer holds only what it handed out, at
  most ``flow_control.max_messages`` / ``max_bytes``. Acks are sent before ``ack`` returns (a
  failed ack is logged: the message comes again). Streaming pull is not used: on the emulator a
  closed or killed consumer's stream lives on and keeps taking messages, each then delayed by an
  ack deadline or more (and it was 8x slower).
- Leases: a thread per consumer extends the ack deadline of the messages it holds every
  ``ack_deadline_seconds / 3``. If the consumer dies they come again after at most
  ``ack_deadline_seconds``; ``close()`` nacks them, so they come again at once.
- Nack = modify ack deadline 0: immediate redelivery, to any member of the group.
- Limits: 10,000,000 bytes per publish request (``max_message_bytes`` leaves headroom); at most
  100 attributes, names up to 256 bytes not starting with ``goog``, values up to 1024 bytes (the
  key counts as a value). Checked here: the emulator enforces none of them, Google Cloud does.
- The emulator offers no exactly-once delivery and ignores dead-letter policies and delivery
  counts: ``delivery_attempt`` is counted by the shared layer and the consume loop publishes dead
  letters to ``<topic><dead_letter_suffix>``. It keeps everything in memory.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import grpc
from google.api_core import exceptions as api_errors
from google.api_core import retry as api_retry
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher import exceptions as publisher_errors
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from MessageBroker.broker_interface import (
    BrokerInterface, Capabilities, CloseReport, Consumer, Message, OutgoingMessage,
)
from MessageBroker.errors import (
    AuthenticationError, BrokerClosedError, BrokerConfigError, BrokerConnectionError, BrokerError,
    MessageTooLargeError, PublishError, ReceiveError, TopicNotFoundError,
)
from MessageBroker.settings import IniSettings

logger = logging.getLogger(__name__)

SERVER_MAX_REQUEST_BYTES = 10_000_000
KEY_ATTRIBUTE, KEY_B64_ATTRIBUTE, EMPTY_ATTRIBUTE = "x-message-key", "x-message-key-b64", "x-message-empty"
_RESERVED_PREFIX, _ESCAPE_PREFIX = "x-message-", "x-message-attr-"
_PUBLISH_PARAMETERS = frozenset({"self", "topic", "data", "ordering_key", "retry", "timeout"})
_MAX_ATTRIBUTES, _MAX_NAME_BYTES, _MAX_VALUE_BYTES = 100, 256, 1024
_PROJECT_ID = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{0,61}[a-z0-9]$")
# No keepalive pings: the emulator answers them with GOAWAY "too_many_pings", breaking every stream.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
_TRANSIENT = (api_errors.ServiceUnavailable, api_errors.DeadlineExceeded, api_errors.Aborted,
              api_errors.InternalServerError, api_errors.Unknown, api_errors.ResourceExhausted)
_IDLE_POLL_SECONDS = 0.05  # longest pause between empty pulls from the emulator


@dataclass(frozen=True)
class PubSubSettings:
    """Validated ``[pubsub]`` settings; ``source`` (the ini file) is named in errors."""

    project_id: str = ""
    emulator_host: str = ""  # empty: real Google Cloud
    ack_deadline_seconds: int = 10
    max_message_bytes: int = 9_900_000
    publish_timeout: float = 30.0
    connect_timeout: float = 5.0
    flow_max_messages: int = 1000
    flow_max_bytes: int = 100 * 1024 * 1024
    batch_max_messages: int = 500
    batch_max_latency: float = 0.01
    max_attempts: int = 5
    dead_letter_suffix: str = ".dlq"
    source: str = "arguments"


# (attribute, ini key, type, minimum, maximum or None)
_NUMBERS = (
    ("ack_deadline_seconds", "ack_deadline_seconds", int, 10, 600),
    ("max_message_bytes", "max_message_bytes", int, 1, SERVER_MAX_REQUEST_BYTES),
    ("publish_timeout", "publish_timeout_seconds", float, 0.1, None),
    ("connect_timeout", "connect_timeout_seconds", float, 0.1, None),
    ("flow_max_messages", "flow_control.max_messages", int, 1, None),
    ("flow_max_bytes", "flow_control.max_bytes", int, 1, None),
    ("batch_max_messages", "batch.max_messages", int, 1, 1000),
    ("batch_max_latency", "batch.max_latency_seconds", float, 0.0, None),
    ("max_attempts", "max_attempts", int, 1, None),
)


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
        ini = IniSettings(path, overrides=overrides)
        project_env = "PUBSUB_PROJECT_ID" if os.environ.get("PUBSUB_PROJECT_ID", "").strip() \
            else "GOOGLE_CLOUD_PROJECT"
        settings = PubSubSettings(
            project_id=ini.get("pubsub", "project_id", env=project_env, default=""),
            emulator_host=ini.get("pubsub", "emulator_host", env="PUBSUB_EMULATOR_HOST", default=""),
            dead_letter_suffix=ini.get("pubsub", "dead_letter_suffix", default=".dlq"),
            source=str(ini.path),
        )
        for attribute, key, kind, low, high in _NUMBERS:
            read = ini.get_int if kind is int else ini.get_float
            value = read("pubsub", key, default=str(getattr(PubSubSettings, attribute)), minimum=low)
            if high is not None and value > high:
                raise BrokerConfigError(f"must be at most {high}, got {value}", file=str(ini.path),
                                        key=f"pubsub.{key}")
            settings = replace(settings, **{attribute: value})
        return cls(settings)

    def __init__(self, settings: PubSubSettings):
        super().__init__(max_message_bytes=settings.max_message_bytes, publish_timeout=settings.publish_timeout,
                         max_attempts=settings.max_attempts, dead_letter_suffix=settings.dead_letter_suffix)
        self.settings = settings
        self._credentials, self.project_id = self._resolve_project()
        self._rpc = {"timeout": settings.publish_timeout, "retry": _retry(settings.publish_timeout)}
        self._pending: set[concurrent.futures.Future[str]] = set()
        self._pending_lock = threading.Lock()
        self._publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=settings.batch_max_messages, max_latency=settings.batch_max_latency),
            publisher_options=pubsub_v1.types.PublisherOptions(
                retry=_retry(settings.publish_timeout), timeout=settings.publish_timeout),
            transport=self._transport(PublisherGrpcTransport),
        )
        self._admin = self._subscriber_client()
        try:
            self._publisher.list_topics(request={"project": f"projects/{self.project_id}", "page_size": 1},
                                        timeout=settings.connect_timeout, retry=_retry(settings.connect_timeout))
        except api_errors.GoogleAPIError as exc:
            self._release_clients()
            raise self._start_error(exc) from exc

    def _resolve_project(self) -> tuple[Any, str]:
        """Credentials (None on the emulator) and the validated project id."""
        s, credentials, project = self.settings, None, self.settings.project_id
        if not s.emulator_host:
            import google.auth
            from google.auth.exceptions import DefaultCredentialsError

            try:
                credentials, detected = google.auth.default(scopes=["https://www.googleapis.com/auth/pubsub"])
            except DefaultCredentialsError as exc:
                raise BrokerConfigError(
                    "no emulator host and no Google Cloud credentials: set the emulator's host:port (or "
                    "PUBSUB_EMULATOR_HOST), or for real Pub/Sub GOOGLE_APPLICATION_CREDENTIALS to a key file "
                    f"({exc})", file=s.source, key="pubsub.emulator_host") from exc
            project = project or detected or ""
        if not project:
            raise BrokerConfigError("missing setting (or set PUBSUB_PROJECT_ID)", file=s.source,
                                    key="pubsub.project_id")
        if not _PROJECT_ID.match(project):
            raise BrokerConfigError(f"invalid project id {project!r}", file=s.source, key="pubsub.project_id")
        return credentials, project

    def _transport(self, transport_class: type) -> Any:
        host = self.settings.emulator_host
        if host:  # our own channel: the ini picks the emulator even without PUBSUB_EMULATOR_HOST
            return transport_class(channel=grpc.insecure_channel(host, options=_CHANNEL_OPTIONS), host=host)
        return transport_class(credentials=self._credentials)

    def _subscriber_client(self) -> pubsub_v1.SubscriberClient:
        return pubsub_v1.SubscriberClient(transport=self._transport(SubscriberGrpcTransport))

    def _start_error(self, exc: api_errors.GoogleAPIError) -> BrokerError:
        s, cause = self.settings, _unwrap(exc)
        if isinstance(cause, api_errors.InvalidArgument | api_errors.NotFound):
            return BrokerConfigError(f"Pub/Sub rejected project {self.project_id!r}: {_describe(cause)}",
                                     file=s.source, key="pubsub.project_id")
        if isinstance(cause, api_errors.Unauthenticated | api_errors.PermissionDenied):
            return AuthenticationError(f"Google Cloud refused the credentials (GOOGLE_APPLICATION_CREDENTIALS) for "
                                       f"project {self.project_id!r} (key pubsub.project_id in {s.source}): {cause}")
        where = (f"the Pub/Sub emulator at {s.emulator_host} (key pubsub.emulator_host" if s.emulator_host else
                 f"Google Cloud Pub/Sub for project {self.project_id!r} (key pubsub.project_id")
        return BrokerConnectionError(f"cannot use {where} in {s.source}) within {s.connect_timeout:g} s: "
                                     f"{_describe(cause)}")

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
            raise _translate(exc, topic, BrokerError, f"creating topic {topic!r}") from exc

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
            raise _translate(exc, topic, BrokerError, f"deleting topic {topic!r}") from exc

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
            raise _translate(exc, topic, BrokerError, f"subscribing group {group!r} to {topic!r}") from exc

    # -- publishing ---------------------------------------------------------------------
    def _publish_async(self, topic: str, message: OutgoingMessage) -> concurrent.futures.Future[str]:
        ours: concurrent.futures.Future[str] = concurrent.futures.Future()
        try:
            theirs = self._publisher.publish(self._topic_path(topic), message.data, **_encode_attributes(message))
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
                error = _translate(failure, topic, PublishError, f"publishing to {topic!r}")
                error.__cause__ = failure
                ours.set_exception(error)

    # -- consuming and closing ----------------------------------------------------------
    def _open_consumer(self, topic: str, group: str, max_outstanding: int) -> Consumer:
        self.ensure_subscription(topic, group)
        return _PubSubConsumer(self, topic, group, self._subscription_path(topic, group), max_outstanding)

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


class _PubSubConsumer(Consumer):
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
            raise _translate(exc, self.topic, ReceiveError, f"pulling from {self.topic!r}") from exc

    def _convert(self, item: Any) -> Message:
        key, attributes = _decode_attributes(item.message.attributes)
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
                               self.topic, _describe(_unwrap(exc)))

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


def _retry(timeout: float) -> api_retry.Retry:
    return api_retry.Retry(predicate=api_retry.if_exception_type(*_TRANSIENT), initial=0.1, maximum=2.0,
                           multiplier=2.0, timeout=timeout)


def _encode_attributes(message: OutgoingMessage) -> dict[str, str]:
    """User attributes and key as Pub/Sub attributes; PublishError if Pub/Sub's limits are exceeded."""
    encoded = {(_ESCAPE_PREFIX + name if name in _PUBLISH_PARAMETERS or name.startswith(_RESERVED_PREFIX) else name):
               value for name, value in message.attributes.items()}
    if message.key is not None:
        try:
            encoded[KEY_ATTRIBUTE] = message.key.decode("utf-8")
        except UnicodeDecodeError:
            encoded[KEY_B64_ATTRIBUTE] = base64.b64encode(message.key).decode("ascii")
    if not message.data and not encoded:
        encoded[EMPTY_ATTRIBUTE] = "1"  # Pub/Sub refuses messages with neither data nor attributes
    problems = [f"{len(encoded)} attributes (limit {_MAX_ATTRIBUTES})"] if len(encoded) > _MAX_ATTRIBUTES else []
    for name, value in encoded.items():
        if len(name.encode()) > _MAX_NAME_BYTES or name.startswith("goog"):
            problems.append(f"attribute name {name[:40]!r}… is over {_MAX_NAME_BYTES} bytes or starts with 'goog'")
        if len(value.encode()) > _MAX_VALUE_BYTES:
            problems.append(f"attribute {name[:40]!r} (or the key) is over {_MAX_VALUE_BYTES} bytes")
    if problems:
        raise PublishError("message exceeds Pub/Sub limits: " + "; ".join(problems), failures=[(0, problems[0])])
    return encoded


def _decode_attributes(raw: Mapping[str, str]) -> tuple[bytes | None, dict[str, str]]:
    key, attributes = None, {}
    for name, value in raw.items():
        if name == KEY_ATTRIBUTE:
            key = value.encode("utf-8")
        elif name == KEY_B64_ATTRIBUTE:
            try:
                key = base64.b64decode(value, validate=True)
            except binascii.Error:  # not written by us: pass it on
                attributes[name] = value
        elif name.startswith(_ESCAPE_PREFIX):
            attributes[name[len(_ESCAPE_PREFIX):]] = value
        elif name != EMPTY_ATTRIBUTE:
            attributes[name] = value
    return key, attributes


def _unwrap(error: BaseException) -> BaseException:
    cause = getattr(error, "cause", None)
    return cause if isinstance(error, api_errors.RetryError) and cause is not None else error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {getattr(error, 'message', None) or error}"


def _translate(error: BaseException, topic: str, default: type[BrokerError], doing: str) -> BrokerError:
    """Map a google.api_core or SDK error onto the broker API's error tree."""
    error = _unwrap(error)
    if isinstance(error, BrokerError):
        return error
    detail = f"{doing}: {_describe(error)}"
    if isinstance(error, api_errors.NotFound):
        return TopicNotFoundError(topic, detail)
    if isinstance(error, api_errors.Unauthenticated | api_errors.PermissionDenied):
        return AuthenticationError(detail)
    if isinstance(error, api_errors.ServiceUnavailable | api_errors.DeadlineExceeded) and default is not PublishError:
        return BrokerConnectionError(detail)
    return default(detail)
