"""``create_app(settings)``: the Quart-Trio app, its services and its lifespan.

Lifespan: the store and ledger open when the app is created (so a bad DB
fails fast); at start-up the ledger releases reservations a dead process
left open and the store marks messages a crash cut as interrupted. The
long-lived services (observation sweeper, stream hub, provider) are tasks
owned by quart-trio's app nursery, started with ``nursery.start`` so the
app serves only once they are ready.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from quart import Response, g, jsonify, request, websocket
from quart.typing import ResponseTypes
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

import ledger
from observation import FanOut, ObservationManager

from .auth import TokenService
from .context import Services
from .db import Db
from .errors import (
    ApiError,
    NotFound,
    ValidationError,
    from_ledger,
    session_not_found,
    unavailable,
)
from .limits import RateLimiter
from .models import Catalog
from .providers import open_provider
from .retention import run_retention
from .serving import TIMER_PER_PASS
from .settings import Settings
from .sse import Connection, encode_event, event_data, quiet_resets
from .storage import SessionGone, StoreUnavailable, open_store
from .streams import StreamHub
from .telemetry import Telemetry
from .timers import Lot, Timers

log = logging.getLogger("chinwag")
access_log = logging.getLogger("chinwag.access")

#: Timer deadlines are rounded up to this grid, so waiters due together wake in one pass.
TIMER_GRID_S = 0.005
#: Observers let through per scheduler pass, at most (observation.fanout): ~70 µs of
#: writes each, so a pass stays within a few milliseconds however many observe.
#: 1,000 observers (bench_observe.py, BENCHMARKS.md): at 64 a join took 463 ms (p50)
#: and the client's lateness p99 was 51 ms; at 32, 276 / 24 ms; at 16, 193 / 21 ms.
WAKE_PER_PASS = 16

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")

_HTTP_CODES = {
    404: ("NOT_FOUND", "No such endpoint."),
    405: ("METHOD_NOT_ALLOWED", "That method is not allowed on this endpoint."),
    413: ("PAYLOAD_TOO_LARGE", "The request body is too large."),
}


def create_app(settings: Settings, *, recover: bool = True) -> QuartTrio:
    """The app. ``recover``: release what a dead process left at start-up — only
    outside cluster mode, where this process owns the database alone (in cluster
    mode the survivors recover a dead node's streams, server.cluster.nodes)."""
    settings = settings.with_secret()
    quiet_resets(logging.getLogger("hypercorn.error"))  # reset_midway is not an error
    app = QuartTrio("chinwag")
    app.asgi_http_class = Connection  # SSE bodies written through ASGI send (server.sse)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        BODY_TIMEOUT=60,
        PROVIDE_AUTOMATIC_OPTIONS=True,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keys in the documented order
    # "/api//chat" is not a route: Werkzeug would answer an HTML 308 to the merged
    # path, built from the Host header; the JSON 404 is what every other miss gets.
    app.url_map.merge_slashes = False
    store = open_store(settings.database)
    book = ledger.open_ledger(settings.database)
    # Cluster mode: other processes may write the same SQLite file (see Db.open).
    db = Db.open(settings.database, store, book, shared=bool(settings.redis_url))
    # One timer service paces every simulated stream and every reader's
    # heartbeat: one heap, no cancel scope per wait (DESIGN.md §2).
    timers = Timers(grid=TIMER_GRID_S, per_pass=TIMER_PER_PASS)
    encode: Callable[[int, str, str], bytes] = encode_event
    if settings.redis_url:  # a mirrored stream's gaps are told as `lagged` (server.cluster.mirror)
        from .cluster import mirror_encoder

        encode = mirror_encoder(encode_event)
    # Many observers of one stream are woken a slice per scheduler pass, so a
    # publish never makes one pass as long as all their writes (observation.fanout).
    fanout = FanOut(per_pass=WAKE_PER_PASS)
    observations = ObservationManager(
        ring_size=settings.observe_ring,
        linger=settings.stream_buffer_ms / 1000,
        encode=encode,
        decode=event_data,  # the rings keep each event's wire bytes, not its data too
        wakeup_lot=Lot,
        fanout=fanout,
    )
    telemetry = Telemetry()
    svc = Services(
        settings=settings,
        store=store,
        ledger=book,
        db=db,
        tokens=TokenService(
            settings.jwt_secret, ttl_s=settings.jwt_ttl_s, public_key=settings.jwt_public_key
        ),
        catalog=Catalog.load(settings.models_file),
        limiter=RateLimiter(settings.rate_limit),
        observations=observations,
        hub=StreamHub(settings, db, observations, telemetry),
        telemetry=telemetry,
        timers=timers,
    )
    app.extensions["chinwag"] = svc

    services_scope = trio.CancelScope()
    services_done = trio.Event()

    async def run_services(*, task_status: trio.TaskStatus[None]) -> None:
        """Owns the long-lived services; ends when ``after_serving`` cancels it."""
        try:
            with services_scope:
                async with AsyncExitStack() as stack:
                    if settings.redis_url:
                        # Cluster mode: the Redis client (and its own task group) opens
                        # around the services and closes after them. A dead node's
                        # streams are recovered by a survivor (server.cluster.nodes),
                        # never by a start-up sweep that would release the other
                        # nodes' live reservations.
                        await stack.enter_async_context(_join_cluster(svc))
                    async with trio.open_nursery() as nursery:
                        await nursery.start(db.run)  # first: recovery and every stream write
                        if recover and svc.link is None:
                            await _recover(db)
                        await nursery.start(timers.run)
                        svc.provider = await nursery.start(_provider_service, settings, timers)
                        svc.hub.provider = svc.provider
                        await nursery.start(fanout.run)
                        await nursery.start(observations.run)
                        await nursery.start(svc.hub.run)
                        if svc.link is not None:
                            await nursery.start(svc.link.run)
                        if settings.retention_days > 0:
                            await nursery.start(run_retention, db, svc.hub, settings.retention_days)
                        task_status.started()
        finally:
            services_done.set()

    @app.before_serving
    async def start_services() -> None:
        await app.nursery.start(run_services)

    @app.after_serving
    async def stop_services() -> None:
        # Runs still going end as "shutdown", persisted and settled, before the DB closes.
        with trio.move_on_after(settings.shutdown_grace_ms / 1000):
            await svc.hub.shutdown()
        if svc.link is not None:
            await svc.link.leave()
        services_scope.cancel()
        with trio.move_on_after(5):
            await services_done.wait()
        db.close()
        store.close()
        book.close()

    _install_request_hooks(app, settings)
    _install_error_handlers(app)
    if settings.redis_url:
        from .cluster import ClusterUnavailable
        from .clustering import busy

        @app.errorhandler(ClusterUnavailable)
        async def cluster_unavailable(exc: ClusterUnavailable) -> Response:
            log.warning("Redis unavailable: %s", exc)  # the URL in it is masked
            response = jsonify(busy(exc).body())
            response.status_code = 503
            response.headers["Retry-After"] = str(exc.retry_after)
            return response

    from .routes import register

    register(app)
    return app


@asynccontextmanager
async def _join_cluster(svc: Services) -> AsyncIterator[None]:
    """Open the Redis side of cluster mode (raises ``ClusterUnavailable`` if Redis is down)."""
    from .cluster import open_cluster
    from .clustering import ClusterLink
    from .dialects import CHAT, DIALECTS

    async with open_cluster(
        svc.settings, svc.observations, info_for=lambda name: DIALECTS.get(name, CHAT)
    ) as cluster:
        svc.link = svc.hub.link = ClusterLink(
            cluster,
            settings=svc.settings,
            hub=svc.hub,
            db=svc.db,
            catalog=svc.catalog,
            observations=svc.observations,
        )
        # A stream ended without its run leaves the cluster's live list then.
        svc.hub.abandoned.on_ended = svc.link.finished
        yield


async def _recover(db: Db) -> None:
    """What a dead process left: open reservations released, cut messages interrupted."""
    released = await db.ledger.recover()
    cut = await db.store.recover_streaming()
    if released or cut:
        log.warning(
            "recovered after an unclean stop: %d reservations released, "
            "%d messages marked interrupted",
            released,
            cut,
        )


async def _provider_service(
    settings: Settings,
    timers: Timers,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Owns the provider (for Bedrock: its one aiobotocore client) for the app's life."""
    async with open_provider(settings, timers) as provider:
        task_status.started(provider)
        await trio.sleep_forever()


def _refuse_nul(path: str, query: bytes, view_args: dict[str, Any] | None) -> None:
    """No id or value holds NUL, and PostgreSQL's text cannot take one (a lookup
    would fail as a database error): such a path names nothing, such a query is
    bad input."""
    if "\x00" in path:
        args = view_args or {}
        if "\x00" in args.get("session_id", ""):
            raise session_not_found()
        raise NotFound()
    if b"%00" in query or b"\x00" in query:
        raise ValidationError("The query string must not hold NUL characters.")


def _request_id(incoming: str) -> str:
    """The client's ``X-Request-Id`` if it is a sane one, else a new one."""
    return incoming if _REQUEST_ID.match(incoming) else f"req_{secrets.token_hex(8)}"


def _install_request_hooks(app: QuartTrio, settings: Settings) -> None:
    origins = settings.cors_origins

    @app.before_request
    async def assign_request_id() -> None:
        g.request_id = _request_id(request.headers.get("X-Request-Id", ""))
        g.t0 = time.perf_counter()
        _refuse_nul(request.path, request.query_string, request.view_args)

    # A WebSocket's handshake is a request too: the same id, the same refusals.
    @app.before_websocket
    async def assign_websocket_id() -> None:
        g.request_id = _request_id(websocket.headers.get("X-Request-Id", ""))
        _refuse_nul(websocket.path, websocket.query_string, websocket.view_args)

    @app.after_websocket
    async def finish_websocket(response: ResponseTypes | None) -> ResponseTypes | None:
        if response is not None:  # refused before the upgrade: a plain HTTP answer
            response.headers["X-Request-Id"] = getattr(g, "request_id", None) or (
                f"req_{uuid.uuid4().hex[:16]}"
            )
        return response

    @app.after_request
    async def finish(response: Response) -> Response:
        # The objects behind the proxies, looked up once each (not once per use).
        req = request._get_current_object()  # type: ignore[attr-defined]
        ctx = g._get_current_object()
        request_id = getattr(ctx, "request_id", None) or f"req_{uuid.uuid4().hex[:16]}"
        headers = response.headers
        headers["X-Request-Id"] = request_id
        who = getattr(ctx, "principal", None)
        method, path, status = req.method, req.path, response.status_code
        t0 = getattr(ctx, "t0", None)
        line = functools.partial(
            access_log.info,
            "%s %s %s",
            method,
            path,
            status,
            extra={
                "fields": {
                    "requestId": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "userId": who.user_id if who else None,
                    # For SSE this is the time to the headers; the stream goes on.
                    "ms": 0.0 if t0 is None else round((time.perf_counter() - t0) * 1000, 3),
                }
            },
        )
        # Logged once this response's first bytes are out: the log's writer thread,
        # woken by the line, would otherwise take the GIL from the loop during
        # that first send (~0.2-0.5 ms of every request's first byte, probed).
        try:
            trio.lowlevel.current_trio_token().run_sync_soon(line)
        except trio.RunFinishedError:  # pragma: no cover - the loop is ending
            line()
        if not getattr(ctx, "body_read", False) and (
            req.content_length or "chunked" in req.headers.get("Transfer-Encoding", "")
        ):
            # Refused (401, 404, 413...) before its body was read: close, or
            # the unread rest of it would stall the next request on this
            # keep-alive connection.
            headers["Connection"] = "close"
        if not origins:
            return response
        origin = req.headers.get("Origin")
        # With "*" every response says so, Origin or not (as seed 002's clients expect).
        if "*" in origins or (origin and origin in origins):
            headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            if "*" not in origins:
                headers["Vary"] = "Origin"
            headers["Access-Control-Expose-Headers"] = (
                "X-Streaming-Session-Id, X-Request-Id, X-Chat-Session-Id"
            )
            if method == "OPTIONS":
                headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
                headers["Access-Control-Allow-Headers"] = req.headers.get(
                    "Access-Control-Request-Headers",
                    "Authorization, Content-Type, X-Request-Id, Last-Event-ID",
                )
                headers["Access-Control-Max-Age"] = "600"
        return response


def _install_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        response = jsonify(exc.body())
        response.status_code = exc.status
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(ledger.LedgerError)
    async def ledger_error(exc: ledger.LedgerError) -> Response:
        return await api_error(from_ledger(exc))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code, message = _HTTP_CODES.get(status, ("BAD_REQUEST", "The request is not valid."))
        if status == 400:
            code = "VALIDATION_ERROR"
        response = jsonify({"message": message, "errorCode": code})
        response.status_code = status
        return response

    @app.errorhandler(SessionGone)
    async def session_gone(exc: SessionGone) -> Response:
        return await api_error(session_not_found())  # deleted while this request ran

    @app.errorhandler(StoreUnavailable)
    async def store_unavailable(exc: StoreUnavailable) -> Response:
        log.warning("store unavailable: %s", exc)  # the URL in it is masked
        return await api_error(unavailable())

    try:
        import psycopg
    except ImportError:  # pragma: no cover - it is a dependency
        pass
    else:

        @app.errorhandler(psycopg.Error)
        async def pg_error(exc: psycopg.Error) -> Response:
            log.exception("database error")  # psycopg's messages never carry the password
            return await api_error(unavailable())

    @app.errorhandler(sqlite3.Error)
    async def db_error(exc: sqlite3.Error) -> Response:
        log.exception("database error")
        response = jsonify(
            {
                "message": "The service is temporarily unavailable.",
                "errorCode": "SERVICE_UNAVAILABLE",
            }
        )
        response.status_code = 503
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception(
            "unhandled error on %s %s",
            request.method,
            request.path,
            extra={"fields": {"requestId": getattr(g, "request_id", None)}},
        )
        response = jsonify({"message": "Internal server error.", "errorCode": "INTERNAL_ERROR"})
        response.status_code = 500
        return response
