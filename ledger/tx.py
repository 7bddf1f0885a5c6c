"""What the ledger's shared SQL needs from an open transaction, on either backend.

:mod:`ledger.statements` and :mod:`ledger.audit` are written once, against
:class:`Tx`, in the SQL both SQLite and PostgreSQL run: ``?`` placeholders
(the PostgreSQL adapter turns them into ``%s``), ``RETURNING``, ``ON
CONFLICT``, partial indexes, ``CASE`` instead of boolean arithmetic. Where
the engines must differ, the difference is one attribute of the transaction
(:attr:`Tx.lock_rows`), not a second copy of the SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["Rows", "Tx", "first"]


class Rows(Protocol):
    """A DB-API cursor after ``execute``: ``sqlite3.Cursor`` and ``psycopg.Cursor`` both are."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction. Nothing here begins or commits: the backend does.

    ``lock_rows`` is appended to a ``SELECT`` whose rows the transaction will
    write after reading them: ``" FOR NO KEY UPDATE"`` on PostgreSQL, where it
    takes the row lock an ``UPDATE`` of the row would take, which serialises
    writers of that row (READ COMMITTED) but, unlike ``FOR UPDATE``, does not
    conflict with the ``KEY SHARE`` lock a foreign-key check takes (another
    transaction inserting a reservation or entry of that account); ``""``
    on SQLite, where ``BEGIN IMMEDIATE`` already holds the database's one
    write lock.
    """

    lock_rows: str

    def execute(self, sql: str, params: Sequence[object] = (), /) -> Rows: ...


def first(rows: Rows) -> Any:
    """The first row of a statement, reading the cursor to its end (or None).

    Reading every row matters for ``INSERT/UPDATE … RETURNING`` on SQLite: the
    statement is only finished (and its write complete) once it is exhausted.
    """
    result = rows.fetchall()
    return result[0] if result else None
