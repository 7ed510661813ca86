"""Fixtures for whole-pipeline tests: the four scripts as processes on a real local broker."""

from __future__ import annotations

import uuid

import pytest

from Pipeline.demo import Stages

BROKERS = ["kafka", "pubsub"]


@pytest.fixture(params=BROKERS)
def broker_name(request) -> str:
    return request.param


@pytest.fixture
def local_broker(request, broker_name):
    """The session's running local broker for this test's broker kind."""
    return request.getfixturevalue("kafka_broker" if broker_name == "kafka" else "pubsub_emulator")


@pytest.fixture
def stages(local_broker, broker_name, tmp_path) -> Stages:
    """Stage runner with this test's own topics, queue and DB (the broker is shared)."""
    running = Stages(tmp_path, local_broker.env, broker_name, topic_prefix=f"t{uuid.uuid4().hex[:8]}_")
    yield running
    running.stop_all()
