"""GET /api/openapi.json: built from the declarations that parse requests."""

from __future__ import annotations

import pytest
from quart import Blueprint

from server.app import create_app
from server.routes.openapi import build


async def test_the_document_needs_a_token(client):
    r = await client.get("/api/openapi.json")
    assert r.status_code == 401


async def test_every_http_route_is_documented_with_its_role(client, harness, app):
    user = harness.user()
    r = await client.get("/api/openapi.json", headers=user["headers"])
    assert r.status_code == 200
    doc = await r.get_json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.websocket or rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)
    login = doc["paths"]["/api/auth/login"]["post"]
    assert "security" not in login
    assert login["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "username",
        "password",
    ]
    allocate = doc["paths"]["/api/credits/allocate"]["post"]
    assert allocate["x-role"] == "admin" and allocate["security"] == [{"bearer": []}]
    assert doc["paths"]["/api/health"]["get"].get("security") is None
    stream = doc["paths"]["/api/chat/sessions/{session_id}/stream"]["post"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    assert stream["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }


async def test_declared_limits_are_the_enforced_ones(client, harness):
    """The document's maxLength for a message is what the server refuses beyond."""
    user = harness.user(credits=1000)
    doc = await (await client.get("/api/openapi.json", headers=user["headers"])).get_json()
    body = doc["paths"]["/api/chat/sessions/{session_id}/messages"]["post"]["requestBody"]
    limit = body["content"]["application/json"]["schema"]["properties"]["message"]["maxLength"]
    r = await client.post("/api/chat/sessions", json={}, headers=user["headers"])
    sid = (await r.get_json())["sessionId"]
    url = f"/api/chat/sessions/{sid}/messages"
    r = await client.post(url, json={"message": "x" * (limit + 1)}, headers=user["headers"])
    assert r.status_code == 400 and (await r.get_json())["details"] == [{"field": "message"}]
    r = await client.post(url, json={"message": "x" * limit}, headers=user["headers"])
    assert r.status_code == 200


def test_an_undocumented_route_is_refused(settings):
    app = create_app(settings)
    bp = Blueprint("stray", __name__)

    @bp.get("/api/stray")
    async def stray() -> str:
        return "?"

    app.register_blueprint(bp)
    with pytest.raises(RuntimeError, match="/api/stray"):
        build(app)
