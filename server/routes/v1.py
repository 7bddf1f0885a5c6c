"""The "AI Chat API" of seed 002 (SPEC §8): ``POST /api/v1/chat`` and its token ping.

A v1 call is a stream like any other — same hub, ledger, caps, heartbeats,
disconnect rule, telemetry and fault scenarios; it can be observed, resumed
and stopped — spoken in the v1 dialect (:data:`server.dialects.V1`).

``sessionId`` (``session-YYYYMMDD-HHMMSS-xxxx``) is the client's own name for
a chat session. It is kept per user (``chat_sessions.client_key``): the same
name from two users is two sessions, and one user can never reach, or learn
of, another's. The session is created on first use and reused after; its
id (``X-Chat-Session-Id``) works with every ``/api/chat/sessions/…`` route,
and so does the name itself. Without ``sessionId`` each call is a new
session. A call refused before its stream starts (402, 409, 429…) leaves no
session behind.
"""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, Response

from .. import memory
from ..auth import Principal
from ..context import authenticated, principal, services
from ..dialects import V1
from ..errors import ValidationError
from ..models import ModelInfo, resolve
from ..run import CLEANUP_TIMEOUT_S
from ..validate import EVENT_STREAM, Body, Flag, Text, operation
from .chat import SESSION_KEY, message_text
from .controls import TEST_CONTROLS, read_controls
from .stream import stream_response

bp = Blueprint("v1", __name__)

CHAT = Body(
    {
        "message": message_text(),
        "sessionId": Text(
            64,
            description="session-YYYYMMDD-HHMMSS-xxxx: a session of the caller's, "
            "created on first use.",
        ),
        "useMemory": Flag(),
    }
)


def is_session_key(value: str) -> bool:
    return SESSION_KEY.match(value) is not None


@bp.post("/api/v1/chat")
@authenticated()
@operation(
    "One-shot chat stream in the seed's AI Chat API dialect (SSE: token, usage, done)",
    body=CHAT,
    params=TEST_CONTROLS,
    produces=EVENT_STREAM,
    description="`: Connected to chat stream`, then `token` {text}…, `usage` "
    "{tokens_in, tokens_out, cost_usd, model}, `done` {finish_reason}. A failure is one "
    "friendly `token` then `done` {finish_reason: error}. Headers as the session stream, "
    "plus X-Chat-Session-Id.",
)
async def chat(body: dict[str, Any]) -> Response:
    svc = services()
    who = principal()
    key: str | None = body["sessionId"]
    if key is not None and not is_session_key(key):
        raise ValidationError(
            "'sessionId' must look like session-YYYYMMDD-HHMMSS-xxxx.",
            details=[{"field": "sessionId"}],
        )
    text: str = body["message"]
    controls = read_controls()
    model = resolve(svc.catalog, None)
    session, created = await _session(who, key, text, model)
    try:
        model = resolve(svc.catalog, None, default=session["model_id"])
        context = None
        if body["useMemory"]:
            recall = await svc.db.read(
                lambda store, _: memory.recall(
                    store,
                    who.user_id,
                    text,
                    top_k=svc.settings.memory_top_k,
                    token_budget=svc.settings.memory_token_budget,
                    exclude_session=session["id"],
                )
            )
            context = memory.render_context(recall)
        run = await svc.hub.start(
            who,
            session,
            text,
            model,
            max_tokens=None,
            temperature=None,
            scenario=controls.scenario,
            pace=controls.pace,
            streaming=True,
            dialect=V1,
            context=context,
        )
    except BaseException:
        # Refused, or its caller left: leave nothing behind, but only what nobody
        # else uses (a concurrent call with the same sessionId may stream on it).
        if created and session["id"] not in svc.hub.busy_sessions():
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S):
                await svc.db.store.delete_session_if_unused(session["id"])
        raise
    response = stream_response(run, controls)
    response.headers["X-Chat-Session-Id"] = session["id"]
    return response


async def _session(
    who: Principal, key: str | None, text: str, model: ModelInfo
) -> tuple[dict[str, Any], bool]:
    """The caller's session named ``key`` (made if new), or a fresh one; and if made now."""
    store = services().db.store
    if key is not None:
        row = await store.session_by_key(who.user_id, key)
        if row is not None:
            return row, False
    title = text[:50] + ("…" if len(text) > 50 else "")
    row = await store.create_session(
        who.user_id, session_id=None, title=title, model_id=model.id, source="api", client_key=key
    )
    if row is None:  # the same name, created at this very moment by a concurrent call
        assert key is not None
        row = await store.session_by_key(who.user_id, key)
        if row is None:
            raise ValidationError(
                "'sessionId' could not be used.", details=[{"field": "sessionId"}]
            )
        return row, False
    return row, True


@bp.get("/api/v1/auth/ping")
@authenticated()
@operation("Check a token (the seed's clients call it before they stream)")
async def ping() -> dict[str, Any]:
    who = principal()
    return {"ok": True, "userId": who.user_id, "role": who.role}
