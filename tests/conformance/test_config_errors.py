"""Bad configuration and unreachable brokers fail fast with errors naming the file and key."""

from __future__ import annotations

import time

import pytest

from MessageBroker.errors import BrokerConfigError, BrokerConnectionError
from MessageBroker.local_brokers import free_port
from MessageBroker.message_broker_factory import MessageBrokerFactory

pytestmark = pytest.mark.timeout(120)

# (broker, section, address key, env var naming the address)
REMOTE = [("kafka", "kafka", "bootstrap.servers", "KAFKA_BOOTSTRAP_SERVERS"),
          ("pubsub", "pubsub", "emulator_host", "PUBSUB_EMULATOR_HOST")]


def test_unknown_broker_name_lists_the_valid_ones(monkeypatch):
    with pytest.raises(BrokerConfigError) as raised:
        MessageBrokerFactory.create("rabbit")
    assert all(name in str(raised.value) for name in ("kafka", "pubsub", "memory"))
    monkeypatch.setenv("MESSAGE_BROKER", "nats")
    with pytest.raises(BrokerConfigError, match="MESSAGE_BROKER"):
        MessageBrokerFactory.create()


def test_broker_choice_precedence(monkeypatch):
    monkeypatch.delenv("MESSAGE_BROKER", raising=False)
    assert MessageBrokerFactory.resolve_name() == "kafka"
    monkeypatch.setenv("MESSAGE_BROKER", "pubsub")
    assert MessageBrokerFactory.resolve_name() == "pubsub"
    assert MessageBrokerFactory.resolve_name("memory") == "memory"


@pytest.mark.parametrize("name,section,key,env", REMOTE)
def test_missing_config_file_is_named(name, section, key, env, tmp_path):
    missing = tmp_path / "nowhere.ini"
    with pytest.raises(BrokerConfigError) as raised:
        MessageBrokerFactory.create(name, config_file=missing)
    assert str(missing) in str(raised.value)


@pytest.mark.parametrize("name,section,key,env", REMOTE)
def test_missing_address_names_file_and_key(name, section, key, env, tmp_path, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    shipped = MessageBrokerFactory.config_path(name).read_text()
    stripped = "\n".join(line for line in shipped.splitlines() if not line.strip().startswith(key))
    config = tmp_path / f"{name}.ini"
    config.write_text(stripped)
    if name == "pubsub":
        # An empty emulator host means real GCP; without credentials that must fail clearly too.
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with pytest.raises((BrokerConfigError, BrokerConnectionError)) as raised:
        MessageBrokerFactory.create(name, config_file=config)
    assert str(config) in str(raised.value)


@pytest.mark.parametrize("name,section,key,env", REMOTE)
def test_unreachable_broker_fails_within_seconds_naming_the_key(name, section, key, env, monkeypatch):
    monkeypatch.delenv(env, raising=False)
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as raised:
        MessageBrokerFactory.create(name, overrides={(section, key): address})
    assert time.monotonic() - started < 20
    message = str(raised.value)
    assert address in message and key in message
    assert str(MessageBrokerFactory.config_path(name)) in message


@pytest.mark.parametrize("name,section,key,env", REMOTE)
def test_environment_variable_overrides_the_ini(name, section, key, env, monkeypatch):
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv(env, address)
    with pytest.raises(BrokerConnectionError) as raised:
        MessageBrokerFactory.create(name)
    assert address in str(raised.value)
