"""The seed's "AI Chat API" (SPEC §8, seed 002) against a real server: curl's
view, a line reader like the seed's OkHttp client, sessions by name, memory,
failures, observation, resume and a supervisor's stop."""

from __future__ import annotations

import itertools
import logging
import shutil
from typing import Any

import pytest
import trio

from tests.conftest import with_settings
from tests.e2e.test_streaming import FAULT_WORDS
from tests.sse import Msg, events, messages

SESSION = "session-20250819-143022-a1b2"


async def v1_chat(live: Any, user: dict[str, Any], body: dict[str, Any], **headers: str):
    """POST /api/v1/chat to the end; (response headers, messages)."""
    async with live.http.stream(
        "POST", "/api/v1/chat", json=body, headers={**user["headers"], **headers}
    ) as r:
        assert r.status_code == 200, await r.aread()
        out = []
        async for msg in messages(r):
            out.append(msg)
            if msg.event == "done":
                break
        return r.headers, out


def tokens(msgs: list[Msg]) -> str:
    return "".join(m.data["text"] for m in msgs if m.event == "token")


@pytest.fixture
async def scenario_live(live_factory: Any, settings: Any) -> Any:
    return await live_factory(with_settings(settings, test_scenarios=True))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_seed_curl_flow_unchanged(live):
    alice = live.harness.user(credits=10_000)
    cmd = [
        "curl",
        "-sN",
        "-D",
        "-",
        "-H",
        "Accept: text/event-stream",
        "-H",
        f"Authorization: Bearer {alice['token']}",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"message": "Hello, how are you?"}',
        f"{live.url}/api/v1/chat",
    ]
    done = await trio.run_process(cmd, capture_stdout=True)
    out = done.stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    headers = {
        k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head.splitlines()[1:])
    }
    assert head.startswith("HTTP/1.1 200")
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache, no-store, must-revalidate"
    assert headers["x-accel-buffering"] == "no"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-streaming-session-id"].startswith("stream-")
    assert body.startswith(": Connected to chat stream\n\n")
    blocks = [b for b in body.split("\n\n") if b and not b.startswith(":")]
    names = [
        next(line[7:] for line in b.splitlines() if line.startswith("event: ")) for b in blocks
    ]
    assert names == ["token"] * 20 + ["usage", "done"]
    assert blocks[-1].endswith('data: {"finish_reason":"stop"}')
    usage = blocks[-2]
    assert (
        '"tokens_in":' in usage and '"tokens_out":20' in usage and '"model":"amazon.nova' in usage
    )


async def test_usage_and_done_match_what_was_charged(live):
    alice = live.harness.user(credits=10_000)
    headers, msgs = await v1_chat(live, alice, {"message": "Tell me about trio"})
    assert msgs[0].comment == "Connected to chat stream"
    evs = events(msgs)
    assert [e.id for e in evs] == list(range(1, len(evs) + 1))  # resumable: every event has an id
    usage, done = evs[-2].data, evs[-1].data
    assert done == {"finish_reason": "stop"}
    stored = live.harness.svc.store.message_by_stream(headers["x-streaming-session-id"])
    assert stored["content"] == tokens(msgs) and stored["status"] == "complete"
    assert usage["tokens_in"] == stored["input_tokens"] and usage["tokens_out"] == 20
    settings = live.harness.svc.settings
    assert usage["cost_usd"] == pytest.approx(stored["credits_charged"] * settings.credit_usd)
    assert stored["credits_charged"] > 0
    bal = live.harness.svc.ledger.balance(alice["id"])
    assert bal.balance == 10_000 - stored["credits_charged"] and bal.reserved == 0


async def test_a_line_reader_like_the_seeds_okhttp_client(live):
    """The Kotlin reader: lines; every `data: ` line is one JSON document."""
    alice = live.harness.user(credits=10_000)
    async with live.http.stream(
        "POST", "/api/v1/chat", json={"message": "lines"}, headers=alice["headers"]
    ) as r:
        lines = [line async for line in r.aiter_lines()]
    import json

    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [d["text"] for d in data if "text" in d]
    assert data[-1] == {"finish_reason": "stop"} and "tokens_out" in data[-2]


async def test_session_id_names_a_session_created_once_and_reused(live):
    alice = live.harness.user(credits=10_000)
    bob = live.harness.user(credits=10_000)
    h1, _ = await v1_chat(live, alice, {"message": "first", "sessionId": SESSION})
    h2, _ = await v1_chat(live, alice, {"message": "second", "sessionId": SESSION})
    assert h1["x-chat-session-id"] == h2["x-chat-session-id"]
    # The normal session routes list it, by its id or by its name.
    for ref in (h1["x-chat-session-id"], SESSION):
        r = await live.http.get(f"/api/chat/sessions/{ref}/messages", headers=alice["headers"])
        assert r.status_code == 200
        listed = r.json()["messages"]
        assert [m["role"] for m in listed] == ["user", "assistant"] * 2
        assert [listed[0]["content"], listed[2]["content"]] == ["first", "second"]
    r = await live.http.get("/api/chat/sessions", headers=alice["headers"])
    assert [s["source"] for s in r.json()["sessions"]] == ["api"]
    # The same name from another user is another session, and reveals nothing.
    h3, _ = await v1_chat(live, bob, {"message": "mine", "sessionId": SESSION})
    assert h3["x-chat-session-id"] != h1["x-chat-session-id"]
    r = await live.http.get(f"/api/chat/sessions/{h1['x-chat-session-id']}", headers=bob["headers"])
    assert r.status_code == 404 and r.json()["errorCode"] == "SESSION_NOT_FOUND"
    # Without a sessionId every call is a new session.
    a, _ = await v1_chat(live, alice, {"message": "x"})
    b, _ = await v1_chat(live, alice, {"message": "y"})
    assert len({a["x-chat-session-id"], b["x-chat-session-id"], h1["x-chat-session-id"]}) == 3


@pytest.mark.parametrize(
    "body",
    [
        {"message": "test", "sessionId": "invalid"},
        {"message": "test", "sessionId": "bad-format"},
        {"message": "test", "sessionId": "session-2025-08-19-143022-a1b2"},
        {"message": "test", "sessionId": "session-20250819-143022-a1b"},
        {"message": "test", "sessionId": 42},
        {"message": ""},
        {"message": "   "},
        {"message": "a" * 4001},
        {"message": "test", "useMemory": "yes"},
        {},
    ],
)
async def test_bad_requests_are_plain_400s_and_store_nothing(live, body):
    alice = live.harness.user(credits=1000)
    r = await live.http.post("/api/v1/chat", json=body, headers=alice["headers"])
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["errorCode"] == "VALIDATION_ERROR"
    assert live.harness.svc.store.list_sessions(alice["id"], _page())[1] == 0
    assert live.harness.svc.ledger.balance(alice["id"]).available == 1000


def _page() -> Any:
    from server.store import Page

    return Page(offset=0, limit=10)


async def test_no_credits_is_402_before_the_stream_and_leaves_no_session(live):
    alice = live.harness.user(credits=0)
    r = await live.http.post(
        "/api/v1/chat", json={"message": "hi", "sessionId": SESSION}, headers=alice["headers"]
    )
    assert r.status_code == 402 and r.json()["errorCode"] == "INSUFFICIENT_CREDITS"
    assert live.harness.svc.store.list_sessions(alice["id"], _page())[1] == 0


async def test_unauthenticated_and_ping(live):
    r = await live.http.post("/api/v1/chat", json={"message": "hi"})
    assert r.status_code == 401 and r.json()["errorCode"] == "UNAUTHORIZED"
    alice = live.harness.user()
    r = await live.http.get("/api/v1/auth/ping", headers=alice["headers"])
    assert r.status_code == 200
    assert r.json() == {"ok": True, "userId": alice["id"], "role": "enduser"}
    r = await live.http.get("/api/v1/auth/ping", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


@pytest.mark.parametrize("scenario", sorted(FAULT_WORDS))
async def test_failures_are_one_friendly_token_then_done_error(scenario_live, scenario):
    live = scenario_live
    alice = live.harness.user(credits=10_000)
    headers, msgs = await v1_chat(live, alice, {"message": "test"}, **{"X-Test-Scenario": scenario})
    evs = events(msgs)
    words, _ = FAULT_WORDS[scenario]
    assert evs[-2].event == "token" and evs[-2].data == {"text": words}
    assert evs[-1].data == {"finish_reason": "error"}
    assert "usage" not in [e.event for e in evs]
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0
    stored = live.harness.svc.store.message_by_stream(headers["x-streaming-session-id"])
    assert stored["status"] == "error"


async def test_heartbeats_while_a_hang_waits(live_factory, settings):
    live = await live_factory(with_settings(settings, test_scenarios=True, sse_heartbeat_ms=100))
    alice = live.harness.user(credits=10_000)
    async with live.http.stream(
        "POST",
        "/api/v1/chat",
        json={"message": "test"},
        headers={**alice["headers"], "X-Test-Scenario": "hang"},
    ) as r:
        opened = trio.current_time()
        beats = []
        async for msg in messages(r):
            assert msg.event is None  # nothing but comments while it hangs
            if msg.comment and msg.comment.startswith("heartbeat "):
                beats.append(msg.at)
                if len(beats) == 4:
                    break
    # The configured 100 ms, not the default 15 s: beat k is due k periods after the
    # opening, never early; a stalled loop may send one late (and the next one on time).
    assert 0.05 < (beats[-1] - opened) / len(beats) < 0.5, [b - opened for b in beats]
    assert max(b - a for a, b in itertools.pairwise([opened, *beats])) < 1.0


async def test_disconnect_aborts_and_charges_only_produced_tokens(live_factory, settings):
    live = await live_factory(with_settings(settings, sim_tokens_per_s=100, sim_answer_tokens=500))
    alice = live.harness.user(credits=100_000)
    async with live.http.stream(
        "POST", "/api/v1/chat", json={"message": "long"}, headers=alice["headers"]
    ) as r:
        run = live.harness.svc.hub.for_stream(r.headers["x-streaming-session-id"])
        got = 0
        async for msg in messages(r):
            got += msg.event == "token"
            if got == 3:
                break
    with trio.fail_after(2):
        await run.wait_done()
    stored = live.harness.svc.store.message_by_stream(run.stream_id)
    assert stored["status"] == "interrupted" and 3 <= stored["output_tokens"] < 500
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0
    assert live.harness.svc.ledger.verify() == []


async def test_use_memory_recalls_the_callers_history_and_never_anothers(live, caplog):
    alice = live.harness.user(credits=100_000)
    bob = live.harness.user(credits=100_000)
    await v1_chat(live, alice, {"message": "My pet quokka is called Max."})
    # Bob's message says quokka too, and is long: were it recalled for Alice,
    # her input would grow by hundreds of tokens.
    await v1_chat(live, bob, {"message": "quokka " + "wombat " * 200})

    async def tokens_in(user: dict[str, Any], text: str, memory: bool) -> int:
        _, msgs = await v1_chat(live, user, {"message": text, "useMemory": memory})
        return next(m.data["tokens_in"] for m in msgs if m.event == "usage")

    ask = "What is my quokka called?"
    caplog.set_level(logging.INFO, logger="chinwag.memory")
    plain = await tokens_in(alice, ask, False)
    recalled = await tokens_in(alice, ask, True)
    record = next(r for r in caplog.records if r.name == "chinwag.memory")
    fields = record.fields  # type: ignore[attr-defined]
    # Her first message and the question she asked just before (both hers, both short).
    assert fields["results_count"] == 2 and fields["memory_ms"] >= 0
    # Alice's own short messages (and a heading) were added, not Bob's long one.
    assert 8 <= recalled - plain < 100
    # Nothing relevant: nothing added.
    assert await tokens_in(alice, "Tell me about pelicans", True) == await tokens_in(
        alice, "Tell me about pelicans", False
    )
    # Bob's own memory does bring his long message back.
    assert await tokens_in(bob, ask, True) - await tokens_in(bob, ask, False) > 300


async def test_recalled_context_stays_within_the_token_budget(live_factory, settings):
    """What memory adds to the input (and so to the charge) is at most
    CHINWAG_MEMORY_TOKEN_BUDGET, the heading and each line's date and role
    included: a message that fits the budget alone but not with them is left out."""
    budget = 40
    live = await live_factory(with_settings(settings, memory_token_budget=budget))
    alice = live.harness.user(credits=100_000)
    await v1_chat(live, alice, {"message": "quokka " + "x" * 71})  # 20 tokens of text

    async def tokens_in(memory: bool) -> tuple[int, Any]:
        headers, msgs = await v1_chat(live, alice, {"message": "quokka?", "useMemory": memory})
        return next(m.data["tokens_in"] for m in msgs if m.event == "usage"), headers

    plain, _ = await tokens_in(False)
    recalled, headers = await tokens_in(True)
    assert 0 <= recalled - plain <= budget
    stored = live.harness.svc.store.message_by_stream(headers["x-streaming-session-id"])
    assert stored["input_tokens"] == recalled  # what was charged


async def test_observers_see_exactly_the_clients_bytes_and_resume_works(live_factory, settings):
    live = await live_factory(
        with_settings(settings, sim_tokens_per_s=50, sim_answer_tokens=30, disconnect_grace_ms=5000)
    )
    alice = live.harness.user(credits=10_000)
    sup = live.harness.user("supervisor")
    async with live.http.stream(
        "POST", "/api/v1/chat", json={"message": "watch"}, headers=alice["headers"]
    ) as r:
        sid, stream_id = r.headers["x-chat-session-id"], r.headers["x-streaming-session-id"]
        raw = b""
        async for chunk in r.aiter_raw():
            raw += chunk
            if raw.count(b"event: token") >= 6:
                break
    # The client dropped; within the grace a resume picks the stream up
    # after the last whole event it got.
    raw = raw[: raw.rindex(b"\n\n") + 2]
    last = max(int(line[4:]) for line in raw.decode().splitlines() if line.startswith("id: "))
    async with live.http.stream(
        "GET",
        f"/api/chat/sessions/{sid}/stream",
        params={"streamingSessionId": stream_id},
        headers={**alice["headers"], "Last-Event-ID": str(last)},
    ) as resumed:
        assert resumed.status_code == 200
        rest = (await resumed.aread()).decode()
    assert rest.startswith(": Connected to chat stream\n\n")
    client_bytes = raw.decode().split("\n\n", 1)[1] + rest.split("\n\n", 1)[1]
    client_events = [b for b in client_bytes.split("\n\n") if b and not b.startswith(":")]
    assert [int(b.split("\n")[0][4:]) for b in client_events] == list(
        range(1, len(client_events) + 1)
    )
    assert client_events[-1].endswith('{"finish_reason":"stop"}')
    # A supervisor joining after the end gets the very same bytes, replayed.
    async with live.http.stream(
        "GET", f"/api/chat/sessions/{sid}/observe", headers=sup["headers"]
    ) as o:
        observed = (await o.aread()).decode()
    replayed = [b for b in observed.split("\n\n") if b.startswith("id: ")]
    assert replayed == client_events


async def test_a_refused_call_never_deletes_the_session_another_call_streams_on(live, monkeypatch):
    """Two calls with one new ``sessionId``: the first makes the session, then
    waits in its memory recall while the second streams on it; the first is
    refused (409: the session's stream is taken) and must leave the session,
    the second's turn and its stored answer alone."""
    from server.db import Db

    key = "session-20250101-120000-abcd"
    alice = live.harness.user(credits=100_000)
    streaming = trio.Event()
    read = Db.read

    async def recall_after_the_second_streams(self: Any, moment: Any, *args: Any) -> Any:
        if getattr(moment, "__name__", "") == "<lambda>":  # v1's memory recall
            await streaming.wait()
        return await read(self, moment, *args)

    monkeypatch.setattr(Db, "read", recall_after_the_second_streams)
    got: dict[str, Any] = {}

    async def first() -> None:
        r = await live.http.post(
            "/api/v1/chat",
            json={"message": "hello one", "sessionId": key, "useMemory": True},
            headers=alice["headers"],
        )
        got["first"] = r.status_code, r.json()

    async def second() -> None:
        # Once the first call has made the session (no event of ours says when).
        while live.harness.svc.store.session_by_key(alice["id"], key) is None:  # noqa: ASYNC110
            await trio.sleep(0.005)
        async with live.http.stream(
            "POST",
            "/api/v1/chat",
            json={"message": "hello two", "sessionId": key},
            headers=alice["headers"],
        ) as r:
            got["session"] = r.headers["x-chat-session-id"]
            streaming.set()
            got["second"] = [m async for m in messages(r)]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
    assert got["first"] == (
        409,
        {
            "message": "A stream is already active on this chat session.",
            "errorCode": "STREAM_ALREADY_ACTIVE",
        },
    )
    assert events(got["second"])[-1].event == "done"
    r = await live.http.get(f"/api/chat/sessions/{got['session']}", headers=alice["headers"])
    assert r.status_code == 200
    assert [m["role"] for m in r.json()["messages"]] == ["user", "assistant"]
    assert r.json()["messages"][1]["status"] == "complete"
