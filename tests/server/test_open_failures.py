"""An open is one transaction, all there or not at all; but its commit can fail
after it happened (PostgreSQL's connection lost in ``COMMIT``). The caller is
refused either way, so the hub undoes whatever of the open was stored
(``server.abandoned``): no reservation outlives the error with no stream to
settle it (in cluster mode no start-up sweep would ever release it); if the
database cannot even be asked, the hub asks again until it answers.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import trio

import ledger
from server.auth import Principal


def _session(harness: Any, credits: int) -> tuple[dict[str, Any], dict[str, Any], Any]:
    svc = harness.svc
    user = harness.user(credits=credits)
    model = next(iter(svc.catalog))
    session = svc.store.create_session(
        user["id"], session_id=None, title="t", model_id=model.id, source="api"
    )
    return user, session, model


async def _start(harness: Any, user: dict[str, Any], session: Any, model: Any) -> Any:
    return await harness.svc.hub.start(
        Principal(user["id"], "u", "enduser"),
        session,
        "hello",
        model,
        max_tokens=None,
        temperature=None,
        scenario=None,
    )


def _committed_then_failed(store: Any) -> list[str]:
    """``store.open_turn`` commits, then raises as a lost connection would."""
    real = store.open_turn
    opened: list[str] = []

    def open_turn(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)  # committed
        opened.append(kwargs["streaming_session_id"])
        raise sqlite3.OperationalError("disk I/O error")

    store.open_turn = open_turn
    return opened


async def test_an_open_stored_despite_its_error_is_undone(harness, caplog):
    svc = harness.svc
    user, session, model = _session(harness, credits=100_000)
    opened = _committed_then_failed(svc.db.write_store)
    with pytest.raises(sqlite3.OperationalError):
        await _start(harness, user, session, model)
    # It was stored: the reservation and the turn's two messages; the hub
    # undoes it at once, without keeping the refused caller waiting.
    [stream_id] = opened
    with trio.fail_after(10):
        await svc.hub.abandoned.drained()
    message = svc.store.message_by_stream(stream_id)
    assert message is not None
    # Nothing held, nothing charged.
    assert svc.ledger.open_reservations(user["id"]) == []
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)
    assert message["status"] == "interrupted" and message["credits_charged"] == 0
    assert "ended without its run" in caplog.text
    assert svc.ledger.verify() == []
    assert svc.hub.live() == []


async def test_a_refused_open_has_nothing_to_undo(harness, caplog):
    svc = harness.svc
    user, session, model = _session(harness, credits=0)
    with pytest.raises(ledger.InsufficientCredits):
        await _start(harness, user, session, model)
    assert svc.ledger.open_reservations(user["id"]) == []
    assert "ended without its run" not in caplog.text and not svc.hub.abandoned.queued
    assert svc.store.recent_messages(session["id"], 5) == []


async def test_an_undo_that_fails_is_tried_again_and_the_caller_gets_the_first_error(
    harness, caplog, monkeypatch
):
    svc = harness.svc
    user, session, model = _session(harness, credits=100_000)
    opened = _committed_then_failed(svc.db.write_store)
    tries: list[int] = []
    real = svc.db.write_ledger.open_reservations

    def unreachable_for_a_while(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) <= 5:  # the first round's try and its retries (4), and one more
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(svc.db.write_ledger, "open_reservations", unreachable_for_a_while)
    with trio.fail_after(10), pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        await _start(harness, user, session, model)
    [stream_id] = opened
    with trio.fail_after(10):
        await svc.hub.abandoned.drained()
    # A try failed (the database did not answer), and a later round ended it.
    assert "not ended yet" in caplog.text
    assert len(tries) >= 6
    assert real(user["id"]) == []
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)
    assert svc.store.message_by_stream(stream_id)["status"] == "interrupted"


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.db.RETRY_DELAYS", (0.01, 0.01, 0.01))
    monkeypatch.setattr("server.abandoned.RETRY_S", 0.05)


class _Link:
    """What the hub asks of a cluster link around an open, recorded in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def admit(self, *, stream_id: str, **_: Any) -> str:
        self.calls.append(("admit", stream_id))
        return stream_id

    async def release(self, admission: str | None) -> None:
        self.calls.append(("release", str(admission)))

    async def finished(self, stream_id: str) -> None:
        self.calls.append(("finished", stream_id))


async def test_in_cluster_mode_an_open_that_may_be_stored_stays_live_until_undone(
    harness, monkeypatch
):
    """Off the cluster's live list only once undone: were the node to die before
    the database answers, a survivor must still find it (and release it)."""
    svc = harness.svc
    link = _Link()
    monkeypatch.setattr(svc.hub, "link", link)
    svc.hub.abandoned.on_ended = link.finished
    user, session, model = _session(harness, credits=100_000)
    opened = _committed_then_failed(svc.db.write_store)
    undo = svc.hub.abandoned.end
    undone: list[str] = []

    async def end(stream_id: str, *args: Any) -> bool:
        assert ("finished", stream_id) not in link.calls  # still live while stored
        undone.append(stream_id)
        return await undo(stream_id, *args)

    monkeypatch.setattr(svc.hub.abandoned, "end", end)
    with pytest.raises(sqlite3.OperationalError):
        await _start(harness, user, session, model)
    [stream_id] = opened
    with trio.fail_after(10):
        await svc.hub.abandoned.drained()
    assert undone == [stream_id]
    assert link.calls == [("admit", stream_id), ("release", stream_id), ("finished", stream_id)]
    assert svc.ledger.open_reservations(user["id"]) == []
