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


class Passes:
    """Counts scheduler passes: another task that checkpoints in a loop."""

    count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await trio.lowlevel.checkpoint()


async def test_tokens_already_due_are_handed_over_together() -> None:
    """A loop that was busy gets the due tokens at once, as from a socket buffer."""
    model = SimulatedProvider(ttft_ms=0, tokens_per_s=1000, answer_tokens=500)
    passes = Passes()
    async with trio.open_nursery() as nursery, model.stream(_request(500)) as events:
        nursery.start_soon(passes.run)
        await events.__anext__()  # Started
        await events.__anext__()  # the first token: the schedule has begun
        time.sleep(0.2)  # noqa: ASYNC251 -- the loop is busy on purpose: ~200 tokens fall due
        before = passes.count
        for _ in range(64):
            assert isinstance(await events.__anext__(), TextDelta)
        # 64 due tokens took about 64 / CATCH_UP_MAX scheduler passes, not 64.
        assert passes.count - before <= 64 // CATCH_UP_MAX + 1
        nursery.cancel_scope.cancel()


async def test_an_unpaced_model_yields_in_bounded_runs() -> None:
    model = SimulatedProvider(ttft_ms=0, tokens_per_s=0, answer_tokens=500)
    passes = Passes()
    async with trio.open_nursery() as nursery, model.stream(_request(500)) as events:
        nursery.start_soon(passes.run)
        await events.__anext__()  # Started
        before = passes.count
        for _ in range(4 * CATCH_UP_MAX):
            assert isinstance(await events.__anext__(), TextDelta)
        # Runs of CATCH_UP_MAX tokens, then a checkpoint: others still get the loop.
        assert 1 <= passes.count - before <= 5
        nursery.cancel_scope.cancel()


async def test_a_token_says_whether_the_next_follows_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``more``: True inside a run of due tokens, False at the end of each run
    (a wait, or the bound) and on the last token, so the run writes its client
    once a run (server.push), and at once when paced."""
    unpaced = SimulatedProvider(ttft_ms=0, tokens_per_s=0, answer_tokens=3 * CATCH_UP_MAX)
    async with unpaced.stream(_request(3 * CATCH_UP_MAX)) as events:
        more = [e.more async for e in events if isinstance(e, TextDelta)]
    ends = [i for i, m in enumerate(more) if not m]
    assert len(more) == 3 * CATCH_UP_MAX and ends[-1] == len(more) - 1
    assert all(b - a <= CATCH_UP_MAX + 1 for a, b in zip([-1, *ends], ends, strict=False))
    assert len(ends) <= 4  # a few runs, not a write per token

    paced = SimulatedProvider(ttft_ms=0, tokens_per_s=1000, answer_tokens=5)
    async with paced.stream(_request(5)) as events:
        assert [e.more async for e in events if isinstance(e, TextDelta)] == [False] * 5
