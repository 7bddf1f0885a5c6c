"""Supervisors watching live streams (SPEC §6), over SSE and WebSocket, and the
list of live streams.

One source, :func:`observe_feed`, says what an observer is told; the SSE
and WebSocket routes only render it. Replayed and live events are the very
bytes the client got (encoded once, at publish).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.typing import ASGISendCallable
from quart import Blueprint, Response, request, websocket

from observation import Batch, ObservationManager, Reader, Stream

from ..context import authenticate, authenticated, services
from ..errors import ApiError, ValidationError, session_not_found
from ..sse import CONNECTED, EventStream, encode_event, heartbeat
from ..timers import Alarm, Timers
from ..validate import EVENT_STREAM, Param, operation

if TYPE_CHECKING:
    from ..clustering import ClusterLink

#: A mirror's gap filler (server.cluster.mirror.GAP; spelled here so that a single
#: process never imports the cluster package).
GAP = "chinwag:gap"


bp = Blueprint("observe", __name__)

MAX_WAIT_S = 300

#: One thing an observer is told: a control event without an id
#: ``("observer" | "history-start" | "history-end" | "lagged", data)``, a batch
#: of stream events, or a heartbeat (``None``). :func:`observe_feed` tells
#: them in groups: everything one wake-up has to say, written at once.
Item = tuple[str, dict[str, Any]] | Batch | None
#: Writes one wake-up's worth to the observer: a list of items, or a bare batch.
Tell = Callable[[list[Item] | Batch], Awaitable[None]]


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


async def _find(session_id: str, wait: float | None) -> Stream | None:
    """The stream to observe; 404 when there is none and the caller will not wait."""
    svc = services()
    if await svc.db.store.get_session(session_id) is None:
        raise session_not_found()
    if svc.link is not None:  # cluster mode: the newest stream anywhere, mirrored here
        stream = await svc.link.latest(session_id)
    else:
        stream = svc.observations.latest(session_id)
    if stream is None and wait is None:
        raise ApiError(
            "No active streaming session found for observation",
            status=404,
            error_code="SESSION_NOT_ACTIVE",
        )
    return stream


class Beats:
    """One response's heartbeat schedule: a beat due every ``interval`` seconds.

    Fixed when the response opens and kept across the wait and the attach, so
    the period stays steady whatever the observer is doing; a beat sent late
    does not shift the ones after it.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.due = trio.current_time() + interval

    def sent(self) -> None:
        """A heartbeat went out: the next is due one period after this one was."""
        self.due += self.interval


async def observe_feed(
    tell: Tell,
    observations: ObservationManager,
    session_id: str,
    stream: Stream | None,
    wait: float | None,
    interval: float,
    timers: Timers | None = None,
    link: ClusterLink | None = None,
) -> None:
    """Tell an observer everything, in order, until ``done`` (or the wait runs out).

    ``observer`` (waiting → connected), ``history-start``, the replay,
    ``history-end``, the live tail, and heartbeats (``None``) every
    ``interval`` seconds from the first item on — also while waiting for a
    stream to start (that wait is bounded by a cancel scope: one per
    heartbeat, only until a stream starts). A reader that falls a whole ring
    behind is told ``lagged {"skipped": N}`` and continues from the oldest
    buffered event: it never slows the producer or any other reader. Each
    call of ``tell`` is one wake-up's worth, to be written in one go: a
    list of items, or (the live tail's usual case) a bare :class:`Batch`.

    ``tell`` is called, not yielded to: no generator stands between the
    reader and the response's writes, which this runs once per event for
    every observer. Cancelled, it leaves the stream detached at once.
    """
    beats = Beats(interval)
    if stream is None:
        await tell([("observer", {"status": "waiting", "sessionId": session_id})])
        give_up = trio.current_time() + (wait or 0)
        while True:
            until = min(beats.due, give_up)
            if link is not None:  # cluster mode: a stream may start on any node
                stream = await link.wait_for_stream(session_id, until)
            else:
                stream = await _next_stream(observations, session_id, until)
            if stream is not None:
                break
            if trio.current_time() >= give_up:
                await tell([("observer", {"status": "timeout", "sessionId": session_id})])
                return
            beats.sent()
            await tell([None])
    # Cluster mode: the count is the cluster's, whichever node answers (SPEC §9).
    elsewhere = await link.observers_elsewhere(stream.stream_id) if link is not None else 0
    with stream.reader(0) as reader:
        await tell(_head(stream, reader, elsewhere))
        # The live tail, one wake-up per call of ``tell``, with heartbeats on
        # ``beats``' schedule. Waiting is cancel-safe: the cursor moves only
        # when a batch is returned, so a heartbeat never loses an event. With
        # the process's ``timers`` a wait is "the next event or the next
        # heartbeat" in one park, without a cancel scope per wait (as the
        # client's own feed waits). Ends when the stream has ended and
        # everything was delivered.
        next_batch = _waiter(reader, beats, timers)
        while True:
            try:
                batch = await next_batch()
            except trio.EndOfChannel:
                return
            if batch is None:
                beats.sent()
                await tell([None])
            elif batch.skipped:
                await tell([("lagged", {"skipped": batch.skipped}), batch])
            else:
                await tell(batch)


async def _next_stream(
    observations: ObservationManager, session_id: str, until: float
) -> Stream | None:
    """The session's stream once one has started; None if none has by ``until``.

    A stream that started while the caller was away (writing a heartbeat)
    counts: the session had none when the observer came, so any it has now
    is new. Checking and waiting are synchronous up to the wait, so no
    start can slip between them.
    """
    stream = observations.latest(session_id)
    if stream is None:
        with trio.move_on_at(until):
            stream = await observations.wait_for_stream(session_id)
    return stream


def _head(stream: Stream, reader: Reader, elsewhere: int = 0) -> list[Item]:
    """``observer`` connected, ``history-start``, the replay and ``history-end``;
    ``elsewhere``: the stream's observers on other nodes."""
    count, from_id = reader.backlog()
    history_end = reader.history_end
    head: list[Item] = [
        (
            "observer",
            {
                "status": "connected",
                "sessionId": stream.group,
                "streamingSessionId": stream.stream_id,
                "observers": stream.observers + elsewhere,
            },
        ),
        ("history-start", {"count": count, "fromId": from_id}),
    ]
    if history_end > 0:
        # Take the history now, before anything can yield: the reader's
        # first batch is exactly it, and a fast producer could otherwise
        # overwrite announced events while the head is being written.
        # (Nothing to take only if the ring was released with no ending kept.)
        with suppress(trio.WouldBlock, trio.EndOfChannel):
            head.append(reader.next_batch_nowait())
    head.append(("history-end", {"lastId": history_end}))
    return head


def _waiter(
    reader: Reader, beats: Beats, timers: Timers | None
) -> Callable[[], Awaitable[Batch | None]]:
    """The reader's next batch, or None when ``beats`` is due; EndOfChannel once all is read."""
    if timers is not None:
        park_until = timers.park_until
        alarm = Alarm()  # this feed's heartbeat: one heap entry per heartbeat, not per event

        def park(lot: Any) -> Awaitable[bool]:
            return park_until(lot, beats.due, alarm)

        return partial(reader.next_batch_or, park)

    async def next_batch() -> Batch | None:
        with trio.move_on_at(beats.due):
            return await reader.next_batch()
        return None

    return next_batch


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
    stream = await _find(session_id, wait)
    feed = partial(
        observe_feed,
        observations=svc.observations,
        session_id=session_id,
        stream=stream,
        wait=wait,
        interval=svc.settings.sse_heartbeat_ms / 1000,
        timers=svc.timers,
        link=svc.link,
    )

    async def serve(send: ASGISendCallable) -> None:
        async def tell(group: list[Item] | Batch) -> None:
            wire = group.wire if isinstance(group, Batch) else _sse_bytes(group)
            await send({"type": "http.response.body", "body": wire, "more_body": True})

        await send({"type": "http.response.body", "body": CONNECTED, "more_body": True})
        await feed(tell)

    return EventStream(serve)


def _sse_bytes(group: list[Item]) -> bytes:
    return b"".join(
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
    await authenticate(
        "supervisor", websocket.headers.get("Authorization") or (f"Bearer {token}" if token else "")
    )
    wait = _wait_seconds(websocket.args)
    stream = await _find(session_id, wait)
    await websocket.accept()

    async def tell(group: list[Item] | Batch) -> None:
        for item in [group] if isinstance(group, Batch) else group:
            for frame in _ws_frames(item):
                await websocket.send(frame)

    await observe_feed(
        tell,
        svc.observations,
        session_id,
        stream,
        wait,
        svc.settings.sse_heartbeat_ms / 1000,
        timers=svc.timers,
        link=svc.link,
    )
    await websocket.close(1000)


def _ws_frames(item: Item) -> list[str]:
    """One JSON text frame per event: ``{"event", "id", "data"}``."""
    if item is None:
        ms = int(datetime.now(UTC).timestamp() * 1000)
        return [f'{{"event":"heartbeat","id":null,"data":{{"ts":{ms}}}}}']
    if isinstance(item, tuple):
        return [_dumps({"event": item[0], "id": None, "data": item[1]})]
    # e.data is JSON text already: embed it, do not re-encode. A mirror's gap
    # fillers (cluster mode) are nothing, but the last of a gap: `lagged`.
    return [
        f'{{"event":"{e.name}","id":{e.id},"data":{e.data}}}'
        if e.name != GAP
        else f'{{"event":"lagged","id":null,"data":{e.data}}}'
        for e in item.events
        if e.name != GAP or e.data
    ]


@bp.get("/api/chat/streams/active")
@authenticated("supervisor")
@operation("The live streams")
async def active_streams() -> dict[str, Any]:
    svc = services()
    if svc.link is not None:  # the whole cluster's
        rows = await svc.link.active()
        for row in rows:
            row["startedAt"] = _iso(row["startedAt"])
        return {"streams": rows}
    return {
        "streams": [
            {
                "sessionId": run.session_id,
                "streamingSessionId": run.stream_id,
                "userId": run.user_id,
                "modelId": run.model.id,
                "startedAt": _iso(run.started_at),
                "observers": run.stream.observers,
                "node": svc.settings.node_id,
            }
            for run in svc.hub.live()
        ]
    }


def _iso(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )
