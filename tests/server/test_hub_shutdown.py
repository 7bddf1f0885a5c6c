"""A shutdown that begins while a stream is still opening (its rows being
written) waits for it too, and the run starts already told to stop: nothing is
left streaming, reserved or half written when ``shutdown`` returns.

The opening's write is held on a gate, as a write queued behind the writer's
batch would be during a shutdown (every other run's ending is being written).
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from server.auth import Principal


async def _open_gate_on_exit(gate: trio.Event) -> None:
    """A failing test must not leave the opening's write held forever."""
    try:
        await trio.sleep_forever()
    finally:
        gate.set()


async def test_shutdown_waits_for_a_stream_still_opening(harness: Any) -> None:
    svc = harness.svc
    hub = svc.hub
    user = harness.user(credits=100_000)
    who = Principal(user["id"], "u", "enduser")
    model = next(iter(svc.catalog))
    session = svc.store.create_session(
        user["id"], session_id=None, title="t", model_id=model.id, source="api"
    )

    entered, gate = trio.Event(), trio.Event()
    real_write = svc.db.write

    async def held_write(moment: Any, *args: Any, light: bool = False) -> Any:
        if getattr(moment, "__name__", "") == "open_rows":
            entered.set()
            await gate.wait()
        return await real_write(moment, *args, light=light)

    svc.db.write = held_write
    opened: list[Any] = []
    shut = trio.Event()

    async def open_one() -> None:
        opened.append(
            await hub.start(
                who, session, "hi", model, max_tokens=None, temperature=None, scenario=None
            )
        )

    async def shut_down() -> None:
        await hub.shutdown()
        shut.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_open_gate_on_exit, gate)
            nursery.start_soon(open_one)
            await entered.wait()  # the opening is in its write
            nursery.start_soon(shut_down)
            await trio.testing.wait_all_tasks_blocked()
            assert not hub.accepting and not shut.is_set()  # it waits for the opening
            gate.set()
            await shut.wait()
            (run,) = opened
            # When shutdown returned, the late run had ended, told to stop, and settled.
            assert run.done
            assert run.outcome is not None and run.outcome.finish_reason == "shutdown"
            nursery.cancel_scope.cancel()
    message = svc.store.message_by_stream(run.stream_id)
    assert message["status"] != "streaming"
    assert svc.ledger.balance(user["id"]).reserved == 0
    assert svc.ledger.open_reservations() == []
