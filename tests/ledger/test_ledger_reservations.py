"""Reserve, settle, release: the life of one stream's credits."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from ledger import (
    Balance,
    InsufficientCredits,
    InvalidAmount,
    Ledger,
    LedgerError,
    ReservationClosed,
    Settlement,
    UnknownAccount,
    UnknownReservation,
)

from .conftest import Target


def test_reserve_holds_credits(funded: Ledger) -> None:
    res = funded.reserve("alice", 300, model_id="m", streaming_session_id="s", holder="A")
    assert (res.account_id, res.amount, res.status, res.holder) == ("alice", 300, "open", "A")
    assert (res.model_id, res.streaming_session_id) == ("m", "s")
    assert res.id.startswith("res_")
    assert funded.balance("alice") == Balance("alice", 1000, 300, 700)
    assert funded.open_reservations("alice") == [res]
    assert funded.open_reservations() == [res]
    assert funded.open_reservations("bob") == []
    # Reservations are not entries.
    assert funded.entries("alice")[1] == 1


def test_reserve_everything_then_nothing_more(funded: Ledger) -> None:
    funded.reserve("alice", 1000)
    with pytest.raises(InsufficientCredits) as info:
        funded.reserve("alice", 1)
    assert (info.value.needed, info.value.available) == (1, 0)
    assert info.value.code == "INSUFFICIENT_CREDITS"
    assert funded.balance("alice") == Balance("alice", 1000, 1000, 0)


def test_insufficient_credits_changes_nothing(funded: Ledger) -> None:
    before = (funded.balance("alice"), funded.statistics())
    with pytest.raises(InsufficientCredits) as info:
        funded.reserve("alice", 1001)
    assert (info.value.needed, info.value.available) == (1001, 1000)
    assert (funded.balance("alice"), funded.statistics()) == before


def test_zero_reservation_for_a_free_model(funded: Ledger) -> None:
    funded.reserve("alice", 1000)
    free = funded.reserve("alice", 0, model_id="free")
    settlement = funded.settle(free.id, 0, input_tokens=5, output_tokens=9)
    assert settlement == Settlement(free.id, 0, 0, None)
    assert funded.verify() == []


@pytest.mark.parametrize("bad", [-1, 2**53 + 1, True, 2.0, "1"])
def test_reserve_rejects_bad_amounts(funded: Ledger, bad: object) -> None:
    with pytest.raises(InvalidAmount):
        funded.reserve("alice", bad)  # type: ignore[arg-type]
    assert funded.balance("alice") == Balance("alice", 1000, 0, 1000)


def test_settle_charges_and_releases_the_rest(funded: Ledger) -> None:
    res = funded.reserve("alice", 300, model_id="m", streaming_session_id="s")
    settlement = funded.settle(res.id, 120, input_tokens=1000, output_tokens=200)
    assert (settlement.reservation_id, settlement.charged, settlement.released) == (
        res.id,
        120,
        180,
    )
    entry = settlement.entry
    assert entry is not None
    assert (entry.kind, entry.amount, entry.model_id, entry.streaming_session_id) == (
        "charge",
        -120,
        "m",
        "s",
    )
    assert (entry.input_tokens, entry.output_tokens, entry.reservation_id) == (1000, 200, res.id)
    assert funded.balance("alice") == Balance("alice", 880, 0, 880)
    assert funded.entries("alice")[0][0] == entry
    assert funded.open_reservations() == []
    assert funded.verify() == []


def test_settle_may_name_the_model_and_stream(funded: Ledger) -> None:
    res = funded.reserve("alice", 10, model_id="m", streaming_session_id="s")
    entry = funded.settle(res.id, 3, model_id="m2", streaming_session_id="s2").entry
    assert entry is not None
    assert (entry.model_id, entry.streaming_session_id) == ("m2", "s2")


def test_settle_caps_the_charge_at_the_reservation(funded: Ledger) -> None:
    other = funded.reserve("alice", 900)
    res = funded.reserve("alice", 100)
    settlement = funded.settle(res.id, 10**30)
    assert (settlement.charged, settlement.released) == (100, 0)
    # available never went below zero, and the other hold is intact.
    assert funded.balance("alice") == Balance("alice", 900, 900, 0)
    funded.release(other.id)
    assert funded.verify() == []


def test_settle_zero_writes_no_entry(funded: Ledger) -> None:
    res = funded.reserve("alice", 50)
    assert funded.settle(res.id, 0) == Settlement(res.id, 0, 50, None)
    assert funded.entries("alice")[1] == 1
    assert funded.balance("alice") == Balance("alice", 1000, 0, 1000)
    assert funded.statistics().settled_total == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"charge": -1},
        {"charge": True},
        {"charge": 1.5},
        {"charge": 1, "input_tokens": -1},
        {"charge": 1, "output_tokens": 0.5},
    ],
)
def test_settle_rejects_bad_numbers_and_keeps_the_reservation(
    funded: Ledger, kwargs: dict[str, object]
) -> None:
    res = funded.reserve("alice", 50)
    before = funded.balance("alice")
    with pytest.raises(InvalidAmount):
        funded.settle(res.id, **kwargs)  # type: ignore[arg-type]
    assert funded.balance("alice") == before
    assert funded.open_reservations() == [res]


def test_release_returns_everything(funded: Ledger) -> None:
    res = funded.reserve("alice", 400)
    funded.release(res.id)
    assert funded.balance("alice") == Balance("alice", 1000, 0, 1000)
    assert funded.entries("alice")[1] == 1
    assert funded.statistics().released_total == 1


@pytest.mark.parametrize(
    ("first", "second", "status"),
    [
        ("settle", "settle", "settled"),
        ("settle", "release", "settled"),
        ("release", "settle", "released"),
        ("release", "release", "released"),
    ],
)
def test_a_reservation_closes_exactly_once(
    funded: Ledger, first: str, second: str, status: str
) -> None:
    res = funded.reserve("alice", 100)

    def close(how: str) -> None:
        if how == "settle":
            funded.settle(res.id, 60)
        else:
            funded.release(res.id)

    close(first)
    after_first = (funded.balance("alice"), funded.statistics())
    with pytest.raises(ReservationClosed) as info:
        close(second)
    assert (info.value.reservation_id, info.value.status) == (res.id, status)
    assert info.value.code == "RESERVATION_CLOSED"
    assert (funded.balance("alice"), funded.statistics()) == after_first
    assert funded.verify() == []


def test_unknown_reservation(funded: Ledger) -> None:
    with pytest.raises(UnknownReservation) as info:
        funded.settle("res_nope", 1)
    assert info.value.code == "RESERVATION_NOT_FOUND"
    with pytest.raises(UnknownReservation):
        funded.release("res_nope")


def test_reserve_on_an_unknown_account(ledger: Ledger) -> None:
    with pytest.raises(UnknownAccount):
        ledger.reserve("ghost", 0)
    assert ledger.open_reservations() == []


def test_recover_releases_other_holders(funded: Ledger) -> None:
    mine = funded.reserve("alice", 10, holder="live")
    funded.reserve("alice", 20, holder="dead")
    funded.reserve("alice", 30)
    assert funded.recover(holder="live") == 2
    assert funded.open_reservations() == [mine]
    assert funded.balance("alice") == Balance("alice", 1000, 10, 990)
    assert funded.recover(holder="live") == 0
    assert funded.recover() == 1
    assert funded.balance("alice") == Balance("alice", 1000, 0, 1000)
    assert funded.entries("alice")[1] == 1
    assert funded.verify() == []


def test_an_integrity_error_is_mapped_and_rolled_back(target: Target) -> None:
    with target.open() as book:
        book.open_account("alice")
        book.allocate("alice", 100)
        res = book.reserve("alice", 40)
        # A foreign writer plants a charge for the open reservation behind our back.
        target.sql(
            "INSERT INTO ledger_entries (account_id, kind, amount, reservation_id, created_at)"
            " VALUES ('alice', 'charge', -1, ?, 'x')",
            (res.id,),
        )
        problems = book.verify()
        assert any("has a charge entry" in p for p in problems)
        assert any("sum of entries" in p for p in problems)
        with pytest.raises(LedgerError) as info:
            book.settle(res.id, 10)
        assert type(info.value) is LedgerError
        assert info.value.code == "INTERNAL_ERROR"
        assert isinstance(info.value.__cause__, (sqlite3.IntegrityError, psycopg.IntegrityError))
        # Rolled back: the reservation is still open, nothing moved.
        assert book.balance("alice") == Balance("alice", 100, 40, 60)
        assert [r.id for r in book.open_reservations()] == [res.id]


def test_verify_reports_tampered_columns(target: Target) -> None:
    with target.open() as book:
        book.open_account("alice")
        book.allocate("alice", 100)
        book.reserve("alice", 40)
        target.sql("UPDATE ledger_accounts SET balance = 90, reserved = 30")
        problems = book.verify()
    assert len(problems) == 2
    assert "balance 90 != sum of entries 100" in problems[0]
    assert "reserved 30 != sum of open reservations 40" in problems[1]


def test_a_constraint_refuses_what_the_checks_missed(target: Target) -> None:
    # The schema's CHECK (balance - reserved >= 0) is the second line of defence.
    with target.open() as book:
        book.open_account("alice")
        book.allocate("alice", 10)
        with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
            target.sql("UPDATE ledger_accounts SET reserved = 11")
        assert book.balance("alice") == Balance("alice", 10, 0, 10)


def test_only_a_reservation_commits_without_its_own_fsync(tmp_path) -> None:
    """SQLite: the reservation's transaction runs with synchronous=NORMAL (a power
    cut may lose it whole: recovery would release it anyway); everything else,
    and the connection afterwards, even after a refused reservation, is FULL."""
    book = Ledger(tmp_path / "l.db")
    try:
        book.open_account("alice")
        book.allocate("alice", 100)
        seen: list[str] = []
        book._conn.set_trace_callback(seen.append)
        res = book.reserve("alice", 40)
        with pytest.raises(InsufficientCredits):
            book.reserve("alice", 1000)
        book.settle(res.id, 10)
        book._conn.set_trace_callback(None)
        syncs = [s for s in seen if "synchronous" in s or s.startswith(("BEGIN", "COMMIT"))]
        assert syncs[:4] == [
            "PRAGMA synchronous = NORMAL",
            "BEGIN IMMEDIATE",
            "COMMIT",
            "PRAGMA synchronous = FULL",
        ]
        assert (
            syncs[4] == "PRAGMA synchronous = NORMAL" and syncs[-3] == "PRAGMA synchronous = FULL"
        )
        assert syncs[-2:] == ["BEGIN IMMEDIATE", "COMMIT"]  # the settlement: FULL
        assert book._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert book.verify() == [] and book.balance("alice").balance == 90
    finally:
        book.close()
