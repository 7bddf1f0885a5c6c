"""Supervisors watching live streams (SPEC §6), over SSE and WebSocket, and the
list of live streams.

One source, :func:`observer_items`, says what an observer is told; the SSE
and WebSocket routes only render it. Replayed and live events are the very
bytes the client got (encoded once, at publish).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, suppress
from datetime import UTC, datetime
from typing import Any

import trio
from quart import Blueprint, Response, request, websocket

from observation import Batch, ObservationManager, Stream

from ..context import authenticate, authenticated, services
from ..errors import ApiError, ValidationError, session_not_found
from ..sse import encode_event, heartbeat, sse_response
from ..validate import EVENT_STREAM, Param, operation
from .stream import paced

bp = Blueprint("observe", __name__)

MAX_WAIT_S = 300

#: One thing an observer is told: a control event without an id
#: ``("observer" | "history-start" | "history-end" | "lagged", data)``, a batch
#: of stream events, or a heartbeat (``None``). :func:`observer_items` yields
#: them in groups: everything one wake-up has to say, written at once.
Item = tuple[str, dict[str, Any]] | Batch | None


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _wait_seconds(args: Any) -> float | None:
    raw = args.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError("'wait' must be a number of seconds.") from None
    if not 0 < value <= MAX_WAIT_S:  # also refuses NaN
        raise ValidationError(f"'wait' must be greater than 0 and at most {MAX_WAIT_S}.")
    return value


def _find(session_id: str, wait: float | None) -> Stream | None:
    """The stream to observe; 404 when there is none and the caller will not wait."""
    svc = services()
    if svc.store.get_session(session_id) is None:
        raise session_not_found()
    stream = svc.observations.latest(session_id)
    if stream is None and wait is None:
        raise ApiError(
            "No active streaming session found for observation",
            status=404,
            error_code="SESSION_NOT_ACTIVE",
        )
    return stream


async def observer_items(
    observations: ObservationManager,
    session_id: str,
    stream: Stream | None,
    wait: float | None,
    interval: float,
) -> AsyncGenerator[list[Item], None]:
    """Everything an observer is told, in order, until ``done`` (or the wait runs out).

    ``observer`` (waiting → connected), ``history-start``, the replay,
    ``history-end``, the live tail. A reader that falls a whole ring behind
    is told ``lagged {"skipped": N}`` and continues from the oldest buffered
    event: it never slows the producer or any other reader. Each yielded
    list is one wake-up's worth, to be written in one go.
    """
    if stream is None:
        yield [("observer", {"status": "waiting", "sessionId": session_id})]
        with trio.move_on_after(wait or 0):
            stream = await observations.wait_for_stream(session_id)
        if stream is None:
            yield [("observer", {"status": "timeout", "sessionId": session_id})]
            return
    with stream.reader(0) as reader:
        count, from_id = reader.backlog()
        history_end = reader.history_end
        head: list[Item] = [
            (
                "observer",
                {
                    "status": "connected",
                    "sessionId": stream.group,
                    "streamingSessionId": stream.stream_id,
                    "observers": stream.observers,
                },
            ),
            ("history-start", {"count": count, "fromId": from_id}),
        ]
        if history_end > 0:
            # Take the history now, before anything can yield: the reader's
            # first batch is exactly it, and a fast producer could otherwise
            # overwrite announced events while the head is being written.
            # (Nothing to take only if the ring was released already.)
            with suppress(trio.WouldBlock, trio.EndOfChannel):
                head.append(reader.next_batch_nowait())
        head.append(("history-end", {"lastId": history_end}))
        yield head
        async with aclosing(paced(reader, interval)) as batches:
            async for batch in batches:
                group: list[Item] = []
                if batch is not None and batch.skipped:
                    group.append(("lagged", {"skipped": batch.skipped}))
                group.append(batch)
                yield group


WAIT = Param(
    "wait",
    {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S},
    description="Seconds to wait for a stream to start, instead of 404.",
)


@bp.get("/api/chat/sessions/<session_id>/observe")
@authenticated("supervisor")
@operation(
    "Watch a session's live stream: history, then the live tail (SSE)",
    params=(WAIT,),
    produces=EVENT_STREAM,
    description="The same feed as one JSON text frame per event: WebSocket "
    "/api/chat/sessions/{session_id}/observe/ws (?token= or Authorization).",
)
async def observe(session_id: str) -> Response:
    svc = services()
    wait = _wait_seconds(request.args)
    stream = _find(session_id, wait)
    items = observer_items(
        svc.observations, session_id, stream, wait, svc.settings.sse_heartbeat_ms / 1000
    )
    return sse_response(_as_sse(items))


async def _as_sse(items: AsyncGenerator[list[Item], None]) -> AsyncIterator[bytes]:
    yield b": connected\n\n"
    async with aclosing(items) as groups:
        async for group in groups:
            yield b"".join(
                heartbeat()
                if item is None
                else encode_event(None, item[0], _dumps(item[1]))
                if isinstance(item, tuple)
                else item.wire
                for item in group
            )


@bp.websocket("/api/chat/sessions/<session_id>/observe/ws")
async def observe_ws(session_id: str) -> None:
    """The same feed, one JSON text frame per event: ``{"event", "id", "data"}``.

    Auth: the ``Authorization`` header, or ``?token=`` for browsers (which
    cannot set headers on a WebSocket). Refusals are plain JSON HTTP errors,
    sent before the upgrade is accepted.
    """
    svc = services()
    token = websocket.args.get("token")
    authenticate(
        "supervisor", websocket.headers.get("Authorization") or (f"Bearer {token}" if token else "")
    )
    wait = _wait_seconds(websocket.args)
    stream = _find(session_id, wait)
    await websocket.accept()
    items = observer_items(
        svc.observations, session_id, stream, wait, svc.settings.sse_heartbeat_ms / 1000
    )
    async with aclosing(items) as groups:
        async for group in groups:
            for item in group:
                for frame in _ws_frames(item):
                    await websocket.send(frame)
    await websocket.close(1000)


def _ws_frames(item: Item) -> list[str]:
    """One JSON text frame per event: ``{"event", "id", "data"}``."""
    if item is None:
        ms = int(datetime.now(UTC).timestamp() * 1000)
        return [f'{{"event":"heartbeat","id":null,"data":{{"ts":{ms}}}}}']
    if isinstance(item, tuple):
        return [_dumps({"event": item[0], "id": None, "data": item[1]})]
    # e.data is JSON text already: embed it, do not re-encode.
    return [f'{{"event":"{e.name}","id":{e.id},"data":{e.data}}}' for e in item.events]


@bp.get("/api/chat/streams/active")
@authenticated("supervisor")
@operation("The live streams")
async def active_streams() -> dict[str, Any]:
    svc = services()
    return {
        "streams": [
            {
                "sessionId": run.session_id,
                "streamingSessionId": run.stream_id,
                "userId": run.user_id,
                "modelId": run.model.id,
                "startedAt": datetime.fromtimestamp(run.started_at, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "observers": run.stream.observers,
            }
            for run in svc.hub.live()
        ]
    }
