"""The web console's files (SPEC §10) and the rename it uses, over the in-process client.

The console itself is driven in a real browser by tests/browser; here: what
the server sends (types, the Content-Security-Policy), that nothing in the
console points outside the server or builds markup from data, and
``PATCH /api/chat/sessions/<id>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.routes.console import files

CONSOLE = Path(__file__).resolve().parents[2] / "server" / "console"
SCRIPTS = sorted(CONSOLE.glob("*.js"))
DIRECTIVES = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "connect-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
    "form-action": "'none'",
}


def _csp(header: str) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in header.split(";") if part.strip())


async def test_the_page_is_served_with_a_strict_csp(client):
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = _csp(r.headers["Content-Security-Policy"])
    for directive, value in DIRECTIVES.items():
        assert policy[directive] == value, directive
    assert "'unsafe-inline'" not in r.headers["Content-Security-Policy"]
    assert "'unsafe-eval'" not in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert r.headers["X-Request-Id"]
    html = await r.get_data(as_text=True)
    assert '<script type="module" src="console/app.js"></script>' in html
    # No inline script or style: the policy would refuse them anyway.
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert "<style" not in html and "style=" not in html


@pytest.mark.parametrize("path", [p.name for p in SCRIPTS])
async def test_every_script_is_served_as_javascript_with_the_csp(client, path):
    r = await client.get(f"/console/{path}")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert await r.get_data() == (CONSOLE / path).read_bytes()


async def test_the_style_sheet_is_served_as_css(client):
    r = await client.get("/console/style.css")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/css; charset=utf-8"
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")


@pytest.mark.parametrize(
    "path",
    [
        "/console/nope.js",
        "/console/index.html",  # only through /
        "/console/../routes/console.py",
        "/console/%2e%2e%2fapp.js",
        "/console/app.mjs",
        "/console/",
    ],
)
async def test_anything_else_is_the_json_404(client, path):
    r = await client.get(path)
    assert r.status_code == 404
    body = await r.get_json()
    assert body["errorCode"] == "NOT_FOUND" and body["message"]


def test_the_package_serves_exactly_the_console_directory():
    on_disk = {p.name for p in CONSOLE.iterdir() if p.suffix in (".html", ".js", ".css")}
    assert set(files()) == on_disk
    assert {"index.html", "app.js", "api.js", "style.css"} <= on_disk


def test_every_module_import_is_a_served_file():
    for script in SCRIPTS:
        for target in re.findall(r'from\s+"\./([^"]+)"', script.read_text()):
            assert (CONSOLE / target).is_file(), (script.name, target)


def test_nothing_is_fetched_from_another_host():
    for path in CONSOLE.iterdir():
        text = path.read_text()
        # The SVG namespace is a name, never fetched.
        text = text.replace('"http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(?i)\b(?:https?:|wss?:|ftp:)//", text), path.name
        assert not re.search(r"""(?:src|href)\s*=\s*["']//""", text), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_data_never_becomes_markup_and_the_token_never_a_url():
    for script in SCRIPTS:
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, (script.name, sink)
        assert "new Function" not in text and "createContextualFragment" not in text
        assert "token=" not in text, script.name  # the token travels in a header only
        assert "localStorage" not in text and "document.cookie" not in text, script.name


# -- PATCH /api/chat/sessions/<id> --------------------------------------------


async def _session(client, user, title="Before"):
    r = await client.post("/api/chat/sessions", json={"title": title}, headers=user["headers"])
    return await r.get_json()


async def test_the_owner_renames_a_session(client, harness):
    alice = harness.user()
    created = await _session(client, alice)
    sid = created["sessionId"]
    r = await client.patch(
        f"/api/chat/sessions/{sid}", json={"title": "After"}, headers=alice["headers"]
    )
    assert r.status_code == 200
    renamed = await r.get_json()
    assert renamed["sessionId"] == sid and renamed["title"] == "After"
    assert set(renamed) == set(created)
    assert renamed["createdAt"] == created["createdAt"]
    assert renamed["updatedAt"] >= created["updatedAt"]
    r = await client.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    assert (await r.get_json())["title"] == "After"
    # Any text is a title, markup included: stored and answered as given.
    hostile = "<script>alert(1)</script> & <b>x</b>"
    r = await client.patch(
        f"/api/chat/sessions/{sid}", json={"title": hostile}, headers=alice["headers"]
    )
    assert (await r.get_json())["title"] == hostile
    r = await client.get("/api/chat/sessions", headers=alice["headers"])
    assert (await r.get_json())["sessions"][0]["title"] == hostile


async def test_another_users_session_is_404(client, harness):
    alice, bob, staff = harness.user(), harness.user(), harness.user("admin")
    sid = (await _session(client, alice))["sessionId"]
    for who in (bob, staff):
        r = await client.patch(
            f"/api/chat/sessions/{sid}", json={"title": "mine now"}, headers=who["headers"]
        )
        assert r.status_code == 404
        assert (await r.get_json())["errorCode"] == "SESSION_NOT_FOUND"
    r = await client.patch(
        "/api/chat/sessions/no-such-session", json={"title": "x"}, headers=alice["headers"]
    )
    assert r.status_code == 404
    r = await client.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    assert (await r.get_json())["title"] == "Before"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": None},
        {"title": ""},
        {"title": "   "},
        {"title": "x" * 201},
        {"title": 7},
        {"title": ["a"]},
    ],
)
async def test_a_bad_title_is_400(client, harness, body):
    alice = harness.user()
    sid = (await _session(client, alice))["sessionId"]
    r = await client.patch(f"/api/chat/sessions/{sid}", json=body, headers=alice["headers"])
    assert r.status_code == 400
    answer = await r.get_json()
    assert answer["errorCode"] == "VALIDATION_ERROR" and answer["details"] == [{"field": "title"}]
    r = await client.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    assert (await r.get_json())["title"] == "Before"


async def test_two_hundred_characters_is_the_limit(client, harness):
    alice = harness.user()
    sid = (await _session(client, alice))["sessionId"]
    r = await client.patch(
        f"/api/chat/sessions/{sid}", json={"title": "é" * 200}, headers=alice["headers"]
    )
    assert r.status_code == 200 and (await r.get_json())["title"] == "é" * 200


async def test_renaming_needs_a_token(client, harness):
    alice = harness.user()
    sid = (await _session(client, alice))["sessionId"]
    r = await client.patch(f"/api/chat/sessions/{sid}", json={"title": "x"})
    assert r.status_code == 401
    assert (await r.get_json())["errorCode"] == "UNAUTHORIZED"
    r = await client.patch(
        f"/api/chat/sessions/{sid}",
        json={"title": "x"},
        headers={"Authorization": "Bearer not-a-token"},
    )
    assert r.status_code == 401


async def test_the_document_describes_the_rename_and_the_console(client, harness):
    user = harness.user()
    doc = await (await client.get("/api/openapi.json", headers=user["headers"])).get_json()
    rename = doc["paths"]["/api/chat/sessions/{session_id}"]["patch"]
    schema = rename["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["title"]
    assert schema["properties"]["title"]["minLength"] == 1
    assert schema["properties"]["title"]["maxLength"] == 200
    assert rename["x-role"] == "enduser"
    page = doc["paths"]["/"]["get"]
    assert "security" not in page and "text/html" in page["responses"]["200"]["content"]
    script = doc["paths"]["/console/{name}.js"]["get"]
    assert "text/javascript" in script["responses"]["200"]["content"]
