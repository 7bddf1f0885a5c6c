"""The ledger over HTTP (SPEC §3). The arithmetic lives in :mod:`ledger`."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, request

import ledger

from ..context import authenticated, principal, services, user_scope
from ..errors import NotFound, ValidationError
from ..models import resolve
from ..validate import MAX_INT, integer, json_body, paginated, pagination, string

bp = Blueprint("credits", __name__)

DEFAULT_CHECK_TOKENS = 1000


def balance_body(b: ledger.Balance) -> dict[str, Any]:
    return {
        "userId": b.account_id,
        "balance": b.balance,
        "reserved": b.reserved,
        "available": b.available,
    }


def _account(user_id: str) -> str:
    svc = services()
    if svc.store.user_by_id(user_id) is None and not svc.ledger.has_account(user_id):
        raise NotFound("User not found.", error_code="USER_NOT_FOUND")
    svc.ledger.open_account(user_id)
    return user_id


@bp.get("/api/credits/balance")
@authenticated()
async def balance() -> dict[str, Any]:
    user_id = _account(user_scope(request.args.get("userId")))
    return balance_body(services().ledger.balance(user_id))


@bp.post("/api/credits/allocate")
@authenticated("admin")
async def allocate() -> dict[str, Any]:
    svc = services()
    body = await json_body()
    user_id = string(body, "userId", max_len=100)
    username = string(body, "username", max_len=100)
    credits = integer(body, "credits", required=True, minimum=1, maximum=MAX_INT)
    reason = string(body, "reason", max_len=500)
    key = string(body, "idempotencyKey", min_len=1, max_len=200)
    if user_id is None and username is None:
        raise ValidationError("'userId' or 'username' is required.")
    user = svc.store.user_by_id(user_id) if user_id else svc.store.user_by_name(username or "")
    if user is None:
        raise NotFound("User not found.", error_code="USER_NOT_FOUND")
    assert credits is not None
    svc.ledger.open_account(user["id"])
    b = svc.ledger.allocate(user["id"], credits, reason=reason, idempotency_key=key)
    return {"userId": b.account_id, "balance": b.balance, "available": b.available}


@bp.post("/api/credits/check")
@authenticated()
async def check() -> dict[str, Any]:
    """Could the caller afford ``estimatedTokens`` tokens (input + output) of ``modelId``?

    Priced conservatively, all at the model's output rate; default 1,000 tokens.
    """
    svc = services()
    body = await json_body()
    model = resolve(svc.catalog, string(body, "modelId", required=True, max_len=200))
    tokens = integer(body, "estimatedTokens", minimum=0, maximum=10_000_000)
    required = model.price.cost(0, DEFAULT_CHECK_TOKENS if tokens is None else tokens)
    user_id = _account(principal().user_id)
    sufficient, available = svc.ledger.check(user_id, required)
    return {"sufficient": sufficient, "available": available, "required": required}


@bp.get("/api/credits/usage")
@authenticated()
async def usage() -> dict[str, Any]:
    user_id = _account(user_scope(request.args.get("userId")))
    page, limit, window = pagination()
    entries, total = services().ledger.entries(user_id, offset=window.offset, limit=window.limit)
    items = [
        {
            "id": e.id,
            "kind": e.kind,
            "amount": e.amount,
            "modelId": e.model_id,
            "streamingSessionId": e.streaming_session_id,
            "reason": e.reason,
            "inputTokens": e.input_tokens,
            "outputTokens": e.output_tokens,
            "createdAt": e.created_at,
        }
        for e in entries
    ]
    return paginated("entries", items, total, page, limit)
