"""Streaming a model answer over SSE (SPEC §5): start, resume, finalize."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, Protocol

import trio
from hypercorn.typing import ASGISendCallable
from quart import Blueprint, Response, request

from observation import Batch, Reader, Stream

from ..context import authenticated, camel_message, principal, services
from ..errors import ApiError, Conflict, NotFound, ValidationError
from ..models import resolve
from ..push import serve_push
from ..run import StreamRun
from ..sse import (
    CONNECTED,
    ConnectionReset,
    EventStream,
    encode_event,
    heartbeat,
    sse_response,
)
from ..timers import Alarm, Timers
from ..validate import (
    EVENT_STREAM,
    MAX_INT,
    Body,
    Int,
    Loose,
    Num,
    Param,
    Text,
    integer,
    operation,
)
from .chat import MODEL_ID, message_text, owned_session
from .controls import TEST_CONTROLS, Controls, read_controls

bp = Blueprint("stream", __name__)


LAST_EVENT_ID = Param(
    "Last-Event-ID",
    {"type": "string", "pattern": "^[0-9]{0,12}$"},
    where="header",
    description="Replay the events after this id (or ?lastEventId=).",
)
RESUME_PARAMS = (
    Param("streamingSessionId", {"type": "string", "maxLength": 200}),
    Param("lastEventId", {"type": "string", "pattern": "^[0-9]{0,12}$"}),
    LAST_EVENT_ID,
)
START = Body(
    {
        "message": message_text(),
        "modelId": MODEL_ID,
        "maxTokens": Int(1, MAX_INT, description="At most the model's maxTokens."),
        "temperature": Num(0.0, 1.0),
    }
)
UPDATE = Body(
    {
        "streamingSessionId": Loose(
            "The X-Streaming-Session-Id of the stream; anything else is a 400 "
            "STREAMING_SESSION_MISMATCH."
        ),
        "completeResponse": Text(1_000_000),
        "tokensUsed": Int(0, 2**31),
    }
)


def lagged(reader: Reader, after_id: int) -> bytes:
    """``event: lagged`` ``{"skipped": N}`` for the events after ``after_id`` that the
    ring no longer holds (a resume older than the ring), as an observer is told."""
    skipped = reader.backlog()[1] - (after_id + 1)
    return encode_event(None, "lagged", f'{{"skipped":{skipped}}}') if skipped > 0 else b""


def push_response(run: StreamRun, stream: Stream, *, after_id: int) -> EventStream:
    """The SSE response of a run of this node: the run writes it (:mod:`server.push`).

    ``: connected`` (and ``lagged`` for a resume older than the ring) is
    flushed before the run is told its client is there (it waits for that
    before it calls upstream); ``after_id`` as for a reader.
    """
    svc = services()
    interval = svc.settings.sse_heartbeat_ms / 1000
    connected = getattr(stream.info, "connected", CONNECTED)
    scope = request.scope

    async def serve(send: ASGISendCallable) -> None:
        with stream.reader(after_id, primary=True) as reader:
            head = connected + lagged(reader, after_id)
            try:
                await send({"type": "http.response.body", "body": head, "more_body": True})
            except BaseException:
                run.detach()  # gone before it attached: the run must not wait for it
                raise
            await serve_push(run, reader, send, interval=interval, timers=svc.timers, scope=scope)

    return EventStream(serve, {"X-Streaming-Session-Id": stream.stream_id}, unserved=run.detach)


def stream_response(run: StreamRun, controls: Controls) -> Response:
    """The SSE response of a new stream: its client is the run's primary reader."""
    if controls.scenario != "reset_midway":
        return push_response(run, run.stream, after_id=0)
    # Half the answer (the simulated model's length, else maxTokens), then the
    # connection is cut: the response's own task reads the ring and cuts it.
    settings = services().settings
    length = min(run.request.max_tokens, settings.sim_answer_tokens)
    cut_after = max(1, length // 2)
    feed = client_feed(
        run,
        run.stream,
        after_id=0,
        interval=services().settings.sse_heartbeat_ms / 1000,
        connected=run.dialect.connected,
        cut_after=cut_after,
        timers=services().timers,
    )
    return sse_response(feed, {"X-Streaming-Session-Id": run.stream_id}, unserved=run.detach)


@bp.post("/api/chat/sessions/<session_id>/stream")
@authenticated()
@operation(
    "Send a message and stream the answer (SSE: chunk, heartbeat, error, done)",
    body=START,
    params=TEST_CONTROLS,
    produces=EVENT_STREAM,
)
async def start_stream(session_id: str, body: dict[str, Any]) -> Response:
    svc = services()
    session = await owned_session(session_id)
    text: str = body["message"]
    model = resolve(svc.catalog, body["modelId"], default=session["model_id"])
    max_tokens = integer(body, "maxTokens", minimum=1, maximum=model.max_tokens)
    temperature = body["temperature"]
    controls = read_controls()
    run = await svc.hub.start(
        principal(),
        session,
        text,
        model,
        max_tokens=max_tokens,
        temperature=temperature,
        scenario=controls.scenario,
        pace=controls.pace,
        streaming=True,
    )
    return stream_response(run, controls)


class Attachable(Protocol):
    """The run a client feed reads: told when its client attaches and goes away."""

    def attach(self) -> None: ...

    def detach(self) -> None: ...


async def client_feed(
    run: Attachable | None,
    stream: Stream,
    *,
    after_id: int,
    interval: float,
    timers: Timers,
    connected: bytes = CONNECTED,
    cut_after: int | None = None,
) -> AsyncIterator[bytes]:
    """The client's own response: the run's primary reader, plus heartbeats.

    The comment ``: connected`` is flushed before the run may call upstream
    (the run waits for this reader to attach). Everything pending is written
    in one chunk per wake-up. When the client goes away Hypercorn cancels
    this generator; its ``finally`` detaches, which aborts the run (after the
    disconnect grace, if any). With ``cut_after`` (``reset_midway``), the
    connection is cut right after that event, with no terminating chunk, as
    a crashed proxy would: for the run that is a disconnect like any other.
    """
    try:
        with stream.reader(after_id, primary=True) as reader:
            # A client gone before it attached is told too (finally).
            yield connected + lagged(reader, after_id)
            if run is not None:
                run.attach()
            # paced(), inlined: this loop runs once per event of every stream.
            next_beat = trio.current_time() + interval
            park_until = timers.park_until
            alarm = Alarm()  # one heap entry per heartbeat, not one per event

            def park(lot: Any) -> Awaitable[bool]:
                return park_until(lot, next_beat, alarm)

            while True:
                try:
                    batch = await reader.next_batch_or(park)
                except trio.EndOfChannel:
                    return
                if batch is None:
                    next_beat += interval
                    yield heartbeat()
                elif cut_after is not None and batch.events[-1].id >= cut_after:
                    yield b"".join(e.wire for e in batch.events if e.id <= cut_after)
                    raise ConnectionReset
                else:
                    yield batch.wire
    finally:
        if run is not None:
            run.detach()


async def paced(
    reader: Reader, interval: float, timers: Timers | None = None
) -> AsyncGenerator[Batch | None, None]:
    """The reader's batches, and ``None`` whenever a heartbeat is due.

    Heartbeats keep a fixed period (every ``interval`` seconds) whether or not
    events flow. Waiting for a batch is cancel-safe: the cursor moves only
    when a batch is returned, so a heartbeat deadline never loses an event.
    With the process's ``timers``, a wait is "the next event or the next
    heartbeat" in one park, without a cancel scope per wait. Ends when the
    stream has ended and everything was delivered.
    """
    next_beat = trio.current_time() + interval
    if timers is None:
        while True:
            batch = None
            with trio.move_on_at(next_beat):
                try:
                    batch = await reader.next_batch()
                except trio.EndOfChannel:
                    return
            if batch is None:
                next_beat += interval
            yield batch

    park_until = timers.park_until
    alarm = Alarm()

    def park(lot: Any) -> Awaitable[bool]:
        return park_until(lot, next_beat, alarm)

    while True:
        try:
            batch = await reader.next_batch_or(park)
        except trio.EndOfChannel:
            return
        if batch is None:
            next_beat += interval
        yield batch


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID", request.args.get("lastEventId", "0")).strip() or "0"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:  # not "²" nor "١٢"
        raise ValidationError("Last-Event-ID must be a non-negative integer.")
    return int(raw)


@bp.get("/api/chat/sessions/<session_id>/stream")
@authenticated()
@operation(
    "Resume a stream: replay after Last-Event-ID, then live",
    params=RESUME_PARAMS,
    produces=EVENT_STREAM,
)
async def resume_stream(session_id: str) -> Response:
    """Resume (SPEC §5.4): replay after Last-Event-ID from the ring, then live."""
    svc = services()
    session_id = (await owned_session(session_id))["id"]
    stream_id = request.args.get("streamingSessionId", "")
    after = _last_event_id()
    stream = None
    if stream_id:  # cluster mode: a stream of another node is mirrored here
        stream = await svc.link.stream(stream_id) if svc.link else svc.observations.get(stream_id)
    if stream is None or stream.group != session_id:
        raise NotFound(
            "Streaming session not found or no longer buffered.", error_code="STREAM_NOT_FOUND"
        )
    if stream.primary_attached:
        raise Conflict(
            "This stream already has a connected client.", error_code="STREAM_ALREADY_ACTIVE"
        )
    local = svc.hub.for_stream(stream_id)
    if local is not None and local.stream is stream:
        return push_response(local, stream, after_id=after)
    run: Attachable | None = local
    if run is None and svc.link is not None and not stream.ended:
        run = await svc.link.remote_run(stream_id)  # its node lifts the disconnect deadline
    interval = svc.settings.sse_heartbeat_ms / 1000
    connected = getattr(stream.info, "connected", CONNECTED)
    return sse_response(
        client_feed(
            run,
            stream,
            after_id=after,
            interval=interval,
            connected=connected,
            timers=svc.timers,
        ),
        {"X-Streaming-Session-Id": stream_id},
        unserved=None if run is None else run.detach,
    )


@bp.post("/api/chat/sessions/<session_id>/update-stream")
@authenticated()
@operation("Finalize a stream: its message as the server stored it", body=UPDATE)
async def update_stream(session_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Finalize (SPEC §5.3): the server's own record is authoritative; idempotent."""
    svc = services()
    session_id = (await owned_session(session_id))["id"]
    stream_id = body["streamingSessionId"]
    message = (
        await svc.db.store.message_by_stream(stream_id)
        if isinstance(stream_id, str) and stream_id
        else None
    )
    if message is None or message["session_id"] != session_id:
        raise ApiError(
            "Streaming session ID mismatch", status=400, error_code="STREAMING_SESSION_MISMATCH"
        )
    if message["status"] == "streaming":
        raise Conflict("The stream is still in progress.", error_code="STREAM_IN_PROGRESS")
    out = camel_message(message)
    return {"message": out}
