"""Login, /me, and every way a token can be bad (SPEC §2, §3)."""

from __future__ import annotations

import time

import jwt
import pytest

from tests.conftest import PASSWORD, SECRET, Harness


async def test_login_returns_a_token_that_works(client, harness):
    user = harness.user("supervisor", name="sue")
    r = await client.post("/api/auth/login", json={"username": "sue", "password": PASSWORD})
    assert r.status_code == 200
    body = await r.get_json()
    assert body["tokenType"] == "Bearer"
    assert body["expiresIn"] > 0
    assert body["user"] == {"id": user["id"], "username": "sue", "role": "supervisor"}
    claims = jwt.decode(body["accessToken"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == user["id"] and claims["role"] == "supervisor"
    me = await client.get(
        "/api/auth/me", headers={"Authorization": f"Bearer {body['accessToken']}"}
    )
    assert (await me.get_json()) == {
        "id": user["id"],
        "username": "sue",
        "email": "sue@example.com",
        "role": "supervisor",
    }


@pytest.mark.parametrize(
    "body",
    [
        {"username": "sue", "password": "wrong password"},
        {"username": "nobody", "password": PASSWORD},
    ],
)
async def test_bad_credentials_are_401_without_saying_which(client, harness, body):
    harness.user(name="sue")
    r = await client.post("/api/auth/login", json=body)
    assert r.status_code == 401
    assert await r.get_json() == {
        "message": "Invalid username or password.",
        "errorCode": "INVALID_CREDENTIALS",
    }


@pytest.mark.parametrize(
    "body", ["{not json", "[]", '{"username": 5, "password": "x"}', '{"username": "a"}']
)
async def test_malformed_login_is_400_json(client, body):
    r = await client.post(
        "/api/auth/login", data=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert (await r.get_json())["errorCode"] == "VALIDATION_ERROR"


def _token(claims: dict, key: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def _claims(user: dict, **over) -> dict:
    base = {"sub": user["id"], "username": "u", "role": "enduser", "exp": int(time.time()) + 60}
    base.update(over)
    return base


def _none_token(claims: dict) -> str:
    import base64
    import json

    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.mark.parametrize(
    "make",
    [
        lambda u: None,
        lambda u: "Basic abc",
        lambda u: "Bearer ",
        lambda u: "Bearer not.a.jwt",
        lambda u: "Bearer " + _token(_claims(u, exp=int(time.time()) - 10)),
        lambda u: "Bearer " + _token(_claims(u), key="another-secret-that-is-32-bytes-long!!"),
        lambda u: "Bearer " + _none_token(_claims(u)),
        lambda u: "Bearer " + _token(_claims(u, role="god")),
        lambda u: "Bearer " + _token({k: v for k, v in _claims(u).items() if k != "exp"}),
        lambda u: "Bearer " + _token(_claims(u, sub="no-such-user")),
    ],
    ids=[
        "missing",
        "basic",
        "empty",
        "garbage",
        "expired",
        "wrong-key",
        "alg-none",
        "bad-role",
        "no-exp",
        "unknown-user",
    ],
)
async def test_bad_tokens_are_401(client, harness, make):
    user = harness.user()
    header = make(user)
    headers = {"Authorization": header} if header else {}
    r = await client.get("/api/auth/me", headers=headers)
    assert r.status_code == 401
    body = await r.get_json()
    assert body["errorCode"] == "UNAUTHORIZED"
    assert set(body) == {"message", "errorCode"}


async def test_rs256_from_an_external_identity_provider(tmp_path, settings):
    from dataclasses import replace

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from server.app import create_app

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    app = create_app(replace(settings, jwt_public_key=pem))
    async with app.test_app():
        client = app.test_client()
        claims = {
            "sub": "idp-user-1",
            "username": "ext",
            "role": "enduser",
            "exp": int(time.time()) + 60,
        }
        good = jwt.encode(claims, key, algorithm="RS256")
        r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {good}"})
        assert r.status_code == 200
        assert (await r.get_json())["id"] == "idp-user-1"
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        bad = jwt.encode(claims, other, algorithm="RS256")
        r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401
        # Identity providers often send roles as a list: not a role of ours, a 401 (was a 500).
        for role in (["admin"], {"name": "enduser"}, 1):
            odd = jwt.encode({**claims, "role": role}, key, algorithm="RS256")
            r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {odd}"})
            assert (r.status_code, (await r.get_json())["errorCode"]) == (401, "UNAUTHORIZED")

        # The external user became a local one at its first request: it can hold
        # sessions, an admin can give it credits, and it can be answered.
        ext = {"Authorization": f"Bearer {good}"}
        svc = app.extensions["chinwag"]
        row = svc.store.user_by_id("idp-user-1")
        assert (row["username"], row["role"]) == ("ext", "enduser")
        r = await client.post("/api/auth/login", json={"username": "ext", "password": "x"})
        assert r.status_code == 401  # no local password
        r = await client.post("/api/chat/sessions", json={"title": "t"}, headers=ext)
        assert r.status_code == 201, await r.get_data()
        sid = (await r.get_json())["sessionId"]
        admin = Harness(app).user("admin")
        r = await client.post(
            "/api/credits/allocate",
            json={"username": "ext", "credits": 1000},
            headers=admin["headers"],
        )
        assert r.status_code in (200, 201), await r.get_data()
        r = await client.post(
            f"/api/chat/sessions/{sid}/messages", json={"message": "hi"}, headers=ext
        )
        assert r.status_code == 200 and (await r.get_json())["creditsCharged"] > 0
        r = await client.get("/api/credits/balance", headers=ext)
        assert r.status_code == 200

        # A second identity whose username is taken here gets a name of its own.
        other_user = jwt.encode({**claims, "sub": "idp|user-2"}, key, algorithm="RS256")
        r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {other_user}"})
        assert r.status_code == 200
        assert svc.store.user_by_id("idp|user-2")["username"] == "ext-idpuser2"

        # A local HS256 token for a user that does not exist is still refused
        # with a public key configured (it used to skip that check).
        local = jwt.encode({**claims, "sub": "no-such-user"}, SECRET, algorithm="HS256")
        r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {local}"})
        assert r.status_code == 401
        assert svc.store.user_by_id("no-such-user") is None


async def test_password_is_never_stored_in_clear(harness):
    user = harness.user(name="pw")
    row = harness.svc.store.user_by_name("pw")
    assert PASSWORD not in row["password_hash"]
    assert row["password_hash"].startswith("scrypt$")
    assert user["id"] == row["id"]


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch):
    from server import auth

    tokens = auth.TokenService(SECRET, ttl_s=60)
    token = tokens.mint("u1", "sue", "enduser")
    decoded = []
    real_decode = auth.TokenService._decode
    monkeypatch.setattr(
        auth.TokenService,
        "_decode",
        staticmethod(lambda *a: decoded.append(a) or real_decode(*a)),
    )
    assert tokens.verify(token) == auth.Principal("u1", "sue", "enduser")
    assert tokens.verify(token) == auth.Principal("u1", "sue", "enduser")
    assert len(decoded) == 1  # the second time, from memory

    # Another token (a forged signature on the same claims) is checked in full.
    head, claims, sig = token.split(".")
    forged = f"{head}.{claims}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
    with pytest.raises(auth.Unauthorized, match="Invalid token"):
        tokens.verify(forged)
    assert len(decoded) == 2

    # Past its exp a remembered token is refused, and forgotten.
    exp = int(time.time()) + 1
    short = jwt.encode({"sub": "u1", "role": "enduser", "exp": exp}, SECRET, algorithm="HS256")
    assert tokens.verify(short).user_id == "u1"
    while time.time() < exp + 0.01:  # the clock passing exp is the event waited for
        time.sleep(0.05)
    with pytest.raises(auth.Unauthorized, match="expired"):
        tokens.verify(short)
    assert short not in tokens._verified


def test_the_verified_tokens_kept_are_bounded(monkeypatch):
    from server import auth

    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    tokens = auth.TokenService(SECRET, ttl_s=60)
    minted = [tokens.mint(f"u{i}", f"user{i}", "enduser") for i in range(5)]
    for token in minted:
        tokens.verify(token)
    assert list(tokens._verified) == minted[2:]  # the oldest went first
