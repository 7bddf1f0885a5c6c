"""The simulated model's pacing."""

from __future__ import annotations

import time

import trio
import trio.testing

from server.providers.base import ChatTurn, ModelRequest, TextDelta
from server.providers.simulated import CATCH_UP_MAX, SimulatedProvider


def _request(max_tokens: int = 100) -> ModelRequest:
    return ModelRequest("m", (ChatTurn("user", "hello"),), max_tokens=max_tokens)


async def test_tokens_keep_an_absolute_schedule(autojump_clock: trio.testing.MockClock) -> None:
    model = SimulatedProvider(ttft_ms=0, tokens_per_s=10, answer_tokens=5)
    seen: list[float] = []
    async with model.stream(_request()) as events:
        start = trio.current_time()
        async for event in events:
            if isinstance(event, TextDelta):
                seen.append(round(trio.current_time() - start, 6))
    assert seen == [0.1, 0.2, 0.3, 0.4, 0.5]


async def test_tokens_already_due_are_handed_over_together() -> None:
    """A loop that was busy gets the due tokens at once, as from a socket buffer."""
    model = SimulatedProvider(ttft_ms=0, tokens_per_s=1000, answer_tokens=500)
    passes = 0

    async def other_task() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery, model.stream(_request(500)) as events:
        nursery.start_soon(other_task)
        await events.__anext__()  # Started
        await events.__anext__()  # the first token: the schedule has begun
        time.sleep(0.2)  # noqa: ASYNC251 -- the loop is busy on purpose: ~200 tokens fall due
        before = passes
        for _ in range(64):
            assert isinstance(await events.__anext__(), TextDelta)
        # 64 due tokens took about 64 / CATCH_UP_MAX scheduler passes, not 64.
        assert passes - before <= 64 // CATCH_UP_MAX + 1
        nursery.cancel_scope.cancel()


async def test_an_unpaced_model_yields_in_bounded_runs() -> None:
    model = SimulatedProvider(ttft_ms=0, tokens_per_s=0, answer_tokens=500)
    passes = 0

    async def other_task() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery, model.stream(_request(500)) as events:
        nursery.start_soon(other_task)
        await events.__anext__()  # Started
        before = passes
        for _ in range(4 * CATCH_UP_MAX):
            assert isinstance(await events.__anext__(), TextDelta)
        # Runs of CATCH_UP_MAX tokens, then a checkpoint: others still get the loop.
        assert 3 <= passes - before <= 5
        nursery.cancel_scope.cancel()
