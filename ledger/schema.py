"""SQLite's ledger tables (all prefixed ``ledger_``), its connection, and its migrations.

The ledger shares its SQLite file with the server's store but never touches
the store's tables, and keeps its own schema version in ``ledger_meta``.
Migrations are numbered, applied in order inside one ``BEGIN IMMEDIATE``
transaction, and idempotent: opening the same file from several connections
or processes at once applies each migration exactly once.

The schema repeats the ledger's rules as constraints (CHECK, UNIQUE, FOREIGN
KEY), a second line of defence behind the checks in :mod:`ledger.core`.
PostgreSQL's DDL (:mod:`ledger.postgres_schema`) is numbered the same way:
migration N is the same change on both, each in its own dialect, and
:data:`SCHEMA_VERSION` is the one version both backends speak.
"""

from __future__ import annotations

import os
import sqlite3
import time

from .errors import SchemaTooNew

__all__ = ["SCHEMA_VERSION", "connect", "migrate"]

BUSY_TIMEOUT_MS = 5000

# Each migration is a list of statements, never ``executescript`` (which
# would COMMIT the surrounding transaction behind our back).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: accounts, entries, reservations.
    (
        """
        CREATE TABLE ledger_accounts (
            account_id  TEXT PRIMARY KEY,
            -- Invariant: balance == sum(ledger_entries.amount) for this account.
            balance     INTEGER NOT NULL DEFAULT 0,
            -- Invariant: reserved == sum(amount) of this account's open reservations.
            reserved    INTEGER NOT NULL DEFAULT 0,
            created_at  TEXT NOT NULL,
            CONSTRAINT ledger_accounts_reserved_nonnegative CHECK (reserved >= 0),
            CONSTRAINT ledger_accounts_available_nonnegative CHECK (balance - reserved >= 0)
        )
        """,
        """
        CREATE TABLE ledger_reservations (
            id                    TEXT PRIMARY KEY,
            account_id            TEXT NOT NULL REFERENCES ledger_accounts (account_id),
            amount                INTEGER NOT NULL CHECK (amount >= 0),
            model_id              TEXT,
            streaming_session_id  TEXT,
            holder                TEXT,
            status                TEXT NOT NULL CHECK (status IN ('open', 'settled', 'released')),
            charged               INTEGER NOT NULL DEFAULT 0,
            created_at            TEXT NOT NULL,
            closed_at             TEXT,
            CONSTRAINT ledger_reservations_charge_within_amount
                CHECK (charged >= 0 AND charged <= amount),
            CONSTRAINT ledger_reservations_only_settled_charge
                CHECK (status = 'settled' OR charged = 0)
        )
        """,
        """
        CREATE TABLE ledger_entries (
            id                    INTEGER PRIMARY KEY AUTOINCREMENT,
            account_id            TEXT NOT NULL REFERENCES ledger_accounts (account_id),
            kind                  TEXT NOT NULL CHECK (kind IN ('allocation', 'charge', 'refund')),
            amount                INTEGER NOT NULL,
            model_id              TEXT,
            streaming_session_id  TEXT,
            reason                TEXT,
            input_tokens          INTEGER NOT NULL DEFAULT 0,
            output_tokens         INTEGER NOT NULL DEFAULT 0,
            -- A charge names the reservation it settled; UNIQUE: at most one charge each.
            reservation_id        TEXT UNIQUE REFERENCES ledger_reservations (id),
            idempotency_key       TEXT,
            created_at            TEXT NOT NULL,
            CONSTRAINT ledger_entries_sign CHECK (
                (kind = 'charge' AND amount < 0) OR (kind <> 'charge' AND amount > 0)
            ),
            CONSTRAINT ledger_entries_charge_has_reservation
                CHECK ((kind = 'charge') = (reservation_id IS NOT NULL))
        )
        """,
        # Newest-first history pages, per account.
        "CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, id)",
        "CREATE INDEX ledger_entries_by_stream ON ledger_entries (streaming_session_id)"
        " WHERE streaming_session_id IS NOT NULL",
        # Invariant: an idempotency key allocates at most once per account.
        "CREATE UNIQUE INDEX ledger_entries_idempotency ON ledger_entries"
        " (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL",
        "CREATE INDEX ledger_reservations_open ON ledger_reservations (account_id)"
        " WHERE status = 'open'",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open a connection configured the way every ledger method relies on.

    ``isolation_level=None``: the ledger issues BEGIN/COMMIT itself.
    ``check_same_thread=False``: the :class:`Ledger` serialises use with its
    own lock, so it may be called from whichever thread owns it.
    WAL lets readers proceed while one writer commits; ``busy_timeout`` makes a
    second writer wait (up to 5 s) for the write lock instead of failing.
    ``synchronous=FULL`` (the default, stated on purpose): a committed credit
    movement survives a power cut, not only a process crash.
    """
    conn = sqlite3.connect(
        os.fspath(path),
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        _enable_wal(conn)
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent in the file; ``:memory:`` stays "memory").

    Switching needs a moment of exclusive access and SQLite does not apply
    ``busy_timeout`` to it: when several connections open a fresh file at
    once, retry for up to the busy timeout. Blocks (sleeps) only in that case,
    only at open, and only until the first connection has switched the file.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() in ("wal", "memory"):
                return
            # Answers the mode now in force: the loop re-reads it to confirm.
            conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy:
                raise
        if time.monotonic() >= deadline:
            # Correctness never depends on WAL (BEGIN IMMEDIATE serialises writers
            # in every journal mode); WAL only lets readers run beside a writer.
            return
        time.sleep(0.002)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the ledger's tables up to :data:`SCHEMA_VERSION`; return the version.

    Atomic: either every pending migration is applied or none is.
    """
    # BEGIN IMMEDIATE: take the write lock before reading the version, so two
    # connections opening a fresh file cannot both apply migration 1.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        row = conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(version, SCHEMA_VERSION)
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION
