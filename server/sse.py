"""Server-Sent Events: encoding and the streaming response (SPEC §5.1).

Events are encoded to bytes exactly once, when they are published into the
observation ring (:func:`encode_event` is the ring's encoder); readers only
concatenate and write bytes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from quart import Response

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}

CONNECTED = b": connected\n\n"


def encode_event(event_id: int | None, name: str, data: str) -> bytes:
    """``id:``/``event:``/``data:`` lines; ``data`` is one line of JSON text."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def heartbeat() -> bytes:
    return comment(f"heartbeat {int(time.time() * 1000)}")


def sse_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> Response:
    """A streaming response with the SPEC headers and no response timeout.

    Quart's RESPONSE_TIMEOUT (60 s by default) would silently cut a long
    stream, so it is switched off for this response only.
    """
    response = Response(body, status=200, headers={**SSE_HEADERS, **(headers or {})})
    response.timeout = None
    return response
