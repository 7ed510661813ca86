"""Security basics: credentials are rejected clearly and fast, and never leak into logs or errors."""

from __future__ import annotations

import logging
import time

import pytest

from MessageBroker.errors import AuthenticationError, BrokerConfigError
from MessageBroker.local_brokers import start_kafka
from MessageBroker.message_broker_factory import MessageBrokerFactory

pytestmark = pytest.mark.timeout(120)

PASSWORD = "s3cr3t-Pa55word-that-must-not-leak"


@pytest.fixture(scope="module")
def authenticating_kafka(tmp_path_factory):
    """A Tansu broker that requires SASL authentication (it knows no users)."""
    with start_kafka(log_dir=tmp_path_factory.mktemp("kafka-auth"), extra_args=("--authentication",)) as broker:
        yield broker


def sasl_overrides(address: str, mechanism: str) -> dict[tuple[str, str], str]:
    return {("kafka", "bootstrap.servers"): address, ("security", "security.protocol"): "SASL_PLAINTEXT",
            ("security", "sasl.mechanisms"): mechanism, ("security", "sasl.username"): "mallory",
            ("security", "sasl.password"): PASSWORD}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_wrong_credentials_fail_fast_without_leaking_the_password(authenticating_kafka, mechanism, caplog, capfd,
                                                                  monkeypatch):
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(AuthenticationError) as raised:
        MessageBrokerFactory.create("kafka", overrides=sasl_overrides(authenticating_kafka.address, mechanism))
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert "SASL" in message or "authentication" in message.lower()
    assert PASSWORD not in message
    assert PASSWORD not in caplog.text
    out, err = capfd.readouterr()
    assert PASSWORD not in out and PASSWORD not in err


def test_password_from_environment_is_used_and_not_leaked(authenticating_kafka, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", PASSWORD)
    overrides = sasl_overrides(authenticating_kafka.address, "SCRAM-SHA-512")
    del overrides[("security", "sasl.password")]
    with pytest.raises(AuthenticationError) as raised:
        MessageBrokerFactory.create("kafka", overrides=overrides)
    assert PASSWORD not in str(raised.value) and PASSWORD not in caplog.text


def test_config_error_with_a_password_in_the_config_does_not_leak_it(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("KAFKA_SASL_PASSWORD", raising=False)
    overrides = sasl_overrides("127.0.0.1:1", "NOT-A-MECHANISM")
    with pytest.raises(BrokerConfigError) as raised:
        MessageBrokerFactory.create("kafka", overrides=overrides)
    assert PASSWORD not in str(raised.value) and PASSWORD not in caplog.text
    assert "kafka_config.ini" in str(raised.value)


def test_local_brokers_listen_on_loopback_only(kafka_broker):
    assert kafka_broker.address.startswith("127.0.0.1:")
