"""``POST /api/auth/login`` and ``GET /api/auth/me``."""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, request

from ..auth import DUMMY_HASH, verify_password
from ..context import authenticated, principal, services
from ..errors import ApiError, TooMany
from ..limits import retry_after
from ..validate import Body, Text, operation

bp = Blueprint("auth", __name__)


LOGIN = Body({"username": Text(100, required=True), "password": Text(1000, required=True)})


@bp.post("/api/auth/login")
@operation("Log in: a bearer token for the user (no auth needed)", body=LOGIN)
async def login(body: dict[str, Any]) -> dict[str, Any]:
    svc = services()
    username: str = body["username"]
    password: str = body["password"]
    # Brute-force bound: the same limiter, keyed by client address.
    wait = await svc.rate_limit(f"login:{request.remote_addr}")
    if wait:
        raise TooMany(headers={"Retry-After": retry_after(wait)})
    user = await svc.db.store.user_by_name(username)
    # scrypt costs ~20 ms of CPU: run it in a thread so the event loop keeps streaming.
    stored = user["password_hash"] if user else DUMMY_HASH
    ok = await trio.to_thread.run_sync(verify_password, password, stored)
    if user is None or not ok:
        raise ApiError(
            "Invalid username or password.", status=401, error_code="INVALID_CREDENTIALS"
        )
    token = svc.tokens.mint(user["id"], user["username"], user["role"])
    return {
        "accessToken": token,
        "tokenType": "Bearer",
        "expiresIn": svc.tokens.ttl_s,
        "user": {"id": user["id"], "username": user["username"], "role": user["role"]},
    }


@bp.get("/api/auth/me")
@authenticated()
@operation("The caller's own user")
async def me() -> dict[str, Any]:
    user = await services().db.store.user_by_id(principal().user_id)
    if user is None:  # external-IdP token for a user we do not store
        who = principal()
        return {"id": who.user_id, "username": who.username, "email": None, "role": who.role}
    return {
        "id": user["id"],
        "username": user["username"],
        "email": user["email"],
        "role": user["role"],
    }
