"""What only PostgreSQL has: a network, a pool, killed connections, secrets in URLs.

Faults are made, not waited for: ``pg_terminate_backend`` from another
connection kills the ledger's own backends (found by their
``application_name``), and a row lock held by another connection makes a
call wait at a known statement, so "mid-transaction" is a fact the test
observes in ``pg_stat_activity`` before it kills.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from ledger import (
    Balance,
    InsufficientCredits,
    InvalidDatabaseUrl,
    LedgerUnavailable,
    PostgresLedger,
    Reservation,
    ReservationClosed,
    mask_url,
    open_ledger,
)
from ledger.urls import password_of, scrub

PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture
def url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def app() -> str:
    return f"ledger-test-{secrets.token_hex(4)}"


@pytest.fixture
def raw(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def book(url: str, app: str) -> Iterator[PostgresLedger]:
    with PostgresLedger(url, application_name=app, pool_timeout=5) as ledger:
        ledger.open_account("alice")
        ledger.allocate("alice", 1000)
        yield ledger


def _pids(raw: psycopg.Connection[Any], app: str, *, waiting: bool = False) -> list[int]:
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    if waiting:
        sql += " AND wait_event_type = 'Lock'"
    return [row[0] for row in raw.execute(sql, (app,)).fetchall()]


def _terminate(raw: psycopg.Connection[Any], pids: list[int]) -> None:
    for pid in pids:
        raw.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _await_lock_waiter(raw: psycopg.Connection[Any], app: str, not_: int = 0) -> int:
    """The pid of the ledger backend now blocked on a row lock (polls pg_stat_activity)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pids := [pid for pid in _pids(raw, app, waiting=True) if pid != not_]:
            return pids[0]
        time.sleep(0.005)
    raise AssertionError("the ledger never waited on the lock")


def _kill_mid_statement(raw: psycopg.Connection[Any], app: str, times: int) -> None:
    """Kill the ledger's backend while it waits for the row lock, ``times`` times running."""
    pid = 0
    for _ in range(times):
        pid = _await_lock_waiter(raw, app, not_=pid)
        _terminate(raw, [pid])


class Background:
    """One ledger call on a thread; its result or its exception."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = call()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


class RowLock:
    """Another connection holding ``alice``'s account row, as a slow writer would."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)
        self.conn.execute(
            "SELECT 1 FROM ledger_accounts WHERE account_id = 'alice' FOR NO KEY UPDATE"
        )

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


# -- connections lost ------------------------------------------------------------------


def test_connections_killed_between_calls_are_replaced(
    book: PostgresLedger, raw: psycopg.Connection[Any], app: str
) -> None:
    assert _pids(raw, app)
    _terminate(raw, _pids(raw, app))
    assert book.balance("alice") == Balance("alice", 1000, 0, 1000)  # a read
    _terminate(raw, _pids(raw, app))
    res = book.reserve("alice", 10)  # a write, on a fresh connection
    _terminate(raw, _pids(raw, app))
    assert book.settle(res.id, 4).charged == 4
    assert book.verify() == []


def test_a_reservation_killed_mid_transaction_leaves_nothing(
    book: PostgresLedger, raw: psycopg.Connection[Any], app: str, url: str
) -> None:
    lock = RowLock(url)
    try:
        # The reservation waits, mid-statement, for the account's row lock; it
        # is killed there, retried (the server answered: nothing applied), and
        # killed there again.
        call = Background(lambda: book.reserve("alice", 300, streaming_session_id="s1"))
        _kill_mid_statement(raw, app, times=2)
        call.join()
    finally:
        lock.release()
    assert isinstance(call.error, LedgerUnavailable)
    assert call.error.code == "SERVICE_UNAVAILABLE"
    # "nothing was committed" when the server answered the statement with the
    # kill; "applied wholly or not at all" if the socket closed first. Either way:
    # Nothing half-written: no reservation row, nothing held.
    assert book.open_reservations() == []
    assert raw.execute("SELECT count(*) FROM ledger_reservations").fetchone() == (0,)
    assert book.balance("alice") == Balance("alice", 1000, 0, 1000)
    assert book.verify() == []
    # And the next call works, with no restart.
    assert book.reserve("alice", 300).amount == 300


def test_a_reservation_killed_once_is_retried_and_made_once(
    book: PostgresLedger, raw: psycopg.Connection[Any], app: str, url: str
) -> None:
    lock = RowLock(url)
    try:
        call = Background(lambda: book.reserve("alice", 300, streaming_session_id="s1"))
        _kill_mid_statement(raw, app, times=1)
        _await_lock_waiter(raw, app)  # the retry, on a fresh connection, waits in turn
    finally:
        lock.release()
    call.join()
    assert call.error is None
    assert isinstance(call.result, Reservation)
    assert book.open_reservations() == [call.result]  # exactly one, not two
    assert book.balance("alice") == Balance("alice", 1000, 300, 700)
    assert book.verify() == []


def test_a_settle_killed_mid_transaction_leaves_the_reservation_open(
    book: PostgresLedger, raw: psycopg.Connection[Any], app: str, url: str
) -> None:
    res = book.reserve("alice", 100, model_id="m")
    lock = RowLock(url)
    try:
        # The reservation is closed and the charge written (in the same statement);
        # the account's update waits for its row lock. Killed there twice (the
        # first time it is retried: the server answered, nothing was applied).
        call = Background(lambda: book.settle(res.id, 60))
        _kill_mid_statement(raw, app, times=2)
        call.join()
    finally:
        lock.release()
    assert isinstance(call.error, LedgerUnavailable)
    assert book.open_reservations() == [res]
    assert book.entries("alice")[1] == 1  # no charge entry
    assert book.balance("alice") == Balance("alice", 1000, 100, 900)
    assert book.verify() == []
    # Retrying the settle is safe: it never happened.
    assert book.settle(res.id, 60).charged == 60
    with pytest.raises(ReservationClosed):
        book.settle(res.id, 60)
    assert book.balance("alice") == Balance("alice", 940, 0, 940)


def test_streams_opening_and_settling_while_connections_are_killed(
    book: PostgresLedger, raw: psycopg.Connection[Any], app: str
) -> None:
    """Four threads run stream lifecycles; a fifth kills the ledger's backends over and over."""
    book.allocate("alice", 9000)
    stop = threading.Event()
    unavailable = [0]
    intended: dict[str, int] = {}  # stream id -> what its settle asked

    def killer() -> None:
        while not stop.is_set():
            _terminate(raw, _pids(raw, app))
            time.sleep(0.02)

    def streams(worker: int) -> None:
        for n in range(60):
            stream = f"w{worker}-{n}"
            try:
                res = book.reserve("alice", 50, streaming_session_id=stream)
            except LedgerUnavailable:
                unavailable[0] += 1
                continue  # either nothing, or an open hold that recover() returns
            intended[stream] = charge = (worker * 7 + n) % 50
            while True:  # settle until it is known to have happened, once
                try:
                    book.settle(res.id, charge)
                    break
                except ReservationClosed:
                    break  # a COMMIT cut by the kill had applied it
                except LedgerUnavailable:
                    unavailable[0] += 1

    kill = threading.Thread(target=killer)
    kill.start()
    try:
        workers = [threading.Thread(target=streams, args=(w,)) for w in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(120)
    finally:
        stop.set()
        kill.join()
    assert unavailable[0] > 0, "the killer never hit a call"
    book.recover()
    assert book.verify() == []
    stats = book.statistics()
    assert stats.open_reservations == 0
    balance = book.balance("alice")
    assert balance.balance == stats.allocations_total - stats.charges_total
    # Exactly once: each stream charged what it asked, or nothing if its reserve was lost.
    for stream, charge in intended.items():
        assert book.charges_for_stream(stream) == charge
    assert stats.charges_total == sum(intended.values())


# -- bounded waits ---------------------------------------------------------------------


def test_an_exhausted_pool_answers_unavailable_instead_of_hanging(
    url: str, app: str, raw: psycopg.Connection[Any]
) -> None:
    with PostgresLedger(url, application_name=app, max_connections=1, pool_timeout=0.2) as book:
        book.open_account("alice")
        book.allocate("alice", 100)
        lock = RowLock(url)
        try:
            busy = Background(lambda: book.reserve("alice", 10))  # holds the only connection
            _await_lock_waiter(raw, app)
            started = time.monotonic()
            with pytest.raises(LedgerUnavailable, match="busy, or the database is unreachable"):
                book.balance("alice")
            assert time.monotonic() - started < 2
        finally:
            lock.release()
        busy.join()
        assert busy.error is None
        assert book.balance("alice") == Balance("alice", 100, 10, 90)


def test_a_lock_not_granted_in_time_is_unavailable_and_writes_nothing(
    url: str, app: str, raw: psycopg.Connection[Any]
) -> None:
    with PostgresLedger(url, application_name=app, lock_timeout=0.1) as book:
        book.open_account("alice")
        book.allocate("alice", 100)
        lock = RowLock(url)
        try:
            with pytest.raises(LedgerUnavailable, match="row lock was not granted"):
                book.reserve("alice", 10)
        finally:
            lock.release()
        assert book.open_reservations() == []
        assert book.verify() == []
        with pytest.raises(InsufficientCredits):
            book.reserve("alice", 101)


# -- secrets ---------------------------------------------------------------------------


def test_an_unreachable_database_is_named_without_its_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"postgresql://chinwag:{PASSWORD}@127.0.0.1:1/chinwag"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LedgerUnavailable) as info:
        open_ledger(url, connect_timeout=1)
    message = str(info.value)
    assert "postgresql://chinwag:***@127.0.0.1:1/chinwag" in message
    assert "cannot connect" in message
    chain: BaseException | None = info.value
    while chain is not None:
        assert PASSWORD not in str(chain) and PASSWORD not in repr(chain)
        chain = chain.__cause__ or chain.__context__
    assert PASSWORD not in caplog.text


def test_a_password_is_never_shown(pg_url: str) -> None:
    # Under trust auth any password is accepted and the ledger opens (its url is
    # masked); under password auth this one is refused (and the refusal masked).
    with_password = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    try:
        book = open_ledger(with_password)
    except LedgerUnavailable as exc:
        shown = str(exc)
    else:
        with book:
            assert isinstance(book, PostgresLedger)
            shown = book.url
    assert PASSWORD not in shown
    assert "postgres:***@" in shown


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgres://h/db?password=pw&sslmode=require",
            "postgres://h/db?password=***&sslmode=require",
        ),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        # libpq takes an unencoded ? or # in a password; urlsplit would not see it.
        ("postgresql://u:Sup3r#Secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:Sup3r?Secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:a#b?c@h", "postgresql://u:***@h"),
        ("postgresql://u:x@y@h/db", "postgresql://u:***@h/db"),
        ("postgresql://h?password=a@b", "postgresql://h?password=***"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    secret = password_of(url)
    if secret:  # the masked form never spells it, and scrub finds it in free text
        assert secret not in mask_url(url)
        assert secret not in scrub(f"could not connect to {url}: refused", url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://chinwag:S3CRET%2fpw@[::1",  # an escape in lower case
        "postgresql://chinwag:S3CRET%41pw@[::1",  # an unreserved character escaped
        "postgresql://chinwag:S3CRET%2Fpw@[::1]x/db",
        "postgresql://u@[::1?password=S3CRET%2fpw",
    ],
)
def test_a_malformed_url_is_refused_without_its_password(url: str) -> None:
    """libpq echoes a URL it cannot parse as it was written: every form of the
    password in it is masked, not only the decoded one and its canonical escape."""
    with pytest.raises(InvalidDatabaseUrl) as caught:
        open_ledger(url)
    assert "S3CRET" not in str(caught.value)
    assert "S3CRET" not in scrub(f'bad URI: "{url}"', url)


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("postgresql://u:Sup3r#Secret@h:5432/db", "Sup3r#Secret"),
        ("postgresql://u:Sup3r?Secret@h/db", "Sup3r?Secret"),
        ("postgresql://u:p%40ss@h/db", "p@ss"),
        ("postgresql://u@h/db?password=zz", "zz"),
        ("postgresql://u@h/db", None),
    ],
)
def test_password_of(url: str, password: str | None) -> None:
    assert password_of(url) == password
