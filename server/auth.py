"""Passwords, JWTs and roles.

- Passwords: scrypt (stdlib ``hashlib.scrypt``, n=2**14, r=8, p=1) with a
  per-user random salt; compared in constant time. Never stored or logged in
  clear.
- Tokens: HS256 with the server secret. When ``CHINWAG_JWT_PUBLIC_KEY`` is
  set, RS256/ES256 tokens signed by an external identity provider are
  accepted too. ``alg:none``, an unlisted algorithm, a bad signature, a
  missing claim or an expired token all fail the same way: 401.
- A verified token is remembered, by its exact text, until its ``exp``
  (at most :data:`VERIFIED_CACHE_SIZE` of them, oldest out first): a client
  that sends the same token on every request pays for the signature check
  once (~0.1 ms of the event loop's time per request otherwise). The
  expiry is checked on every use; any other token, a forged one included,
  is decoded and checked in full.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from .errors import Forbidden, Unauthorized

Role = Literal["enduser", "supervisor", "admin"]
ROLES: tuple[Role, ...] = ("enduser", "supervisor", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}

_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

#: How many verified tokens :class:`TokenService` remembers (see the module docstring).
VERIFIED_CACHE_SIZE = 4096


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
    except ValueError:
        return False
    candidate = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return hmac.compare_digest(candidate, digest)


#: The longest ``sub`` an external identity provider's token may carry.
MAX_EXTERNAL_ID = 128

# A hash of a random password, checked when the user does not exist, so that
# "no such user" and "wrong password" take the same time.
DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by the token."""

    user_id: str
    username: str
    role: Role
    #: Signed by an external identity provider (``CHINWAG_JWT_PUBLIC_KEY``),
    #: whose users become local users at their first request.
    external: bool = False

    def at_least(self, role: Role) -> bool:
        return _RANK[self.role] >= _RANK[role]

    @property
    def is_staff(self) -> bool:
        return self.at_least("supervisor")


class TokenService:
    def __init__(self, secret: str, *, ttl_s: int = 3600, public_key: str | None = None) -> None:
        if len(secret.encode()) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes")
        self._secret = secret
        self._public_key = public_key
        self.ttl_s = ttl_s
        #: token text -> (who, exp): tokens whose signature and claims were checked.
        self._verified: dict[str, tuple[Principal, float]] = {}

    def mint(self, user_id: str, username: str, role: Role) -> str:
        now = int(time.time())
        claims = {
            "sub": user_id,
            "username": username,
            "role": role,
            "iat": now,
            "exp": now + self.ttl_s,
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known[1]:
                return known[0]
            del self._verified[token]  # expired: decoding it again says so
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg == "HS256":
                claims = self._decode(token, self._secret, "HS256")
            elif alg in ("RS256", "ES256") and self._public_key:
                claims = self._decode(token, self._public_key, alg)
            else:
                raise Unauthorized("Invalid token.")
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired.") from None
        except jwt.PyJWTError:
            raise Unauthorized("Invalid token.") from None
        sub, username, role = claims.get("sub"), claims.get("username"), claims.get("role")
        if not isinstance(sub, str) or not sub or not isinstance(role, str) or role not in _RANK:
            raise Unauthorized("Invalid token.")
        try:  # PyJWT checked it is a number and not past; any number (10**400 too)
            expires = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            raise Unauthorized("Invalid token.") from None
        external = alg != "HS256"
        if external and (len(sub) > MAX_EXTERNAL_ID or not sub.isprintable()):
            raise Unauthorized("Invalid token.")  # it becomes a user id: keep it sane
        who = Principal(sub, username if isinstance(username, str) else "", role, external)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (who, expires)
        return who

    @staticmethod
    def _decode(token: str, key: str, alg: str) -> dict[str, Any]:
        return jwt.decode(token, key, algorithms=[alg], options={"require": ["sub", "exp", "role"]})


def bearer_token(header: str | None) -> str:
    if not header:
        raise Unauthorized("Missing bearer token.")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing bearer token.")
    return token.strip()


def require_role(principal: Principal, role: Role) -> None:
    if not principal.at_least(role):
        raise Forbidden()
