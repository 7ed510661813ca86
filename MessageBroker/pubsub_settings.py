"""Pub/Sub handler settings: ``pubsub_config.ini`` read and validated, the project resolved.

The keys and their meaning are in the spec sheet of :mod:`MessageBroker.google_pubsub_handler`
and in the ini file itself; a bad value raises BrokerConfigError naming the file and the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from MessageBroker.errors import BrokerConfigError
from MessageBroker.settings import IniSettings

SERVER_MAX_REQUEST_BYTES = 10_000_000
PULL_MODES = ("unary", "streaming")
_PROJECT_ID = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{0,61}[a-z0-9]$")


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
    pull: str = "unary"  # or "streaming"
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


def read_config(path: Path, overrides: Mapping[tuple[str, str], str] | None = None) -> PubSubSettings:
    """Read ``[pubsub]`` of ``path`` (env vars and ``overrides`` win) and validate it."""
    ini = IniSettings(path, overrides=overrides)
    project_env = "PUBSUB_PROJECT_ID" if os.environ.get("PUBSUB_PROJECT_ID", "").strip() \
        else "GOOGLE_CLOUD_PROJECT"
    settings = PubSubSettings(
        project_id=ini.get("pubsub", "project_id", env=project_env, default=""),
        emulator_host=ini.get("pubsub", "emulator_host", env="PUBSUB_EMULATOR_HOST", default=""),
        dead_letter_suffix=ini.get("pubsub", "dead_letter_suffix", default=".dlq"),
        pull=ini.get("pubsub", "pull", env="PUBSUB_PULL", default="unary").lower(),
        source=str(ini.path),
    )
    if settings.pull not in PULL_MODES:
        raise BrokerConfigError(f"pull must be one of {', '.join(PULL_MODES)}, not {settings.pull!r}",
                                file=settings.source, key="pubsub.pull")
    for attribute, key, kind, low, high in _NUMBERS:
        read = ini.get_int if kind is int else ini.get_float
        value = read("pubsub", key, default=str(getattr(PubSubSettings, attribute)), minimum=low, maximum=high)
        settings = replace(settings, **{attribute: value})
    return settings


def resolve_project(settings: PubSubSettings) -> tuple[Any, str]:
    """Credentials (None on the emulator) and the validated project id."""
    s, credentials, project = settings, None, settings.project_id
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
