"""The event formats on the pipeline's topics: the public contract between the four scripts.

Attribute names follow CloudEvents' binary content mode (``ce_`` prefix, as in its Kafka and
Pub/Sub bindings). ``ce_specversion`` is CloudEvents' version; ``schema_version`` is ours and
changes only when a consumer would have to change.

Image event (``new_image_topic``) — body: the encoded image (PNG, JPEG, ...); key: image id.
    ce_specversion=1.0  ce_type=mnist.image  ce_id=<image_id>  ce_source=<source name>
    ce_time=<RFC 3339 creation time>  ce_datacontenttype=image/png  schema_version=1
    expected_label=<0-9>   (optional: the true label, when the producer knows it)

Result event (``inference_topic``) — body: JSON; key: image id; attributes: ce_type=mnist.prediction,
ce_id, ce_source, ce_time, ce_datacontenttype=application/json, schema_version=1.
    {"schema_version": 1, "image_id": "...", "label": 7, "confidence": 0.998,
     "probabilities": [10 floats], "model_version": "...", "source": "...",
     "expected_label": 7 | null,
     "timings": {"created_at": "...", "predicted_at": "...", "queue_wait_ms": .., "predict_ms": ..}}

Dead letter (``new_image_topic.dlq``) — the original image event, plus the broker layer's
``dead_letter_reason``, ``dead_letter_attempts``, ``dead_letter_source_topic`` and
``dead_letter_time`` attributes.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from MessageBroker.broker_interface import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE_TOPIC,
    DEAD_LETTER_TIME,
    Message,
    OutgoingMessage,
)

SCHEMA_VERSION = "1"
SPEC_VERSION = "1.0"
IMAGE_EVENT_TYPE = "mnist.image"
RESULT_EVENT_TYPE = "mnist.prediction"
MAX_ID_LENGTH = 128


class EventError(ValueError):
    """An event does not follow the contract (missing attribute, bad JSON, unknown version)."""


@dataclass(frozen=True)
class ImageEvent:
    """An image to classify."""

    image_id: str
    image: bytes
    source: str
    content_type: str = "application/octet-stream"
    created_at: str = field(default_factory=lambda: now_iso())
    expected_label: int | None = None

    def to_message(self) -> OutgoingMessage:
        attributes = _ce_attributes(IMAGE_EVENT_TYPE, self.image_id, self.source, self.created_at, self.content_type)
        if self.expected_label is not None:
            attributes["expected_label"] = str(self.expected_label)
        return OutgoingMessage(self.image, self.image_id.encode("utf-8"), attributes)

    @classmethod
    def from_message(cls, message: Message) -> ImageEvent:
        attributes = message.attributes
        _check_type(attributes, IMAGE_EVENT_TYPE)
        label = attributes.get("expected_label")
        return cls(
            image_id=_valid_id(attributes.get("ce_id")),
            image=message.data,
            source=attributes.get("ce_source", ""),
            content_type=attributes.get("ce_datacontenttype", "application/octet-stream"),
            created_at=attributes.get("ce_time", ""),
            expected_label=_optional_label(label),
        )


@dataclass(frozen=True)
class ResultEvent:
    """The model's answer for one image."""

    image_id: str
    label: int
    confidence: float
    probabilities: tuple[float, ...]
    model_version: str
    source: str = ""
    expected_label: int | None = None
    timings: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {"schema_version": int(SCHEMA_VERSION), **asdict(self)}
        body["probabilities"] = [round(p, 6) for p in self.probabilities]
        body["timings"] = dict(self.timings)
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ResultEvent:
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EventError(f"result event is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise EventError("result event must be a JSON object")
        if str(body.get("schema_version")) != SCHEMA_VERSION:
            raise EventError(f"unsupported result schema_version {body.get('schema_version')!r}")
        try:
            probabilities = tuple(float(p) for p in body["probabilities"])
            event = cls(
                image_id=_valid_id(body["image_id"]),
                label=int(body["label"]),
                confidence=float(body["confidence"]),
                probabilities=probabilities,
                model_version=str(body["model_version"]),
                source=str(body.get("source", "")),
                expected_label=_optional_label(body.get("expected_label")),
                timings=dict(body.get("timings") or {}),
            )
        except KeyError as exc:
            raise EventError(f"result event lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise EventError(f"result event has a bad value: {exc}") from None
        if not 0 <= event.label <= 9 or len(probabilities) != 10 or not all(map(math.isfinite, probabilities)):
            raise EventError("result event must have a label 0-9 and ten finite probabilities")
        return event

    def to_message(self) -> OutgoingMessage:
        attributes = _ce_attributes(RESULT_EVENT_TYPE, self.image_id, self.source, now_iso(), "application/json")
        return OutgoingMessage(self.to_json(), self.image_id.encode("utf-8"), attributes)

    @classmethod
    def from_message(cls, message: Message) -> ResultEvent:
        _check_type(message.attributes, RESULT_EVENT_TYPE)
        return cls.from_json(message.data)

    def to_row(self) -> dict[str, Any]:
        """The DB row for this result (one JSON line)."""
        return json.loads(self.to_json())


@dataclass(frozen=True)
class DeadLetter:
    """An image event that could not be processed, with the reason."""

    image_id: str
    reason: str
    attempts: int
    source_topic: str
    dead_lettered_at: str
    source: str = ""
    expected_label: int | None = None

    @classmethod
    def from_message(cls, message: Message) -> DeadLetter:
        attributes = message.attributes
        if DEAD_LETTER_REASON not in attributes:
            raise EventError("dead letter lacks its reason attribute")
        image_id = attributes.get("ce_id") or f"unidentified-{message.topic}-{message.id}"
        return cls(
            image_id=image_id[:MAX_ID_LENGTH],
            reason=attributes[DEAD_LETTER_REASON],
            attempts=int(attributes.get(DEAD_LETTER_ATTEMPTS, "1") or 1),
            source_topic=attributes.get(DEAD_LETTER_SOURCE_TOPIC, ""),
            dead_lettered_at=attributes.get(DEAD_LETTER_TIME, ""),
            source=attributes.get("ce_source", ""),
            expected_label=_optional_label(attributes.get("expected_label"), strict=False),
        )

    def to_row(self) -> dict[str, Any]:
        """The DB row; keyed on ``id`` (the image id) so a redelivered letter is stored once."""
        return {"id": self.image_id, **asdict(self)}


def new_image_id() -> str:
    """A unique id for an image (random)."""
    return uuid.uuid4().hex


def content_image_id(image: bytes) -> str:
    """An id derived from the image bytes, so re-sending the same image gives the same id."""
    return "sha256-" + hashlib.sha256(image).hexdigest()[:32]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _ce_attributes(event_type: str, image_id: str, source: str, time: str, content_type: str) -> dict[str, str]:
    return {
        "ce_specversion": SPEC_VERSION,
        "ce_type": event_type,
        "ce_id": _valid_id(image_id),
        "ce_source": source or "unknown",
        "ce_time": time,
        "ce_datacontenttype": content_type,
        "schema_version": SCHEMA_VERSION,
    }


def _check_type(attributes: Mapping[str, str], expected: str) -> None:
    found = attributes.get("ce_type")
    if found != expected:
        raise EventError(f"expected a {expected!r} event, got ce_type={found!r}")
    if attributes.get("schema_version") != SCHEMA_VERSION:
        raise EventError(f"unsupported schema_version {attributes.get('schema_version')!r}")


def _valid_id(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EventError("event lacks an image id (ce_id)")
    if len(value) > MAX_ID_LENGTH or any(ch in value for ch in "\n\r\t"):
        raise EventError(f"image id is longer than {MAX_ID_LENGTH} characters or contains control characters")
    return value


def _optional_label(value: object, *, strict: bool = True) -> int | None:
    if value in (None, ""):
        return None
    try:
        label = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        if strict:
            raise EventError(f"expected_label must be 0-9, got {value!r}") from None
        return None
    if not 0 <= label <= 9:
        if strict:
            raise EventError(f"expected_label must be 0-9, got {value!r}")
        return None
    return label
