"""Server-Sent Events: encoding and the streaming response (SPEC §5.1).

Events are encoded to bytes exactly once, when they are published into the
observation ring (:func:`encode_event` is the ring's encoder); readers only
concatenate and write bytes.

An SSE response is an :class:`EventStream`: instead of a body for Quart to
iterate, it has a ``serve(send)`` that writes the body itself through the
ASGI ``send`` (:class:`Connection`, the app's ``asgi_http_class``, hands
it over). That drops Quart's per-chunk layers, and it lets a stream's run
write its own client's bytes (:mod:`server.push`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import ASGISendCallable
from quart import Response
from quart.utils import encode_headers
from quart_trio.asgi import TrioASGIHTTPConnection

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


def event_data(event_id: int, name: str, wire: bytes) -> str:
    """An event's ``data`` back from its wire bytes: the inverse of
    :func:`encode_event` (and of a mirror's gap encoding) for ``data``, which
    is one line. "" for bytes without a data line (an empty gap)."""
    start = wire.find(b"data: ")
    if start < 0:
        return ""
    start += 6
    return wire[start : wire.index(b"\n", start)].decode()


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def heartbeat() -> bytes:
    return comment(f"heartbeat {int(time.time() * 1000)}")


#: Writes a response's body through the ASGI ``send`` (its chunks: ``more_body`` True).
Serve = Callable[[ASGISendCallable], Awaitable[None]]


class EventStream(Response):
    """A 200 ``text/event-stream`` response whose body :attr:`serve` writes.

    No response timeout: Quart's RESPONSE_TIMEOUT (60 s by default) would
    silently cut a long stream. The after-request hooks see it as any
    response (status, headers); only :class:`Connection` sends it.

    ``unserved``: called if the client goes away before :attr:`serve` is
    called (a stream's run waits for its client: it is told at once, not
    after ``ATTACH_TIMEOUT_S``). Once called, :attr:`serve` owns that news.
    """

    def __init__(
        self,
        serve: Serve,
        headers: dict[str, str] | None = None,
        *,
        unserved: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(b"", status=200, headers={**SSE_HEADERS, **(headers or {})})
        del self.headers["Content-Length"]  # of the placeholder body: this one is open-ended
        self.timeout = None
        self.serve = serve
        self.unserved = unserved


class Connection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, sending an :class:`EventStream` itself.

    Headers, then ``serve(send)``, then the end of the body. Everything else
    is Quart's. Disconnects are Quart-Trio's as before: ``http.disconnect``
    cancels the task that runs ``serve``.
    """

    async def _send_response(self, send: ASGISendCallable, response: Any) -> None:
        if not isinstance(response, EventStream):
            await super()._send_response(send, response)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": encode_headers(response.headers),
                    "trailers": False,
                }
            )
        except BaseException:
            if response.unserved is not None:
                response.unserved()
            raise
        await response.serve(send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def sse_response(
    body: AsyncIterator[bytes],
    headers: dict[str, str] | None = None,
    *,
    unserved: Callable[[], None] | None = None,
) -> EventStream:
    """An :class:`EventStream` writing each chunk ``body`` yields, in one ``send`` each."""

    async def serve(send: ASGISendCallable) -> None:
        try:
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            # Cancelled in a send (the client went away): the body's own
            # ``finally`` must run now, not whenever the collector finds it.
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()

    return EventStream(serve, headers, unserved=unserved)
