"""``POST /api/users`` (SPEC §3): the HTTP form of ``chinwag user add``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio
from quart import Blueprint

from ..auth import ROLES
from ..context import authenticated, services
from ..errors import Conflict, ValidationError
from ..users import (
    EMAIL_PATTERN,
    MAX_EMAIL,
    MAX_PASSWORD,
    MIN_PASSWORD,
    USERNAME_PATTERN,
    InvalidUser,
    UserExists,
    new_user,
    save_user,
)
from ..validate import Body, Text, operation, string

bp = Blueprint("users", __name__)


@dataclass(frozen=True)
class Matching:
    """A string that must match ``pattern`` (declared in the document as enforced)."""

    pattern: str
    max_len: int
    message: str
    required: bool = False
    description: str = ""

    def parse(self, body: Mapping[str, Any], name: str) -> str | None:
        value = string(body, name, required=self.required, max_len=self.max_len)
        if value is not None and not re.fullmatch(self.pattern, value):
            raise ValidationError(self.message, details=[{"field": name}])
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "string" if self.required else ["string", "null"],
            "maxLength": self.max_len,
            "pattern": self.pattern,
        }
        if self.description:
            out["description"] = self.description
        return out


NEW_USER = Body(
    {
        "username": Matching(
            USERNAME_PATTERN,
            64,
            "'username' must be 1 to 64 letters, digits, '.', '_' or '-'.",
            required=True,
            description="1 to 64 letters, digits, '.', '_' or '-'.",
        ),
        "password": Text(MAX_PASSWORD, min_len=MIN_PASSWORD, required=True),
        "role": Text(20, required=True, choices=ROLES),
        "email": Matching(EMAIL_PATTERN, MAX_EMAIL, "'email' must be an email address."),
    }
)


@bp.post("/api/users")
@authenticated("admin")
@operation("Add a user (the same operation as `chinwag user add`)", body=NEW_USER, status=201)
async def create_user(body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    svc = services()
    try:
        # scrypt costs ~20 ms of CPU: hash in a thread so the event loop keeps streaming.
        user = await trio.to_thread.run_sync(
            new_user, body["username"], body["password"], body["role"], body["email"]
        )
    except InvalidUser as exc:
        raise ValidationError(exc.message, details=[{"field": exc.field}]) from None
    try:
        created = await svc.db.write(save_user, user)
    except UserExists:
        raise Conflict(
            "A user with this username already exists.", error_code="USER_EXISTS"
        ) from None
    return created, 201
