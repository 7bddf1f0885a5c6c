"""Supervisors watching live streams (SPEC §6) and the list of live streams."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response, request

from observation import ObservationManager, Stream

from ..context import authenticated, services
from ..errors import ApiError, ValidationError, session_not_found
from ..sse import encode_event, heartbeat, sse_response
from .stream import paced

bp = Blueprint("observe", __name__)

MAX_WAIT_S = 300


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _wait_seconds() -> float | None:
    raw = request.args.get("wait")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError("'wait' must be a number of seconds.") from None
    if not 0 < value <= MAX_WAIT_S or value != value:
        raise ValidationError(f"'wait' must be greater than 0 and at most {MAX_WAIT_S}.")
    return value


def _session_or_404(session_id: str) -> None:
    if services().store.get_session(session_id) is None:
        raise session_not_found()


@bp.get("/api/chat/sessions/<session_id>/observe")
@authenticated("supervisor")
async def observe(session_id: str) -> Response:
    svc = services()
    wait = _wait_seconds()
    _session_or_404(session_id)
    stream = svc.observations.latest(session_id)
    if stream is None and wait is None:
        raise ApiError("No active streaming session found for observation", status=404,
                       error_code="SESSION_NOT_ACTIVE")
    interval = svc.settings.sse_heartbeat_ms / 1000
    return sse_response(observer_feed(svc.observations, session_id, stream, wait, interval))


async def observer_feed(
    observations: ObservationManager,
    session_id: str,
    stream: Stream | None,
    wait: float | None,
    interval: float,
) -> AsyncIterator[bytes]:
    """The observer's SSE body (runs outside the app context: everything is passed in)."""
    yield b": connected\n\n"
    if stream is None:
        yield encode_event(None, "observer", _dumps({"status": "waiting", "sessionId": session_id}))
        with trio.move_on_after(wait or 0):
            stream = await observations.wait_for_stream(session_id)
        if stream is None:
            yield encode_event(None, "observer", _dumps({"status": "timeout", "sessionId": session_id}))
            return
    async for chunk in observe_stream(stream, interval):
        yield chunk


async def observe_stream(stream: Stream, interval: float) -> AsyncIterator[bytes]:
    """``observer``, ``history-start``, the replay, ``history-end``, then live to ``done``.

    The replayed and live events are the very bytes the client got (encoded
    once, at publish). An observer that falls a whole ring behind is told
    ``lagged {"skipped": N}`` and continues from the oldest buffered event;
    it never slows the producer or anyone else.
    """
    with stream.reader(0) as reader:
        count, from_id = reader.backlog()
        history_end = reader.history_end
        head = encode_event(None, "observer", _dumps({
            "status": "connected", "sessionId": stream.group,
            "streamingSessionId": stream.stream_id, "observers": stream.observers,
        })) + encode_event(None, "history-start", _dumps({"count": count, "fromId": from_id}))
        in_history = history_end > 0
        if not in_history:
            head += _history_end(0)
        yield head
        async for batch in paced(reader, interval):
            if batch is None:
                yield heartbeat()
                continue
            out = batch.wire
            if batch.skipped:
                out = encode_event(None, "lagged", _dumps({"skipped": batch.skipped})) + out
            if in_history and reader.position >= history_end:
                # The first batch is exactly the history (the reader guarantees it).
                in_history = False
                out += _history_end(history_end)
            yield out


def _history_end(last_id: int) -> bytes:
    return encode_event(None, "history-end", _dumps({"lastId": last_id}))


@bp.get("/api/chat/streams/active")
@authenticated("supervisor")
async def active_streams() -> dict[str, Any]:
    svc = services()
    streams = []
    for run in svc.hub.live():
        streams.append({
            "sessionId": run.session_id,
            "streamingSessionId": run.stream_id,
            "userId": run.user_id,
            "modelId": run.model.id,
            "startedAt": run.started_at,
            "observers": run.stream.observers,
        })
    return {"streams": streams}
