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
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8, bad JSON and integers over Python's 4300-digit
            # limit; RecursionError, nesting deeper than the interpreter's recursion limit.
            raise EventError(f"result event is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise EventError("result event must be a JSON object")
        if str(body.get("schema_version")) != SCHEMA_VERSION:
            raise EventError(f"unsupported result schema_version {body.get('schema_version')!r}")
        try:
            probabilities = tuple(_number(p, "probabilities") for p in _list(body["probabilities"]))
            event = cls(
                image_id=_valid_id(body["image_id"]),
                label=_integer(body["label"], "label"),
                confidence=_number(body["confidence"], "confidence"),
                probabilities=probabilities,
                model_version=str(body["model_version"]),
                source=str(body.get("source", "")),
                expected_label=_optional_label(body.get("expected_label")),
                timings=_timings(body.get("timings")),
            )
        except KeyError as exc:
            raise EventError(f"result event lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(Infinity), float(10**400)
            raise EventError(f"result event has a bad value: {exc}") from None
        if (
            not 0 <= event.label <= 9
            or len(probabilities) != 10
            or not all(map(math.isfinite, probabilities))
            or not math.isfinite(event.confidence)
        ):
            raise EventError("result event must have a label 0-9, ten finite probabilities and a finite confidence")
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
            attempts=_attempts(attributes.get(DEAD_LETTER_ATTEMPTS)),
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
    if len(value) > MAX_ID_LENGTH or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise EventError(f"image id is longer than {MAX_ID_LENGTH} characters or contains control characters")
    if not value.isascii() and any("\ud800" <= ch <= "\udfff" for ch in value):
        # A JSON "\ud800" escape decodes to a lone surrogate, which the message key cannot encode.
        raise EventError("image id contains a lone surrogate (not valid Unicode)")
    return value


def _integer(value: object, name: str) -> int:
    # JSON true/7.9 are not labels: bool is an int subclass and int() would truncate floats.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(f"{name} must be a whole number, got {value!r:.40}")
    return value


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError(f"{name} must be a number, got {value!r:.40}")
    return float(value)


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise EventError(f"probabilities must be a list, got {type(value).__name__}")
    return value


def _optional_label(value: object, *, strict: bool = True) -> int | None:
    if value in (None, ""):
        return None
    try:
        label = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
        if strict:
            raise EventError(f"expected_label must be 0-9, got {value!r}") from None
        return None
    if not 0 <= label <= 9:
        if strict:
            raise EventError(f"expected_label must be 0-9, got {value!r}")
        return None
    return label


def _timings(value: object) -> dict[str, Any]:
    """A result's timings: names mapped to JSON scalars.

    Nested values are refused: one nested nearly as deep as the parser allows would make
    ``to_json`` (``asdict`` copies recursively) fail with RecursionError downstream.
    """
    if not value:
        return {}
    if not isinstance(value, dict) or not all(
        item is None or isinstance(item, (str, int, float)) for item in value.values()
    ):
        raise EventError("result timings must be a JSON object of names to numbers or strings")
    return dict(value)


def _attempts(value: str | None) -> int:
    """A dead letter's delivery count; a missing or garbled count reads as 1, as if absent.

    Dead letters are stored even when damaged (like their labels), so that every input stays
    accounted for; the count is informative only.
    """
    try:
        return int(value or 1)
    except (TypeError, ValueError, OverflowError):
        return 1
