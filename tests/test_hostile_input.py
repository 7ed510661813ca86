"""Hostile input: the event codec and image decoding under generated garbage.

Properties (each input either yields a valid value or raises the module's typed error):

* ``ResultEvent.from_json`` on arbitrary bytes, arbitrary JSON, and result bodies with the right
  keys but wrong types / NaN / Infinity / huge numbers / deep nesting / wrong schema_version /
  non-UTF-8 encodings → ``EventError`` or a valid ``ResultEvent`` that can be written again.
  ``ResultEvent → to_json → from_json`` is the identity (probabilities are rounded to 6 places).
* ``ImageEvent.from_message`` / ``DeadLetter.from_message`` on messages with arbitrary attribute
  dicts (odd unicode, missing keys, very long ids, control characters) → ``EventError`` or a
  valid event.
* ``decode_image`` / ``preprocess`` on arbitrary bytes, on small PNG/JPEG/BMP/GIF/TIFF/WebP images
  drawn with Pillow (then mutated by byte flips, truncations, insertions, deletions), and on
  headers declaring huge dimensions → an ``ImageError`` subclass or a valid array; oversize input
  is refused with ``ImageTooLargeError`` before decoding (fast, and without the memory decoding
  would take), and peak memory stays bounded.

Volume: at least 10,000 generated inputs for the codec and 10,000 for the images; every test
body counts its calls in ``INPUTS`` and the last tests assert the totals (max_examples below add
up to 11,700 codec and 10,600 image inputs; the few pinned ``@example`` inputs come on top).
Memory: peak RSS is sampled around every image decoded; the rise over the module's start and the
rise during any one image are both bounded. Reproducible: every test is derandomized (seeded from
the test's own name) and uses no example database. Inputs that once crashed with an untyped
exception, or were wrongly accepted, are pinned with ``@example``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import io
import json
import math
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import numpy as np
import psutil
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from MessageBroker.broker_interface import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_REASON,
    DEAD_LETTER_SOURCE_TOPIC,
    DEAD_LETTER_TIME,
    Message,
)
from Modelling.errors import (
    BlankImageError,
    ImageError,
    ImageTooLargeError,
    UndecodableImageError,
    UnsupportedImageError,
)
from Modelling.preprocessing import (
    MAX_ENCODED_BYTES,
    MAX_PIXELS,
    MAX_WORKING_SIDE,
    decode_image,
    preprocess,
)
from Pipeline.events import (
    MAX_ID_LENGTH,
    DeadLetter,
    EventError,
    ImageEvent,
    ResultEvent,
)

# Pillow warns about the corrupt tags and EXIF blocks these tests feed it on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.*"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Inputs tried per family ("codec", "image"), counted in the test bodies.
INPUTS: collections.Counter[str] = collections.Counter()
#: Inputs that came out valid (not refused), per kind: the generators must reach the valid path too.
ACCEPTED: collections.Counter[str] = collections.Counter()
#: Tests that have fed INPUTS; the totals are asserted only when all of them ran.
FED_BY: dict[str, set[str]] = {"codec": set(), "image": set()}
CODEC_TESTS = 7
IMAGE_TESTS = 4

#: Generous bound on how far peak RSS may rise over the module's starting RSS (Hypothesis's own
#: bookkeeping of ~22,000 examples is part of it).
MEMORY_BOUND_MB = 400
#: Bound on the peak RSS rise during one image's decoding; preprocessing documents ~160 MB for
#: the largest image it accepts, and the generated ones are far smaller.
PER_IMAGE_MEMORY_BOUND_MB = 200
#: An oversize input must be refused within this much CPU time: only its length or header was
#: read. CPU time of this process (with the garbage collector paused) is what the refusal costs;
#: wall time would also count other processes on a busy CI machine.
REFUSAL_SECONDS = 0.5

_PROCESS = psutil.Process()
#: RSS and lifetime peak when this module's first test starts; highest RSS sampled since; the
#: largest rise of the peak during one image's decoding.
_MEMORY = {"start_rss": 0, "start_maxrss": 0, "peak_rss": 0, "per_image_peak": 0}


def fuzz(max_examples: int) -> settings:
    """Reproducible settings: a fixed seed per test, no example database, no per-input deadline."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None)


def count(family: str, test: str) -> None:
    INPUTS[family] += 1
    FED_BY[family].add(test)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@contextlib.contextmanager
def refusal_time() -> Iterator[Callable[[], float]]:
    """Measure the CPU seconds a block takes, without a garbage collection of unrelated objects."""
    gc.disable()
    started = time.process_time()
    try:
        yield lambda: time.process_time() - started
    finally:
        gc.enable()


def sample_memory() -> None:
    _MEMORY["peak_rss"] = max(_MEMORY["peak_rss"], _PROCESS.memory_info().rss)


class MemoryWatch:
    """Records how far the process's peak RSS rose above its RSS at entry, if it rose at all.

    ru_maxrss only moves when a new lifetime peak is reached; when it does inside the block,
    that peak belongs to the block. Blocks that stay under the old peak are bounded by it.
    """

    def __enter__(self) -> Self:
        self.rss = _PROCESS.memory_info().rss
        self.maxrss = _maxrss_bytes()
        return self

    def __exit__(self, *exc_info: object) -> None:
        maxrss = _maxrss_bytes()
        if maxrss > self.maxrss:
            _MEMORY["per_image_peak"] = max(_MEMORY["per_image_peak"], maxrss - self.rss)
        sample_memory()


@pytest.fixture(scope="module", autouse=True)
def memory_baseline() -> None:
    """Measure from this module's start, not from collection: other modules may run first."""
    rss = _PROCESS.memory_info().rss
    _MEMORY.update(start_rss=rss, start_maxrss=_maxrss_bytes(), peak_rss=rss)


# =============================================================================================
# Codec
# =============================================================================================

ODD_CHARACTERS = (
    "\x00\x01\x07\x1b\x7f\x85\xa0\n\r\t\u2028\u2029\u200b\u200d\u202e\ufeff\ufffd\uffff"
    "\U0001f600\U0010ffff٧７𝟕Ⅶé\u0301"
)
#: Any code point, lone surrogates included: brokers never deliver those (Kafka headers are
#: decoded with errors="replace", Pub/Sub attributes are UTF-8), but in-process callers can.
odd_text = st.text(alphabet=st.characters() | st.sampled_from(ODD_CHARACTERS), max_size=40)
attribute_text = st.one_of(
    odd_text,
    st.sampled_from(["", " ", "1", "0", "9", "10", "-1", "07", " 7 ", "7.0", "١", "７", "1_0", "nan", "inf"]),
    st.integers(MAX_ID_LENGTH - 2, MAX_ID_LENGTH + 2).map(lambda n: "i" * n),  # around the id limit
    st.integers(1_000, 100_000).map(lambda n: "x" * n),                      # very long
    st.integers(4_290, 4_400).map(lambda n: "9" * n),  # around int()'s 4300-digit limit
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(alphabet=st.characters(), max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def dumps(value: object) -> str:
    return json.dumps(value, allow_nan=True)  # NaN / Infinity, as Python's json accepts them


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


#: Raw JSON text for a field: wrong types, non-finite and huge numbers, nesting either side of
#: the parser's recursion limit, escapes that decode to control characters or lone surrogates.
hostile_json = st.one_of(
    st.sampled_from([
        "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0.0", "0", "-1", "10", "9.99",
        "7.0", "true", "false", "null", '""', '"  "', '"7"', '"seven"', '"\\u0000"', '"\\ud800"',
        '"a\\nb"', "[]", "{}", '"0123456789"', "[1,2,3,4,5,6,7,8,9,10]", '[["a","b"]]', '{"a":{"b":[1]}}',
    ]),
    st.integers(4_290, 4_400).map(lambda n: "9" * n),
    st.integers(300, 400).map(lambda n: f"{n}e{n}"),
    st.integers(1, 3_000).map(nested),
    st.integers(1, 3_000).map(lambda depth: '{"timings":' * depth + "0" + "}" * depth),
    json_values.map(dumps),
)

valid_ids = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=MAX_ID_LENGTH).filter(
    lambda text: text.strip()
)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
labels = st.integers(0, 9)
#: Valid raw JSON text for each field of a result body.
VALID_RESULT_FIELDS: dict[str, st.SearchStrategy[str]] = {
    "schema_version": st.sampled_from(["1", '"1"']),
    "image_id": valid_ids.map(dumps),
    "label": labels.map(dumps),
    "confidence": finite_floats.map(dumps),
    "probabilities": st.lists(finite_floats, min_size=10, max_size=10).map(dumps),
    "model_version": st.text(max_size=20).map(dumps),
    "source": st.text(max_size=20).map(dumps),
    "expected_label": st.none().map(dumps) | labels.map(dumps),
    "timings": st.dictionaries(st.text(max_size=12), json_scalars, max_size=4).map(dumps),
}
WRONG_SCHEMA_VERSIONS = [
    "2", '"2"', "0", "1.0", '"1.0"', "true", "null", '" 1"', '"01"', '"１"', "[1]", '{"v":1}', "1e0",
]
#: One element of a probabilities list: mostly numbers, sometimes something else.
probability_json = st.one_of(finite_floats.map(dumps), hostile_json)


@st.composite
def mutations(draw: st.DrawFn, max_ops: int = 4) -> list[tuple[str, int, bytes]]:
    """Byte-level edits: flip, set, insert, delete, truncate; positions biased to the start."""
    position = st.integers(0, 63) | st.integers(0, 1 << 20)
    operation = st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), position, st.binary(min_size=1, max_size=8)
    )
    return draw(st.lists(operation, max_size=max_ops))


def mutate(data: bytes, operations: list[tuple[str, int, bytes]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, payload in operations:
        if not buffer:
            break
        index = position % len(buffer)
        if kind == "flip":
            buffer[index] ^= 1 << (payload[0] % 8)
        elif kind == "set":
            buffer[index] = payload[0]
        elif kind == "insert":
            buffer[index:index] = payload
        elif kind == "delete":
            del buffer[index : index + len(payload)]
        else:
            del buffer[index:]
    return bytes(buffer)


@st.composite
def result_bodies(draw: st.DrawFn) -> bytes:
    """A result event with the right keys; 0-3 fields wrong or missing, extra keys, odd encodings."""
    spoiled = draw(st.sets(st.sampled_from(sorted(VALID_RESULT_FIELDS)), max_size=3))
    members = []
    for key, valid in VALID_RESULT_FIELDS.items():
        if key not in spoiled:
            members.append((key, draw(valid)))
            continue
        how = draw(st.sampled_from(["missing", "hostile", "hostile", "element"]))
        if how == "missing":
            continue
        if key == "schema_version" and draw(st.booleans()):
            value = draw(st.sampled_from(WRONG_SCHEMA_VERSIONS))
        elif how == "element" or key == "probabilities" and draw(st.booleans()):
            # A list of about ten numbers with one or more bad elements (or a wrong length).
            value = "[" + ",".join(draw(st.lists(probability_json, min_size=8, max_size=12))) + "]"
        else:
            value = draw(hostile_json)
        members.append((key, value))
    members += draw(st.lists(st.tuples(st.text(max_size=10), hostile_json), max_size=2))
    members = draw(st.permutations(members))  # includes duplicate keys: the last one wins
    text = "{" + ",".join(f"{dumps(key)}:{value}" for key, value in members) + "}"
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"]))
    data = text.encode(encoding, errors="replace")
    return mutate(data, draw(mutations(max_ops=2))) if draw(st.integers(0, 4)) == 0 else data


def is_valid_id(value: object) -> bool:
    """The id contract: non-blank, at most 128 chars, no line breaks or tabs, encodable as a key."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= MAX_ID_LENGTH
        and not any(ch in value for ch in "\n\r\t")
        and not any("\ud800" <= ch <= "\udfff" for ch in value)
    )


def is_optional_label(value: object) -> bool:
    return value is None or (type(value) is int and 0 <= value <= 9)


def check_result(data: bytes) -> ResultEvent | None:
    """from_json gives EventError or a valid event that writes and re-reads to the same JSON."""
    try:
        event = ResultEvent.from_json(data)
    except EventError as exc:
        assert str(exc)
        return None
    assert type(event.label) is int and 0 <= event.label <= 9
    assert type(event.confidence) is float and math.isfinite(event.confidence)
    assert len(event.probabilities) == 10
    assert all(type(p) is float and math.isfinite(p) for p in event.probabilities)
    assert is_valid_id(event.image_id)
    assert is_optional_label(event.expected_label)
    assert isinstance(event.model_version, str) and isinstance(event.source, str)
    assert isinstance(event.timings, dict)
    written = event.to_json()
    assert ResultEvent.from_json(written).to_json() == written
    assert isinstance(event.to_row(), dict)
    event.to_message()
    ACCEPTED["result event"] += 1
    return event


VALID_RESULT = {
    "schema_version": 1, "image_id": "img-1", "label": 7, "confidence": 0.9,
    "probabilities": [0.1] * 10, "model_version": "v1",
}


def result_with(**fields: object) -> bytes:
    return json.dumps({**VALID_RESULT, **fields}).encode()


def result_with_raw(key: str, raw: str) -> bytes:
    return json.dumps({**VALID_RESULT, key: "@"}).replace('"@"', raw).encode()


@fuzz(2_000)
@given(
    prefix=st.sampled_from([b"", b"{", b'{"schema_version":1,', b"[", b'"', b"\xef\xbb\xbf", b"\xff\xfe", b"\x00"]),
    body=st.binary(max_size=200),
)
@example(prefix=b"", body=b"[" * 100_000)        # RecursionError escaped from json.loads
@example(prefix=b"", body=b'{"a":' * 100_000)
@example(prefix=b"", body=b"9" * 5_000)          # ValueError (int digit limit) escaped
def test_result_from_arbitrary_bytes(prefix: bytes, body: bytes) -> None:
    count("codec", "arbitrary bytes")
    check_result(prefix + body)


@fuzz(1_500)
@given(value=json_values)
def test_result_from_arbitrary_json(value: object) -> None:
    count("codec", "arbitrary json")
    assert check_result(dumps(value).encode()) is None  # no JSON value drawn here has all the keys


@fuzz(3_500)
@given(data=result_bodies())
@example(data=result_with(label=float("inf")))            # OverflowError: int(inf)
@example(data=result_with(expected_label=float("-inf")))  # OverflowError in _optional_label
@example(data=result_with_raw("confidence", "1" * 400))   # OverflowError: float(10**400 - 1)
@example(data=result_with_raw("probabilities", "[" + ",".join(["1" * 400] * 10) + "]"))
@example(data=result_with_raw("label", "9" * 5_000))      # ValueError from json.loads itself
@example(data=result_with_raw("timings", '{"x":' + nested(900) + "}"))  # to_json: RecursionError
@example(data=result_with(confidence=float("nan")))       # was accepted, then written as NaN
@example(data=result_with_raw("image_id", '"\\ud800"'))     # accepted; to_message: UnicodeEncodeError
def test_result_from_plausible_but_wrong_bodies(data: bytes) -> None:
    count("codec", "plausible bodies")
    check_result(data)


def deepest_parsable_nesting() -> int:
    """How deep json.loads can nest from here: the limit depends on the current stack depth."""
    low, high = 1, 100_000
    while low < high:
        middle = (low + high + 1) // 2
        try:
            json.loads(nested(middle))
            low = middle
        except RecursionError:
            high = middle - 1
    return low


@pytest.mark.parametrize("key", sorted(VALID_RESULT_FIELDS))
def test_result_fields_nested_at_the_parser_limit(key: str) -> None:
    # Either side of the parser's limit: json.loads' RecursionError escaped from_json, and a value
    # it only just accepted overflows whatever recurses over it next (to_json of the timings).
    deepest = deepest_parsable_nesting()
    for depth in range(deepest - 12, deepest + 3):
        check_result(result_with_raw(key, nested(depth)))
        check_result(result_with_raw(key, '{"x":' * depth + "0" + "}" * depth))


@st.composite
def result_events(draw: st.DrawFn) -> ResultEvent:
    probability = finite_floats | st.integers(0, 10**6).map(lambda n: n / 10**6)
    timing = st.none() | st.booleans() | st.integers(-(10**18), 10**18) | finite_floats | st.text(max_size=12)
    return ResultEvent(
        image_id=draw(valid_ids),
        label=draw(labels),
        confidence=draw(finite_floats),
        probabilities=tuple(draw(st.lists(probability, min_size=10, max_size=10))),
        model_version=draw(st.text(max_size=20)),
        source=draw(st.text(max_size=20)),
        expected_label=draw(st.none() | labels),
        timings=draw(st.dictionaries(st.text(max_size=12), timing, max_size=4)),
    )


@fuzz(1_200)
@given(event=result_events())
def test_result_round_trip_is_identity(event: ResultEvent) -> None:
    count("codec", "result round trip")
    written = event.to_json()
    decoded = ResultEvent.from_json(written)
    # to_json rounds probabilities to 6 decimals (and nothing else); after that it is exact.
    assert decoded == dataclasses.replace(event, probabilities=tuple(round(p, 6) for p in event.probabilities))
    assert decoded.to_json() == written


def image_attributes_base(image_id: str = "img-1") -> dict[str, str]:
    return {
        "ce_specversion": "1.0", "ce_type": "mnist.image", "ce_id": image_id, "ce_source": "producer",
        "ce_time": "2024-01-01T00:00:00.000+00:00", "ce_datacontenttype": "image/png", "schema_version": "1",
    }


@st.composite
def attribute_dicts(draw: st.DrawFn, base: dict[str, str]) -> dict[str, str]:
    """``base`` with keys dropped or replaced by odd text, plus extra odd attributes."""
    attributes = dict(base)
    for key in sorted(base):
        how = draw(st.sampled_from(["keep", "keep", "drop", "odd"]))
        if how == "drop":
            del attributes[key]
        elif how == "odd":
            attributes[key] = draw(attribute_text)
    attributes.update(draw(st.dictionaries(attribute_text, attribute_text, max_size=3)))
    return attributes


def message(attributes: dict[str, str], data: bytes = b"\x89PNG", message_id: str = "m-1") -> Message:
    return Message(id=message_id, topic="new_image_topic", data=data, key=None, attributes=attributes,
                   publish_time=None)


near_valid_image_values = {
    "ce_type": ["mnist.image", "mnist.image ", "MNIST.IMAGE", "mnist.prediction", ""],
    "schema_version": ["1", " 1", "01", "1.0", "2", "１", ""],
    "expected_label": ["0", "9", "10", "-1", " 7 ", "٧", "７", "1_0", "7.0", "", "x", "9" * 5_000],
}


@fuzz(1_800)
@given(
    attributes=attribute_dicts(image_attributes_base()),
    near_valid=st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in near_valid_image_values.items()}),
    data=st.binary(max_size=16),
)
@example(attributes={**image_attributes_base(), "expected_label": "9" * 5_000}, near_valid={}, data=b"")
@example(attributes=image_attributes_base("i" * 129), near_valid={}, data=b"")
@example(attributes=image_attributes_base("\ud800"), near_valid={}, data=b"")  # to_message: UnicodeEncodeError
def test_image_event_from_odd_attributes(attributes: dict[str, str], near_valid: dict[str, str], data: bytes) -> None:
    count("codec", "image event attributes")
    received = message({**attributes, **near_valid}, data)
    try:
        event = ImageEvent.from_message(received)
    except EventError as exc:
        assert str(exc)
        return
    assert is_valid_id(event.image_id)
    assert is_optional_label(event.expected_label)
    assert event.image == data
    assert all(isinstance(v, str) for v in (event.source, event.content_type, event.created_at))
    # A valid event can be sent on, and reads back the same (an empty source is sent as "unknown").
    sent = event.to_message()
    again = ImageEvent.from_message(message(dict(sent.attributes), sent.data))
    assert again == dataclasses.replace(event, source=event.source or "unknown")
    ACCEPTED["image event"] += 1


@fuzz(1_000)
@given(
    attributes=attribute_dicts(
        {**image_attributes_base(), DEAD_LETTER_REASON: "boom", DEAD_LETTER_ATTEMPTS: "5",
         DEAD_LETTER_SOURCE_TOPIC: "new_image_topic", DEAD_LETTER_TIME: "2024-01-01T00:00:00+00:00",
         "expected_label": "3"}
    ),
    message_id=st.text(max_size=300),
)
@example(attributes={DEAD_LETTER_REASON: "r", DEAD_LETTER_ATTEMPTS: "abc"}, message_id="m")  # ValueError escaped
@example(attributes={DEAD_LETTER_REASON: "r", DEAD_LETTER_ATTEMPTS: "9" * 5_000}, message_id="m")
def test_dead_letter_from_odd_attributes(attributes: dict[str, str], message_id: str) -> None:
    count("codec", "dead letter attributes")
    try:
        letter = DeadLetter.from_message(message(attributes, message_id=message_id))
    except EventError as exc:
        assert DEAD_LETTER_REASON not in attributes, f"a dead letter with a reason was refused: {exc}"
        return
    assert DEAD_LETTER_REASON in attributes
    assert isinstance(letter.image_id, str) and 0 < len(letter.image_id) <= MAX_ID_LENGTH
    assert type(letter.attempts) is int
    assert is_optional_label(letter.expected_label)
    json.dumps(letter.to_row())  # stored as one JSON line
    ACCEPTED["dead letter"] += 1


@fuzz(700)
@given(
    image_id=valid_ids,
    source=st.text(min_size=1, max_size=40),
    content_type=st.text(max_size=40),
    created_at=st.text(max_size=40),
    expected_label=st.none() | labels,
    image=st.binary(max_size=64),
)
def test_image_event_round_trip_is_identity(
    image_id: str, source: str, content_type: str, created_at: str, expected_label: int | None, image: bytes
) -> None:
    count("codec", "image event round trip")
    event = ImageEvent(image_id, image, source, content_type, created_at, expected_label)
    sent = event.to_message()
    assert sent.key == image_id.encode("utf-8")
    assert ImageEvent.from_message(message(dict(sent.attributes), sent.data)) == event


# =============================================================================================
# Images
# =============================================================================================

#: Pillow modes drawn per format (each saves without conversion).
FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P"],
    "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I;16", "F"],
    "WEBP": ["RGB", "RGBA"],
}
TIFF_COMPRESSIONS = ["raw", "packbits", "tiff_deflate", "tiff_lzw"]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How to draw one small image with Pillow (pixels come from a seeded numpy generator)."""

    image_format: str
    mode: str
    width: int
    height: int
    style: str
    seed: int
    option: int


@st.composite
def image_specs(draw: st.DrawFn) -> ImageSpec:
    image_format = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[image_format]))
    if draw(st.integers(0, 15)) == 0:
        # A thin strip longer than MAX_WORKING_SIDE: the reduce / JPEG draft path at 1-3 px wide.
        across, along = draw(st.integers(1, 3)), draw(st.integers(MAX_WORKING_SIDE + 1, 3 * MAX_WORKING_SIDE))
        width, height = (across, along) if draw(st.booleans()) else (along, across)
    else:
        width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    styles = ["stroke", "stroke", "noise", "solid", "two_level"] + (["nonfinite"] if mode == "F" else [])
    style, seed, option = draw(st.sampled_from(styles)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 255))
    return ImageSpec(image_format, mode, width, height, style, seed, option)


def draw_pixels(spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """Grey (uint8) and alpha (uint8) planes in the spec's style."""
    rng = np.random.default_rng(spec.seed)
    shape = (spec.height, spec.width)
    if spec.style == "noise":
        grey = rng.integers(0, 256, shape, dtype=np.uint8)
    elif spec.style == "solid":
        grey = np.full(shape, rng.integers(0, 256), dtype=np.uint8)
    else:
        background, ink = rng.integers(0, 256, 2)
        grey = np.full(shape, background, dtype=np.uint8)
        top, left = rng.integers(0, spec.height), rng.integers(0, spec.width)
        grey[top : top + max(1, spec.height // 3), left : left + max(1, spec.width // 4)] = ink
        if spec.style == "stroke":
            grey[rng.integers(0, spec.height), :] = ink
    alpha = np.where(rng.random(shape) < 0.3, 0, 255).astype(np.uint8)
    return grey, alpha


def encode_image(spec: ImageSpec) -> bytes:
    grey, alpha = draw_pixels(spec)
    mode = spec.mode
    if mode == "F":
        values = grey.astype(np.float32) / np.float32(255.0)
        if spec.style == "nonfinite":
            values[0, 0] = (np.nan, np.inf, -np.inf)[spec.option % 3]
        image = Image.fromarray(values, "F")
    elif mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode in ("LA", "RGBA"):
        image = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]).convert(mode)
    else:
        image = Image.fromarray(grey).convert(mode)
    options: dict[str, object] = {}
    if spec.image_format == "JPEG":
        options = {"quality": 5 + spec.option % 91, "progressive": spec.option % 2 == 1}
        if spec.option % 4 == 0:
            exif = Image.Exif()
            exif[0x0112] = 1 + spec.option % 8  # orientation, applied on decoding
            options["exif"] = exif.tobytes()
    elif spec.image_format == "TIFF":
        options = {"compression": TIFF_COMPRESSIONS[spec.option % len(TIFF_COMPRESSIONS)]}
    elif spec.image_format == "WEBP":
        options = {"lossless": spec.option % 2 == 0, "quality": spec.option % 101, "method": 0}
    elif spec.image_format in ("PNG", "GIF") and mode in ("L", "P") and spec.option % 3 == 0:
        options = {"transparency": int(grey[0, 0])}
    buffer = io.BytesIO()
    image.save(buffer, spec.image_format, **options)
    return buffer.getvalue()


def check_image(data: bytes | bytearray | memoryview) -> np.ndarray | ImageError:
    """decode_image and preprocess give an ImageError or a valid array; nothing else escapes."""
    try:
        with MemoryWatch():
            grey = decode_image(data)
    except ImageError as exc:
        assert exc.reason
        return exc
    assert grey.ndim == 2 and grey.dtype == np.float32 and grey.size > 0
    assert max(grey.shape) <= MAX_WORKING_SIDE
    assert np.isfinite(grey).all() and grey.min() >= 0.0 and grey.max() <= 1.0
    try:
        with MemoryWatch():
            result = preprocess(data)
    except ImageError as exc:
        assert exc.reason
        return exc
    assert result.shape == (28, 28) and result.dtype == np.float32
    assert np.isfinite(result).all() and result.min() >= 0.0 and result.max() <= 1.0
    ACCEPTED["image"] += 1
    return result


MAGIC_PREFIXES = [
    b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
    b"MM\x00*", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"\x00\x00\x01\x00", b"P5\n", b"%!PS-Adobe",
]


@fuzz(3_000)
@given(
    prefix=st.sampled_from(MAGIC_PREFIXES),
    body=st.binary(max_size=512),
    container=st.sampled_from([bytes, bytearray, memoryview]),
)
# Crashed with untyped exceptions before decode_image translated them (found by fuzzing):
@example(prefix=b"", body=b"GIF87a\x00\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x03\x00\x07\x00\x00\x00\x00\x00,",
         container=bytes)  # struct.error
@example(prefix=b"", body=b"\xff\xd8\xff\xc0\x00\x11\x087\x00\x00\x01\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00"
         b"\xff\xda\x00\x00", container=bytes)  # ZeroDivisionError in JPEG draft (1 px wide)
@example(prefix=b"", body=b"II*\x00\x08\x00\x00\x00\x08\x00\x00\x01\x04\x00\x01\x00\x00\x00!\x00\x00\x00\x01\x01"
         b"\x04\x00\x01\x00\x00\x00\x14\x00\x00\x00" + bytes(24) + b"\x11\x01\x02\x00\x01" + bytes(7),
         container=bytes)  # TypeError: ASCII strip offsets
def test_arbitrary_bytes_give_image_error_or_valid_array(
    prefix: bytes, body: bytes, container: Callable[[bytes], bytes | bytearray | memoryview]
) -> None:
    count("image", "arbitrary bytes")
    check_image(container(prefix + body))


@fuzz(4_400)
@given(spec=image_specs(), edits=mutations(max_ops=6))
@example(spec=ImageSpec("TIFF", "F", 8, 8, "nonfinite", 1, 0), edits=[])  # NaN: ZeroDivisionError in centre_digit
def test_mutated_images_give_image_error_or_valid_array(spec: ImageSpec, edits: list[tuple[str, int, bytes]]) -> None:
    count("image", "mutated images")
    check_image(mutate(encode_image(spec), edits))


@fuzz(1_500)
@given(spec=image_specs())
@example(spec=ImageSpec("JPEG", "L", 1, 5_000, "stroke", 1, 1))  # refused as corrupt: draft asked for 0 px
@example(spec=ImageSpec("JPEG", "RGB", 3, 6_000, "stroke", 2, 1))
def test_valid_images_decode_or_are_blank(spec: ImageSpec) -> None:
    count("image", "valid images")
    outcome = check_image(encode_image(spec))
    if isinstance(outcome, ImageError):
        allowed: tuple[type[ImageError], ...] = (BlankImageError,)
        if spec.style == "nonfinite":
            allowed = (BlankImageError, UnsupportedImageError)
        assert isinstance(outcome, allowed), f"{spec}: {outcome!r}"


# -- headers declaring huge dimensions (no pixel data is ever allocated to build them) ----------


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header(width: int, height: int, colour_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_header(width: int, height: int, frame_width: int = 1, frame_height: int = 1) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, frame_width, frame_height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def bmp_header(width: int, height: int, bits: int = 24) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    palette = bytes(4 * 256) if bits == 8 else b""
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + 64, 0, 0, offset) + info + palette + bytes(64)


def tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in entries
    ) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(16)


def jpeg_header(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + bytes(32) + b"\xff\xd9"


def _webp_lossless_1x1_payload() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()[20:]  # after RIFF, size, WEBP, VP8L, chunk size: the bitstream


WEBP_BITSTREAM = _webp_lossless_1x1_payload()


def webp_header(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header (14 bits a side) declares width x height."""
    bits = struct.unpack("<I", WEBP_BITSTREAM[1:5])[0] & ~((1 << 28) - 1) | (width - 1) | (height - 1) << 14
    payload = WEBP_BITSTREAM[:1] + struct.pack("<I", bits) + WEBP_BITSTREAM[5:]
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)
    return b"RIFF" + struct.pack("<I", len(body)) + body


#: Builders and the largest side each format can declare.
HUGE_HEADERS: dict[str, tuple[Callable[[int, int], bytes], int]] = {
    "PNG": (png_header, 2**31 - 1),
    "GIF": (gif_header, 2**16 - 1),
    "GIF frame": (lambda w, h: gif_header(1, 1, w, h), 2**16 - 1),  # frame larger than the screen
    "BMP": (bmp_header, 2**31 - 1),
    "BMP top-down": (lambda w, h: bmp_header(w, -h, 8), 2**31 - 1),
    "TIFF": (tiff_header, 2**32 - 1),
    "JPEG": (jpeg_header, 2**16 - 1),
    "WEBP": (webp_header, 2**14),
}


@st.composite
def huge_dimensions(draw: st.DrawFn) -> tuple[str, int, int]:
    """A format and a width x height over MAX_PIXELS that the format's header can declare."""
    name = draw(st.sampled_from(sorted(HUGE_HEADERS)))
    side = HUGE_HEADERS[name][1]
    width = draw(st.integers(MAX_PIXELS // side + 1, side) | st.sampled_from([side, MAX_PIXELS // side + 1]))
    least_height = MAX_PIXELS // width + 1
    height = draw(st.integers(least_height, side) | st.sampled_from([least_height, side]))
    return name, width, height


@fuzz(1_700)
@given(case=huge_dimensions())
@example(case=("PNG", 30_000, 30_000))
@example(case=("GIF", 30_000, 30_000))
@example(case=("BMP", 30_000, 30_000))
@example(case=("PNG", 5_001, 5_000))  # just over MAX_PIXELS, under Pillow's own bomb limit
def test_headers_declaring_huge_dimensions_are_refused_before_decoding(case: tuple[str, int, int]) -> None:
    count("image", "huge headers")
    name, width, height = case
    assert width * height > MAX_PIXELS
    data = HUGE_HEADERS[name][0](width, height)
    with refusal_time() as elapsed, pytest.raises(ImageTooLargeError) as refused, MemoryWatch():
        decode_image(data)
    assert elapsed() < REFUSAL_SECONDS
    assert "pixels" in refused.value.reason


@pytest.mark.parametrize("container", [bytes, bytearray, memoryview])
def test_input_over_the_byte_limit_is_refused_before_parsing(container: Callable[[bytes], object]) -> None:
    # A valid PNG header, so only the length can be the reason.
    data = container(png_header(28, 28).ljust(MAX_ENCODED_BYTES + 1, b"\0"))
    for function in (decode_image, preprocess):
        with refusal_time() as elapsed, pytest.raises(ImageTooLargeError, match="bytes"):
            function(data)  # type: ignore[operator]
        assert elapsed() < REFUSAL_SECONDS


# -- oversize images with real pixel data: refused without the memory decoding would take ------


def png_of_zeros(width: int, height: int) -> bytes:
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + width)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bmp_rle8_of_zeros(width: int, height: int) -> bytes:
    runs = b"".join(bytes([min(255, width - x), 0]) for x in range(0, width, 255))
    pixels = (runs + b"\x00\x00") * (height - 1) + runs + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def pillow_of_zeros(image_format: str, mode: str = "L", **options: object) -> Callable[[int, int], bytes]:
    def build(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, (width, height)).save(buffer, image_format, **options)
        return buffer.getvalue()

    return build


def ico_wrapping(width: int, height: int) -> bytes:
    """An icon whose directory says 16x16 but whose PNG is width x height (Pillow decodes it in open)."""
    png = png_of_zeros(width, height)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


#: Each builds a fully decodable image (checked at a small size); 6000 x 6000 (36 MP) is over
#: MAX_PIXELS and under Pillow's own bomb limit, so only decode_image's header check can refuse
#: it. Building them costs this process at most ~40 MB (Pillow's encoders need the image).
OVERSIZE_BUILDERS: dict[str, tuple[Callable[[int, int], bytes], type[ImageError]]] = {
    "PNG": (png_of_zeros, ImageTooLargeError),
    "BMP RLE8": (bmp_rle8_of_zeros, ImageTooLargeError),
    "GIF": (pillow_of_zeros("GIF", "P"), ImageTooLargeError),
    "TIFF": (pillow_of_zeros("TIFF", compression="tiff_deflate"), ImageTooLargeError),
    "JPEG": (pillow_of_zeros("JPEG", quality=50), ImageTooLargeError),
    "WEBP": (webp_header, ImageTooLargeError),  # its one-colour bitstream decodes at any size
    "ICO holding a PNG": (ico_wrapping, UndecodableImageError),  # not an accepted format
}
OVERSIZE_SIDE = 6_000
#: Decoding any of them would take at least 36 MB (one byte a pixel).
OVERSIZE_MEMORY_BOUND_MB = 16

_REFUSE_IN_CHILD = """
import json, resource, sys, time
from pathlib import Path
from typing import Self
from Modelling.preprocessing import preprocess
files = [Path(p) for p in sys.argv[1:]]
payloads = {p.name: p.read_bytes() for p in files}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = {}
for name, data in payloads.items():
    started = time.process_time()
    try:
        preprocess(data)
        outcome = "accepted"
    except Exception as exc:
        outcome = type(exc).__name__
    report[name] = [outcome, time.process_time() - started]
report["peak_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(report))
"""


def test_oversize_decodable_images_are_refused_before_decoding(tmp_path: Path) -> None:
    paths = []
    for name, (build, _) in OVERSIZE_BUILDERS.items():
        # The same builder at a small size decodes: refusing the big one is not mere breakage.
        small = build(60, 40)
        if name.startswith("ICO"):
            assert Image.open(io.BytesIO(small)).size == (60, 40)
        else:
            assert decode_image(small).shape == (40, 60), name
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(build(OVERSIZE_SIDE, OVERSIZE_SIDE))
        assert path.stat().st_size < MAX_ENCODED_BYTES, name
        paths.append(path)
    completed = subprocess.run(
        [sys.executable, "-c", _REFUSE_IN_CHILD, *map(str, paths)],
        capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    report = json.loads(completed.stdout)
    for name, (_, expected) in OVERSIZE_BUILDERS.items():
        outcome, seconds = report[name.replace(" ", "_")]
        assert outcome == expected.__name__, f"{name}: {outcome}"
        assert seconds < REFUSAL_SECONDS, f"{name} took {seconds:.2f} s to refuse"
    assert report["peak_growth_mb"] < OVERSIZE_MEMORY_BOUND_MB, report


# =============================================================================================
# Totals and memory over the whole module
# =============================================================================================


@pytest.mark.parametrize(
    ("family", "tests", "valid_kinds"),
    [("codec", CODEC_TESTS, ("result event", "image event", "dead letter")), ("image", IMAGE_TESTS, ("image",))],
)
def test_at_least_ten_thousand_inputs_were_tried(family: str, tests: int, valid_kinds: tuple[str, ...]) -> None:
    if len(FED_BY[family]) < tests:
        pytest.skip(f"only {len(FED_BY[family])} of the {tests} {family} tests ran; totals need all")
    assert INPUTS[family] >= 10_000, INPUTS
    # Thousands of refusals alone would prove little: valid outcomes must be checked as well.
    assert all(ACCEPTED[kind] >= 100 for kind in valid_kinds), ACCEPTED


def test_memory_stayed_bounded() -> None:
    if not FED_BY["image"]:
        pytest.skip("no image test ran")
    # ru_maxrss is the process's lifetime peak: if it rose, the new peak happened in this module;
    # otherwise the samples taken after every image input are the best evidence.
    peak = _maxrss_bytes() if _maxrss_bytes() > _MEMORY["start_maxrss"] else _MEMORY["peak_rss"]
    growth_mb = (max(peak, _MEMORY["peak_rss"]) - _MEMORY["start_rss"]) / 2**20
    assert growth_mb < MEMORY_BOUND_MB, f"peak RSS grew by {growth_mb:.0f} MB"
    per_image_mb = _MEMORY["per_image_peak"] / 2**20
    assert per_image_mb < PER_IMAGE_MEMORY_BOUND_MB, f"one image raised peak RSS by {per_image_mb:.0f} MB"
