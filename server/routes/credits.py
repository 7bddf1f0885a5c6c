"""The ledger over HTTP (SPEC §3). The arithmetic lives in :mod:`ledger`."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, request

import ledger

from ..context import authenticated, principal, services, user_scope
from ..errors import NotFound, ValidationError
from ..models import resolve
from ..validate import (
    MAX_INT,
    PAGINATION,
    Body,
    Int,
    Param,
    Text,
    operation,
    paginated,
    pagination,
)

bp = Blueprint("credits", __name__)

DEFAULT_CHECK_TOKENS = 1000


def balance_body(b: ledger.Balance) -> dict[str, Any]:
    return {
        "userId": b.account_id,
        "balance": b.balance,
        "reserved": b.reserved,
        "available": b.available,
    }


async def _account(user_id: str) -> str:
    svc = services()
    if await svc.db.store.user_by_id(user_id) is None and not await svc.db.ledger.has_account(
        user_id
    ):
        raise NotFound("User not found.", error_code="USER_NOT_FOUND")
    await svc.db.ledger.open_account(user_id)
    return user_id


USER_ID = Param("userId", {"type": "string", "maxLength": 100}, description="Staff only.")
ALLOCATE = Body(
    {
        "userId": Text(100),
        "username": Text(100, description="Instead of userId."),
        "credits": Int(1, MAX_INT, required=True),
        "reason": Text(500),
        "idempotencyKey": Text(200, min_len=1, description="A repeat allocates once."),
    }
)
CHECK = Body(
    {
        "modelId": Text(200, required=True),
        "estimatedTokens": Int(0, 10_000_000, description="Default 1,000."),
    }
)


@bp.get("/api/credits/balance")
@authenticated()
@operation("A balance: the caller's, or ?userId= for staff", params=(USER_ID,))
async def balance() -> dict[str, Any]:
    user_id = await _account(user_scope(request.args.get("userId")))
    return balance_body(await services().db.ledger.balance(user_id))


@bp.post("/api/credits/allocate")
@authenticated("admin")
@operation("Allocate credits to a user", body=ALLOCATE)
async def allocate(body: dict[str, Any]) -> dict[str, Any]:
    svc = services()
    user_id, username = body["userId"], body["username"]
    credits: int = body["credits"]
    reason, key = body["reason"], body["idempotencyKey"]
    if user_id is None and username is None:
        raise ValidationError("'userId' or 'username' is required.")
    user = (
        await svc.db.store.user_by_id(user_id)
        if user_id
        else await svc.db.store.user_by_name(username or "")
    )
    if user is None:
        raise NotFound("User not found.", error_code="USER_NOT_FOUND")
    if user_id and username is not None and user["username"] != username:
        # Both given: they must name one user (credits never go to a guess).
        named = await svc.db.store.user_by_name(username)
        if named is None:
            raise NotFound("User not found.", error_code="USER_NOT_FOUND")
        raise ValidationError("'userId' and 'username' name different users.")
    await svc.db.ledger.open_account(user["id"])
    b = await svc.db.ledger.allocate(user["id"], credits, reason=reason, idempotency_key=key)
    return {"userId": b.account_id, "balance": b.balance, "available": b.available}


@bp.post("/api/credits/check")
@authenticated()
@operation("Could the caller afford a call?", body=CHECK)
async def check(body: dict[str, Any]) -> dict[str, Any]:
    """Could the caller afford ``estimatedTokens`` tokens (input + output) of ``modelId``?

    Priced conservatively, all at the model's output rate; default 1,000 tokens.
    """
    svc = services()
    model = resolve(svc.catalog, body["modelId"])
    tokens = body["estimatedTokens"]
    required = model.price.cost(0, DEFAULT_CHECK_TOKENS if tokens is None else tokens)
    user_id = await _account(principal().user_id)
    sufficient, available = await svc.db.ledger.check(user_id, required)
    return {"sufficient": sufficient, "available": available, "required": required}


@bp.get("/api/credits/usage")
@authenticated()
@operation("Ledger entries: the caller's, or ?userId= for staff", params=(USER_ID, *PAGINATION))
async def usage() -> dict[str, Any]:
    user_id = await _account(user_scope(request.args.get("userId")))
    page, limit, window = pagination()
    entries, total = await services().db.ledger.entries(
        user_id, offset=window.offset, limit=window.limit
    )
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
