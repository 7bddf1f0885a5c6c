"""Hostile paths, query strings, headers and tokens are bad input: a clear JSON
answer, never a 500, an HTML page or a database error (on PostgreSQL a NUL in a
lookup was a 503 with a traceback logged).

Each case runs on both backends (the ``backend`` fixture).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

import jwt
import pytest

from tests.conftest import SECRET


@pytest.fixture
async def alice(client: Any, harness: Any) -> dict[str, Any]:
    user = harness.user()
    r = await client.post("/api/chat/sessions", json={"title": "t"}, headers=user["headers"])
    assert r.status_code == 201
    return {**user, "sid": (await r.get_json())["sessionId"]}


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def answer(r: Any) -> tuple[int, str]:
    assert r.headers["Content-Type"].startswith("application/json"), await r.get_data()
    return r.status_code, (await r.get_json())["errorCode"]


async def test_a_nul_in_a_path_names_nothing(client, alice, caplog):
    for path in ("/api/chat/sessions/x%00/messages", f"/api/chat/sessions/{alice['sid']}%00"):
        r = await client.get(path, headers=alice["headers"])
        assert await answer(r) == (404, "SESSION_NOT_FOUND")
    r = await client.get("/api/admin/users/a%00b", headers=alice["headers"])
    assert (await answer(r))[0] == 404
    assert errors_logged(caplog) == []


async def test_a_nul_in_a_query_is_a_400(client, alice, caplog):
    for query in ("q=al%00ice", "streamingSessionId=%00"):
        r = await client.get(f"/api/chat/sessions?{query}", headers=alice["headers"])
        assert await answer(r) == (400, "VALIDATION_ERROR")
    assert errors_logged(caplog) == []


async def test_doubled_slashes_are_a_json_404_not_a_redirect(client, alice):
    for method, path in [("POST", "/api//chat/sessions"), ("GET", "/api/chat//sessions")]:
        r = await client.open(
            path, method=method, json={}, headers={**alice["headers"], "Host": "evil.example"}
        )
        assert "Location" not in r.headers
        assert (await answer(r))[0] == 404


@pytest.mark.parametrize("bad", ["²", "①", "١٢", "12x", "-1"])
async def test_last_event_id_takes_ascii_digits_only(client, alice, caplog, bad):
    base = f"/api/chat/sessions/{alice['sid']}/stream?streamingSessionId=stream-1-x"
    r = await client.get(base, headers={**alice["headers"], "Last-Event-ID": bad})
    assert await answer(r) == (400, "VALIDATION_ERROR")
    r = await client.get(f"{base}&lastEventId={quote(bad)}", headers=alice["headers"])
    assert await answer(r) == (400, "VALIDATION_ERROR")  # "²" was int()'s ValueError: a 500
    assert errors_logged(caplog) == []


async def test_a_client_chosen_id_with_a_trailing_newline_is_refused(client, alice):
    r = await client.post("/api/chat/sessions", json={"id": "777\n"}, headers=alice["headers"])
    assert await answer(r) == (400, "VALIDATION_ERROR")
    r = await client.post("/api/chat/sessions", json={"id": "777"}, headers=alice["headers"])
    assert r.status_code == 201 and (await r.get_json())["sessionId"] == "777"


async def test_a_v1_session_name_with_a_trailing_newline_is_refused(client, alice):
    body = {"message": "hi", "sessionId": "session-20240101-120000-abcd\n"}
    r = await client.post("/api/v1/chat", json=body, headers=alice["headers"])
    assert await answer(r) == (400, "VALIDATION_ERROR")


@pytest.mark.parametrize("exp", [10**400, 2**64, 1e308])
async def test_an_absurd_exp_is_a_401_not_a_500(client, harness, caplog, exp):
    user = harness.user()
    claims = {"sub": user["id"], "username": "u", "role": "enduser", "exp": exp}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    r = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
    if exp == 10**400:  # too big for a float
        assert await answer(r) == (401, "UNAUTHORIZED")
    else:  # far in the future, but a number: the token is good
        assert r.status_code == 200
    assert errors_logged(caplog) == []
    # An ordinary token still works after it.
    good = {**claims, "exp": int(time.time()) + 60}
    r = await client.get(
        "/api/auth/me",
        headers={"Authorization": f"Bearer {jwt.encode(good, SECRET, algorithm='HS256')}"},
    )
    assert r.status_code == 200
