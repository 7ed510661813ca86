"""Build the configured broker handler: ``MessageBrokerFactory.create()``.

The broker is chosen by, highest first: the ``name`` argument (scripts pass ``--broker``), the
``MESSAGE_BROKER`` environment variable, ``[broker] name`` in ``broker.ini``, else Kafka. Each
handler is imported only when chosen, so using Kafka never imports the Pub/Sub SDK and vice versa.
Config files are found beside this module, never in the current directory.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from MessageBroker.broker_interface import BrokerInterface
from MessageBroker.errors import BrokerConfigError
from MessageBroker.settings import IniSettings

CONFIG_DIR = Path(__file__).resolve().parent
BROKER_CHOICE_FILE = CONFIG_DIR / "broker.ini"
BROKER_ENV = "MESSAGE_BROKER"
DEFAULT_BROKER = "kafka"


@dataclass(frozen=True)
class _HandlerEntry:
    module: str
    class_name: str
    config_file: str | None


_HANDLERS: dict[str, _HandlerEntry] = {
    "kafka": _HandlerEntry("MessageBroker.kafka_handler", "KafkaHandler", "kafka_config.ini"),
    "pubsub": _HandlerEntry("MessageBroker.google_pubsub_handler", "GooglePubSubHandler", "pubsub_config.ini"),
    "memory": _HandlerEntry("MessageBroker.in_memory_handler", "InMemoryHandler", None),
}
_ALIASES = {"google_pubsub": "pubsub", "google-pubsub": "pubsub", "gcp": "pubsub", "in_memory": "memory"}


class MessageBrokerFactory:
    """Maps a broker name to its handler through an explicit table."""

    @staticmethod
    def available() -> list[str]:
        """The broker names ``create`` accepts."""
        return sorted(_HANDLERS)

    @staticmethod
    def resolve_name(name: str | None = None) -> str:
        """The broker to use: ``name`` → $MESSAGE_BROKER → broker.ini → kafka. Validated."""
        import os

        source = "argument"
        if not name:
            name, source = os.environ.get(BROKER_ENV, "").strip(), f"environment variable {BROKER_ENV}"
        if not name and BROKER_CHOICE_FILE.is_file():
            name = IniSettings(BROKER_CHOICE_FILE).get("broker", "name", default="")
            source = f"{BROKER_CHOICE_FILE} key 'broker.name'"
        if not name:
            return DEFAULT_BROKER
        canonical = _ALIASES.get(name.lower(), name.lower())
        if canonical not in _HANDLERS:
            raise BrokerConfigError(
                f"unknown broker {name!r} (from {source}); valid: {', '.join(MessageBrokerFactory.available())}",
                file=str(BROKER_CHOICE_FILE) if source.startswith(str(BROKER_CHOICE_FILE)) else None,
                key="broker.name" if source.startswith(str(BROKER_CHOICE_FILE)) else None,
            )
        return canonical

    @staticmethod
    def config_path(name: str) -> Path | None:
        """Default config file of broker ``name`` (None for the in-process broker)."""
        entry = _HANDLERS[MessageBrokerFactory.resolve_name(name)]
        return CONFIG_DIR / entry.config_file if entry.config_file else None

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        config_file: str | Path | None = None,
        overrides: Mapping[tuple[str, str], str] | None = None,
    ) -> BrokerInterface:
        """Build and connect the handler; raises BrokerConfigError / BrokerConnectionError fast."""
        canonical = cls.resolve_name(name)
        entry = _HANDLERS[canonical]
        handler_class = getattr(importlib.import_module(entry.module), entry.class_name)
        path = Path(config_file) if config_file else cls.config_path(canonical)
        return handler_class.from_config(path, overrides=overrides or {})


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--broker`` and ``--broker-config`` to a script's argument parser."""
    parser.add_argument(
        "--broker",
        choices=MessageBrokerFactory.available(),
        help=f"message broker to use (default: ${BROKER_ENV}, else [broker] name in "
        f"MessageBroker/broker.ini, else {DEFAULT_BROKER})",
    )
    parser.add_argument(
        "--broker-config",
        metavar="INI",
        help="broker settings file (default: MessageBroker/kafka_config.ini or pubsub_config.ini)",
    )


def create_from_args(args: argparse.Namespace) -> BrokerInterface:
    """Build the broker chosen by ``add_broker_arguments`` flags."""
    return MessageBrokerFactory.create(args.broker, config_file=args.broker_config)
