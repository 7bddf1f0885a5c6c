"""SIGTERM with open streams: every client and observer is told, everything is
persisted and settled, and the process exits 0 within the bound."""

from __future__ import annotations

import signal
import sqlite3
from contextlib import closing

import httpx
import pytest
import trio
import trio.testing

import ledger
from server.serving import cut_connections
from tests.e2e.stuck import stuck_stream
from tests.e2e.test_cli import _run, start_server
from tests.sse import events, messages

#: CHINWAG_SHUTDOWN_GRACE_MS at its default.
GRACE_S = 10
#: An answer far longer than a stuck client's kernel buffers can take.
LONG = 8000


async def test_sigterm_tells_streams_and_observers_then_exits_0(tmp_path, nursery):
    assert _run(tmp_path, "user", "add", "dee", "--password", "dee-password").returncode == 0
    assert (
        _run(
            tmp_path, "user", "add", "sup", "--password", "sup-password", "--role", "supervisor"
        ).returncode
        == 0
    )
    assert _run(tmp_path, "credits", "allocate", "dee", "1000").returncode == 0
    token = _run(tmp_path, "token", "dee").stdout.strip()
    sup_token = _run(tmp_path, "token", "sup").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    server = await start_server(
        tmp_path, nursery, CHINWAG_SIM_TOKENS_PER_S="20", CHINWAG_SIM_ANSWER_TOKENS="2000"
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        sid = (await http.post("/api/chat/sessions", json={}, headers=headers)).json()["sessionId"]
        async with (
            http.stream(
                "POST",
                f"/api/chat/sessions/{sid}/stream",
                json={"message": "long", "maxTokens": 4000},
                headers=headers,
            ) as r,
            http.stream(
                "GET",
                f"/api/chat/sessions/{sid}/observe",
                headers={"Authorization": f"Bearer {sup_token}"},
            ) as o,
        ):
            feed, ofeed = messages(r), messages(o)
            client = []
            while sum(m.event == "chunk" for m in client) < 2:
                client.append(await feed.__anext__())
            started = trio.current_time()
            server.proc.send_signal(signal.SIGTERM)
            client += [m async for m in feed]
            observed = [m async for m in ofeed]
        with trio.fail_after(15):
            code = await server.proc.wait()
        took = trio.current_time() - started
    assert code == 0 and took < 5  # streams settle at once; grace is 10 s
    for got in (events(client), events(observed)):
        assert got[-2].event == "error"
        assert got[-2].data["errorCode"] == "SERVER_SHUTTING_DOWN"
        assert got[-1].event == "done" and got[-1].data["finishReason"] == "shutdown"
    done = events(client)[-1].data

    # After a restart: persisted as interrupted, charged for what was produced, nothing reserved.
    server = await start_server(tmp_path, nursery)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            msgs = (await http.get(f"/api/chat/sessions/{sid}/messages", headers=headers)).json()
            assistant = msgs["messages"][-1]
            assert assistant["status"] == "interrupted"
            assert assistant["outputTokens"] == done["outputTokens"] >= 2
            bal = (await http.get("/api/credits/balance", headers=headers)).json()
            assert bal["reserved"] == 0 and bal["balance"] == 1000 - done["creditsCharged"]
    finally:
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await server.proc.wait() == 0


async def test_cut_connections_wakes_a_shielded_write_to_a_client_that_stopped_reading():
    """The mechanism: a write shielded from cancellation (as Hypercorn's are), blocked
    on a client that reads nothing, wakes with an error when its socket is cut.
    Only accepted connections are cut: not the listener, not outgoing sockets."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)  # never reads
    accepted = await listener.accept()
    outcome: list[str] = []

    async def write_until_cut() -> None:
        with trio.CancelScope(shield=True):
            try:
                while True:
                    await accepted.send_all(b"x" * 65536)
            except trio.BrokenResourceError:
                outcome.append("cut")

    async with listener, client, accepted:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_until_cut)
                await trio.testing.wait_all_tasks_blocked()  # the kernel buffers are full
                assert cut_connections({port}) == 1
        assert outcome == ["cut"]
        assert cut_connections(set()) == 0
        await accepted.aclose()  # its owner closes it: a reset, the unsent data dropped
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await _read_to_the_end(client)


async def _read_to_the_end(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def _wait_until_stuck(http: httpx.AsyncClient, sup_token: str, session_id: str) -> None:
    """Return once the stream has stopped advancing, far from its end.

    Its client reads nothing (a 4 KB receive buffer) and the model is
    unpaced: the run writes to it until the kernel's buffers are full, then
    waits in that write (a write Hypercorn shields; server.push). Nothing
    signals a blocked write, so it is seen as the stream's events stopping
    (no event for 0.5 s) with no ``done``: unstuck, the whole answer takes
    a fraction of that.
    """
    async with http.stream(
        "GET",
        f"/api/chat/sessions/{session_id}/observe",
        headers={"Authorization": f"Bearer {sup_token}"},
    ) as o:
        feed = messages(o)
        seen = 0
        while True:
            with trio.move_on_after(0.5):
                msg = await feed.__anext__()
                assert msg.event != "done", "the stream ended: its client was not stuck"
                seen = max(seen, msg.id or 0)
                continue
            assert seen > 0
            return


async def test_sigterm_cuts_clients_that_stopped_reading(tmp_path, nursery):
    """Default grace (10 s) and slow-client timeout (30 s): two clients that stopped
    reading do not hold the process; their streams end as ``shutdown``, persisted
    and settled, and the process exits 0 within the grace."""
    assert _run(tmp_path, "user", "add", "dee", "--password", "dee-password").returncode == 0
    assert (
        _run(
            tmp_path, "user", "add", "sup", "--password", "sup-password", "--role", "supervisor"
        ).returncode
        == 0
    )
    assert _run(tmp_path, "credits", "allocate", "dee", "1000000").returncode == 0
    token = _run(tmp_path, "token", "dee").stdout.strip()
    sup_token = _run(tmp_path, "token", "sup").stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    server = await start_server(tmp_path, nursery, CHINWAG_SIM_ANSWER_TOKENS=str(LONG))
    stuck: list[trio.SocketStream] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            sids = [
                (await http.post("/api/chat/sessions", json={}, headers=headers)).json()[
                    "sessionId"
                ]
                for _ in range(2)
            ]
            stuck = [await stuck_stream(server.url, token, sid, LONG) for sid in sids]
            with trio.fail_after(10):
                for sid in sids:
                    await _wait_until_stuck(http, sup_token, sid)
        sent = trio.current_time()
        server.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(GRACE_S + 10):
            await server.proc.wait()
        took = trio.current_time() - sent
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()
        for stream in stuck:
            await stream.aclose()
    assert took < GRACE_S + 3, f"still running {took:.1f} s after SIGTERM"
    assert server.proc.returncode == 0

    db = tmp_path / "cli.db"
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT status, finish_reason, output_tokens FROM messages WHERE role = 'assistant'"
        ).fetchall()
    assert len(rows) == 2
    for status, finish_reason, output_tokens in rows:
        assert (status, finish_reason) == ("interrupted", "shutdown")
        assert 0 < output_tokens < LONG
    with ledger.Ledger(db) as book:
        stats = book.statistics()
        assert stats.open_reservations == 0 and stats.reserved_credits == 0
        assert stats.settled_total == 2
        assert book.verify() == []
