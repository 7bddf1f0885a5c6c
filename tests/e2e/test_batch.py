"""POST /api/batch (SPEC §8) through a real server: many calls in one, each its own call.

Every item is dispatched through the app itself, so it meets the same auth,
role, validation and rate limit as a direct call; its error is its own, in
its place; the items run concurrently.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import with_settings


def auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {user['token']}"}


async def batch(live: Any, user: dict[str, Any] | None, requests: Any, **kw: Any) -> Any:
    headers = {**(auth(user) if user else {}), **kw.get("headers", {})}
    return await live.http.post(kw.get("path", "/api/batch"), json=requests, headers=headers)


def statuses(r: Any) -> list[int]:
    return [item["status"] for item in r.json()["data"]["responses"]]


async def test_mixed_items_answer_in_order_each_with_its_own_status(live):
    alice = live.harness.user(credits=1000)
    bob = live.harness.user()
    r = await live.http.post("/api/chat/sessions", json={"title": "bob's"}, headers=auth(bob))
    bobs = r.json()["sessionId"]
    r = await live.http.post("/api/chat/sessions", json={"title": "mine"}, headers=auth(alice))
    mine = r.json()["sessionId"]

    r = await batch(
        live,
        alice,
        {
            "requests": [
                {"method": "GET", "path": "/api/chat/sessions?limit=5"},
                {"method": "POST", "path": "/api/chat/sessions", "body": {"title": "via batch"}},
                {"method": "GET", "path": f"/api/chat/sessions/{bobs}"},
                {"method": "POST", "path": "/api/chat/sessions", "body": {"title": "x" * 201}},
                {"method": "GET", "path": "/api/chat/users/search?q=a"},
                {"method": "GET", "path": "/api/auth/me"},
                {"method": "DELETE", "path": f"/api/chat/sessions/{bobs}"},
                {"method": "GET", "path": "/api/no/such/route"},
                {"method": "PUT", "path": "/api/auth/me"},
                {"method": "GET", "path": f"/api/chat/sessions/{mine}/messages"},
            ]
        },
        headers={"X-Request-Id": "batch-1"},
    )
    assert r.status_code == 200
    # The batch keeps its own request id (each item has its own, derived from it).
    assert r.headers["x-request-id"] == "batch-1"
    assert r.headers["content-type"].startswith("application/json")
    out = r.json()
    assert out["success"] is True
    data = out["data"]
    assert data["count"] == 10 == len(data["responses"])
    assert isinstance(data["timestamp"], int) and data["timestamp"] > 1_600_000_000_000
    assert statuses(r) == [200, 201, 404, 400, 403, 200, 404, 404, 405, 200]
    bodies = [item["body"] for item in data["responses"]]
    assert bodies[0]["pagination"]["limit"] == 5  # the query string went through
    assert bodies[1]["title"] == "via batch"
    assert bodies[2]["errorCode"] == "SESSION_NOT_FOUND"
    assert bodies[3]["errorCode"] == "VALIDATION_ERROR"
    assert bodies[3]["details"] == [{"field": "title"}]
    assert bodies[4]["errorCode"] == "FORBIDDEN"
    assert bodies[5]["id"] == alice["id"]  # run as the caller
    assert bodies[6]["errorCode"] == "SESSION_NOT_FOUND"
    assert bodies[7]["errorCode"] == "NOT_FOUND"
    assert bodies[8]["errorCode"] == "METHOD_NOT_ALLOWED"
    assert bodies[9]["messages"] == []
    for body in bodies[2:5] + bodies[6:9]:
        assert set(body) <= {"message", "errorCode", "details"}

    # The created session is the caller's; Bob's session survived the DELETE.
    r = await live.http.get("/api/chat/sessions", headers=auth(alice))
    assert {s["title"] for s in r.json()["sessions"]} == {"mine", "via batch"}
    r = await live.http.get(f"/api/chat/sessions/{bobs}", headers=auth(bob))
    assert r.status_code == 200


async def test_an_item_cannot_escape_the_callers_identity(live):
    alice, admin = live.harness.user(), live.harness.user("admin")
    r = await batch(
        live,
        alice,
        {
            "requests": [
                {"method": "GET", "path": "/api/auth/me", "headers": auth(admin)},
                {
                    "method": "POST",
                    "path": "/api/credits/allocate",
                    "body": {"userId": alice["id"], "credits": 1000},
                    "headers": auth(admin),
                    "Authorization": f"Bearer {admin['token']}",
                },
            ]
        },
    )
    assert statuses(r) == [200, 403]
    assert r.json()["data"]["responses"][0]["body"]["id"] == alice["id"]
    assert live.harness.svc.ledger.balance(alice["id"]).balance == 0


async def test_an_empty_batch_is_an_empty_success(live):
    r = await batch(live, live.harness.user(), {"requests": []})
    assert r.status_code == 200
    data = r.json()["data"]
    assert r.json()["success"] is True
    assert data["responses"] == [] and data["count"] == 0 and isinstance(data["timestamp"], int)


async def test_twenty_items_run_and_twenty_one_are_refused(live):
    user = live.harness.user()
    item = {"method": "GET", "path": "/api/auth/me"}
    r = await batch(live, user, {"requests": [item] * 20})
    assert r.status_code == 200 and statuses(r) == [200] * 20
    r = await batch(live, user, {"requests": [item] * 21})
    assert r.status_code == 400
    assert r.json()["errorCode"] == "VALIDATION_ERROR"
    assert r.json()["details"] == [{"field": "requests"}]
    assert "20" in r.json()["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], None),
        ("requests", None),
        ({}, "requests"),
        ({"requests": None}, "requests"),
        ({"requests": "GET /api/auth/me"}, "requests"),
        ({"requests": {"method": "GET", "path": "/api/auth/me"}}, "requests"),
        ({"requests": [{"method": "GET", "path": "/api/auth/me"}, 7]}, "requests[1]"),
        ({"requests": [{"path": "/api/auth/me"}]}, "requests[0].method"),
        ({"requests": [{"method": "HEAD", "path": "/api/auth/me"}]}, "requests[0].method"),
        ({"requests": [{"method": "OPTIONS", "path": "/api/auth/me"}]}, "requests[0].method"),
        ({"requests": [{"method": "CONNECT", "path": "/api/auth/me"}]}, "requests[0].method"),
        ({"requests": [{"method": 1, "path": "/api/auth/me"}]}, "requests[0].method"),
        ({"requests": [{"method": "GET"}]}, "requests[0].path"),
        ({"requests": [{"method": "GET", "path": "api/auth/me"}]}, "requests[0].path"),
        ({"requests": [{"method": "GET", "path": "/metrics"}]}, "requests[0].path"),
        ({"requests": [{"method": "GET", "path": "http://x/api/a"}]}, "requests[0].path"),
        ({"requests": [{"method": "GET", "path": ["/api/auth/me"]}]}, "requests[0].path"),
        (
            {"requests": [{"method": "GET", "path": "/api/" + "a" * 2048}]},
            "requests[0].path",
        ),
        (
            {"requests": [{"method": "POST", "path": "/api/chat/sessions", "body": "{}"}]},
            "requests[0].body",
        ),
        (
            {"requests": [{"method": "POST", "path": "/api/chat/sessions", "body": [1]}]},
            "requests[0].body",
        ),
    ],
)
async def test_a_bad_shape_is_400_naming_the_item(live, body, field):
    user = live.harness.user()
    r = await batch(live, user, body)
    assert r.status_code == 400
    error = r.json()
    assert error["errorCode"] == "VALIDATION_ERROR"
    if field is not None:
        assert error["details"][0]["field"] == field
        if field.startswith("requests["):
            assert error["details"][0]["index"] == int(field[9])
    # Nothing ran.
    r = await live.http.get("/api/chat/sessions", headers=auth(user))
    assert r.json()["sessions"] == []


async def test_not_json_is_400(live):
    user = live.harness.user()
    r = await live.http.post(
        "/api/batch",
        content=b"{not json",
        headers={**auth(user), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["errorCode"] == "VALIDATION_ERROR"


async def test_streaming_items_are_refused_while_the_others_run(live):
    user = live.harness.user(credits=100_000)
    sup = live.harness.user("supervisor")
    r = await live.http.post("/api/chat/sessions", json={}, headers=auth(user))
    sid = r.json()["sessionId"]
    streaming = [
        ("POST", f"/api/chat/sessions/{sid}/stream", {"message": "hello"}),
        ("GET", f"/api/chat/sessions/{sid}/stream?streamingSessionId=x"),
        ("GET", f"/api/chat/sessions/{sid}/observe"),
        ("GET", f"/api/chat/sessions/{sid}/observe/ws"),
        ("POST", "/api/v1/chat", {"message": "hello"}),
    ]
    nested = [
        ("POST", "/api/batch", {"requests": [{"method": "GET", "path": "/api/auth/me"}]}),
        ("POST", "/api/v1/batch", {"requests": []}),
    ]
    requests: list[dict[str, Any]] = [{"method": "GET", "path": "/api/auth/me"}]
    for method, path, *body in streaming + nested:
        requests.append({"method": method, "path": path, **({"body": body[0]} if body else {})})
    requests.append(
        {"method": "POST", "path": f"/api/chat/sessions/{sid}/messages", "body": {"message": "hi"}}
    )
    for who in (user, sup):
        r = await batch(live, who, {"requests": requests})
        assert r.status_code == 200
        responses = r.json()["data"]["responses"]
        for item in responses[1 : 1 + len(streaming)]:
            assert item["status"] == 400
            assert item["body"]["errorCode"] == "STREAMING_NOT_IN_BATCH"
            assert "batch" in item["body"]["message"]
        for item in responses[1 + len(streaming) : -1]:
            assert item["status"] == 400 and item["body"]["errorCode"] == "NESTED_BATCH"
        assert responses[0]["status"] == 200
        assert responses[0]["body"]["id"] == who["id"]
    # The user's non-streaming message ran (the supervisor's 404: not their session) ...
    assert responses[-1]["status"] == 404
    r = await live.http.get(f"/api/chat/sessions/{sid}/messages", headers=auth(user))
    messages = r.json()["messages"]
    # ... and only it: the refused stream stored nothing and charged nothing.
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "hi"
    charges = [
        e
        for e in (await live.http.get("/api/credits/usage", headers=auth(user))).json()["entries"]
        if e["kind"] == "charge"
    ]
    assert len(charges) == 1
    assert live.harness.svc.ledger.verify() == []


async def test_the_v1_alias_is_the_same_endpoint(live):
    user = live.harness.user()
    r = await batch(
        live,
        user,
        {"requests": [{"method": "GET", "path": "/api/auth/me"}]},
        path="/api/v1/batch",
    )
    assert r.status_code == 200 and statuses(r) == [200]
    assert r.json()["data"]["responses"][0]["body"]["username"] == user["username"]
    r = await batch(live, user, {"requests": [{}] * 21}, path="/api/v1/batch")
    assert r.status_code == 400


async def test_without_a_valid_token_the_batch_is_401(live):
    body = {"requests": [{"method": "GET", "path": "/api/health"}]}
    r = await batch(live, None, body)
    assert r.status_code == 401 and r.json()["errorCode"] == "UNAUTHORIZED"
    r = await live.http.post("/api/batch", json=body, headers={"Authorization": "Bearer x.y.z"})
    assert r.status_code == 401 and r.json()["errorCode"] == "UNAUTHORIZED"
    r = await batch(live, None, body, path="/api/v1/batch")
    assert r.status_code == 401


async def test_every_item_counts_against_the_rate_limit(live_factory, settings):
    live = await live_factory(with_settings(settings, rate_limit=5))
    user = live.harness.user()
    item = {"method": "GET", "path": "/api/auth/me"}
    # The batch takes one request of the 5, its items the next 4; the rest are 429.
    r = await batch(live, user, {"requests": [item] * 6})
    assert r.status_code == 200
    assert sorted(statuses(r)) == [200] * 4 + [429] * 2
    for response in r.json()["data"]["responses"]:
        if response["status"] == 429:
            assert response["body"]["errorCode"] == "RATE_LIMITED"
    # The bucket is empty: the batch itself is refused now, as a direct call is.
    r = await batch(live, user, {"requests": [item]})
    assert r.status_code == 429 and "Retry-After" in r.headers
    r = await live.http.get("/api/auth/me", headers=auth(user))
    assert r.status_code == 429
    # Another user's bucket is their own.
    r = await batch(live, live.harness.user(), {"requests": [item]})
    assert statuses(r) == [200]


async def test_one_slow_item_never_makes_another_wait(live_factory, settings):
    """Twenty items: one paced model call (about 2 s) in the middle, nineteen quick ones.

    Run one after the other — in either order — some quick item would be
    created after the slow one was settled. Run together, every quick item's
    row is written before the slow call is settled, whatever the machine's speed.
    """
    live = await live_factory(
        with_settings(settings, sim_ttft_ms=0, sim_tokens_per_s=20, sim_answer_tokens=40)
    )
    user = live.harness.user(credits=1_000_000)
    r = await live.http.post("/api/chat/sessions", json={"title": "slow"}, headers=auth(user))
    slow_sid = r.json()["sessionId"]
    slow = {
        "method": "POST",
        "path": f"/api/chat/sessions/{slow_sid}/messages",
        "body": {"message": "take your time"},
    }
    fast = [
        {"method": "POST", "path": "/api/chat/sessions", "body": {"title": f"fast {i}"}}
        for i in range(19)
    ]
    requests = [*fast[:10], slow, *fast[10:]]
    r = await live.http.post("/api/batch", json={"requests": requests}, headers=auth(user))
    assert r.status_code == 200
    responses = r.json()["data"]["responses"]
    assert [x["status"] for x in responses] == [201] * 10 + [200] + [201] * 9
    answer = responses[10]["body"]
    assert answer["assistantMessage"]["status"] == "complete"
    assert answer["assistantMessage"]["outputTokens"] == 40  # the whole paced answer
    stream_id = answer["assistantMessage"]["streamingSessionId"]
    r = await live.http.get("/api/credits/usage?limit=100", headers=auth(user))
    (settled,) = [e for e in r.json()["entries"] if e["streamingSessionId"] == stream_id]
    # ISO-8601 UTC with milliseconds, all from the server's clock: they sort as strings.
    created = [x["body"]["createdAt"] for x in responses[:10] + responses[11:]]
    assert [x["body"]["title"] for x in responses[:10] + responses[11:]] == [
        f"fast {i}" for i in range(19)
    ]
    assert max(created) < settled["createdAt"], (created, settled)
    assert answer["userMessage"]["createdAt"] < settled["createdAt"]


async def test_a_caller_who_leaves_cancels_the_items(live_factory, settings, caplog):
    """The batch's nursery is cancelled with its request: a waiting item never answers.

    The slow item waits for a paced model answer. The caller leaves while it
    waits; once the answer is complete (it would have answered then), neither
    the batch nor that item has logged an answer, and nothing logged an error.
    """
    caplog.set_level(logging.INFO)
    live = await live_factory(
        with_settings(settings, sim_ttft_ms=0, sim_tokens_per_s=20, sim_answer_tokens=40)
    )
    user = live.harness.user(credits=1_000_000)
    r = await live.http.post("/api/chat/sessions", json={}, headers=auth(user))
    sid = r.json()["sessionId"]
    body = {
        "requests": [
            {
                "method": "POST",
                "path": f"/api/chat/sessions/{sid}/messages",
                "body": {"message": "x"},
            },
            {"method": "GET", "path": "/api/auth/me"},
        ]
    }

    async def assistant_status() -> str | None:
        r = await live.http.get(f"/api/chat/sessions/{sid}/messages", headers=auth(user))
        statuses = [m["status"] for m in r.json()["messages"] if m["role"] == "assistant"]
        return statuses[0] if statuses else None

    async with trio.open_nursery() as nursery:

        async def call() -> None:
            async with httpx.AsyncClient(base_url=live.url) as http:
                await http.post(
                    "/api/batch", json=body, headers={**auth(user), "X-Request-Id": "leaver"}
                )

        nursery.start_soon(call)
        with trio.fail_after(10):
            while await assistant_status() != "streaming":  # noqa: ASYNC110 (over HTTP)
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # the caller goes away mid-batch
    with trio.fail_after(10):
        while await assistant_status() == "streaming":  # noqa: ASYNC110 (over HTTP)
            await trio.sleep(0.05)
    r = await live.http.get("/api/auth/me", headers=auth(user))  # one more round trip
    assert r.status_code == 200
    answered = {
        getattr(rec, "fields", {}).get("requestId")
        for rec in caplog.records
        if rec.name == "chinwag.access"
    }
    assert "leaver" not in answered and "leaver.0" not in answered
    assert [rec for rec in caplog.records if rec.levelno >= logging.ERROR] == []
