"""A supervisor stops a live answer (SPEC §6.1), over a real server, while its
client and an observer read it."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.conftest import with_settings
from tests.e2e.test_streaming import new_session
from tests.sse import Msg, events, messages

STOPPED = {"message": "This answer was stopped by a supervisor.", "errorCode": "STREAM_CANCELLED"}


@pytest.fixture
async def paced(live_factory: Any, settings: Any) -> Any:
    """50 tokens/s, 500-token answers: a stream lasts ~10 s unless stopped."""
    return await live_factory(with_settings(settings, sim_tokens_per_s=50, sim_answer_tokens=500))


async def read_until(feed: messages, predicate: Any) -> list[Msg]:
    out = []
    async for msg in feed:
        out.append(msg)
        if predicate(out):
            break
    return out


async def test_stop_tells_client_and_observer_and_charges_only_produced(paced):
    live = paced
    alice = live.harness.user(credits=100_000)
    sup = live.harness.user("supervisor")
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "a long answer", "maxTokens": 1000},
        headers=alice["headers"],
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        run = live.harness.svc.hub.for_stream(stream_id)
        client_feed = messages(r)
        client = await read_until(client_feed, lambda got: got[-1].event == "chunk")
        async with live.http.stream(
            "GET", f"/api/chat/sessions/{sid}/observe", headers=sup["headers"]
        ) as o:
            observer_feed = messages(o)
            observed = await read_until(observer_feed, lambda got: got[-1].event == "history-end")
            stop = await live.http.post(
                f"/api/chat/streams/{stream_id}/cancel",
                json={"reason": "off-topic answer"},
                headers=sup["headers"],
            )
            # The answer comes once the stream has ended, settled.
            assert stop.status_code == 200
            assert stop.json() == {"streamingSessionId": stream_id, "finishReason": "cancelled"}
            assert run.done
            client += await read_until(client_feed, lambda got: got[-1].event == "done")
            observed += await read_until(observer_feed, lambda got: got[-1].event == "done")

    for feed in (client, observed):
        evs = events(feed)
        assert [e.event for e in evs[-2:]] == ["error", "done"]
        assert evs[-2].data == STOPPED
        assert evs[-1].data["finishReason"] == "cancelled"
    # The observer saw exactly the client's events.
    client_evs = [(e.id, e.event, e.data) for e in events(client)]
    assert [(e.id, e.event, e.data) for e in events(observed) if e.id] == client_evs

    done = events(client)[-1].data
    stored = live.harness.svc.store.message_by_stream(stream_id)
    assert stored["status"] == "cancelled" and stored["finish_reason"] == "cancelled"
    assert stored["cancel_reason"] == "off-topic answer"
    produced = sum(e.event == "chunk" for e in events(client))
    assert stored["output_tokens"] == produced == done["outputTokens"] < 500
    assert stored["content"] == "".join(
        e.data["text"] for e in events(client) if e.event == "chunk"
    )
    bal = live.harness.svc.ledger.balance(alice["id"])
    assert bal.reserved == 0 and bal.balance == 100_000 - stored["credits_charged"]
    assert 0 < stored["credits_charged"] < run.reservation.amount
    assert live.harness.svc.ledger.verify() == []

    # Staff see why; the session view carries the reason.
    r = await live.http.get(f"/api/chat/users/{alice['id']}/sessions/{sid}", headers=sup["headers"])
    assert r.json()["messages"][-1]["cancelReason"] == "off-topic answer"
    assert r.json()["messages"][-1]["status"] == "cancelled"

    # It is no longer live: a second stop is 404.
    again = await live.http.post(f"/api/chat/streams/{stream_id}/cancel", headers=sup["headers"])
    assert again.status_code == 404 and again.json()["errorCode"] == "STREAM_NOT_FOUND"


async def test_stop_on_a_v1_stream_speaks_v1(paced):
    live = paced
    alice = live.harness.user(credits=100_000)
    admin = live.harness.user("admin")
    async with live.http.stream(
        "POST", "/api/v1/chat", json={"message": "go on"}, headers=alice["headers"]
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        feed = messages(r)
        got = await read_until(feed, lambda got: got[-1].event == "token")
        stop = await live.http.post(
            f"/api/chat/streams/{stream_id}/cancel", headers=admin["headers"]
        )
        assert stop.status_code == 200 and stop.json()["finishReason"] == "cancelled"
        got += await read_until(feed, lambda got: got[-1].event == "done")
    evs = events(got)
    assert [e.event for e in evs[-3:]] == ["token", "usage", "done"]
    assert evs[-3].data == {"text": STOPPED["message"]}
    assert evs[-1].data == {"finish_reason": "cancelled"}
    assert evs[-2].data["tokens_out"] == sum(e.event == "token" for e in evs) - 1


async def test_who_may_stop_and_what(paced):
    live = paced
    alice = live.harness.user(credits=100_000)
    sup = live.harness.user("supervisor")
    sid = await new_session(live, alice)
    async with live.http.stream(
        "POST", f"/api/chat/sessions/{sid}/stream", json={"message": "x"}, headers=alice["headers"]
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        feed = messages(r)
        await feed.__anext__()
        url = f"/api/chat/streams/{stream_id}/cancel"
        mine = await live.http.post(url, headers=alice["headers"])  # the owner is an enduser
        assert mine.status_code == 403 and mine.json()["errorCode"] == "FORBIDDEN"
        anon = await live.http.post(url)
        assert anon.status_code == 401
        long = await live.http.post(url, json={"reason": "x" * 201}, headers=sup["headers"])
        assert long.status_code == 400 and long.json()["errorCode"] == "VALIDATION_ERROR"
        bad = await live.http.post(url, json={"reason": 7}, headers=sup["headers"])
        assert bad.status_code == 400
        # None of those stopped it.
        assert not live.harness.svc.hub.for_stream(stream_id).done
        unknown = await live.http.post(
            "/api/chat/streams/stream-1-nope/cancel", headers=sup["headers"]
        )
        assert unknown.status_code == 404 and unknown.json()["errorCode"] == "STREAM_NOT_FOUND"
        ok = await live.http.post(url, headers=sup["headers"])  # no body: no reason
        assert ok.status_code == 200
        with trio.fail_after(5):
            rest = await read_until(feed, lambda got: got[-1].event == "done")
    assert rest[-1].data["finishReason"] == "cancelled"
    assert live.harness.svc.store.message_by_stream(stream_id)["cancel_reason"] is None
