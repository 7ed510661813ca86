"""Topics on the Kafka cluster: existence checks (cached), creation and deletion through the admin API.

Topics are never created implicitly (see the spec sheet of :mod:`MessageBroker.kafka_handler`),
so the handler asks here before the first publish to a topic and before opening a consumer.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Mapping

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from MessageBroker.errors import AuthenticationError, BrokerConnectionError, BrokerError, TopicNotFoundError
from MessageBroker.kafka_settings import AUTH_ERRORS, ClientLog, KafkaSettings

NOT_FOUND = {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION}
_MISSING_TOPIC_TTL = 1.0  # remember a missing topic this long: a failing batch asks the broker once


class KafkaTopics:
    """Which topics exist, asked through ``metadata()`` (the handler's current producer).

    ``known`` holds topics seen to exist (the handler's publish path reads it directly); a topic
    found missing is remembered as missing for ``_MISSING_TOPIC_TTL`` seconds.
    """

    def __init__(self, settings: KafkaSettings, metadata: Callable[[], confluent_kafka.Producer]):
        self.settings, self._metadata = settings, metadata
        self.known: set[str] = set()
        self._missing_until: dict[str, float] = {}
        self._admin_client: AdminClient | None = None

    def _admin(self) -> AdminClient:
        if self._admin_client is None:
            self._admin_client = AdminClient({**self.settings.client, **ClientLog(self.settings, "admin").hooks()})
        return self._admin_client

    def exists(self, topic: str) -> bool:
        """Ask the broker (no cache); BrokerConnectionError / AuthenticationError if it cannot say."""
        try:
            found = self._metadata().list_topics(topic, timeout=self.settings.connect_timeout).topics.get(topic)
        except KafkaException as exc:
            raise BrokerConnectionError(f"metadata request for {topic!r} failed: "
                                        f"{self.settings.scrub(exc.args[0].str())}") from None
        if found is not None and found.error is not None and found.error.code() in AUTH_ERRORS:
            raise AuthenticationError(f"not authorised for topic {topic!r}: {found.error.str()}")
        return found is not None and bool(found.partitions) and (found.error is None or found.error.code() not in NOT_FOUND)

    def require(self, topic: str, *, fresh: bool = False) -> None:
        """Raise TopicNotFoundError unless ``topic`` exists (positive answers are cached)."""
        if topic in self.known and not fresh:
            return
        if self._missing_until.get(topic, 0.0) > time.monotonic() or not self.exists(topic):
            self._missing_until[topic] = time.monotonic() + _MISSING_TOPIC_TTL
            self.known.discard(topic)
            raise TopicNotFoundError(topic)
        self.known.add(topic)

    def create(self, topic: str) -> None:
        """Create ``topic`` with the configured partitions; blocks until metadata lists it."""
        new = NewTopic(topic, num_partitions=self.settings.partitions,
                       replication_factor=self.settings.replication_factor)
        self._admin_call(topic, self._admin().create_topics([new]), KafkaError.TOPIC_ALREADY_EXISTS)
        self._missing_until.pop(topic, None)
        self._wait_for_metadata(topic, present=True)
        self.known.add(topic)

    def delete(self, topic: str) -> None:
        """Delete ``topic``; a missing topic is fine. Blocks until metadata no longer lists it."""
        self.known.discard(topic)
        self._admin_call(topic, self._admin().delete_topics([topic]), KafkaError.UNKNOWN_TOPIC_OR_PART)
        self._wait_for_metadata(topic, present=False)

    def _wait_for_metadata(self, topic: str, *, present: bool) -> None:
        deadline = time.monotonic() + 2 * self.settings.connect_timeout
        while self.exists(topic) != present:
            if time.monotonic() > deadline:
                raise BrokerConnectionError(f"topic {topic!r} still {'missing' if present else 'listed'} "
                                            f"in metadata after {2 * self.settings.connect_timeout:g} s")
            time.sleep(0.05)

    def _admin_call(self, topic: str, futures: Mapping[str, concurrent.futures.Future], tolerated: int) -> None:
        try:
            futures[topic].result(timeout=2 * self.settings.connect_timeout)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.code() != tolerated:
                kind = AuthenticationError if error.code() in AUTH_ERRORS else BrokerError
                raise kind(f"topic {topic!r}: {self.settings.scrub(error.str())}") from None
        except concurrent.futures.TimeoutError:
            raise BrokerConnectionError(f"topic {topic!r}: no answer from the broker within "
                                        f"{2 * self.settings.connect_timeout:g} s") from None
        finally:
            self._admin().poll(0)
