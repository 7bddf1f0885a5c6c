"""The HTTP error family: every failure a client sees is one of these.

``ApiError`` (status, errorCode, message) ─┬─ ``ValidationError``   400 VALIDATION_ERROR (+details)
                                            ├─ ``Unauthorized``      401 UNAUTHORIZED
                                            ├─ ``Forbidden``         403 FORBIDDEN
                                            ├─ ``NotFound``          404 <code>
                                            ├─ ``Conflict``          409 <code>
                                            └─ ``TooMany``           429 <code> (+Retry-After)

Handlers in :mod:`server.app` turn them into ``{"message", "errorCode"}``
JSON; anything else becomes a logged 500 ``INTERNAL_ERROR`` with no detail.
Ledger errors are mapped here, in one place (:func:`from_ledger`).
"""

from __future__ import annotations

from typing import Any

import ledger


class ApiError(Exception):
    status = 400
    error_code = "BAD_REQUEST"
    default_message = "The request could not be processed."

    def __init__(
        self,
        message: str | None = None,
        *,
        error_code: str | None = None,
        status: int | None = None,
        details: list[Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        if error_code is not None:
            self.error_code = error_code
        if status is not None:
            self.status = status
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "errorCode": self.error_code}
        if self.details:
            out["details"] = self.details
        return out


class ValidationError(ApiError):
    status = 400
    error_code = "VALIDATION_ERROR"
    default_message = "The request is not valid."


class Unauthorized(ApiError):
    status = 401
    error_code = "UNAUTHORIZED"
    default_message = "Authentication required."


class Forbidden(ApiError):
    status = 403
    error_code = "FORBIDDEN"
    default_message = "You do not have permission to do that."


class NotFound(ApiError):
    status = 404
    error_code = "NOT_FOUND"
    default_message = "Not found."


class Conflict(ApiError):
    status = 409
    error_code = "CONFLICT"
    default_message = "The request conflicts with the current state."


class TooMany(ApiError):
    status = 429
    error_code = "RATE_LIMITED"
    default_message = "Too many requests, please slow down."


def session_not_found() -> NotFound:
    # Same answer for "does not exist" and "belongs to someone else" (SPEC §2).
    return NotFound("Chat session not found.", error_code="SESSION_NOT_FOUND")


def unavailable() -> ApiError:
    """503: the database cannot be used right now; nothing was half done (SPEC §9)."""
    return ApiError(
        "The service is temporarily unavailable, please retry shortly.",
        status=503,
        error_code="SERVICE_UNAVAILABLE",
        headers={"Retry-After": "2"},
    )


def from_ledger(exc: ledger.LedgerError) -> ApiError:
    """Translate a ledger error into its HTTP form (the one mapping point)."""
    if isinstance(exc, ledger.LedgerUnavailable):
        return unavailable()
    if isinstance(exc, ledger.InsufficientCredits):
        return ApiError(
            f"Insufficient credits: {exc.needed} needed, {exc.available} available.",
            status=402,
            error_code="INSUFFICIENT_CREDITS",
        )
    if isinstance(exc, ledger.UnknownAccount):
        return NotFound("User not found.", error_code="USER_NOT_FOUND")
    if isinstance(exc, ledger.IdempotencyConflict):
        return Conflict(
            "This idempotency key was already used with a different amount or reason.",
            error_code="IDEMPOTENCY_CONFLICT",
        )
    if isinstance(exc, ledger.InvalidAmount):
        return ValidationError(str(exc) or "Invalid credit amount.")
    return ApiError("The ledger refused the operation.", status=409, error_code="LEDGER_CONFLICT")
