"""Supervisor/admin views of other users (SPEC §4)."""

from __future__ import annotations

import logging
from typing import Any

from quart import Blueprint, request

from ..context import authenticated, camel_session, principal, services
from ..errors import NotFound, session_not_found
from ..validate import PAGINATION, Body, Param, Text, operation, paginated, pagination
from .chat import full_session

bp = Blueprint("supervisor", __name__)
log = logging.getLogger("chinwag.supervisor")


SEARCH = (Param("q", {"type": "string"}, description="Part of a username or email."), *PAGINATION)


@bp.get("/api/chat/users/search")
@authenticated("supervisor")
@operation("Find users, with their session counts", params=SEARCH)
async def search_users() -> dict[str, Any]:
    q = request.args.get("q", "")[:100]
    page, limit, window = pagination()
    rows, total = await services().db.store.search_users(q, window)
    users = [
        {
            "id": r["id"],
            "username": r["username"],
            "email": r["email"],
            "role": r["role"],
            "sessionCount": r["session_count"],
        }
        for r in rows
    ]
    return paginated("users", users, total, page, limit)


async def _user(user_id: str) -> dict[str, Any]:
    user: dict[str, Any] | None = await services().db.store.user_by_id(user_id)
    if user is None:
        raise NotFound("User not found.", error_code="USER_NOT_FOUND")
    return user


@bp.get("/api/chat/users/<user_id>/sessions")
@authenticated("supervisor")
@operation("A user's sessions", params=PAGINATION)
async def user_sessions(user_id: str) -> dict[str, Any]:
    await _user(user_id)
    page, limit, window = pagination()
    rows, total = await services().db.store.list_sessions(user_id, window)
    return paginated("sessions", [camel_session(r) for r in rows], total, page, limit)


@bp.get("/api/chat/users/<user_id>/sessions/<session_id>")
@authenticated("supervisor")
@operation("One of a user's sessions, with its messages")
async def user_session(user_id: str, session_id: str) -> dict[str, Any]:
    await _user(user_id)
    row = await services().db.store.get_session(session_id, user_id)
    if row is None:
        raise session_not_found()
    return {**(await full_session(row, staff=True)), "userId": user_id}


STOP = Body(
    {"reason": Text(200, description="Kept with the message and in the logs.")}, optional=True
)


@bp.post("/api/chat/streams/<stream_id>/cancel")
@authenticated("supervisor")
@operation(
    "Stop a live stream: its client and every observer are told (SPEC §6.1)",
    body=STOP,
    description="Answers once the stream has ended, its message stored and its "
    "charge settled. finishReason is how it really ended: cancelled, or what it "
    "ended as on its own if it got there first.",
)
async def stop_stream(stream_id: str, body: dict[str, Any]) -> dict[str, Any]:
    who = principal()
    reason: str | None = body["reason"]
    log.info(
        "stream %s stopped by %s",
        stream_id,
        who.username,
        extra={"fields": {"streamingSessionId": stream_id, "by": who.user_id, "reason": reason}},
    )
    svc = services()
    if svc.link is not None:  # wherever in the cluster it runs
        finish = await svc.link.stop(stream_id, reason)
    else:
        finish = await svc.hub.stop(stream_id, reason)
    if finish is None:
        raise NotFound("No live stream with this id.", error_code="STREAM_NOT_FOUND")
    return {"streamingSessionId": stream_id, "finishReason": finish}
