"""Pipeline settings from ``pipeline_config.ini``, with environment and flag overrides.

The file is found beside this module (``PIPELINE_CONFIG`` names another one); relative paths
in it are resolved against the project root, so the scripts work from any directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from MessageBroker.settings import IniSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path(__file__).resolve().parent / "pipeline_config.ini"


class PipelineConfigError(ValueError):
    """A pipeline setting is missing or invalid; names the file and the key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        where = ", ".join(p for p in (f"file {file}" if file else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.file = file
        self.key = key


@dataclass(frozen=True)
class PipelineConfig:
    """Every pipeline setting, validated."""

    path: Path
    images_topic: str
    results_topic: str
    model_server_group: str
    results_group: str
    dead_letters_group: str
    checkpoint: Path
    consume_batch_size: int
    consume_max_wait: float
    max_attempts: int
    queue_dir: Path
    queue_max_bytes: int | None
    publish_batch_size: int
    publish_max_wait: float
    db_dir: Path
    db_max_bytes: int | None
    db_batch_size: int
    producer_batch_size: int
    producer_source: str


def load_config(path: str | Path | None = None, overrides: Mapping[tuple[str, str], str] | None = None) -> PipelineConfig:
    """Read and validate the settings; raises PipelineConfigError naming file and key."""
    chosen = Path(path or os.environ.get("PIPELINE_CONFIG") or DEFAULT_CONFIG)
    # Separate runs on one broker (tests, staging) get groups of their own.
    group_prefix = os.environ.get("PIPELINE_GROUP_PREFIX", "")
    ini = IniSettings(chosen, overrides={k: v for k, v in (overrides or {}).items() if v is not None},
                      error=PipelineConfigError)
    return PipelineConfig(
        path=chosen,
        images_topic=ini.get("topics", "images", env="PIPELINE_IMAGES_TOPIC"),
        results_topic=ini.get("topics", "results", env="PIPELINE_RESULTS_TOPIC"),
        model_server_group=group_prefix + ini.get("groups", "model_server"),
        results_group=group_prefix + ini.get("groups", "results_db"),
        dead_letters_group=group_prefix + ini.get("groups", "dead_letters"),
        checkpoint=_path(ini.get("model_server", "checkpoint", env="PIPELINE_MODEL_CHECKPOINT")),
        consume_batch_size=ini.get_int("model_server", "batch_size", minimum=1),
        consume_max_wait=ini.get_int("model_server", "max_wait_ms", minimum=1) / 1000,
        max_attempts=ini.get_int("model_server", "max_attempts", minimum=1),
        queue_dir=_path(ini.get("model_server", "queue_dir", env="PIPELINE_QUEUE_DIR")),
        queue_max_bytes=ini.get_int("model_server", "queue_max_bytes", env="PIPELINE_QUEUE_MAX_BYTES", minimum=0) or None,
        publish_batch_size=ini.get_int("result_publisher", "batch_size", minimum=1),
        publish_max_wait=ini.get_int("result_publisher", "max_wait_ms", minimum=1) / 1000,
        db_dir=_path(ini.get("results_db", "db_dir", env="PIPELINE_DB_DIR")),
        db_max_bytes=ini.get_int("results_db", "max_bytes", env="PIPELINE_DB_MAX_BYTES", minimum=0) or None,
        db_batch_size=ini.get_int("results_db", "batch_size", minimum=1),
        producer_batch_size=ini.get_int("producer", "batch_size", minimum=1),
        producer_source=ini.get("producer", "source"),
    )


def _path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path
