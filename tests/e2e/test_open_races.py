"""What happens around a stream's open, over a real server: its client going
away while the open commits, its session deleted meanwhile, a shutdown
meanwhile, and a whole (non-streaming) answer that is stopped or cut.

The open's commit is shielded (it commits whatever its caller does), so each
test holds it just after the commit, in a shielded wait of the test's own,
as a slow commit (a PostgreSQL round trip, a busy writer) would.
"""

from __future__ import annotations

import json
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from server import run as run_module
from tests.conftest import with_settings
from tests.e2e.test_streaming import new_session
from tests.sse import messages


@pytest.fixture
async def paced(live_factory: Any, settings: Any) -> Any:
    """20 tokens/s, 200-token answers: a stream lasts ~10 s unless ended."""
    return await live_factory(with_settings(settings, sim_tokens_per_s=20, sim_answer_tokens=200))


class HeldOpen:
    """``hub._open`` held after its commit until :meth:`release` (for one
    session; ``hold=False``: not held, only recorded)."""

    def __init__(self, hub: Any, session_id: str, *, hold: bool = True) -> None:
        self.committed = trio.Event()
        self.released = trio.Event()
        self.handler: trio.Nursery | None = None  # the request's own (Quart-Trio's)
        self.runs: list[Any] = []
        real = hub._open

        async def held(who: Any, sid: str, *args: Any) -> Any:
            opened = await real(who, sid, *args)
            if sid == session_id:
                self.runs.append(opened)
                self.handler = trio.lowlevel.current_task().parent_nursery
                self.committed.set()
                if hold:
                    with trio.CancelScope(shield=True):
                        await self.released.wait()
            return opened

        hub._open = held

    async def until_handler_cancelled(self) -> None:
        """Shielded as the open is: until Hypercorn has seen the client go."""
        assert self.handler is not None
        with trio.fail_after(5):
            while not self.handler.cancel_scope.cancel_called:  # noqa: ASYNC110 - no event says it
                await trio.sleep(0.005)

    def release(self) -> None:
        self.released.set()

    async def first_token(self) -> Any:
        """The run, once its first token is published (read from its ring)."""
        with trio.fail_after(5):
            await self.committed.wait()
            (run,) = self.runs
            with run.stream.reader(0) as reader:
                await reader.next_batch()
        return run


async def _post(got: list[Any], live: Any, path: str, user: dict[str, Any]) -> None:
    """POST a message to ``path`` as ``user`` (a background task): the answer into ``got``."""
    got.append(await live.http.post(path, json={"message": "a long one"}, headers=user["headers"]))


async def test_a_client_gone_during_the_open_ends_its_run_at_once(paced, monkeypatch):
    """Not after ATTACH_TIMEOUT_S: the run, its reservation and its session's slot
    are let go as soon as the response that never started tells it."""
    monkeypatch.setattr(run_module, "ATTACH_TIMEOUT_S", 60.0)
    live = paced
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    hub = live.harness.svc.hub
    held = HeldOpen(hub, sid)
    parts = urlsplit(live.url)
    sock = trio.socket.socket()
    await sock.connect((parts.hostname, parts.port))
    client = trio.SocketStream(sock)
    body = json.dumps({"message": "hello"}).encode()
    await client.send_all(
        f"POST /api/chat/sessions/{sid}/stream HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {alice['token']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with trio.fail_after(5):
        await held.committed.wait()
    assert live.harness.svc.ledger.balance(alice["id"]).reserved > 0
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await client.aclose()  # a reset: the client is gone before any byte came back
    await held.until_handler_cancelled()
    held.release()
    (run,) = held.runs
    with trio.fail_after(10):  # well before the 60 s attach timeout
        await run.wait_done()
    assert run.outcome.finish_reason == "client_disconnected"
    assert run.outcome.output_tokens == 0 and run.outcome.credits_charged == 0
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0
    async with live.http.stream(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        json={"message": "again"},
        headers=alice["headers"],
    ) as again:
        assert again.status_code == 200  # the session's slot is free


async def test_deleting_a_session_ends_the_stream_being_opened_on_it(paced):
    """SPEC §4: a live stream on it is ended first — also one whose open is in flight."""
    live = paced
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    hub = live.harness.svc.hub
    held = HeldOpen(hub, sid)
    got: list[Any] = []

    async def stream() -> None:
        async with live.http.stream(
            "POST",
            f"/api/chat/sessions/{sid}/stream",
            json={"message": "hi"},
            headers=alice["headers"],
        ) as r:
            got.append(r.status_code)
            got.extend([m async for m in messages(r)])

    async def delete() -> None:
        r = await live.http.delete(f"/api/chat/sessions/{sid}", headers=alice["headers"])
        got.append(("deleted", r.status_code))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream)
        with trio.fail_after(5):
            await held.committed.wait()
        nursery.start_soon(delete)
        try:
            with trio.fail_after(5):  # the delete waits for the open, not the other way round
                while not hub._opened.statistics().tasks_waiting:  # noqa: ASYNC110 - nor here
                    await trio.sleep(0.005)
        finally:
            held.release()
    assert got[0] == 200 and got[-1] == ("deleted", 200)
    ending = [(m.event, m.data) for m in got[1:-1]]
    assert ending[-1][0] == "done"
    assert ending[-1][1]["finishReason"] == "client_disconnected"
    assert (
        await live.http.get(f"/api/chat/sessions/{sid}", headers=alice["headers"])
    ).status_code == 404
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0
    assert hub.for_session(sid) is None


async def test_shutdown_waits_for_a_run_whose_open_ends_meanwhile(paced):
    """``StreamHub.shutdown`` returns once every run is settled, also one whose
    open committed while it was waiting for the others."""
    live = paced
    alice = live.harness.user(credits=100_000)
    first, second = await new_session(live, alice), await new_session(live, alice)
    hub = live.harness.svc.hub
    opened_a = HeldOpen(hub, first, hold=False)
    held = HeldOpen(hub, second)

    async def stream(sid: str) -> None:
        async with live.http.stream(
            "POST",
            f"/api/chat/sessions/{sid}/stream",
            json={"message": "x"},
            headers=alice["headers"],
        ) as r:
            async for _ in messages(r):
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, first)
        run_a = await opened_a.first_token()
        nursery.start_soon(stream, second)
        with trio.fail_after(5):
            await held.committed.wait()
        cancel = run_a.cancel

        def cancel_and_release(reason: str, note: str | None = None) -> None:
            cancel(reason, note)
            held.release()  # the second open completes while shutdown waits for the first

        run_a.cancel = cancel_and_release
        await hub.shutdown()
        (run_b,) = held.runs
        assert run_a.done and run_b.done
        assert run_b.outcome.finish_reason == "shutdown"


@pytest.mark.parametrize("how", ["stop", "shutdown"])
async def test_a_whole_answer_stopped_or_cut_is_not_a_success(paced, how):
    """``POST …/messages`` answers what a stream's client is told (SPEC §6.1):
    409 STREAM_CANCELLED for a supervisor's stop, 503 SERVER_SHUTTING_DOWN for a
    shutdown; what was produced is stored and charged as for a stream."""
    live = paced
    alice = live.harness.user(credits=100_000)
    sup = live.harness.user("supervisor")
    sid = await new_session(live, alice)
    opened = HeldOpen(live.harness.svc.hub, sid, hold=False)
    answer: list[Any] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_post, answer, live, f"/api/chat/sessions/{sid}/messages", alice)
        run = await opened.first_token()
        if how == "stop":
            stop = await live.http.post(
                f"/api/chat/streams/{run.stream_id}/cancel", headers=sup["headers"]
            )
            assert stop.json()["finishReason"] == "cancelled"
        else:
            await live.harness.svc.hub.shutdown()
    (r,) = answer
    if how == "stop":
        assert r.status_code == 409
        assert r.json() == {
            "message": "This answer was stopped by a supervisor.",
            "errorCode": "STREAM_CANCELLED",
        }
    else:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["errorCode"] == "SERVER_SHUTTING_DOWN"
    assert r.headers["content-type"] == "application/json"
    stored = live.harness.svc.store.list_messages(sid)[0][-1]
    assert stored["status"] == ("cancelled" if how == "stop" else "interrupted")
    assert 0 < stored["output_tokens"] < 200
    assert stored["credits_charged"] == run.outcome.credits_charged
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0


@pytest.mark.parametrize("route", ["stream", "messages"])
async def test_a_session_deleted_before_the_open_is_a_404(live, monkeypatch, route):
    """Past its ownership check, before its open: the session deleted meanwhile is
    404 SESSION_NOT_FOUND, as it would be a moment later (not a 503 "retry")."""
    from server.streams import StreamHub

    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    checked, deleted = trio.Event(), trio.Event()
    start = StreamHub.start

    async def after_the_delete(self: Any, *args: Any, **kwargs: Any) -> Any:
        checked.set()
        await deleted.wait()
        return await start(self, *args, **kwargs)

    monkeypatch.setattr(StreamHub, "start", after_the_delete)
    got: list[Any] = []

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_post, got, live, f"/api/chat/sessions/{sid}/{route}", alice)
        with trio.fail_after(5):
            await checked.wait()
        r = await live.http.delete(f"/api/chat/sessions/{sid}", headers=alice["headers"])
        assert r.status_code == 200
        deleted.set()
    (r,) = got
    assert (r.status_code, r.json()["errorCode"]) == (404, "SESSION_NOT_FOUND")
    assert live.harness.svc.ledger.balance(alice["id"]).reserved == 0
    assert live.harness.svc.store.list_messages(sid)[1] == 0
