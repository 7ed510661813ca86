"""How a message's key and attributes travel as Pub/Sub attributes, and Pub/Sub's attribute limits.

The mapping is described in the spec sheet of :mod:`MessageBroker.google_pubsub_handler`:
the key goes in ``x-message-key`` (``x-message-key-b64`` if not UTF-8), user attributes named
like publish() parameters or starting with ``x-message-`` go as ``x-message-attr-<name>``, an
empty message without attributes carries ``x-message-empty``; decoding undoes all of it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from MessageBroker.broker_interface import OutgoingMessage
from MessageBroker.errors import PublishError

KEY_ATTRIBUTE, KEY_B64_ATTRIBUTE, EMPTY_ATTRIBUTE = "x-message-key", "x-message-key-b64", "x-message-empty"
_RESERVED_PREFIX, _ESCAPE_PREFIX = "x-message-", "x-message-attr-"
_PUBLISH_PARAMETERS = frozenset({"self", "topic", "data", "ordering_key", "retry", "timeout"})
# Google Cloud enforces these, the emulator does not: checked before sending so both behave alike.
_MAX_ATTRIBUTES, _MAX_NAME_BYTES, _MAX_VALUE_BYTES = 100, 256, 1024


def encode_attributes(message: OutgoingMessage) -> dict[str, str]:
    """User attributes and key as Pub/Sub attributes; PublishError if Pub/Sub's limits are exceeded."""
    encoded = {(_ESCAPE_PREFIX + name if name in _PUBLISH_PARAMETERS or name.startswith(_RESERVED_PREFIX) else name):
               value for name, value in message.attributes.items()}
    if message.key is not None:
        try:
            encoded[KEY_ATTRIBUTE] = message.key.decode("utf-8")
        except UnicodeDecodeError:
            encoded[KEY_B64_ATTRIBUTE] = base64.b64encode(message.key).decode("ascii")
    if not message.data and not encoded:
        encoded[EMPTY_ATTRIBUTE] = "1"  # Pub/Sub refuses messages with neither data nor attributes
    problems = [f"{len(encoded)} attributes (limit {_MAX_ATTRIBUTES})"] if len(encoded) > _MAX_ATTRIBUTES else []
    for name, value in encoded.items():
        if len(name.encode()) > _MAX_NAME_BYTES or name.startswith("goog"):
            problems.append(f"attribute name {name[:40]!r}… is over {_MAX_NAME_BYTES} bytes or starts with 'goog'")
        if len(value.encode()) > _MAX_VALUE_BYTES:
            problems.append(f"attribute {name[:40]!r} (or the key) is over {_MAX_VALUE_BYTES} bytes")
    if problems:
        raise PublishError("message exceeds Pub/Sub limits: " + "; ".join(problems), failures=[(0, problems[0])])
    return encoded


def decode_attributes(raw: Mapping[str, str]) -> tuple[bytes | None, dict[str, str]]:
    """The key and the user attributes of a received message (``encode_attributes`` undone)."""
    key, attributes = None, {}
    for name, value in raw.items():
        if name == KEY_ATTRIBUTE:
            key = value.encode("utf-8")
        elif name == KEY_B64_ATTRIBUTE:
            try:
                key = base64.b64decode(value, validate=True)
            except binascii.Error:  # not written by us: pass it on
                attributes[name] = value
        elif name.startswith(_ESCAPE_PREFIX):
            attributes[name[len(_ESCAPE_PREFIX):]] = value
        elif name != EMPTY_ATTRIBUTE:
            attributes[name] = value
    return key, attributes
