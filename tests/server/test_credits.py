"""The ledger over HTTP (SPEC §3): balance, allocate, check, usage."""

from __future__ import annotations

import pytest


async def test_balance_of_self_and_of_others(client, harness):
    alice = harness.user(credits=40)
    bob = harness.user(credits=7)
    sup = harness.user("supervisor")
    r = await client.get("/api/credits/balance", headers=alice["headers"])
    assert await r.get_json() == {
        "userId": alice["id"],
        "balance": 40,
        "reserved": 0,
        "available": 40,
    }
    r = await client.get(f"/api/credits/balance?userId={bob['id']}", headers=alice["headers"])
    assert r.status_code == 403
    r = await client.get(f"/api/credits/balance?userId={bob['id']}", headers=sup["headers"])
    assert (await r.get_json())["balance"] == 7
    r = await client.get("/api/credits/balance?userId=nobody", headers=sup["headers"])
    assert r.status_code == 404


async def test_allocate_is_admin_only_and_idempotent(client, harness):
    admin, sup, alice = harness.user("admin"), harness.user("supervisor"), harness.user()
    body = {"username": alice["username"], "credits": 100, "idempotencyKey": "k-1"}
    for who in (alice, sup):
        r = await client.post("/api/credits/allocate", json=body, headers=who["headers"])
        assert r.status_code == 403
    r = await client.post("/api/credits/allocate", json=body, headers=admin["headers"])
    assert await r.get_json() == {"userId": alice["id"], "balance": 100, "available": 100}
    r = await client.post("/api/credits/allocate", json=body, headers=admin["headers"])
    assert (await r.get_json())["balance"] == 100  # same key: allocated once
    r = await client.post(
        "/api/credits/allocate", json={**body, "credits": 5}, headers=admin["headers"]
    )
    assert r.status_code == 409 and (await r.get_json())["errorCode"] == "IDEMPOTENCY_CONFLICT"
    r = await client.post(
        "/api/credits/allocate", json={**body, "reason": "other"}, headers=admin["headers"]
    )
    assert r.status_code == 409 and (await r.get_json())["errorCode"] == "IDEMPOTENCY_CONFLICT"
    r = await client.post(
        "/api/credits/allocate",
        json={"userId": alice["id"], "credits": 5},
        headers=admin["headers"],
    )
    assert (await r.get_json())["balance"] == 105
    assert harness.svc.ledger.verify() == []


async def test_allocate_to_a_user_named_twice_must_name_one(client, harness):
    admin, alice, bob = harness.user("admin"), harness.user(), harness.user()
    for body, status in (
        ({"userId": alice["id"], "username": bob["username"]}, 400),
        ({"userId": alice["id"], "username": "nobody"}, 404),
        ({"userId": alice["id"], "username": alice["username"]}, 200),
    ):
        r = await client.post(
            "/api/credits/allocate", json={**body, "credits": 7}, headers=admin["headers"]
        )
        assert r.status_code == status, await r.get_json()
    assert harness.svc.ledger.balance(alice["id"]).balance == 7
    assert harness.svc.ledger.balance(bob["id"]).balance == 0


@pytest.mark.parametrize(
    "credits",
    [-5, 0, 1.5, 2**53 + 1, "100", None, True, [1]],
    ids=["negative", "zero", "fraction", "huge", "string", "null", "bool", "list"],
)
async def test_bad_amounts_are_400_and_change_nothing(client, harness, credits):
    admin, alice = harness.user("admin"), harness.user(credits=10)
    r = await client.post(
        "/api/credits/allocate",
        json={"userId": alice["id"], "credits": credits},
        headers=admin["headers"],
    )
    assert r.status_code == 400
    assert (await r.get_json())["errorCode"] == "VALIDATION_ERROR"
    assert harness.svc.ledger.balance(alice["id"]).balance == 10


async def test_allocate_to_unknown_user_is_404(client, harness):
    admin = harness.user("admin")
    for body in (
        {"userId": "nope", "credits": 5},
        {"username": "nope", "credits": 5},
        {"credits": 5},
    ):
        r = await client.post("/api/credits/allocate", json=body, headers=admin["headers"])
        assert r.status_code in (404, 400)
        assert (await r.get_json())["errorCode"] in ("USER_NOT_FOUND", "VALIDATION_ERROR")
    r = await client.post(
        "/api/credits/allocate", json={"userId": "nope", "credits": 5}, headers=admin["headers"]
    )
    assert r.status_code == 404


async def test_check_prices_from_the_catalog(client, harness):
    alice = harness.user(credits=3)
    r = await client.post(
        "/api/credits/check",
        json={"modelId": "amazon.nova-micro-v1:0", "estimatedTokens": 500},
        headers=alice["headers"],
    )
    assert await r.get_json() == {"sufficient": True, "available": 3, "required": 2}
    r = await client.post(
        "/api/credits/check",
        json={"modelId": "meta.llama3-70b-instruct-v1:0", "estimatedTokens": 500},
        headers=alice["headers"],
    )
    assert await r.get_json() == {"sufficient": False, "available": 3, "required": 15}
    r = await client.post("/api/credits/check", json={"modelId": "nope"}, headers=alice["headers"])
    assert r.status_code == 400 and (await r.get_json())["errorCode"] == "MODEL_NOT_FOUND"
    r = await client.post(
        "/api/credits/check",
        json={"modelId": "amazon.nova-micro-v1:0", "estimatedTokens": -1},
        headers=alice["headers"],
    )
    assert r.status_code == 400


async def test_usage_lists_allocations_and_charges(client, harness):
    alice = harness.user(credits=1000)
    other = harness.user()
    r = await client.post("/api/chat/sessions", json={}, headers=alice["headers"])
    sid = (await r.get_json())["sessionId"]
    r = await client.post(
        f"/api/chat/sessions/{sid}/messages", json={"message": "hello"}, headers=alice["headers"]
    )
    charged = (await r.get_json())["creditsCharged"]
    r = await client.get("/api/credits/usage?limit=1", headers=alice["headers"])
    body = await r.get_json()
    assert body["pagination"]["total"] == 2 and body["pagination"]["hasNext"] is True
    newest = body["entries"][0]
    assert newest["kind"] == "charge" and newest["amount"] == -charged
    assert newest["modelId"] == "amazon.nova-micro-v1:0"
    assert newest["streamingSessionId"].startswith("stream-")
    r = await client.get("/api/credits/usage?page=2&limit=1", headers=alice["headers"])
    oldest = (await r.get_json())["entries"][0]
    assert oldest["kind"] == "allocation" and oldest["amount"] == 1000
    r = await client.get(f"/api/credits/usage?userId={alice['id']}", headers=other["headers"])
    assert r.status_code == 403
    r = await client.get("/api/credits/usage?limit=500", headers=alice["headers"])
    assert r.status_code == 400
