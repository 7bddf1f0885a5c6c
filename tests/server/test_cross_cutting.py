"""Request ids, JSON errors for unknown routes and methods, CORS, body limits."""

from __future__ import annotations


async def test_request_id_is_echoed_or_made(client):
    r = await client.get("/api/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = await client.get("/api/health", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["X-Request-Id"].startswith("req_")
    r = await client.get("/api/health")
    assert r.headers["X-Request-Id"].startswith("req_")


async def test_unknown_route_and_wrong_method_are_json(client):
    r = await client.get("/api/nope")
    assert r.status_code == 404
    assert (await r.get_json())["errorCode"] == "NOT_FOUND"
    assert r.headers["X-Request-Id"].startswith("req_")
    r = await client.put("/api/health")
    assert r.status_code == 405
    assert (await r.get_json())["errorCode"] == "METHOD_NOT_ALLOWED"


async def test_errors_carry_request_ids(client):
    r = await client.get("/api/auth/me", headers={"X-Request-Id": "trace-1"})
    assert r.status_code == 401 and r.headers["X-Request-Id"] == "trace-1"


async def test_cors_preflight_and_exposed_headers(client):
    r = await client.options(
        "/api/chat/sessions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    r = await client.get("/api/health", headers={"Origin": "https://app.example"})
    assert r.headers["Access-Control-Expose-Headers"] == (
        "X-Streaming-Session-Id, X-Request-Id, X-Chat-Session-Id"
    )
    # With "*", even a request without Origin is told (seed 002's curl -I expects it).
    r = await client.get("/api/health")
    assert r.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_restricted_origins(settings):
    from dataclasses import replace

    from server.app import create_app

    app = create_app(replace(settings, cors_origins=("https://good.example",)))
    async with app.test_app():
        client = app.test_client()
        r = await client.get("/api/health", headers={"Origin": "https://good.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://good.example"
        r = await client.get("/api/health", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers
        r = await client.get("/api/health")
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_oversized_body_is_413_json(settings):
    from dataclasses import replace

    from server.app import create_app

    app = create_app(replace(settings, max_body_bytes=1024))
    async with app.test_app():
        client = app.test_client()
        r = await client.post(
            "/api/auth/login", data="x" * 5000, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413
        assert (await r.get_json())["errorCode"] == "PAYLOAD_TOO_LARGE"


async def test_rate_limit_is_429_with_retry_after(settings):
    from dataclasses import replace

    from server.app import create_app

    app = create_app(replace(settings, rate_limit=3))
    async with app.test_app():
        svc = app.extensions["chinwag"]
        u = svc.store.add_user("r", "scrypt$x$y", "enduser")
        headers = {"Authorization": "Bearer " + svc.tokens.mint(u["id"], "r", "enduser")}
        client = app.test_client()
        codes = [(await client.get("/api/auth/me", headers=headers)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await client.get("/api/auth/me", headers=headers)
        assert (await r.get_json())["errorCode"] == "RATE_LIMITED"
        assert int(r.headers["Retry-After"]) >= 1
