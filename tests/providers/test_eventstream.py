"""Event-stream frames: our encoder against botocore's own parser, and our decoder."""

from __future__ import annotations

import uuid

import botocore.session
import pytest
from botocore.eventstream import ChecksumMismatch, EventStream, EventStreamBuffer
from botocore.exceptions import EventStreamError
from botocore.parsers import EventStreamJSONParser

from server.providers.eventstream import (
    FrameDecoder,
    FrameError,
    decode_frame,
    encode_frame,
    event_frame,
    exception_frame,
)

HEADERS = {
    ":message-type": "event",
    "text": "héllo",
    "raw": b"\x00\x01\xff",
    "yes": True,
    "no": False,
    "small": 7,
    "big": 2**40,
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}


def botocore_messages(data: bytes) -> list:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return list(buffer)


def test_botocore_parses_every_header_type() -> None:
    (message,) = botocore_messages(encode_frame(HEADERS, b"payload"))
    assert message.payload == b"payload"
    expected = {**HEADERS, "id": HEADERS["id"].bytes}  # botocore gives uuids as bytes
    assert message.headers == expected


def test_round_trip_through_our_decoder_byte_by_byte() -> None:
    frames = [encode_frame(HEADERS, b"one"), event_frame("messageStart", {"role": "assistant"})]
    decoder = FrameDecoder()
    got = []
    for byte in b"".join(frames):
        decoder.feed(bytes([byte]))
        got.extend(decoder)
    assert decoder.pending == 0
    assert [(f.headers, f.payload) for f in got] == [
        (HEADERS, b"one"),
        (
            {
                ":event-type": "messageStart",
                ":content-type": "application/json",
                ":message-type": "event",
            },
            b'{"role":"assistant"}',
        ),
    ]
    assert decode_frame(frames[0][:-1]) is None  # a partial frame is "not yet"


def test_corruption_is_caught_by_both_parsers() -> None:
    frame = bytearray(encode_frame({"a": "b"}, b"payload"))
    frame[-6] ^= 0xFF  # flip a payload byte: the message CRC no longer matches
    with pytest.raises(FrameError):
        decode_frame(bytes(frame))
    with pytest.raises(ChecksumMismatch):
        botocore_messages(bytes(frame))


class _RawStream:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self):
        yield from (self._data[i : i + 7] for i in range(0, len(self._data), 7))


def converse_stream(data: bytes) -> EventStream:
    """botocore's (sync) EventStream for ConverseStream's output shape over ``data``."""
    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    shape = model.operation_model("ConverseStream").output_shape.members["stream"]
    return EventStream(_RawStream(data), shape, EventStreamJSONParser(), "ConverseStream")


def test_converse_events_parse_into_the_modelled_shapes() -> None:
    data = b"".join(
        [
            event_frame("messageStart", {"role": "assistant"}),
            event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
            event_frame("contentBlockStop", {"contentBlockIndex": 0}),
            event_frame("messageStop", {"stopReason": "end_turn"}),
            event_frame(
                "metadata",
                {
                    "usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4},
                    "metrics": {"latencyMs": 12},
                },
            ),
        ]
    )
    assert list(converse_stream(data)) == [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"contentBlockIndex": 0, "delta": {"text": "Hi"}}},
        {"contentBlockStop": {"contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
        {
            "metadata": {
                "usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4},
                "metrics": {"latencyMs": 12},
            }
        },
    ]


def test_exception_frame_raises_event_stream_error() -> None:
    data = event_frame("messageStart", {"role": "assistant"}) + exception_frame(
        "modelStreamErrorException", "it broke"
    )
    events = iter(converse_stream(data))
    assert next(events) == {"messageStart": {"role": "assistant"}}
    with pytest.raises(EventStreamError) as info:
        next(events)
    assert info.value.response["Error"] == {
        "Code": "modelStreamErrorException",
        "Message": "it broke",
    }
