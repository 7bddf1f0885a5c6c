"""server.push: the run writes its client's bytes; one writer at a time; nothing lost.

A real observation stream and its primary reader; the ASGI ``send`` is a
recorder that can be made to block, as a socket write to a full buffer does.
(The same through real sockets: tests/e2e, test_slow_reader, test_shutdown.)
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from observation import ObservationManager, Stream
from server.push import Push, serve_push
from server.sse import encode_event
from server.timers import Timers


class Send:
    """An ASGI ``send`` that records the bodies; ``hold()`` makes writes wait until ``release()``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.gate: trio.Event | None = None
        self.entered = trio.Event()
        self.fail = False

    def hold(self) -> None:
        self.gate, self.entered = trio.Event(), trio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()
        self.gate = None

    async def __call__(self, message: dict[str, Any]) -> None:
        assert message["type"] == "http.response.body" and message["more_body"]
        if self.fail:
            raise OSError("connection reset")
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.bodies.append(message["body"])
        await trio.lowlevel.checkpoint()

    @property
    def ids(self) -> list[int]:
        return [
            int(line[4:])
            for line in b"".join(self.bodies).decode().splitlines()
            if line.startswith("id: ")
        ]


class Run:
    """The run's side that serve_push uses."""

    def __init__(self) -> None:
        self.stop_requested_at: float | None = None
        self.push: Push | None = None
        self.detached = 0

    def attach(self, push: Push | None = None) -> None:
        self.push = push

    def detach(self, push: Push | None = None) -> None:
        self.detached += 1
        if self.push is push:
            self.push = None


@pytest.fixture
def stream() -> Stream:
    return ObservationManager(ring_size=64, encode=encode_event).open_stream("s1", group="g")


async def test_pump_writes_what_is_pending_in_one_write_then_nothing() -> None:
    stream = ObservationManager(ring_size=64, encode=encode_event).open_stream("s", group="g")
    send = Send()
    with stream.reader(0, primary=True) as reader:
        push = Push(reader, send)
        for k in range(3):
            stream.publish_nowait("chunk", f'{{"k":{k}}}')
        await push.pump()
        assert send.ids == [1, 2, 3] and len(send.bodies) == 1
        await push.pump()  # nothing pending: no write
        assert len(send.bodies) == 1
        push.add(b": heartbeat 1\n\n")
        stream.publish_nowait("chunk", "{}")
        await push.pump()  # the heartbeat goes with the next write
        assert send.bodies[-1].startswith(b": heartbeat 1\n\n") and send.ids == [1, 2, 3, 4]


async def test_one_writer_at_a_time_and_the_writer_takes_what_was_published_meanwhile(
    stream: Stream,
) -> None:
    send = Send()
    with stream.reader(0, primary=True) as reader:
        push = Push(reader, send)
        stream.publish_nowait("chunk", "{}")
        send.hold()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push.pump)
            await send.entered.wait()  # the first write is in flight, and waits
            assert push.busy and push.writes == 1
            for _ in range(5):
                stream.publish_nowait("chunk", "{}")
                await push.pump()  # another task: leaves it to the writer, returns at once
            push.add(b": heartbeat\n\n")
            assert send.bodies == []
            send.release()
        assert not push.busy and push.writes == 1  # the first write took all the rest too
    # In order, no gap, no duplicate; the heartbeat went out too.
    assert send.ids == [1, 2, 3, 4, 5, 6]
    assert b": heartbeat\n\n" in b"".join(send.bodies)


@pytest.mark.parametrize("guarded", [False, True], ids=["own-scope", "callers-guard"])
async def test_a_write_in_flight_finishes_even_if_its_task_is_cancelled(
    stream: Stream, guarded: bool
) -> None:
    """Shielded by a scope of its own, or by the caller's innermost scope, whose
    shield the canceller raises first (``shield_write``, the run's way): either
    way the stop waits for the write and arrives at the caller's next checkpoint."""
    send = Send()
    after: list[str] = []
    with stream.reader(0, primary=True) as reader:
        push = Push(reader, send)
        stream.publish_nowait("chunk", "{}")
        send.hold()
        run_scope = trio.CancelScope()
        guards: list[trio.CancelScope] = []

        async def run() -> None:
            with run_scope, trio.CancelScope() as guard:
                guards.append(guard)
                await (push.write(guard) if guarded else push.pump())
                assert guard.shield is False  # lowered again
                after.append("written")
                await trio.lowlevel.checkpoint()  # the stop arrives here
                after.append("not reached")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await send.entered.wait()
            # A guarded write costs no cancel-scope work until somebody stops it.
            assert guards[0].shield is False
            push.shield_write()
            assert guards[0].shield is guarded
            run_scope.cancel()  # the run is stopped mid-write
            await trio.testing.wait_all_tasks_blocked()
            assert after == []  # still writing
            send.release()
        assert run_scope.cancelled_caught and after == ["written"]
        # The batch taken from the ring was written: the client has no gap.
        assert send.ids == [1] and reader.position == 1


async def test_shield_write_without_a_write_in_flight_changes_nothing(stream: Stream) -> None:
    """Between writes a stop needs no shield: it arrives at once."""
    send = Send()
    with stream.reader(0, primary=True) as reader:
        push = Push(reader, send)
        with trio.CancelScope() as guard:
            stream.publish_nowait("chunk", "{}")
            await push.write(guard)
            push.shield_write()
            assert guard.shield is False
            guard.cancel()
            await trio.lowlevel.checkpoint()
            pytest.fail("not cancelled")  # pragma: no cover
        assert guard.cancelled_caught and send.ids == [1]


async def test_a_failed_write_closes_the_push_and_wakes_the_response(stream: Stream) -> None:
    send = Send()
    with stream.reader(0, primary=True) as reader:
        push = Push(reader, send)
        woke = trio.Event()

        async def response() -> None:
            await push.lot.park()
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(response)
            await trio.testing.wait_all_tasks_blocked()
            send.fail = True
            stream.publish_nowait("chunk", "{}")
            await push.pump()  # the run's write: the error is not the run's
            assert push.finished
            await woke.wait()
        stream.publish_nowait("chunk", "{}")
        await push.pump()  # closed: nobody writes any more
        assert send.bodies == []


async def test_serve_push_replays_beats_and_ends_with_the_stream(
    stream: Stream, timers: Timers, autojump_clock: trio.testing.MockClock
) -> None:
    for _ in range(3):
        stream.publish_nowait("chunk", "{}")  # before the client attached: a replay
    send, run = Send(), Run()
    with stream.reader(1, primary=True) as reader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_push(run, reader, send, interval=1.0, timers=timers, scope={})
            )
            await trio.testing.wait_all_tasks_blocked()
            assert run.push is not None and send.ids == [2, 3]  # after id 1
            await trio.sleep(2.5)  # two heartbeats, nothing else
            assert sum(b.startswith(b": heartbeat") for b in send.bodies) == 2
            stream.publish_nowait("chunk", "{}")
            await run.push.pump()  # the run's write after its publish
            stream.publish_nowait("done", "{}")
            stream.close()
            run.push.wake()  # the run, at its end
        assert send.ids == [2, 3, 4, 5]
    assert run.push is None and run.detached == 1


async def test_serve_push_cuts_a_stopped_runs_stuck_write_after_the_grace(
    stream: Stream, timers: Timers, autojump_clock: trio.testing.MockClock, monkeypatch: Any
) -> None:
    cut: list[dict[str, Any]] = []
    was_cut = trio.Event()

    def cut_peer(scope: dict[str, Any]) -> bool:
        cut.append(scope)
        was_cut.set()
        return True

    monkeypatch.setattr("server.push.cut_peer", cut_peer)
    send, run = Send(), Run()
    scope = {"client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}
    with stream.reader(0, primary=True) as reader:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: serve_push(run, reader, send, interval=10.0, timers=timers, scope=scope)
            )
            await trio.testing.wait_all_tasks_blocked()
            assert run.push is not None
            push = run.push
            stream.publish_nowait("chunk", "{}")
            send.hold()
            nursery.start_soon(push.pump)  # the run's write, which will not return
            await send.entered.wait()
            await trio.sleep(3)
            assert cut == []  # running on: a slow client is the kernel's business
            run.stop_requested_at = trio.current_time()
            push.wake()  # what StreamRun.cancel does
            t0 = trio.current_time()
            with trio.fail_after(5):
                await was_cut.wait()
            assert 0.9 <= trio.current_time() - t0 <= 1.2  # HURRY_GRACE_S
            assert cut == [scope] and push.finished
            send.release()  # the cut makes the write fail or return
    assert run.detached == 1


async def test_a_runs_stop_mid_write_lets_the_write_finish(stream: Stream) -> None:
    """StreamRun.cancel raises the shield of the write in flight before it cancels
    (its writes run under ``write(guard)`` with no scope of their own)."""
    from types import SimpleNamespace

    from server.auth import Principal
    from server.providers.base import ChatTurn, ModelRequest
    from server.run import StreamRun

    run = StreamRun(
        SimpleNamespace(link=None),  # type: ignore[arg-type]
        principal=Principal("u1", "alice", "enduser"),
        session_id="g",
        model=None,  # type: ignore[arg-type]
        request=ModelRequest("m", (ChatTurn("user", "hi"),), 5),
        reservation=None,  # type: ignore[arg-type]
        user_message={},
        assistant_message={},
        stream=stream,
        streaming=True,
    )
    send = Send()
    after: list[str] = []
    with stream.reader(0, primary=True) as reader:
        push = Push(reader, send)
        run.attach(push)
        stream.publish_nowait("chunk", "{}")
        send.hold()

        async def writes() -> None:  # as StreamRun.run's loop does
            with run.cancel_scope, trio.CancelScope() as guard:
                await push.write(guard)
                after.append("written")
                await trio.lowlevel.checkpoint()
                after.append("not reached")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writes)
            await send.entered.wait()
            run.cancel("cancelled")
            await trio.testing.wait_all_tasks_blocked()
            assert after == []  # still writing
            send.release()
        assert run.cancel_scope.cancelled_caught and after == ["written"]
        assert send.ids == [1] and run.cancel_reason == "cancelled"
