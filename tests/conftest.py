"""Shared fixtures: real local brokers, started once per test session.

A test that needs a broker gets it started here; if it cannot start, the test fails (never
skips): CI must not pass without having exercised the real brokers.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from MessageBroker.broker_interface import BrokerInterface
from MessageBroker.in_memory_handler import InMemoryHandler
from MessageBroker.local_brokers import LocalBroker, start_kafka, start_pubsub
from MessageBroker.message_broker_factory import MessageBrokerFactory

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# "pubsub-streaming" is the Pub/Sub handler with ``pull = streaming`` (the SDK's streaming pull).
BACKENDS = ["memory", "kafka", "pubsub", "pubsub-streaming"]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A Tansu broker on a free loopback port for the whole session."""
    with start_kafka(log_dir=tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """Google's Pub/Sub emulator on a free loopback port for the whole session."""
    with start_pubsub(log_dir=tmp_path_factory.mktemp("pubsub")) as broker:
        yield broker


@dataclass
class Backend:
    """How a test reaches one backend: build handlers, name topics, run subprocesses."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    _opened: list[BrokerInterface] = field(default_factory=list)

    @property
    def broker(self) -> str:
        """The factory's name for this backend's handler."""
        return self.name.split("-")[0]

    def overrides(self) -> dict[tuple[str, str], str]:
        if self.broker == "kafka":
            return {("kafka", "bootstrap.servers"): self.env["KAFKA_BOOTSTRAP_SERVERS"]}
        if self.broker == "pubsub":
            return {("pubsub", "emulator_host"): self.env["PUBSUB_EMULATOR_HOST"],
                    ("pubsub", "project_id"): self.env["PUBSUB_PROJECT_ID"],
                    ("pubsub", "pull"): self.env["PUBSUB_PULL"]}
        return {}

    def make(self) -> BrokerInterface:
        """A new connected handler; closed at the end of the test."""
        broker = MessageBrokerFactory.create(self.broker, overrides=self.overrides())
        self._opened.append(broker)
        return broker

    def subprocess_env(self) -> dict[str, str]:
        """Environment for a child process that should reach the same broker."""
        return {**os.environ, **self.env, "MESSAGE_BROKER": self.broker,
                "PYTHONPATH": str(PROJECT_ROOT)}

    def close_all(self) -> None:
        for broker in self._opened:
            broker.close(timeout=5)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each test using this runs once per backend, against the real broker."""
    name = request.param
    env: dict[str, str] = {}
    if name == "kafka":
        env = request.getfixturevalue("kafka_broker").env
    elif name.startswith("pubsub"):
        env = {**request.getfixturevalue("pubsub_emulator").env,
               "PUBSUB_PULL": "streaming" if name == "pubsub-streaming" else "unary"}
    else:
        InMemoryHandler.reset()
    chosen = Backend(name, dict(env))
    yield chosen
    chosen.close_all()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Iterator[callable]:  # type: ignore[valid-type]
    """Factory of unique, valid topic names (valid on Kafka and Pub/Sub)."""
    base = re.sub(r"[^a-zA-Z0-9]", "_", request.node.originalname)[:40]

    def make(suffix: str = "") -> str:
        return f"t_{base}_{suffix}{uuid.uuid4().hex[:8]}"

    yield make
