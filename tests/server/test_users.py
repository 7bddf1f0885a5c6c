"""POST /api/users (SPEC §3): admin only, the same operation as `chinwag user add`."""

from __future__ import annotations

import argparse

import pytest

from server import cli
from server.store import Page
from tests.conftest import SECRET

PASSWORD = "s3cret-enough"
EVERYONE = Page(offset=0, limit=1000)


def new(username: str = "carol", **extra: object) -> dict[str, object]:
    return {"username": username, "password": PASSWORD, "role": "enduser", **extra}


async def test_an_admin_adds_a_user_who_can_then_log_in(client, harness):
    admin = harness.user("admin")
    body = new("carol.b-2_x", email="carol@example.com", role="supervisor")
    r = await client.post("/api/users", json=body, headers=admin["headers"])
    assert r.status_code == 201
    created = await r.get_json()
    assert set(created) == {"id", "username", "email", "role"}
    assert created["username"] == "carol.b-2_x"
    assert created["email"] == "carol@example.com" and created["role"] == "supervisor"
    assert harness.svc.store.user_by_id(created["id"])["username"] == "carol.b-2_x"
    # Their ledger account is open: a balance, not USER_NOT_FOUND.
    assert harness.svc.ledger.has_account(created["id"])
    r = await client.get(f"/api/credits/balance?userId={created['id']}", headers=admin["headers"])
    assert r.status_code == 200 and (await r.get_json())["balance"] == 0

    r = await client.post("/api/auth/login", json={"username": "carol.b-2_x", "password": PASSWORD})
    assert r.status_code == 200
    login = await r.get_json()
    assert login["user"] == {"id": created["id"], "username": "carol.b-2_x", "role": "supervisor"}
    r = await client.get(
        "/api/auth/me", headers={"Authorization": f"Bearer {login['accessToken']}"}
    )
    assert (await r.get_json()) == created


async def test_email_is_optional(client, harness):
    admin = harness.user("admin")
    r = await client.post("/api/users", json=new("dan"), headers=admin["headers"])
    assert r.status_code == 201 and (await r.get_json())["email"] is None
    r = await client.post("/api/users", json=new("eve", email=None), headers=admin["headers"])
    assert r.status_code == 201 and (await r.get_json())["email"] is None


@pytest.mark.parametrize("role", ["enduser", "supervisor"])
async def test_only_an_admin_may_add_users(client, harness, role):
    caller = harness.user(role)
    r = await client.post("/api/users", json=new(), headers=caller["headers"])
    assert r.status_code == 403 and (await r.get_json())["errorCode"] == "FORBIDDEN"
    assert harness.svc.store.user_by_name("carol") is None


async def test_without_a_token_it_is_401(client, harness):
    r = await client.post("/api/users", json=new())
    assert r.status_code == 401 and (await r.get_json())["errorCode"] == "UNAUTHORIZED"
    r = await client.post("/api/users", json=new(), headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert harness.svc.store.user_by_name("carol") is None


async def test_a_taken_username_is_409_and_changes_nothing(client, harness):
    admin = harness.user("admin")
    existing = harness.user(name="taken")
    r = await client.post("/api/users", json=new("taken", role="admin"), headers=admin["headers"])
    assert r.status_code == 409
    assert (await r.get_json())["errorCode"] == "USER_EXISTS"
    assert harness.svc.store.user_by_name("taken")["role"] == "enduser"
    assert harness.svc.store.user_by_name("taken")["id"] == existing["id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"password": PASSWORD, "role": "enduser"}, "username"),
        (new(""), "username"),
        (new("has space"), "username"),
        (new("slash/name"), "username"),
        (new("ünïcode"), "username"),
        (new("x" * 65), "username"),
        (new(42), "username"),
        (new(password="short77"), "password"),
        (new(password=None), "password"),
        (new(password=12345678), "password"),
        (new(role="root"), "role"),
        (new(role=None), "role"),
        (new(email="not-an-address"), "email"),
        (new(email="a@b@c"), "email"),
        (new(email=["x@y"]), "email"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_bad_input_is_400_naming_the_field(client, harness, body, field):
    admin = harness.user("admin")
    before = harness.svc.store.search_users("", EVERYONE)[1]
    r = await client.post("/api/users", json=body, headers=admin["headers"])
    assert r.status_code == 400
    error = await r.get_json()
    assert error["errorCode"] == "VALIDATION_ERROR"
    assert error["details"] == [{"field": field}]
    assert harness.svc.store.search_users("", EVERYONE)[1] == before


async def test_a_body_that_is_not_an_object_is_400(client, harness):
    admin = harness.user("admin")
    for raw in (b"", b"[]", b"nope"):
        r = await client.post(
            "/api/users",
            data=raw,
            headers={**admin["headers"], "Content-Type": "application/json"},
        )
        assert r.status_code == 400
        assert (await r.get_json())["errorCode"] == "VALIDATION_ERROR"


async def test_the_password_never_appears_in_a_response(client, harness):
    admin = harness.user("admin")
    texts = []
    for body in (new("frank"), new("frank"), new("bad name"), new("gina", role="root")):
        r = await client.post("/api/users", json=body, headers=admin["headers"])
        texts.append(await r.get_data(as_text=True))
    r = await client.post("/api/auth/login", json={"username": "frank", "password": PASSWORD})
    texts.append(await r.get_data(as_text=True))
    r = await client.get("/api/chat/users/search?q=frank", headers=admin["headers"])
    texts.append(await r.get_data(as_text=True))
    stored_hash = harness.svc.store.user_by_name("frank")["password_hash"]
    assert stored_hash.startswith("scrypt$") and PASSWORD not in stored_hash
    for text in texts:
        assert PASSWORD not in text
        assert stored_hash not in text and "password_hash" not in text and "scrypt" not in text


async def test_the_cli_and_the_api_are_one_operation(client, harness, settings, monkeypatch):
    """Same rules, same store: a name the API refuses the CLI refuses, and vice versa."""
    monkeypatch.setenv("CHINWAG_DB", str(settings.db_path))
    if settings.database_url:
        monkeypatch.setenv("CHINWAG_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CHINWAG_JWT_SECRET", SECRET)

    def cli_add(username: str, password: str = PASSWORD) -> int:
        args = argparse.Namespace(username=username, password=password, role="enduser", email=None)
        return cli._user_add(args)

    admin = harness.user("admin")
    assert cli_add("hank") == 0
    assert harness.svc.ledger.has_account(harness.svc.store.user_by_name("hank")["id"])
    r = await client.post("/api/users", json=new("hank"), headers=admin["headers"])
    assert r.status_code == 409
    r = await client.post("/api/users", json=new("ivy"), headers=admin["headers"])
    assert r.status_code == 201
    assert cli_add("ivy") == 1  # taken
    assert cli_add("bad name") == 2  # the API's username rule
    assert cli_add("jo", password="short") == 2  # and its password rule
    assert harness.svc.store.user_by_name("bad name") is None
    assert harness.svc.store.user_by_name("jo") is None
