"""What a request handler can reach: the app's services and the caller.

``services()`` is the one way routes get at the store, the ledger, the
catalog, the provider and the stream hub; ``authenticated(role)`` is the one
place a route's JWT, role and rate limit are checked.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from quart import current_app, g, request

import ledger
from observation import ObservationManager

from .auth import Principal, Role, TokenService, bearer_token, require_role
from .db import Db
from .errors import Forbidden, TooMany, Unauthorized
from .limits import RateLimiter, retry_after
from .models import Catalog
from .providers.base import Provider
from .settings import Settings
from .storage import StoreBackend
from .telemetry import Telemetry
from .timers import Timers
from .users import UserExists, provision_external

if TYPE_CHECKING:
    from .clustering import ClusterLink
    from .streams import StreamHub

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(slots=True)
class Services:
    settings: Settings
    #: The backends themselves (synchronous; tests and tools). Request code uses ``db``.
    store: StoreBackend
    ledger: ledger.LedgerBackend
    db: Db
    tokens: TokenService
    catalog: Catalog
    limiter: RateLimiter
    observations: ObservationManager
    hub: StreamHub
    telemetry: Telemetry
    timers: Timers
    provider: Provider | None = None  # set once the provider service has started
    #: Cluster mode (CHINWAG_REDIS_URL): set once this process has joined the cluster.
    link: ClusterLink | None = None

    async def rate_limit(self, key: str) -> float:
        """0.0 to go ahead, else seconds to wait: cluster-wide in cluster mode."""
        if self.link is not None:
            return await self.link.rate(key)
        return self.limiter.take(key)


def services() -> Services:
    return current_app.extensions["chinwag"]  # type: ignore[no-any-return]


def principal() -> Principal:
    return g.principal  # type: ignore[no-any-return]


async def authenticate(role: Role, authorization: str | None = None) -> Principal:
    """Verify the bearer token, the role and the user's rate limit.

    ``authorization`` is the header value; by default the current request's.
    """
    svc = services()
    if authorization is None:
        authorization = request.headers.get("Authorization")
    who = svc.tokens.verify(bearer_token(authorization))
    if await svc.db.store.user_by_id(who.user_id) is None:
        if not who.external:
            # A token for a user that has been removed is no longer valid.
            raise Unauthorized("Invalid token.")
        # An external identity provider's user becomes a local one (sessions,
        # credits), at its first request.
        try:
            await svc.db.write(provision_external, who)
        except UserExists:
            raise Unauthorized("This identity's username is taken here.") from None
    require_role(who, role)
    wait = await svc.rate_limit(who.user_id)
    if wait:
        raise TooMany(
            "Rate limit exceeded, please slow down.",
            headers={"Retry-After": retry_after(wait)},
        )
    g.principal = who
    return who


def authenticated(
    role: Role = "enduser",
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    def decorate(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(handler)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            await authenticate(role)
            return await handler(*args, **kwargs)

        wrapper.__chinwag_role__ = role  # type: ignore[attr-defined]  # for server.openapi
        return wrapper

    return decorate


def user_scope(query_user: str | None) -> str:
    """Whose data: the caller's own, or ``?userId=`` for supervisor/admin."""
    who = principal()
    if query_user and query_user != who.user_id:
        if not who.is_staff:
            raise Forbidden()
        return query_user
    return who.user_id


def camel_session(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "sessionId": row["id"],
        "title": row["title"],
        "modelId": row["model_id"],
        "source": row["source"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
    }


def camel_message(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "role": row["role"],
        "content": row["content"],
        "modelId": row["model_id"],
        "status": row["status"],
        "tokensUsed": row["tokens_used"],
        "inputTokens": row["input_tokens"],
        "outputTokens": row["output_tokens"],
        "creditsCharged": row["credits_charged"],
        "streamingSessionId": row["streaming_session_id"],
        "createdAt": row["created_at"],
    }
