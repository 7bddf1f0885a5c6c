"""Chat sessions and their messages (SPEC §4), for their owner."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from ..context import authenticated, camel_message, camel_session, principal, services
from ..errors import ApiError, session_not_found
from ..models import resolve
from ..validate import client_id, json_body, paginated, pagination, string

bp = Blueprint("chat", __name__)

MESSAGE_MAX = 4000


def owned_session(session_id: str) -> dict[str, Any]:
    """The caller's session, or 404 SESSION_NOT_FOUND (also for others' sessions)."""
    row = services().store.get_session(session_id, principal().user_id)
    if row is None:
        raise session_not_found()
    return row


def message_text(
    body: dict[str, Any], name: str = "message", *, required: bool = True
) -> str | None:
    return string(body, name, required=required, min_len=1, max_len=MESSAGE_MAX, not_blank=True)


@bp.post("/api/chat/sessions")
@authenticated()
async def create_session() -> tuple[dict[str, Any], int]:
    svc = services()
    body = await json_body(allow_empty=True)
    title = string(body, "title", max_len=200)
    initial = message_text(body, "initialMessage", required=False)
    model = resolve(svc.catalog, body.get("modelId"))
    source = string(body, "source", max_len=50, min_len=1) or "web"
    chosen = client_id(body["id"]) if body.get("id") is not None else None
    if not title:
        title = (initial[:50] + ("…" if len(initial) > 50 else "")) if initial else "New chat"
    who = principal()
    row = svc.store.create_session(
        who.user_id, session_id=chosen, title=title, model_id=model.id, source=source
    )
    if row is None:
        raise ApiError(
            "A session with this id already exists.", status=409, error_code="SESSION_EXISTS"
        )
    if initial:
        svc.store.add_message(
            row["id"], who.user_id, role="user", content=initial, model_id=model.id
        )
    return camel_session(row), 201


@bp.get("/api/chat/sessions")
@authenticated()
async def list_sessions() -> dict[str, Any]:
    page, limit, window = pagination()
    rows, total = services().store.list_sessions(principal().user_id, window)
    return paginated("sessions", [camel_session(r) for r in rows], total, page, limit)


def full_session(row: dict[str, Any]) -> dict[str, Any]:
    messages, _ = services().store.list_messages(row["id"])
    return {**camel_session(row), "messages": [camel_message(m) for m in messages]}


@bp.get("/api/chat/sessions/<session_id>")
@authenticated()
async def get_session(session_id: str) -> dict[str, Any]:
    return full_session(owned_session(session_id))


@bp.delete("/api/chat/sessions/<session_id>")
@authenticated()
async def delete_session(session_id: str) -> dict[str, Any]:
    svc = services()
    owned_session(session_id)
    # A live stream on it ends first (persisted and settled), then the rows go.
    await svc.hub.end_session_streams(session_id)
    svc.store.delete_session(session_id)
    return {"deleted": True, "sessionId": session_id}


@bp.get("/api/chat/sessions/<session_id>/messages")
@authenticated()
async def list_messages(session_id: str) -> dict[str, Any]:
    owned_session(session_id)
    page, limit, window = pagination()
    rows, total = services().store.list_messages(session_id, window)
    return paginated("messages", [camel_message(r) for r in rows], total, page, limit)


@bp.post("/api/chat/sessions/<session_id>/messages")
@authenticated()
async def post_message(session_id: str) -> dict[str, Any]:
    """Non-streaming: the same stream machinery, answered when it is done."""
    svc = services()
    session = owned_session(session_id)
    body = await json_body()
    text = message_text(body)
    assert text is not None
    model = resolve(svc.catalog, body.get("modelId"), default=session["model_id"])
    run = svc.hub.start(
        principal(), session, text, model, max_tokens=None, temperature=None, scenario=None
    )
    outcome = await run.result()
    if outcome.error is not None:
        raise ApiError(outcome.error.user_message, status=503, error_code=outcome.error.error_code)
    return {
        "userMessage": camel_message(outcome.user_message),
        "assistantMessage": camel_message(outcome.assistant_message),
        "tokensUsed": outcome.input_tokens + outcome.output_tokens,
        "creditsCharged": outcome.credits_charged,
    }
