"""Typed errors of the broker API: every SDK exception leaves a handler as one of these.

    BrokerError
    ├── BrokerConfigError          bad or missing setting; names the file and the key
    ├── BrokerConnectionError      broker unreachable / not answering within the configured time
    │   └── AuthenticationError    credentials rejected
    ├── PublishError               a message was not confirmed by the broker
    │   └── MessageTooLargeError   rejected before sending; names size and limit
    ├── ReceiveError               consuming failed
    ├── TopicNotFoundError         the topic (or subscription) does not exist
    ├── BrokerClosedError          the broker or consumer was used after close()
    └── UnsupportedOperationError  the backend lacks this capability

Scripts catch these, never ``confluent_kafka.KafkaException`` or ``google.api_core`` errors.
"""

from __future__ import annotations

from collections.abc import Sequence


class BrokerError(Exception):
    """Base of every error raised by the broker API."""


class BrokerConfigError(BrokerError):
    """A setting is missing or invalid; ``file`` and ``key`` say where to fix it."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ", ".join(part for part in (f"file {file}" if file else "", f"key {key!r}" if key else "") if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key


class BrokerConnectionError(BrokerError):
    """The broker could not be reached or did not answer in time."""


class AuthenticationError(BrokerConnectionError):
    """The broker rejected the configured credentials."""


class PublishError(BrokerError):
    """One or more messages were not confirmed by the broker.

    ``failures`` holds ``(index, reason)`` pairs for the messages of the batch that failed;
    ``delivered_ids`` the broker ids of those that were confirmed (``None`` for failed ones).
    """

    def __init__(
        self,
        message: str,
        *,
        failures: Sequence[tuple[int, str]] = (),
        delivered_ids: Sequence[str | None] = (),
    ):
        super().__init__(message)
        self.failures = list(failures)
        self.delivered_ids = list(delivered_ids)


class MessageTooLargeError(PublishError):
    """A message exceeds the backend's size limit; raised before anything is sent."""

    def __init__(self, size: int, limit: int, *, topic: str):
        super().__init__(
            f"message of {size} bytes for topic {topic!r} exceeds the limit of {limit} bytes"
        )
        self.size = size
        self.limit = limit
        self.topic = topic


class ReceiveError(BrokerError):
    """Consuming from the broker failed."""


class TopicNotFoundError(BrokerError):
    """The topic or subscription does not exist on the broker."""

    def __init__(self, topic: str, detail: str = ""):
        super().__init__(f"topic {topic!r} not found" + (f": {detail}" if detail else ""))
        self.topic = topic


class BrokerClosedError(BrokerError):
    """The broker, or one of its consumers, was used after ``close()``."""


class UnsupportedOperationError(BrokerError):
    """The backend cannot do this (its capability flag is off)."""
