"""Accounts, allocations, refunds, history, statistics: one method at a time."""

from __future__ import annotations

import pickle
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import ledger as ledger_pkg
from ledger import (
    Balance,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    Ledger,
    LedgerBackend,
    LedgerError,
    LedgerStatistics,
    LedgerUnavailable,
    ReservationClosed,
    SchemaTooNew,
    SqliteLedger,
    UnknownAccount,
    open_ledger,
)

from .conftest import Target

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BAD_CREDITS = [0, -1, 2**53 + 1, True, 1.0, "5", None]


# -- opening -----------------------------------------------------------------


def test_open_account_is_idempotent(ledger: Ledger) -> None:
    assert not ledger.has_account("alice")
    assert ledger.open_account("alice") == Balance("alice", 0, 0, 0)
    ledger.allocate("alice", 5)
    assert ledger.open_account("alice") == Balance("alice", 5, 0, 5)
    assert ledger.has_account("alice")
    assert ledger.statistics().accounts == 1


@pytest.mark.parametrize("bad", ["", None, 3])
def test_open_account_rejects_bad_ids(ledger: Ledger, bad: object) -> None:
    with pytest.raises(InvalidAmount):
        ledger.open_account(bad)  # type: ignore[arg-type]
    assert ledger.statistics().accounts == 0


def test_unknown_account_everywhere(ledger: Ledger) -> None:
    for call in (
        lambda: ledger.balance("ghost"),
        lambda: ledger.allocate("ghost", 1),
        lambda: ledger.refund("ghost", 1),
        lambda: ledger.check("ghost", 1),
        lambda: ledger.reserve("ghost", 1),
        lambda: ledger.entries("ghost"),
    ):
        with pytest.raises(UnknownAccount) as info:
            call()
        assert info.value.account_id == "ghost"
        assert info.value.code == "ACCOUNT_NOT_FOUND"
    assert not ledger.has_account("ghost")
    assert ledger.usage_by_model("ghost") == {}


def test_file_ledger_reopens_with_its_data(db_path: Path) -> None:
    with Ledger(db_path) as book:
        book.open_account("alice")
        book.allocate("alice", 42)
    with Ledger(str(db_path)) as book:
        assert book.balance("alice").balance == 42
        assert book.verify() == []
    conn = sqlite3.connect(db_path)
    try:
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    finally:
        conn.close()
    assert mode == "wal"
    assert all(t.startswith("ledger_") or t.startswith("sqlite_") for t in tables)


def test_a_ledger_reopens_with_its_data_and_version(target: Target) -> None:
    with target.open() as book:
        book.open_account("alice")
        book.allocate("alice", 42)
    with target.open() as book:  # opening again migrates nothing and loses nothing
        assert book.balance("alice").balance == 42
        assert book.verify() == []
    ((version,),) = target.sql("SELECT value FROM ledger_meta WHERE key = 'schema_version'")
    assert int(version) == ledger_pkg.SCHEMA_VERSION


def test_open_ledger_picks_the_backend(target: Target) -> None:
    with open_ledger(target.url) as book:
        expected = SqliteLedger if target.backend == "sqlite" else ledger_pkg.PostgresLedger
        assert type(book) is expected
        assert isinstance(book, LedgerBackend)


def test_a_newer_schema_is_refused(target: Target) -> None:
    target.open().close()
    target.sql("UPDATE ledger_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(SchemaTooNew, match="newer") as info:
        target.open()
    assert (info.value.found, info.value.supported) == (999, ledger_pkg.SCHEMA_VERSION)
    assert isinstance(info.value, LedgerError)


def test_close_is_idempotent(target: Target) -> None:
    book = target.open()
    book.close()
    book.close()


def test_postgres_and_sqlite_migrations_are_numbered_alike() -> None:
    from ledger import postgres_schema, schema

    assert len(postgres_schema.MIGRATIONS) == schema.SCHEMA_VERSION == ledger_pkg.SCHEMA_VERSION


# -- allocate ----------------------------------------------------------------


def test_allocate_writes_an_allocation_entry(ledger: Ledger) -> None:
    ledger.open_account("alice")
    assert ledger.allocate("alice", 100, reason="welcome") == Balance("alice", 100, 0, 100)
    entries, total = ledger.entries("alice")
    assert total == 1
    (entry,) = entries
    assert (entry.kind, entry.amount, entry.reason) == ("allocation", 100, "welcome")
    assert ISO_Z.match(entry.created_at)


@pytest.mark.parametrize("bad", BAD_CREDITS)
def test_allocate_rejects_bad_amounts_and_changes_nothing(funded: Ledger, bad: object) -> None:
    before = funded.balance("alice")
    with pytest.raises(InvalidAmount) as info:
        funded.allocate("alice", bad)  # type: ignore[arg-type]
    assert info.value.code == "VALIDATION_ERROR"
    assert str(info.value)
    assert funded.balance("alice") == before
    assert funded.entries("alice")[1] == 1


def test_allocate_accepts_the_largest_amount_but_no_overflow(ledger: Ledger) -> None:
    ledger.open_account("rich")
    assert ledger.allocate("rich", 2**53).balance == 2**53
    with pytest.raises(InvalidAmount, match="exceed"):
        ledger.allocate("rich", 1)
    with pytest.raises(InvalidAmount, match="exceed"):
        ledger.refund("rich", 1)
    assert ledger.balance("rich").balance == 2**53
    assert ledger.verify() == []


def test_idempotency_key_allocates_once(ledger: Ledger) -> None:
    ledger.open_account("alice")
    first = ledger.allocate("alice", 50, idempotency_key="grant-1")
    second = ledger.allocate("alice", 50, idempotency_key="grant-1")
    assert first == second == Balance("alice", 50, 0, 50)
    assert ledger.entries("alice")[1] == 1
    # The replay answers with the *current* balance.
    ledger.allocate("alice", 7)
    assert ledger.allocate("alice", 50, idempotency_key="grant-1").balance == 57
    assert ledger.entries("alice")[1] == 2


def test_idempotency_key_with_another_amount_conflicts(ledger: Ledger) -> None:
    ledger.open_account("alice")
    ledger.allocate("alice", 50, idempotency_key="grant-1")
    with pytest.raises(IdempotencyConflict) as info:
        ledger.allocate("alice", 51, idempotency_key="grant-1")
    assert info.value.key == "grant-1"
    assert info.value.code == "IDEMPOTENCY_CONFLICT"
    assert ledger.balance("alice").balance == 50


def test_idempotency_keys_are_per_account(ledger: Ledger) -> None:
    for user in ("alice", "bob"):
        ledger.open_account(user)
        ledger.allocate(user, 10, idempotency_key="same")
    ledger.allocate("bob", 20, idempotency_key="other")
    assert ledger.balance("alice").balance == 10
    assert ledger.balance("bob").balance == 30


# -- check, refund -----------------------------------------------------------


def test_check_reports_available(funded: Ledger) -> None:
    assert funded.check("alice", 1000) == (True, 1000)
    assert funded.check("alice", 1001) == (False, 1000)
    assert funded.check("alice", 0) == (True, 1000)
    funded.reserve("alice", 600)
    assert funded.check("alice", 500) == (False, 400)
    with pytest.raises(InvalidAmount):
        funded.check("alice", -1)


def test_refund_adds_a_refund_entry(funded: Ledger) -> None:
    entry = funded.refund("alice", 25, reason="outage", streaming_session_id="stream-1")
    assert (entry.kind, entry.amount, entry.reason) == ("refund", 25, "outage")
    assert entry.streaming_session_id == "stream-1"
    assert funded.balance("alice").balance == 1025
    assert funded.entries("alice")[0][0] == entry
    assert funded.charges_for_stream("stream-1") == 0


@pytest.mark.parametrize("bad", BAD_CREDITS)
def test_refund_rejects_bad_amounts(funded: Ledger, bad: object) -> None:
    with pytest.raises(InvalidAmount):
        funded.refund("alice", bad)  # type: ignore[arg-type]
    assert funded.balance("alice") == Balance("alice", 1000, 0, 1000)


# -- history -----------------------------------------------------------------


def test_entries_are_paged_newest_first(funded: Ledger) -> None:
    for n in range(1, 6):
        funded.allocate("alice", n)
    page, total = funded.entries("alice", offset=0, limit=2)
    assert total == 6
    assert [e.amount for e in page] == [5, 4]
    page, _ = funded.entries("alice", offset=4, limit=10)
    assert [e.amount for e in page] == [1, 1000]
    assert funded.entries("alice", offset=50) == ([], 6)
    ids = [e.id for e in funded.entries("alice", limit=100)[0]]
    assert ids == sorted(ids, reverse=True)


@pytest.mark.parametrize(("offset", "limit"), [(-1, 20), (0, -1), (0, 1.5), (True, 20)])
def test_entries_rejects_bad_pages(funded: Ledger, offset: object, limit: object) -> None:
    with pytest.raises(InvalidAmount):
        funded.entries("alice", offset=offset, limit=limit)  # type: ignore[arg-type]


def test_usage_by_model_and_charges_for_stream(funded: Ledger) -> None:
    for model, stream, charge in [
        ("m1", "s1", 10),
        ("m1", "s2", 5),
        ("m2", "s2", 7),
        (None, None, 3),
    ]:
        res = funded.reserve("alice", 20, model_id=model, streaming_session_id=stream)
        funded.settle(res.id, charge)
    free = funded.reserve("alice", 20, model_id="m3", streaming_session_id="s3")
    funded.settle(free.id, 0)
    assert funded.usage_by_model("alice") == {"m1": 15, "m2": 7, "": 3}
    assert funded.charges_for_stream("s2") == 12
    assert funded.charges_for_stream("s3") == 0
    assert funded.charges_for_stream("nope") == 0
    assert sum(funded.usage_by_model("alice").values()) == 1000 - funded.balance("alice").balance


# -- statistics --------------------------------------------------------------


def test_statistics_snapshot(funded: Ledger) -> None:
    funded.open_account("bob")
    funded.allocate("bob", 10)
    a = funded.reserve("alice", 100)
    b = funded.reserve("alice", 50)
    funded.reserve("bob", 4)
    funded.settle(a.id, 30)
    funded.release(b.id)
    funded.refund("alice", 2)
    assert funded.statistics() == LedgerStatistics(
        accounts=2,
        entries=4,
        open_reservations=1,
        reserved_credits=4,
        allocations_total=1010,
        charges_total=30,
        settled_total=1,
        released_total=1,
        refunds_total=2,
    )


def test_statistics_of_an_empty_ledger(ledger: Ledger) -> None:
    assert ledger.statistics() == LedgerStatistics(0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert ledger.verify() == []


# -- the package's shape -------------------------------------------------------


def test_errors_carry_context_codes_and_pickle() -> None:
    errors: list[LedgerError] = [
        InsufficientCredits(10, 3),
        UnknownAccount("u"),
        IdempotencyConflict("k"),
        ReservationClosed("r", "settled"),
        InvalidAmount("credits must be positive"),
        ledger_pkg.UnknownReservation("r"),
        LedgerUnavailable("the ledger database at postgresql://u:***@h/db failed"),
        SchemaTooNew(3, 1),
    ]
    codes = {type(e).__name__: e.code for e in errors}
    assert codes == {
        "InsufficientCredits": "INSUFFICIENT_CREDITS",
        "UnknownAccount": "ACCOUNT_NOT_FOUND",
        "IdempotencyConflict": "IDEMPOTENCY_CONFLICT",
        "ReservationClosed": "RESERVATION_CLOSED",
        "InvalidAmount": "VALIDATION_ERROR",
        "UnknownReservation": "RESERVATION_NOT_FOUND",
        "LedgerUnavailable": "SERVICE_UNAVAILABLE",
        "SchemaTooNew": "SCHEMA_TOO_NEW",
    }
    assert LedgerError.code == "INTERNAL_ERROR"
    for error in errors:
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)
    assert str(InsufficientCredits(10, 3)) == "insufficient credits: 10 needed, 3 available"


def test_public_api_is_reexported() -> None:
    names = [
        *("Ledger", "Price", "Balance", "Entry", "Reservation", "Settlement"),
        *("LedgerStatistics", "LedgerError", "InsufficientCredits", "UnknownAccount"),
        *("IdempotencyConflict", "ReservationClosed", "InvalidAmount"),
        *("LedgerUnavailable", "SchemaTooNew", "SqliteLedger", "PostgresLedger"),
        *("LedgerBackend", "open_ledger", "PostgresPool", "mask_url", "is_postgres_url"),
    ]
    for name in names:
        assert getattr(ledger_pkg, name).__module__.startswith("ledger.")


def test_ledger_imports_neither_server_nor_observation() -> None:
    code = (
        "import sys, ledger; bad = [m for m in sys.modules"
        " if m.split('.')[0] in ('server', 'observation', 'quart', 'trio', 'psycopg')];"
        " print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
