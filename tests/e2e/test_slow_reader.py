"""A client that keeps its connection open but stops reading must not hold
server resources past CHINWAG_SLOW_CLIENT_TIMEOUT_MS, nor block shutdown."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import with_settings
from tests.e2e.stuck import stuck_stream
from tests.e2e.test_streaming import new_session


async def test_a_client_that_stops_reading_is_let_go(live_factory, settings):
    live = await live_factory(
        with_settings(
            settings,
            observe_ring=64,
            sim_answer_tokens=5000,
            slow_client_timeout_ms=500,
        )
    )
    alice = live.harness.user(credits=100_000)
    sid = await new_session(live, alice)
    async with await stuck_stream(live.url, alice["token"], sid, 5000):
        hub = live.harness.svc.hub
        run = hub.for_session(sid)
        assert run is not None
        started = trio.current_time()
        with trio.fail_after(10):
            await run.wait_done()
        took = trio.current_time() - started
        assert run.outcome.finish_reason == "client_disconnected"
        assert took < 5
        msg = live.harness.svc.store.message_by_stream(run.stream_id)
        assert msg["status"] == "interrupted" and 0 < msg["output_tokens"] < 5000
        bal = live.harness.svc.ledger.balance(alice["id"])
        assert bal.reserved == 0 and bal.balance == 100_000 - msg["credits_charged"]
        # The kernel frees the pinned connection too (TCP_USER_TIMEOUT): the ring has
        # no reader left. The kernel gives no event to await, so poll, bounded.
        with trio.fail_after(10):
            while live.harness.svc.observations.statistics().readers:  # noqa: ASYNC110
                await trio.sleep(0.05)


@pytest.mark.parametrize("grace_ms", [0, 5000])
async def test_a_stop_is_prompt_while_the_run_waits_on_a_client_that_stopped_reading(
    live_factory, settings, grace_ms
):
    """The run writes its client's bytes itself (server.push), so with a client
    that stopped reading it ends up waiting in a write no cancellation reaches.
    A supervisor's stop still ends it in about HURRY_GRACE_S (its connection is
    cut), not after the slow-client timeout (a minute here), and only produced
    tokens are charged. With a disconnect grace, the cut connection's detach
    must not turn the stop into a disconnect (it did: "client_disconnected")."""
    live = await live_factory(
        with_settings(
            settings,
            sim_answer_tokens=8000,
            slow_client_timeout_ms=60_000,
            disconnect_grace_ms=grace_ms,
        )
    )
    alice = live.harness.user(credits=1_000_000)
    sid = await new_session(live, alice)
    hub = live.harness.svc.hub
    async with await stuck_stream(live.url, alice["token"], sid, 8000):
        run = hub.for_session(sid)
        assert run is not None
        # Wait until the run is in a write that does not return (the kernel's
        # buffers are full); nothing signals it, so watch the write's age, bounded.
        with trio.fail_after(10):
            await _stuck_for(run, 0.5)
        started = trio.current_time()
        with trio.fail_after(10):
            assert await hub.stop(run.stream_id, "enough") == "cancelled"
        took = trio.current_time() - started
    assert took < 5, f"the stop took {took:.1f} s"
    msg = live.harness.svc.store.message_by_stream(run.stream_id)
    assert msg["status"] == "cancelled" and 0 < msg["output_tokens"] < 8000
    bal = live.harness.svc.ledger.balance(alice["id"])
    assert bal.reserved == 0 and bal.balance == 1_000_000 - msg["credits_charged"]


async def _stuck_for(run, seconds: float) -> None:
    """Return once the run's write to its client has been in flight for ``seconds``:
    the same write (the push's count of writes unchanged) busy at every look."""
    seen: int | None = None
    since = 0.0
    while True:
        push, now = run.push, trio.current_time()
        if push is None or not push.busy:
            seen = None
        elif push.writes != seen:
            seen, since = push.writes, now
        elif now - since >= seconds:
            return
        await trio.sleep(0.05)
