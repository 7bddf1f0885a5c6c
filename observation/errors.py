"""The observation package's own error.

Everything else it raises is one of trio's resource errors, with trio's
meaning::

    StreamExists            open_stream() with an id that is already registered
    trio.WouldBlock         publish_nowait() would drop an event the primary has not read;
                            next_batch_nowait() has nothing to deliver yet
    trio.BusyResourceError  a second primary reader; two tasks reading one Reader
    trio.ClosedResourceError publish after close; reading a detached Reader
    trio.EndOfChannel       next_batch() after the stream ended and was drained
"""

from __future__ import annotations


class StreamExists(Exception):
    """A stream with this id is already live or lingering."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} already exists")
        self.stream_id = stream_id
