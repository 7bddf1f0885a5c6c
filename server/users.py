"""Adding a user: the one operation behind ``chinwag user add`` and ``POST /api/users``.

:func:`new_user` checks the input and hashes the password (scrypt, ~20 ms
of CPU: an async caller runs it in a thread); :func:`save_user` stores the
user and opens their ledger account. :func:`add_user` is both, for callers
that may block (the CLI).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import ledger

from .auth import ROLES, Principal, Role, hash_password
from .storage import StoreBackend, UsernameTaken

__all__ = [
    "EMAIL_PATTERN",
    "MIN_PASSWORD",
    "USERNAME_PATTERN",
    "InvalidUser",
    "NewUser",
    "UserExists",
    "add_user",
    "new_user",
    "public_user",
    "save_user",
]

USERNAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+$"
MIN_PASSWORD = 8
MAX_PASSWORD = 1000  # what POST /api/auth/login accepts
MAX_EMAIL = 254


class InvalidUser(ValueError):
    """The input names ``field`` and says what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class UserExists(Exception):
    def __init__(self, username: str) -> None:
        super().__init__(f"user {username!r} already exists")
        self.username = username


@dataclass(frozen=True, slots=True)
class NewUser:
    """A checked user, password already hashed: ready to be saved."""

    username: str
    password_hash: str
    role: Role
    email: str | None

    def __repr__(self) -> str:  # never the hash in a log line
        return f"NewUser({self.username!r}, role={self.role!r})"


def _role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise InvalidUser("role", f"'role' must be one of {', '.join(ROLES)}.")


def new_user(username: str, password: str, role: str, email: str | None = None) -> NewUser:
    """Check the input (raising :class:`InvalidUser`) and hash the password."""
    if not re.fullmatch(USERNAME_PATTERN, username):
        raise InvalidUser(
            "username", "'username' must be 1 to 64 letters, digits, '.', '_' or '-'."
        )
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidUser(
            "password", f"'password' must be {MIN_PASSWORD} to {MAX_PASSWORD} characters."
        )
    checked_role = _role(role)
    if email is not None and (len(email) > MAX_EMAIL or not re.fullmatch(EMAIL_PATTERN, email)):
        raise InvalidUser("email", "'email' must be an email address.")
    return NewUser(username, hash_password(password), checked_role, email)


def save_user(store: StoreBackend, book: ledger.LedgerBackend, user: NewUser) -> dict[str, Any]:
    """Store the user and open their ledger account; a taken name → :class:`UserExists`."""
    try:
        row = store.add_user(user.username, user.password_hash, user.role, user.email)
    except UsernameTaken:
        raise UserExists(user.username) from None
    book.open_account(row["id"])
    return public_user(row)


def add_user(
    store: StoreBackend,
    book: ledger.LedgerBackend,
    username: str,
    password: str,
    role: str,
    email: str | None = None,
) -> dict[str, Any]:
    """:func:`new_user` then :func:`save_user` (blocks for the hash)."""
    return save_user(store, book, new_user(username, password, role, email))


#: An external user's stored password hash: matches no password (they log in
#: at their identity provider, never at /api/auth/login).
NO_PASSWORD = "external$-$-"


def provision_external(
    store: StoreBackend, book: ledger.LedgerBackend, who: Principal
) -> dict[str, Any]:
    """The local user of an external identity provider's token (``sub`` is its
    id), made at its first request, with its (empty) ledger account: from then
    on it is a user like any other (sessions, credits an admin allocates).

    Its username is the token's ``username`` claim (or the ``sub``) where that
    is free and valid, else that name with the start of the ``sub`` appended.
    Two first requests at once: the second finds the first's row.
    """
    base = who.username if re.fullmatch(USERNAME_PATTERN, who.username or "") else ""
    base = base or re.sub(r"[^A-Za-z0-9._-]", "_", who.user_id)[:40] or "user"
    suffix = re.sub(r"[^A-Za-z0-9]", "", who.user_id)[:8] or "x"
    row: dict[str, Any] | None = None
    for name in (base, f"{base[:55]}-{suffix}"):
        try:
            row = store.add_user(name, NO_PASSWORD, who.role, None, user_id=who.user_id)
            break
        except UsernameTaken:
            row = store.user_by_id(who.user_id)
            if row is not None:  # made meanwhile
                break
    if row is None:
        raise UserExists(base)
    book.open_account(row["id"])
    return public_user(row)


def public_user(row: dict[str, Any]) -> dict[str, Any]:
    """What a client may see of a user: never the password hash."""
    return {
        "id": row["id"],
        "username": row["username"],
        "email": row["email"],
        "role": row["role"],
    }
