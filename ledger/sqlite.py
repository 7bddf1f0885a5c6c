"""The ledger in one SQLite file: :class:`SqliteLedger` (exported as ``ledger.Ledger``).

Guarantees, beyond those of :mod:`ledger.core` (which holds every operation):

* **Synchronous and short.** Each call is one transaction of a few
  sub-millisecond local statements; nothing awaits, so a Trio caller may call
  it on the Trio thread, where it is atomic with respect to cancellation. It
  blocks only while another connection holds SQLite's write lock (at most
  ``busy_timeout`` = 5 s, then ``sqlite3.OperationalError``).
* **One writer.** Every method that moves credits runs inside one
  ``BEGIN IMMEDIATE … COMMIT``: the write lock is taken *before* the balance
  is read, so two connections (threads, processes) racing for the same
  credits are serialised and cannot both pass the balance check. Any
  exception rolls the whole transaction back: a rejected call changes nothing.
* **Durable.** ``synchronous=FULL``: a committed credit movement survives a
  power cut; a process killed mid-transaction leaves nothing (the journal).
  A reservation alone commits without its own fsync (``synchronous=NORMAL``
  for that transaction): a power cut may lose it whole, which loses nothing
  (recovery would release it); its settlement's fsync flushes it anyway.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Self, TypeVar

from .core import SqlLedger
from .errors import LedgerError
from .schema import BUSY_TIMEOUT_MS, connect, migrate
from .tx import Tx

__all__ = ["SqliteLedger", "map_integrity_errors"]

T = TypeVar("T")

#: ``PRAGMA synchronous`` levels by the number SQLite reports them as.
_LEVELS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@contextmanager
def map_integrity_errors() -> Iterator[None]:
    """Translate :class:`sqlite3.IntegrityError` into :class:`LedgerError`.

    The ledger checks every rule itself before writing; the schema's CHECK,
    UNIQUE and FOREIGN KEY constraints are the second line of defence. If one
    fires, the caller's transaction rolls back and the caller sees a
    ``LedgerError`` (code ``INTERNAL_ERROR``), never a raw ``sqlite3`` error.
    """
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise LedgerError(f"ledger integrity constraint refused the write: {exc}") from exc


class _SqliteTx:
    """:class:`~ledger.tx.Tx` over a ``sqlite3`` connection (``?`` is SQLite's own style)."""

    __slots__ = ("_conn",)
    lock_rows = ""  # BEGIN IMMEDIATE already holds the one write lock

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[object] = (), /) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)


class SqliteLedger(SqlLedger):
    """The credits ledger over one SQLite file (``":memory:"`` for tests).

    Owns one connection, opened here (creating or upgrading the schema, or
    refusing a newer one with :class:`~ledger.SchemaTooNew`) and closed by
    :meth:`close` (or by leaving a ``with`` block). Calls from several threads
    on one ledger are serialised by an internal lock; several ledgers (or
    processes) on the same file are serialised by SQLite's write lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._conn = connect(path)
        self._tx = _SqliteTx(self._conn)
        self._lock = threading.Lock()
        self._closed = False
        self._owned = True
        self._synchronous = "FULL"  # connect()'s

    @classmethod
    def sharing(cls, conn: sqlite3.Connection) -> Self:
        """The ledger on a connection its caller owns and keeps using (and closes).

        The server's one SQLite writer: the store's write connection, so the
        two never drop each other's page cache (a commit by one connection
        makes every other connection to the file read its pages again) —
        measured in a loop, a stream's opening 250 → 150 to 210 µs. The caller
        serialises its own use of ``conn`` with the ledger's (the server's
        ``Db`` has one writer). The connection keeps its own ``synchronous``
        level; a durable commit of the ledger raises it to FULL for that
        transaction. The schema is brought up to date as :func:`connect` does.
        """
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
        ledger = cls.__new__(cls)
        ledger._conn = conn
        ledger._tx = _SqliteTx(conn)
        ledger._lock = threading.Lock()
        ledger._closed = False
        ledger._owned = False
        ledger._synchronous = _LEVELS[conn.execute("PRAGMA synchronous").fetchone()[0]]
        return ledger

    @classmethod
    def memory(cls) -> Self:
        """A private in-memory ledger (gone when closed)."""
        return cls(":memory:")

    def manual_checkpoints(self) -> None:
        """This connection's commits never checkpoint the WAL: its owner does
        (``PRAGMA wal_checkpoint`` on any connection to the file)."""
        with self._lock:
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")

    def close(self) -> None:
        """Close the connection (not a :meth:`sharing` one: its owner does). Idempotent.
        Open reservations stay open (see :meth:`recover`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._owned:
                    self._conn.close()

    def _write(self, work: Callable[[Tx], T], *, durable: bool = True) -> T:
        with self._lock:
            conn = self._conn
            # WAL + NORMAL: no fsync at this commit; FULL: it waits for the disk
            # (see SqlLedger._write). Switched only for this transaction.
            level = "FULL" if durable else "NORMAL"
            switch = level != self._synchronous
            if switch:
                conn.execute(f"PRAGMA synchronous = {level}")
            try:
                # BEGIN IMMEDIATE: take the write lock before reading the balance.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    with map_integrity_errors():
                        result = work(self._tx)
                        conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return result
            finally:
                if switch:
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")

    def _within(self, conn: sqlite3.Connection, work: Callable[[Tx], T]) -> T:
        # The caller's BEGIN IMMEDIATE holds the write lock, as ours would.
        with map_integrity_errors():
            return work(_SqliteTx(conn))

    def _read(self, work: Callable[[Tx], T], *, snapshot: bool = False) -> T:
        # A deferred transaction, even for one statement: every SELECT inside
        # sees one committed snapshot.
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                result = work(self._tx)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result
