"""AWS event-stream frames (``application/vnd.amazon.eventstream``), both ways.

A frame ("message") on the wire::

    [total length: u32][headers length: u32][prelude CRC32: u32]
    [headers ...][payload ...][message CRC32: u32]

All integers are big-endian. The prelude CRC covers the first 8 bytes; the
message CRC covers everything before it (prelude and prelude CRC included).
A header is ``[name length: u8][name][type: u8][value]``; this module writes
and reads the types Bedrock uses (bool, byte, short, int, long, bytes,
string, timestamp, uuid).

Guarantees: :func:`encode_frame` output is accepted by botocore's own parser
(``botocore.eventstream.EventStreamBuffer``), which the tests check; and
``decode_frame(encode_frame(h, p))`` gives back ``(h, p)``. Pure functions:
nothing here blocks or does I/O.
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

#: ``str`` → string (7), ``bytes`` → byte array (6), ``bool`` → true/false
#: (0/1), ``int`` → int32 (4) or int64 (5) when it does not fit,
#: ``uuid.UUID`` → uuid (9).
HeaderValue = str | bytes | bool | int | uuid.UUID

PRELUDE_LENGTH = 12
_MESSAGE_CRC_LENGTH = 4
MAX_HEADERS_LENGTH = 128 * 1024
MAX_PAYLOAD_LENGTH = 24 * 1024 * 1024

_TRUE, _FALSE, _BYTE, _SHORT, _INT, _LONG, _BYTES, _STRING, _TIMESTAMP, _UUID = range(10)


class FrameError(ValueError):
    """A frame that is malformed, truncated where it must not be, or fails its CRC."""


def _encode_header(name: str, value: HeaderValue) -> bytes:
    raw_name = name.encode("utf-8")
    if not 0 < len(raw_name) < 256:
        raise FrameError(f"header name length out of range: {name!r}")
    head = struct.pack(">B", len(raw_name)) + raw_name
    # bool before int: bool is an int subclass.
    if isinstance(value, bool):
        return head + struct.pack(">B", _TRUE if value else _FALSE)
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return head + struct.pack(">Bi", _INT, value)
        return head + struct.pack(">Bq", _LONG, value)
    if isinstance(value, uuid.UUID):
        return head + struct.pack(">B", _UUID) + value.bytes
    if isinstance(value, str):
        kind, raw = _STRING, value.encode("utf-8")
    elif isinstance(value, bytes):
        kind, raw = _BYTES, value
    else:
        raise FrameError(f"unsupported header value type for {name!r}: {type(value).__name__}")
    if len(raw) > 0xFFFF:
        raise FrameError(f"header value too long for {name!r}")
    return head + struct.pack(">BH", kind, len(raw)) + raw


def encode_frame(headers: Mapping[str, HeaderValue], payload: bytes) -> bytes:
    """One complete event-stream frame carrying ``headers`` and ``payload``."""
    header_bytes = b"".join(_encode_header(k, v) for k, v in headers.items())
    if len(header_bytes) > MAX_HEADERS_LENGTH:
        raise FrameError("headers too long")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise FrameError("payload too long")
    total = PRELUDE_LENGTH + len(header_bytes) + len(payload) + _MESSAGE_CRC_LENGTH
    prelude = struct.pack(">II", total, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + header_bytes + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _json_bytes(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


def event_frame(event_type: str, payload: Mapping[str, object]) -> bytes:
    """An ``event`` frame: ``:event-type`` names the ConverseStream member
    (``messageStart``, ``contentBlockDelta``, ``metadata``...), the payload is
    its JSON body."""
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_frame(headers, _json_bytes(payload))


def exception_frame(exception_type: str, message: str) -> bytes:
    """An ``exception`` frame (a modelled in-stream error such as
    ``modelStreamErrorException``); botocore raises it as ``EventStreamError``."""
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_frame(headers, _json_bytes({"message": message}))


# -- decoding (tests and diagnostics) -----------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    headers: dict[str, HeaderValue]
    payload: bytes


def _decode_headers(data: bytes) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    pos = 0
    try:
        while pos < len(data):
            (name_len,) = struct.unpack_from(">B", data, pos)
            pos += 1
            name = data[pos : pos + name_len].decode("utf-8")
            pos += name_len
            (kind,) = struct.unpack_from(">B", data, pos)
            pos += 1
            value: HeaderValue
            if kind in (_TRUE, _FALSE):
                value = kind == _TRUE
            elif kind in (_BYTE, _SHORT, _INT, _LONG, _TIMESTAMP):
                fmt = {_BYTE: ">b", _SHORT: ">h", _INT: ">i", _LONG: ">q", _TIMESTAMP: ">q"}[kind]
                (value,) = struct.unpack_from(fmt, data, pos)
                pos += struct.calcsize(fmt)
            elif kind in (_BYTES, _STRING):
                (length,) = struct.unpack_from(">H", data, pos)
                pos += 2
                raw = data[pos : pos + length]
                if len(raw) != length:
                    raise FrameError("truncated header value")
                pos += length
                value = raw.decode("utf-8") if kind == _STRING else bytes(raw)
            elif kind == _UUID:
                value = uuid.UUID(bytes=bytes(data[pos : pos + 16]))
                pos += 16
            else:
                raise FrameError(f"unknown header type {kind}")
            headers[name] = value
    except (struct.error, UnicodeDecodeError) as exc:
        raise FrameError(f"malformed headers: {exc}") from exc
    return headers


def decode_frame(data: bytes) -> tuple[Frame, int] | None:
    """Decode the frame at the start of ``data``.

    Returns ``(frame, bytes consumed)``, or ``None`` when ``data`` holds only
    part of a frame. Raises :class:`FrameError` on a bad length or CRC.
    """
    if len(data) < PRELUDE_LENGTH:
        return None
    total, headers_len, prelude_crc = struct.unpack_from(">III", data, 0)
    if zlib.crc32(data[:8]) != prelude_crc:
        raise FrameError("prelude CRC mismatch")
    if headers_len > MAX_HEADERS_LENGTH or total < PRELUDE_LENGTH + headers_len + 4:
        raise FrameError("bad frame lengths")
    if total - PRELUDE_LENGTH - headers_len - 4 > MAX_PAYLOAD_LENGTH:
        raise FrameError("payload too long")
    if len(data) < total:
        return None
    (message_crc,) = struct.unpack_from(">I", data, total - 4)
    if zlib.crc32(data[: total - 4]) != message_crc:
        raise FrameError("message CRC mismatch")
    headers_end = PRELUDE_LENGTH + headers_len
    headers = _decode_headers(bytes(data[PRELUDE_LENGTH:headers_end]))
    return Frame(headers, bytes(data[headers_end : total - 4])), total


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes as they arrive, iterate frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def __iter__(self) -> Iterator[Frame]:
        while (decoded := decode_frame(bytes(self._buffer))) is not None:
            frame, used = decoded
            del self._buffer[:used]
            yield frame

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet make a whole frame."""
        return len(self._buffer)
