"""A call's ending is one transaction (``StoreBackend.close_turn``): a transient
database failure is tried again, and one that lasts leaves nothing half written
(the message still ``streaming``, the reservation still held, no charge) for
recovery to end, while the run's readers and caller are told it was not saved.

Before, the message, the settlement and the telemetry row were three commits:
a failing settle left a ``complete`` message that said it was charged, with the
reservation open, no ``done`` and a caller's ``AssertionError``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import pytest
import trio

from server.auth import Principal


def _failing(store: Any, times: int) -> list[int]:
    """``store.close_turn`` raises a busy-database error ``times`` times (-1: always)."""
    real = store.close_turn
    calls: list[int] = []

    def close_turn(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if times < 0 or len(calls) <= times:
            raise sqlite3.OperationalError("database is locked")
        return real(*args, **kwargs)

    store.close_turn = close_turn
    return calls


async def _one_call(harness: Any) -> tuple[Any, Any, dict[str, Any]]:
    svc = harness.svc
    user = harness.user(credits=100_000)
    session = svc.store.create_session(
        user["id"], session_id=None, title="t", model_id=next(iter(svc.catalog)).id, source="api"
    )
    who = Principal(user["id"], "u", "enduser")
    run = await svc.hub.start(
        who,
        session,
        "hello",
        next(iter(svc.catalog)),
        max_tokens=None,
        temperature=None,
        scenario=None,
    )
    with trio.fail_after(20):
        outcome = await run.result()
    return run, outcome, user


async def test_a_transient_failure_of_the_ending_is_tried_again(harness, caplog):
    calls = _failing(harness.svc.db.write_store, times=2)
    run, outcome, user = await _one_call(harness)
    assert len(calls) == 3
    assert outcome.finish_reason == "stop" and outcome.error is None
    message = harness.svc.store.message_by_stream(run.stream_id)
    assert message["status"] == "complete"
    assert message["credits_charged"] == outcome.credits_charged > 0
    balance = harness.svc.ledger.balance(user["id"])
    assert balance.reserved == 0 and balance.balance == 100_000 - outcome.credits_charged


@pytest.mark.parametrize("lost_on_try", [1, 4])
async def test_an_ending_stored_by_a_try_whose_answer_was_lost_is_told_as_stored(
    harness, lost_on_try
):
    """A try commits and then raises (a connection lost in COMMIT): the first of
    four, after which the retry finds the reservation settled, or the last, after
    three failed ones, with no retry left. Either way the run reads the ending
    back: readers and the caller are told what is stored, the charge included,
    not "not saved, not charged"."""
    svc = harness.svc
    real = svc.db.write_store.close_turn
    tries: list[int] = []

    def close_turn(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) < lost_on_try:
            raise sqlite3.OperationalError("database is locked")
        settled = real(*args, **kwargs)
        if len(tries) == lost_on_try:
            raise sqlite3.OperationalError("disk I/O error")  # after the commit
        return settled

    svc.db.write_store.close_turn = close_turn
    run, outcome, user = await _one_call(harness)
    assert len(tries) == {1: 2, 4: 4}[lost_on_try]
    message = svc.store.message_by_stream(run.stream_id)
    assert message["status"] == "complete" and message["credits_charged"] > 0
    assert outcome.finish_reason == "stop" and outcome.error is None
    assert outcome.credits_charged == message["credits_charged"]
    assert outcome.assistant_message["status"] == "complete"
    assert svc.hub.abandoned.queued == []
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000 - outcome.credits_charged, 0)
    assert svc.ledger.verify() == []


async def test_an_ending_someone_else_stored_first_is_told_as_theirs(harness):
    """The reservation was closed and the message ended by another (a survivor in
    cluster mode) before the run's own ending: the run keeps its hands off and
    tells what is stored, not a charge of its own."""
    svc = harness.svc
    real = svc.db.write_store.close_turn
    store, book = svc.db.write_store, svc.db.write_ledger

    def close_turn(message_id: str, **kwargs: Any) -> Any:
        for held in book.open_reservations():  # this test's one call's
            book.release(held.id)
        store.finish_message(
            message_id,
            content="",
            status="interrupted",
            input_tokens=0,
            output_tokens=0,
            credits_charged=0,
            finish_reason="error",
        )
        return real(message_id, **kwargs)

    store.close_turn = close_turn
    run, outcome, user = await _one_call(harness)
    assert outcome.finish_reason == "error" and outcome.credits_charged == 0
    assert outcome.error is not None and outcome.error.error_code == "NODE_LOST"
    assert outcome.assistant_message["status"] == "interrupted"
    assert svc.store.message_by_stream(run.stream_id)["status"] == "interrupted"
    assert svc.hub.abandoned.queued == []
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)
    assert svc.ledger.verify() == []


async def test_readers_are_told_when_the_database_does_not_answer_in_time(
    harness, monkeypatch, caplog
):
    """Every database thread is busy past the time the ending has for its record
    (a database that hangs rather than refuses): the readers are told all the
    same (not confirmed), and the hub ends the stream once the database answers."""
    svc = harness.svc
    db = svc.hub.db
    monkeypatch.setattr("server.run.RECORD_S", 0.3)
    monkeypatch.setattr("server.abandoned.RETRY_S", 0.05)
    monkeypatch.setattr(db, "_batching", False)  # writes wait for a thread, as on PostgreSQL
    monkeypatch.setattr(db, "_limiter", trio.CapacityLimiter(1))
    user = harness.user(credits=100_000)
    model = next(iter(svc.catalog))
    session = svc.store.create_session(
        user["id"], session_id=None, title="t", model_id=model.id, source="api"
    )
    who = Principal(user["id"], "u", "enduser")
    release = trio.Event()

    async def hog(task_status: trio.TaskStatus[None]) -> None:
        async with db._limiter:  # the only thread, held until the run has ended
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        run = await svc.hub.start(
            who, session, "hello", model, max_tokens=None, temperature=None, scenario=None
        )
        await nursery.start(hog)
        with trio.fail_after(20):
            outcome = await run.result()
        # Told, with its closing events, while the database still had not answered.
        assert outcome.finish_reason == "error" and outcome.credits_charged == 0
        assert outcome.error is not None and outcome.error.error_code == "INTERNAL_ERROR"
        assert "confirmed" in outcome.error.user_message
        assert run.stream.ended and svc.hub.abandoned.queued == [run.stream_id]
        assert "not recorded within" in caplog.text
        release.set()
    with trio.fail_after(10):
        await svc.hub.abandoned.drained()
    assert svc.store.message_by_stream(run.stream_id)["status"] == "interrupted"
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)
    assert svc.ledger.verify() == []


async def test_readers_are_told_when_a_try_outlasts_the_whole_ending(harness, monkeypatch):
    """A try that runs in its database thread past the ending's bounds (it cannot
    be interrupted: a PostgreSQL lock wait, say) and then fails: the readers are
    still told, and the hub still gets the stream to end."""
    svc = harness.svc
    db = svc.hub.db
    monkeypatch.setattr("server.run.CLEANUP_TIMEOUT_S", 1.0)
    monkeypatch.setattr("server.run.RECORD_S", 0.6)
    monkeypatch.setattr("server.abandoned.RETRY_S", 3600.0)
    monkeypatch.setattr(db, "_batching", False)  # as on PostgreSQL: a thread per write
    monkeypatch.setattr(db, "_inline_reads", False)  # and per read

    def close_turn(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.2)  # past RECORD_S and CLEANUP_TIMEOUT_S
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(svc.db.write_store, "close_turn", close_turn)
    # The hub's rounds find the database away too (the next one an hour away).
    monkeypatch.setattr(svc.db.write_ledger, "open_reservations", _unreachable)
    run, outcome, user = await _one_call(harness)
    assert outcome.finish_reason == "error" and outcome.credits_charged == 0
    assert outcome.error is not None and "confirmed" in outcome.error.user_message
    assert run.stream.ended and svc.hub.abandoned.queued == [run.stream_id]
    # Held until the hub ends it.
    assert svc.store.message_by_stream(run.stream_id)["status"] == "streaming"
    assert svc.ledger.balance(user["id"]).reserved > 0


def _unreachable(*args: Any, **kwargs: Any) -> Any:
    raise sqlite3.OperationalError("database is locked")


async def _one_call_database_away(harness: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``_one_call`` whose ending fails, as does the hub's first round of ending it
    without its run (``server.abandoned``); returns once that round is over, the
    database answering again and the next round an hour away."""
    svc = harness.svc
    monkeypatch.setattr("server.abandoned.RETRY_S", 3600.0)
    _failing(svc.db.write_store, times=-1)

    with monkeypatch.context() as away:
        away.setattr(svc.db.write_ledger, "open_reservations", _unreachable)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.hub.abandoned.round_ended)  # parked before the run ends
            result = await _one_call(harness)
    return result


async def test_an_ending_that_cannot_be_saved_leaves_nothing_half_written(
    harness, caplog, monkeypatch
):
    svc = harness.svc
    run, outcome, user = await _one_call_database_away(harness, monkeypatch)
    assert svc.hub.abandoned.queued == [run.stream_id]
    # The caller is told, as readers are (an error, then done): not saved, not charged.
    assert outcome.finish_reason == "error" and outcome.credits_charged == 0
    assert outcome.error is not None and outcome.error.error_code == "INTERNAL_ERROR"
    assert "could not record its ending" in caplog.text
    # Nothing of the ending was stored: no charge, the message not "complete".
    message = svc.store.message_by_stream(run.stream_id)
    assert message["status"] == "streaming" and message["credits_charged"] == 0
    assert [r.streaming_session_id for r in svc.ledger.open_reservations(user["id"])] == [
        run.stream_id
    ]
    assert svc.ledger.balance(user["id"]).balance == 100_000
    # Recovery (the next start-up) ends both, charging nothing.
    assert svc.ledger.recover() == 1
    assert svc.store.recover_streaming() == 1
    assert svc.store.message_by_stream(run.stream_id)["status"] == "interrupted"
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)
    assert svc.ledger.verify() == []


async def test_an_ending_that_cannot_be_saved_is_ended_once_the_database_answers(
    harness, monkeypatch
):
    """The hub ends it without its run (``server.abandoned``), as recovery would:
    the reservation released, nothing charged, the message ``interrupted`` with
    the text that was streamed — no restart needed, which cluster mode has none of."""
    monkeypatch.setattr("server.abandoned.RETRY_S", 0.05)
    svc = harness.svc
    _failing(svc.db.write_store, times=-1)  # only the ending's own transaction fails
    run, outcome, user = await _one_call(harness)
    assert outcome.finish_reason == "error" and outcome.credits_charged == 0
    with trio.fail_after(10):
        await svc.hub.abandoned.drained()
    message = svc.store.message_by_stream(run.stream_id)
    assert message["status"] == "interrupted" and message["credits_charged"] == 0
    assert message["content"] and message["content"] == outcome.assistant_message["content"]
    assert svc.ledger.open_reservations(user["id"]) == []
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)
    assert svc.ledger.verify() == []


async def test_a_shutdown_tries_once_more_what_the_database_could_not_end(harness, monkeypatch):
    svc = harness.svc
    run, outcome, user = await _one_call_database_away(harness, monkeypatch)
    assert outcome.credits_charged == 0
    assert svc.hub.abandoned.queued == [run.stream_id]
    assert svc.store.message_by_stream(run.stream_id)["status"] == "streaming"
    with trio.fail_after(10):
        await svc.hub.shutdown()
    assert svc.hub.abandoned.queued == []
    assert svc.store.message_by_stream(run.stream_id)["status"] == "interrupted"
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000, 0)


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.db.RETRY_DELAYS", (0.01, 0.01, 0.01))


async def _recover(monkeypatch: pytest.MonkeyPatch, svc: Any, **fields: Any) -> dict[str, Any]:
    """A survivor ends a dead node's stream (``settle_recovered``), the cluster's
    copy of its text being "so far"; the closing events it tells, by name."""
    from server.cluster import RecoveredStream
    from server.recovery import settle_recovered

    async def content(redis: Any, stream: Any) -> str:
        return "so far"

    monkeypatch.setattr("server.recovery._content", content)
    lost = RecoveredStream(dialect="chat", started_at=0.0, node_id="dead", **fields)
    events = await settle_recovered(
        lost, redis=None, db=svc.db, catalog=svc.catalog, credit_usd=0.0
    )  # type: ignore[arg-type]
    return {name: json.loads(data) for name, data in events}


async def _recover_run(
    monkeypatch: pytest.MonkeyPatch, svc: Any, run: Any, user: dict[str, Any], stored: Any
) -> dict[str, Any]:
    """:func:`_recover` of a live run's stream, as a survivor sees it: 3 tokens out."""
    return await _recover(
        monkeypatch,
        svc,
        stream_id=run.stream_id,
        session_id=run.session_id,
        user_id=user["id"],
        model_id=run.model.id,
        reservation_id=run.reservation.id,
        message_id=stored["id"],
        tokens=3,
        last_id=3,
        ended=False,
        input_tokens=5,
    )


@pytest.mark.parametrize("ended", [False, True])
async def test_a_survivor_charges_what_the_owners_readers_were_told(harness, monkeypatch, ended):
    """A dead node's stream, ended in the database by a survivor (cluster mode):
    one cut mid-way is charged the tokens the cluster saw produced; one whose
    owner had already told its readers ``done`` (its ending could not be saved:
    "not charged") is released, not charged — what its readers were told stands."""
    svc = harness.svc
    user = harness.user(credits=100_000)
    model = next(iter(svc.catalog))
    session = svc.store.create_session(
        user["id"], session_id=None, title="t", model_id=model.id, source="api"
    )
    stream_id = f"stream-recovered-{ended}"

    def open_rows(store: Any, book: Any) -> Any:
        reserve = book.reservation(
            user["id"], 500, model_id=model.id, streaming_session_id=stream_id
        )
        return store.open_turn(
            session["id"],
            user["id"],
            text="hi",
            model_id=model.id,
            streaming_session_id=stream_id,
            reserve=reserve,
        )

    reservation, _, assistant = await svc.db.write(open_rows)
    await _recover(
        monkeypatch,
        svc,
        stream_id=stream_id,
        session_id=session["id"],
        user_id=user["id"],
        model_id=model.id,
        reservation_id=reservation.id,
        message_id=assistant["id"],
        tokens=300,
        last_id=12,
        ended=ended,
        input_tokens=50,
    )
    message = svc.store.message_by_stream(stream_id)
    assert message["status"] == "interrupted" and message["content"] == "so far"
    assert svc.ledger.open_reservations(user["id"]) == []
    balance = svc.ledger.balance(user["id"])
    charge = 0 if ended else model.price.cost(50, 300)
    assert charge or ended
    assert (balance.balance, message["credits_charged"]) == (100_000 - charge, charge)
    assert svc.ledger.verify() == []


@pytest.mark.parametrize("read_reservation", [False, True])
async def test_a_survivor_never_overwrites_an_ending_the_owner_stored_first(
    harness, monkeypatch, read_reservation
):
    """A partition: the survivor read the message as "streaming" (and perhaps the
    reservation as open), then the owner's own ending committed. The survivor's
    ending fails whole or finds nothing to do, and the message stays as the
    owner stored it (charge included): ended once, one telemetry row."""
    svc = harness.svc
    run, outcome, user = await _one_call(harness)
    stored = svc.store.message_by_stream(run.stream_id)
    assert stored["status"] == "complete" and stored["credits_charged"] > 0
    stale = {**stored, "status": "streaming", "credits_charged": 0}
    rows_before = len(svc.store.recent_telemetry(1000))
    with monkeypatch.context() as race:  # what the survivor read before the owner's commit
        race.setattr(svc.db.write_store, "message_by_stream", lambda _id: stale)
        if read_reservation:
            race.setattr(svc.db.write_ledger, "open_reservations", lambda _u: [run.reservation])
        await _recover_run(race, svc, run, user, stored)
    after = svc.store.message_by_stream(run.stream_id)
    assert (after["status"], after["credits_charged"], after["content"]) == (
        "complete",
        stored["credits_charged"],
        stored["content"],
    )
    assert len(svc.store.recent_telemetry(1000)) == rows_before
    balance = svc.ledger.balance(user["id"])
    assert (balance.balance, balance.reserved) == (100_000 - outcome.credits_charged, 0)
    assert svc.ledger.verify() == []


class _Odd:
    """A provider whose answer holds what no database can store as it is."""

    name = "odd"

    def __init__(self, text: str) -> None:
        self.text = text

    def stream(self, request: Any) -> Any:
        from contextlib import asynccontextmanager

        from server.providers.base import Started, Stop, TextDelta, Usage

        @asynccontextmanager
        async def events() -> Any:
            async def gen() -> Any:
                yield Started(retries=0)
                for text in ("Hello", self.text, " world"):
                    yield TextDelta(text)
                yield Usage(input_tokens=3, output_tokens=3)
                yield Stop("stop")

            yield gen()

        return events()


@pytest.mark.parametrize("text", ["\x00", "nul\x00byte"], ids=["nul", "nul-inside"])
async def test_an_answer_holding_nul_is_stored_and_charged(client, harness, text):
    """PostgreSQL's text takes no NUL (a model's JSON may carry \\u0000): the answer
    is stored with U+FFFD in its place and charged, not left streaming, uncharged."""
    svc = harness.svc
    alice = harness.user(credits=1000)
    svc.hub.provider = _Odd(text)
    r = await client.post("/api/chat/sessions", json={}, headers=alice["headers"])
    sid = (await r.get_json())["sessionId"]
    r = await client.post(
        f"/api/chat/sessions/{sid}/messages", json={"message": "hi"}, headers=alice["headers"]
    )
    assert r.status_code == 200, await r.get_data()
    stored = svc.store.list_messages(sid)[0][-1]
    assert stored["status"] == "complete"
    assert stored["content"] == "Hello" + text.replace("\x00", "\ufffd") + " world"
    assert stored["credits_charged"] > 0 and svc.ledger.balance(alice["id"]).reserved == 0
    assert svc.hub.abandoned.queued == [] and svc.ledger.verify() == []


async def test_one_stream_the_database_refuses_to_end_never_holds_up_the_others(
    harness, monkeypatch
):
    """The queue of streams to end without their run goes past one that fails for
    a reason of its own (not the database's absence), so the others' reservations
    are released now, not at the next start-up."""
    import ledger

    svc = harness.svc
    bob, carol = harness.user(credits=50), harness.user(credits=50)
    svc.ledger.reserve(bob["id"], 50, streaming_session_id="stream-bad")
    svc.ledger.reserve(carol["id"], 50, streaming_session_id="stream-good")
    by_stream = svc.db.write_store.message_by_stream
    refuse = True

    def refusing(stream_id: str) -> Any:
        if refuse and stream_id == "stream-bad":  # not the database's absence
            raise ledger.LedgerError("a row the database will not take")
        return by_stream(stream_id)

    monkeypatch.setattr(svc.db.write_store, "message_by_stream", refusing)
    svc.hub.abandoned.later("stream-bad", bob["id"])
    svc.hub.abandoned.later("stream-good", carol["id"])
    await svc.hub.abandoned.try_all()
    assert svc.ledger.balance(carol["id"]).reserved == 0
    assert svc.hub.abandoned.queued == ["stream-bad"]
    refuse = False
    await svc.hub.abandoned.try_all()  # its next try goes through
    assert svc.ledger.balance(bob["id"]).reserved == 0 and svc.hub.abandoned.queued == []


async def test_a_survivor_late_to_an_owners_ending_tells_the_stored_charge(harness, monkeypatch):
    """A survivor that read the message as still streaming just before its owner's
    ending committed (a partition; another process on the database) leaves the
    owner's ending as it stands, and its `done` says the charge stored, not 0."""
    svc = harness.svc
    run, outcome, user = await _one_call(harness)
    stored = svc.store.message_by_stream(run.stream_id)
    assert stored["credits_charged"] == outcome.credits_charged > 0
    by_stream = svc.db.write_store.message_by_stream
    reads: list[str] = []

    def before_the_owner_committed(stream_id: str) -> Any:
        reads.append(stream_id)
        row = by_stream(stream_id)
        return {**row, "status": "streaming", "credits_charged": 0} if len(reads) == 1 else row

    monkeypatch.setattr(svc.db.write_store, "message_by_stream", before_the_owner_committed)
    told = await _recover_run(monkeypatch, svc, run, user, stored)
    done = told["done"]
    assert done["creditsCharged"] == svc.ledger.charges_for_stream(run.stream_id) > 0
    assert svc.store.message_by_stream(run.stream_id) == stored  # the owner's ending stands


async def test_rounds_of_tries_never_overlap(harness, monkeypatch):
    """A shutdown's round and the hub task's round take turns: two tries of one
    stream at once would race each other's release (one of them refused)."""
    svc = harness.svc
    abandoned = svc.hub.abandoned
    trying: list[str] = []
    overlapped: list[tuple[str, ...]] = []

    async def end(stream_id: str, user_id: str, content: str = "") -> bool:
        trying.append(stream_id)
        if len(trying) > 1:
            overlapped.append(tuple(trying))
        await trio.sleep(0.01)  # a write in its thread
        trying.remove(stream_id)
        return True

    monkeypatch.setattr(abandoned, "end", end)
    abandoned.later("stream-a", "nobody")
    abandoned.later("stream-b", "nobody")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(abandoned.try_all)
        nursery.start_soon(abandoned.try_all)
    assert overlapped == [] and abandoned.queued == []


async def test_a_reservation_closed_between_listing_and_release_counts_as_ended(harness):
    """Another ending (recovery, a survivor) may close the reservation after this
    try listed it as open: the stream is ended, not refused and queued again."""
    svc = harness.svc
    dave = harness.user(credits=50)
    svc.ledger.reserve(dave["id"], 50, streaming_session_id="stream-raced")
    book = svc.db.write_ledger
    listed = book.open_reservations(dave["id"])
    for held in listed:
        book.release(held.id)  # someone else's ending, just before this try's release

    class Stale:
        def __getattr__(self, name: str) -> Any:
            return getattr(book, name)

        def open_reservations(self, user_id: str) -> Any:
            return listed

    svc.db.write_ledger = Stale()  # type: ignore[assignment]
    try:
        assert await svc.hub.abandoned.end("stream-raced", dave["id"]) is True
    finally:
        svc.db.write_ledger = book
    assert svc.ledger.balance(dave["id"]).reserved == 0
