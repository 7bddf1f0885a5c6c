"""Server-Sent Events: encoding and the streaming response (SPEC §5.1).

Events are encoded to bytes exactly once, when they are published into the
observation ring (:func:`encode_event` is the ring's encoder); readers only
concatenate and write bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import trio
from quart import Response

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",
}

CONNECTED = b": connected\n\n"


class ConnectionReset(Exception):
    """Raised by a response body to cut its connection with no terminating chunk.

    Hypercorn closes the connection when a body fails after the headers went
    out; that is exactly what ``X-Test-Scenario: reset_midway`` (SPEC §8)
    wants. It is not an error: :class:`QuietResets` keeps it out of the log.
    """


class QuietResets(logging.Filter):
    """Drops Hypercorn's "Error in ASGI Framework" record for a deliberate reset."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_reset(exc)


def _is_reset(exc: BaseException | None) -> bool:
    """A reset, or a group of resets (and the cancellations they caused)."""
    if isinstance(exc, ConnectionReset):
        return True
    if isinstance(exc, BaseExceptionGroup):
        resets, rest = exc.split(lambda e: isinstance(e, ConnectionReset | trio.Cancelled))
        return rest is None and resets is not None and _has_reset(resets)
    return False


def _has_reset(group: BaseExceptionGroup[BaseException]) -> bool:
    return any(
        isinstance(e, ConnectionReset) or (isinstance(e, BaseExceptionGroup) and _has_reset(e))
        for e in group.exceptions
    )


def quiet_resets(logger: logging.Logger) -> None:
    """Install :class:`QuietResets` on ``logger`` once."""
    if not any(isinstance(f, QuietResets) for f in logger.filters):
        logger.addFilter(QuietResets())


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
