"""On-disk framing of one queue record, and the parser that never returns a torn one.

Layout of a record (little-endian, 32-byte header, then the payload)::

    offset  size  field
    0       4     magic            b"QRC1" – format version; anything else is not a record
    4       8     seq              u64, strictly increasing within a queue (gaps allowed)
    12      8     appended_at_ns   i64, wall-clock time of the append (time.time_ns())
    20      4     length           u32, payload size in bytes (<= MAX_PAYLOAD_BYTES)
    24      4     payload_crc      u32, CRC-32 of the payload
    28      4     header_crc       u32, CRC-32 of bytes 0..27
    32      …     payload

Why two checksums: the header CRC lets the parser tell "header whole, payload not yet written"
(keep waiting) from "garbage" (stop) before trusting ``length``, so a torn header can never make
a reader wait for gigabytes that will not come. The payload CRC catches a torn or stale payload.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Sequence
from typing import NamedTuple

MAGIC = b"QRC1"
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

_HEAD = struct.Struct("<4sQqII")
_HEAD_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _HEAD_CRC.size


class Stop(enum.Enum):
    """Why ``parse_records`` stopped."""

    END = "end"  # the buffer ended exactly at a record boundary
    INCOMPLETE = "incomplete"  # a record started but the buffer ends inside it
    INVALID = "invalid"  # bytes at the position are not a whole, valid record
    LIMIT = "limit"  # max_items records were parsed


class RawRecord(NamedTuple):
    """One whole record; ``end`` is the offset just past it in the parsed buffer."""

    seq: int
    appended_at_ns: int
    payload: bytes
    end: int


class ParseResult(NamedTuple):
    """Records parsed, where parsing stopped and why, and bytes needed to finish the next one."""

    records: list[RawRecord]
    position: int
    stop: Stop
    needed: int


def encode_batch(first_seq: int, appended_at_ns: int, payloads: Sequence[bytes]) -> bytes:
    """Frame ``payloads`` as consecutive records numbered from ``first_seq``; pure function."""
    parts: list[bytes] = []
    for offset, payload in enumerate(payloads):
        seq = first_seq + offset
        head = _HEAD.pack(MAGIC, seq, appended_at_ns, len(payload), zlib.crc32(payload))
        parts.append(head)
        parts.append(_HEAD_CRC.pack(zlib.crc32(head)))
        parts.append(payload)
    return b"".join(parts)


def parse_records(buffer: bytes, position: int = 0, max_items: int | None = None) -> ParseResult:
    """Parse whole records from ``buffer[position:]``; never returns a torn or corrupt record.

    Stops at the first record that is incomplete or invalid and says which; whether that means
    "not yet written" or "torn for good" is for the caller to decide from context.
    """
    view = memoryview(buffer)
    records: list[RawRecord] = []
    size = len(buffer)
    while max_items is None or len(records) < max_items:
        if size - position < HEADER_SIZE:
            stop = Stop.END if position == size else Stop.INCOMPLETE
            return ParseResult(records, position, stop, HEADER_SIZE)
        magic, seq, appended_at_ns, length, payload_crc = _HEAD.unpack_from(buffer, position)
        (header_crc,) = _HEAD_CRC.unpack_from(buffer, position + _HEAD.size)
        if (
            magic != MAGIC
            or length > MAX_PAYLOAD_BYTES
            or zlib.crc32(view[position : position + _HEAD.size]) != header_crc
        ):
            return ParseResult(records, position, Stop.INVALID, HEADER_SIZE)
        end = position + HEADER_SIZE + length
        if end > size:
            return ParseResult(records, position, Stop.INCOMPLETE, HEADER_SIZE + length)
        payload = bytes(view[position + HEADER_SIZE : end])
        if zlib.crc32(payload) != payload_crc:
            return ParseResult(records, position, Stop.INVALID, HEADER_SIZE)
        records.append(RawRecord(seq, appended_at_ns, payload, end))
        position = end
    return ParseResult(records, position, Stop.LIMIT, HEADER_SIZE)
