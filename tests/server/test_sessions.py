"""Chat sessions and messages over the in-process client (SPEC §4)."""

from __future__ import annotations

import uuid

import pytest


async def _create(client, user, **body):
    r = await client.post("/api/chat/sessions", json=body, headers=user["headers"])
    return r.status_code, await r.get_json()


async def test_create_get_list_delete(client, harness):
    alice = harness.user()
    status, created = await _create(client, alice, title="Hello", source="mobile")
    assert status == 201
    assert created["title"] == "Hello" and created["source"] == "mobile"
    assert created["modelId"] == "amazon.nova-micro-v1:0"
    assert set(created) == {"sessionId", "title", "modelId", "source", "createdAt", "updatedAt"}
    sid = created["sessionId"]

    r = await client.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    full = await r.get_json()
    assert full["sessionId"] == sid and full["messages"] == []

    r = await client.get("/api/chat/sessions", headers=alice["headers"])
    listing = await r.get_json()
    assert [s["sessionId"] for s in listing["sessions"]] == [sid]
    assert listing["pagination"] == {
        "page": 1,
        "limit": 20,
        "total": 1,
        "totalPages": 1,
        "hasNext": False,
    }

    r = await client.delete(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    assert r.status_code == 200
    r = await client.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    assert r.status_code == 404


async def test_initial_message_and_client_chosen_id(client, harness):
    alice = harness.user()
    chosen = str(uuid.uuid4())
    status, created = await _create(client, alice, id=chosen, initialMessage="Tell me a story")
    assert status == 201 and created["sessionId"] == chosen
    assert created["title"] == "Tell me a story"
    r = await client.get(f"/api/chat/sessions/{chosen}/messages", headers=alice["headers"])
    msgs = (await r.get_json())["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [("user", "Tell me a story")]
    status, body = await _create(client, alice, id=chosen)
    assert status == 409 and body["errorCode"] == "SESSION_EXISTS"
    status, created = await _create(client, alice, id="12345")
    assert status == 201 and created["sessionId"] == "12345"


async def test_others_sessions_are_404_not_403(client, harness):
    alice, bob = harness.user(), harness.user()
    _, created = await _create(client, alice, title="private")
    sid = created["sessionId"]
    for method, path in [
        ("GET", f"/api/chat/sessions/{sid}"),
        ("DELETE", f"/api/chat/sessions/{sid}"),
        ("GET", f"/api/chat/sessions/{sid}/messages"),
    ]:
        r = await client.open(path, method=method, headers=bob["headers"])
        assert r.status_code == 404, path
        assert (await r.get_json()) == {
            "message": "Chat session not found.",
            "errorCode": "SESSION_NOT_FOUND",
        }
    r = await client.post(
        f"/api/chat/sessions/{sid}/messages", json={"message": "hi"}, headers=bob["headers"]
    )
    assert r.status_code == 404
    # Still there, untouched, for its owner.
    r = await client.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    assert r.status_code == 200 and (await r.get_json())["messages"] == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"title": "x" * 201}, "VALIDATION_ERROR"),
        ({"title": 5}, "VALIDATION_ERROR"),
        ({"modelId": "gpt-99"}, "MODEL_NOT_FOUND"),
        ({"id": "not-a-uuid"}, "VALIDATION_ERROR"),
        ({"initialMessage": "   "}, "VALIDATION_ERROR"),
        ({"initialMessage": "x" * 4001}, "VALIDATION_ERROR"),
    ],
)
async def test_bad_session_bodies_store_nothing(client, harness, body, code):
    alice = harness.user()
    status, out = await _create(client, alice, **body)
    assert status == 400 and out["errorCode"] == code
    assert harness.svc.store.list_sessions(alice["id"], _page())[1] == 0


def _page():
    from server.store import Page

    return Page(0, 100)


@pytest.mark.parametrize(
    "query", ["page=0", "limit=0", "limit=101", "page=abc", "limit=1.5", "page=-1"]
)
async def test_bad_pagination_is_400(client, harness, query):
    alice = harness.user()
    r = await client.get(f"/api/chat/sessions?{query}", headers=alice["headers"])
    assert r.status_code == 400
    assert (await r.get_json())["errorCode"] == "VALIDATION_ERROR"


async def test_pagination_pages_and_past_the_end(client, harness):
    alice = harness.user()
    for i in range(5):
        await _create(client, alice, title=f"s{i}")
    r = await client.get("/api/chat/sessions?page=2&limit=2", headers=alice["headers"])
    body = await r.get_json()
    assert len(body["sessions"]) == 2
    assert body["pagination"] == {
        "page": 2,
        "limit": 2,
        "total": 5,
        "totalPages": 3,
        "hasNext": True,
    }
    r = await client.get("/api/chat/sessions?page=9&limit=2", headers=alice["headers"])
    body = await r.get_json()
    assert (
        r.status_code == 200 and body["sessions"] == [] and body["pagination"]["hasNext"] is False
    )


async def test_non_streaming_message_is_answered_and_charged(client, harness):
    alice = harness.user(credits=1000)
    _, created = await _create(client, alice)
    sid = created["sessionId"]
    r = await client.post(
        f"/api/chat/sessions/{sid}/messages",
        json={"message": "Hello there"},
        headers=alice["headers"],
    )
    assert r.status_code == 200, await r.get_data()
    body = await r.get_json()
    assert body["userMessage"]["content"] == "Hello there"
    assistant = body["assistantMessage"]
    assert assistant["role"] == "assistant" and assistant["status"] == "complete"
    assert len(assistant["content"].split()) == 20  # CHINWAG_SIM_ANSWER_TOKENS in the fixture
    assert body["tokensUsed"] == assistant["tokensUsed"] > 20
    assert body["creditsCharged"] >= 1
    bal = harness.svc.ledger.balance(alice["id"])
    assert bal.balance == 1000 - body["creditsCharged"] and bal.reserved == 0
    r = await client.get(f"/api/chat/sessions/{sid}/messages", headers=alice["headers"])
    msgs = (await r.get_json())["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[1]["content"] == assistant["content"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"message": ""},
        {"message": "  \n "},
        {"message": "x" * 4001},
        {"message": 3},
        {"message": "ok", "modelId": "nope"},
    ],
)
async def test_bad_messages_store_and_reserve_nothing(client, harness, body):
    alice = harness.user(credits=1000)
    _, created = await _create(client, alice)
    sid = created["sessionId"]
    r = await client.post(f"/api/chat/sessions/{sid}/messages", json=body, headers=alice["headers"])
    assert r.status_code == 400
    assert harness.svc.store.list_messages(sid)[1] == 0
    assert harness.svc.ledger.balance(alice["id"]).available == 1000


async def test_message_without_credits_is_402_and_stores_nothing(client, harness):
    alice = harness.user(credits=0)
    _, created = await _create(client, alice)
    sid = created["sessionId"]
    r = await client.post(
        f"/api/chat/sessions/{sid}/messages", json={"message": "hi"}, headers=alice["headers"]
    )
    assert r.status_code == 402
    assert (await r.get_json())["errorCode"] == "INSUFFICIENT_CREDITS"
    assert harness.svc.store.list_messages(sid)[1] == 0
