"""Kafka handler settings: ``kafka_config.ini`` validated, secrets scrubbed, librdkafka logs routed.

The keys and their meaning are in the spec sheet of :mod:`MessageBroker.kafka_handler` and in
the ini file itself; this module turns them into a :class:`KafkaSettings` or a
BrokerConfigError naming the file and the key.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from MessageBroker.errors import BrokerConfigError
from MessageBroker.settings import IniSettings

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "kafka_config.ini"
FRAMING_BYTES = 4096  # record, header and batch overhead librdkafka counts on top of our size
AUTH_ERRORS = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
               KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}
_SECRET_KEY = re.compile(r"password|secret|jaas|oauthbearer\.config", re.IGNORECASE)
_ALIASES = {"request.required.acks": "acks", "queue.buffering.max.ms": "linger.ms",
            "compression.codec": "compression.type", "message.timeout.ms": "delivery.timeout.ms",
            "sasl.mechanism": "sasl.mechanisms"}


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


def read_config(path: Path | None = None,
                overrides: Mapping[tuple[str, str], str] | None = None) -> tuple[KafkaSettings, dict[str, Any]]:
    """Read ``kafka_config.ini`` (env and ``overrides`` win) and validate it.

    Returns the Kafka settings and the options of the shared broker layer
    (``max_message_bytes``, ``publish_timeout``, ``max_attempts``, ``dead_letter_suffix``).
    """
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
    producer.setdefault("message.max.bytes", str(max_bytes + FRAMING_BYTES))
    if int(producer["message.max.bytes"]) < max_bytes + FRAMING_BYTES:
        raise BrokerConfigError(f"must be at least kafka.max.message.bytes + {FRAMING_BYTES}",
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
    options = {"max_message_bytes": max_bytes, "publish_timeout": publish_timeout,
               "max_attempts": ini.get_int("kafka", "max.attempts", default="5", minimum=1),
               "dead_letter_suffix": ini.get("kafka", "dead.letter.suffix", default=".dlq")}
    return settings, options


class ClientLog:
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
