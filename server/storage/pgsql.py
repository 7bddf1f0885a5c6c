"""Small psycopg helpers the PostgreSQL store's modules share (``%s`` placeholders).

Rows come back as dicts (``dict_row``) keyed by column name in the table's
order, the shape ``server.store.Store`` gives. None of these begins or
commits: the caller's unit of work (:class:`ledger.PostgresPool.run`) does.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from .base import Row

__all__ = [
    "SNAPSHOT",
    "Conn",
    "delete_sessions",
    "insert",
    "select_all",
    "select_one",
    "select_value",
]

Conn = psycopg.Connection[Any]

#: The BEGIN of a unit that reads several times and must see one committed state.
SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def select_all(conn: Conn, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)  # our own SQL, never user text
        return cur.fetchall()


def select_one(conn: Conn, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
    found = select_all(conn, sql, params)
    return found[0] if found else None


def select_value(conn: Conn, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None


def insert(conn: Conn, table: str, row: Row) -> None:
    """``INSERT`` one row; ``table`` and the keys are ours, the values parameters."""
    cols = ", ".join(row)
    marks = ", ".join("%s" for _ in row)
    sql = f"INSERT INTO {table} ({cols}) VALUES ({marks})"
    conn.execute(sql, tuple(row.values()))


def delete_sessions(conn: Conn, ids: list[str]) -> None:
    """Delete sessions with their messages (inside the caller's transaction)."""
    conn.execute("DELETE FROM messages WHERE session_id = ANY(%s)", (ids,))
    conn.execute("DELETE FROM chat_sessions WHERE id = ANY(%s)", (ids,))
