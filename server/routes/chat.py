"""Chat sessions and their messages (SPEC §4), for their owner."""

from __future__ import annotations

import re
from typing import Any

from quart import Blueprint

from ..context import authenticated, camel_message, camel_session, principal, services
from ..endings import ServerShutdown, StreamCancelled
from ..errors import ApiError, Conflict, session_not_found
from ..models import resolve
from ..providers.base import ProviderError
from ..validate import PAGINATION, Body, ClientId, Text, operation, paginated, pagination
from .controls import TEST_CONTROLS, read_controls

bp = Blueprint("chat", __name__)

MESSAGE_MAX = 4000


#: A session's name in the v1 API (``/api/v1/chat``'s ``sessionId``), kept per user.
SESSION_KEY = re.compile(r"^session-[0-9]{8}-[0-9]{6}-[A-Za-z0-9]{4}\Z")


async def owned_session(session_id: str) -> dict[str, Any]:
    """The caller's session — by id, or by its v1 name — or 404 SESSION_NOT_FOUND
    (also for others' sessions)."""
    store, user_id = services().db.store, principal().user_id
    row: dict[str, Any] | None = await store.get_session(session_id, user_id)
    if row is None and SESSION_KEY.match(session_id):
        row = await store.session_by_key(user_id, session_id)
    if row is None:
        raise session_not_found()
    return row


def message_text(*, required: bool = True) -> Text:
    return Text(MESSAGE_MAX, min_len=1, not_blank=True, required=required)


MODEL_ID = Text(200, description="A model id of GET /api/models.")
NEW_SESSION = Body(
    {
        "title": Text(200),
        "initialMessage": message_text(required=False),
        "modelId": MODEL_ID,
        "source": Text(50, min_len=1),
        "id": ClientId(),
    },
    optional=True,
)
NEW_MESSAGE = Body({"message": message_text(), "modelId": MODEL_ID})
RENAME = Body({"title": Text(200, min_len=1, required=True, not_blank=True)})


@bp.post("/api/chat/sessions")
@authenticated()
@operation("Create a chat session", body=NEW_SESSION, status=201)
async def create_session(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    svc = services()
    title = body["title"]
    initial = body["initialMessage"]
    model = resolve(svc.catalog, body["modelId"])
    source = body["source"] or "web"
    chosen = body["id"]
    if not title:
        title = (initial[:50] + ("…" if len(initial) > 50 else "")) if initial else "New chat"
    who = principal()
    row = await svc.db.store.create_session(
        who.user_id, session_id=chosen, title=title, model_id=model.id, source=source
    )
    if row is None:
        raise ApiError(
            "A session with this id already exists.", status=409, error_code="SESSION_EXISTS"
        )
    if initial:
        await svc.db.store.add_message(
            row["id"], who.user_id, role="user", content=initial, model_id=model.id
        )
    return camel_session(row), 201


@bp.get("/api/chat/sessions")
@authenticated()
@operation("The caller's sessions, newest first", params=PAGINATION)
async def list_sessions() -> dict[str, Any]:
    page, limit, window = pagination()
    rows, total = await services().db.store.list_sessions(principal().user_id, window)
    return paginated("sessions", [camel_session(r) for r in rows], total, page, limit)


async def full_session(row: dict[str, Any], *, staff: bool = False) -> dict[str, Any]:
    """The session with its messages; staff also see why a supervisor stopped one."""
    messages, _ = await services().db.store.list_messages(row["id"])
    out = [camel_message(m) for m in messages]
    if staff:
        for shown, m in zip(out, messages, strict=True):
            shown["cancelReason"] = m.get("cancel_reason")
    return {**camel_session(row), "messages": out}


@bp.get("/api/chat/sessions/<session_id>")
@authenticated()
@operation("One of the caller's sessions, with its messages")
async def get_session(session_id: str) -> dict[str, Any]:
    return await full_session(await owned_session(session_id))


@bp.patch("/api/chat/sessions/<session_id>")
@authenticated()
@operation("Rename one of the caller's sessions", body=RENAME)
async def rename_session(session_id: str, body: dict[str, Any]) -> dict[str, Any]:
    session_id = (await owned_session(session_id))["id"]
    row = await services().db.store.rename_session(session_id, body["title"])
    if row is None:  # deleted meanwhile
        raise session_not_found()
    return camel_session(row)


@bp.delete("/api/chat/sessions/<session_id>")
@authenticated()
@operation("Delete a session (a live stream on it ends first)")
async def delete_session(session_id: str) -> dict[str, Any]:
    svc = services()
    session_id = (await owned_session(session_id))["id"]
    # A live stream on it ends first (persisted and settled), then the rows go.
    if svc.link is not None:  # wherever in the cluster it runs
        await svc.link.end_session(session_id)
    else:
        await svc.hub.end_session_streams(session_id)
    await svc.db.store.delete_session(session_id)
    return {"deleted": True, "sessionId": session_id}


@bp.get("/api/chat/sessions/<session_id>/messages")
@authenticated()
@operation("A session's messages, oldest first", params=PAGINATION)
async def list_messages(session_id: str) -> dict[str, Any]:
    session_id = (await owned_session(session_id))["id"]
    page, limit, window = pagination()
    rows, total = await services().db.store.list_messages(session_id, window)
    return paginated("messages", [camel_message(r) for r in rows], total, page, limit)


@bp.post("/api/chat/sessions/<session_id>/messages")
@authenticated()
@operation(
    "Send a message; the answer comes back whole (no streaming)",
    body=NEW_MESSAGE,
    params=TEST_CONTROLS,
)
async def post_message(session_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Non-streaming: the same stream machinery, answered when it is done."""
    svc = services()
    session = await owned_session(session_id)
    text: str = body["message"]
    model = resolve(svc.catalog, body["modelId"], default=session["model_id"])
    controls = read_controls()  # as the stream route reads them (SPEC §8)
    run = await svc.hub.start(
        principal(),
        session,
        text,
        model,
        max_tokens=None,
        temperature=None,
        scenario=controls.scenario,
        pace=controls.pace,
    )
    outcome = await run.result()
    if outcome.error is not None:
        raise _failed(outcome.error)
    return {
        "userMessage": camel_message(outcome.user_message),
        "assistantMessage": camel_message(outcome.assistant_message),
        "tokensUsed": outcome.input_tokens + outcome.output_tokens,
        "creditsCharged": outcome.credits_charged,
    }


def _failed(error: ProviderError) -> ApiError:
    """A whole answer that did not complete: 500 for our own failure; 409
    ``STREAM_CANCELLED`` if a supervisor stopped it and 503
    ``SERVER_SHUTTING_DOWN`` if the server is stopping (what a stream's client
    is told, SPEC §6.1); else 503 ``UPSTREAM_UNAVAILABLE`` (SPEC §2) with the
    upstream's code in ``details``. What was produced is stored either way."""
    if error.error_code == "INTERNAL_ERROR":
        return ApiError(error.user_message, status=500, error_code="INTERNAL_ERROR")
    if isinstance(error, StreamCancelled):
        return Conflict(error.user_message, error_code=error.error_code)
    if isinstance(error, ServerShutdown):
        return ApiError(
            error.user_message,
            status=503,
            error_code=error.error_code,
            headers={"Retry-After": "1"},
        )
    return ApiError(
        error.user_message,
        status=503,
        error_code="UPSTREAM_UNAVAILABLE",
        details=[{"upstreamErrorCode": error.error_code}],
        headers={"Retry-After": "2"},
    )
