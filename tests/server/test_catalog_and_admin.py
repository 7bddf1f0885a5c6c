"""Models, recommend, supervisor views, health, version (SPEC §4)."""

from __future__ import annotations

import pytest

SEED_MODELS = {
    "amazon.nova-micro-v1:0",
    "amazon.nova-lite-v1:0",
    "amazon.titan-text-express-v1",
    "meta.llama3-70b-instruct-v1:0",
}


async def test_models_list_the_seed_catalog_marked_simulated(client, harness):
    u = harness.user()
    r = await client.get("/api/models", headers=u["headers"])
    models = (await r.get_json())["models"]
    assert {m["id"] for m in models} == SEED_MODELS
    for m in models:
        assert m["provider"] == "simulated"
        assert set(m) == {
            "id",
            "name",
            "provider",
            "capabilities",
            "creditCost",
            "maxTokens",
            "available",
        }
        assert m["creditCost"]["inputPer1k"] > 0 and m["creditCost"]["outputPer1k"] > 0


async def test_catalog_extends_from_a_file(tmp_path, settings):
    import json
    from dataclasses import replace

    from server.app import create_app

    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": "acme.tiny-v1",
                    "name": "Acme Tiny",
                    "inputPer1k": 1,
                    "outputPer1k": 1,
                    "maxTokens": 100,
                },
                {"id": "amazon.nova-lite-v1:0", "available": False},
            ]
        )
    )
    app = create_app(replace(settings, models_file=path))
    async with app.test_app():
        svc = app.extensions["chinwag"]
        u = svc.store.add_user("x", "scrypt$x$y", "enduser")
        headers = {"Authorization": "Bearer " + svc.tokens.mint(u["id"], "x", "enduser")}
        client = app.test_client()
        models = {
            m["id"]: m
            for m in (await (await client.get("/api/models", headers=headers)).get_json())["models"]
        }
        assert models["acme.tiny-v1"]["maxTokens"] == 100
        assert models["amazon.nova-lite-v1:0"]["available"] is False
        r = await client.post(
            "/api/chat/sessions", json={"modelId": "amazon.nova-lite-v1:0"}, headers=headers
        )
        assert r.status_code == 503 and (await r.get_json())["errorCode"] == "MODEL_UNAVAILABLE"


@pytest.mark.parametrize(
    ("priority", "expected"),
    [
        ("quality", "meta.llama3-70b-instruct-v1:0"),
        ("cost", "amazon.nova-micro-v1:0"),
    ],
)
async def test_recommend(client, harness, priority, expected):
    u = harness.user()
    r = await client.post(
        "/api/models/recommend",
        json={"taskType": "code", "priority": priority},
        headers=u["headers"],
    )
    body = await r.get_json()
    assert body["recommendedModel"]["id"] == expected
    assert expected not in {m["id"] for m in body["alternatives"]}
    assert body["reason"]
    r = await client.post("/api/models/recommend", json={"priority": "vibes"}, headers=u["headers"])
    assert r.status_code == 400


async def test_supervisor_endpoints_need_the_role(client, harness):
    enduser, sup = harness.user(), harness.user("supervisor")
    alice = harness.user(name="alice")
    r = await client.post("/api/chat/sessions", json={"title": "a"}, headers=alice["headers"])
    sid = (await r.get_json())["sessionId"]
    paths = [
        "/api/chat/users/search?q=ali",
        f"/api/chat/users/{alice['id']}/sessions",
        f"/api/chat/users/{alice['id']}/sessions/{sid}",
        "/api/chat/streams/active",
    ]
    for path in paths:
        r = await client.get(path, headers=enduser["headers"])
        assert r.status_code == 403, path
        assert (await r.get_json())["errorCode"] == "FORBIDDEN"
        r = await client.get(path, headers=sup["headers"])
        assert r.status_code == 200, path

    body = await (
        await client.get("/api/chat/users/search?q=ali", headers=sup["headers"])
    ).get_json()
    assert [(u["username"], u["sessionCount"]) for u in body["users"]] == [("alice", 1)]
    assert body["pagination"]["total"] == 1
    body = await (
        await client.get(f"/api/chat/users/{alice['id']}/sessions/{sid}", headers=sup["headers"])
    ).get_json()
    assert body["sessionId"] == sid and body["messages"] == []
    r = await client.get(f"/api/chat/users/{sup['id']}/sessions/{sid}", headers=sup["headers"])
    assert r.status_code == 404
    r = await client.get("/api/chat/users/nobody/sessions", headers=sup["headers"])
    assert r.status_code == 404


async def test_search_escapes_like_wildcards(client, harness):
    sup = harness.user("supervisor")
    harness.user(name="a_b")
    harness.user(name="axb")
    body = await (
        await client.get("/api/chat/users/search?q=a_b", headers=sup["headers"])
    ).get_json()
    assert [u["username"] for u in body["users"]] == ["a_b"]


async def test_health_is_open_and_version_is_not(client, harness, settings):
    r = await client.get("/api/health")
    body = await r.get_json()
    assert r.status_code == 200 and body["status"] == "ok" and body["version"]
    engine = "postgresql" if settings.database_url else "sqlite"
    assert body["database"] == {"engine": engine, "status": "ok"}
    assert body["redis"] is None and body["node"] == settings.node_id
    r = await client.get("/api/version")
    assert r.status_code == 401
    u = harness.user()
    r = await client.get("/api/version", headers=u["headers"])
    assert (await r.get_json())["version"] == body["version"]


async def test_health_is_503_when_the_db_is_unusable(app, client, settings):
    from tests.conftest import db_sql

    db_sql(settings, "ALTER TABLE users RENAME TO gone")
    r = await client.get("/api/health")
    body = await r.get_json()
    assert r.status_code == 503 and body["status"] == "unavailable"
    engine = "postgresql" if settings.database_url else "sqlite"
    assert body["database"] == {"engine": engine, "status": "unavailable"}
