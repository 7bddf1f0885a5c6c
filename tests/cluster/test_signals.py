"""Signals reach the stream's node; the caller's answer waits for the handler's."""

from __future__ import annotations

from typing import Any

import trio

from server.cluster.nodes import Identity, Node
from server.cluster.redis import ClusterRedis
from server.cluster.registry import Registry, StreamInfo
from server.cluster.signals import Signals


def node(redis: ClusterRedis, name: str) -> tuple[Node, Signals]:
    identity = Identity(name)
    registry = Registry(redis, identity, buffer_ms=5_000)
    return Node(redis, identity, registry, lease_ms=5_000, buffer_ms=5_000), Signals(
        redis, identity, block_ms=200
    )


async def test_a_stop_reaches_the_owner_and_the_answer_waits_for_its_end(redis: ClusterRedis):
    owner, owner_signals = node(redis, "a")
    caller, caller_signals = node(redis, "b")
    await owner.join()
    await caller.join()
    info = StreamInfo("stream-1", "session-1", "u", "m", "r", "msg", "chat", 1.0, "a")
    await owner.registry.register(info)
    await owner_signals.request(owner.identity.incarnation, "noop", {}, answer_within=0.01)
    ended = trio.Event()
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handle(kind: str, args: dict[str, Any]) -> dict[str, Any]:
        seen.append((kind, args))
        if kind == "stop":
            await trio.sleep(0.2)  # the stream settles
            ended.set()
            return {"finishReason": "cancelled"}
        return {}

    async with trio.open_nursery() as nursery:
        await nursery.start(owner_signals.run, handle)
        target = await caller_signals.owner_of_stream("stream-1")
        assert target == owner.identity.incarnation
        assert await caller_signals.owner_of_session("session-1") is None  # no claim taken here
        answer = await caller_signals.request(
            target, "stop", {"streamId": "stream-1", "note": "enough"}, answer_within=5
        )
        assert ended.is_set()  # the answer came after the end
        assert answer == {"finishReason": "cancelled"}
        # Several at once, each answered.
        answers: list[dict[str, Any] | None] = []

        async def ask(i: int) -> None:
            answers.append(
                await caller_signals.request(
                    target, "end-session", {"sessionId": f"s{i}"}, answer_within=5
                )
            )

        async with trio.open_nursery() as asking:
            for i in range(5):
                asking.start_soon(ask, i)
        assert answers == [{}] * 5
        nursery.cancel_scope.cancel()
    assert ("stop", {"streamId": "stream-1", "note": "enough"}) in seen
    # The early "noop" (sent before the inbox was read) was kept and answered too.
    assert seen[0] == ("noop", {})


async def test_a_dead_or_silent_target_answers_none(redis: ClusterRedis):
    caller, signals = node(redis, "b")
    await caller.join()
    with trio.fail_after(1):
        assert await signals.request("gone.1234", "stop", {}, answer_within=30) is None
    silent, _ = node(redis, "silent")
    await silent.join()  # holds a lease but nobody reads its inbox
    with trio.fail_after(3):
        assert (
            await signals.request(silent.identity.incarnation, "stop", {}, answer_within=0.3)
            is None
        )


async def test_a_failing_handler_still_answers(redis: ClusterRedis):
    owner, signals = node(redis, "a")
    await owner.join()

    async def handle(kind: str, args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(signals.run, handle)
        answer = await signals.request(owner.identity.incarnation, "stop", {}, answer_within=5)
        nursery.cancel_scope.cancel()
    assert answer == {"error": "RuntimeError"}
