"""The SQLite store: users, chat sessions, messages and telemetry in one file (WAL).

This is the embedded backend of the store seam (:mod:`server.storage`;
PostgreSQL's is :class:`server.storage.postgres.PostgresStore`, with the
same methods, rows and errors). Every method is synchronous: statements
take well under a millisecond, so the server may call them on the Trio
thread (DESIGN.md §3) rather than paying a thread hop. Each write is one
transaction; a multi-row change (deleting a session with its messages) is
atomic.

Schema changes are numbered migrations (:mod:`server.storage.sqlite_schema`)
applied at open, idempotently (``store_meta.schema_version``); a file whose
version is newer than this code is refused (:class:`SchemaTooNew`). The
ledger keeps its own ``ledger_*`` tables in the same file.

Users and chat sessions are here; messages, memory search, retention,
telemetry and recovery are the :class:`~server.storage.sqlite_messages.SqliteMessages`
mixin's.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlite_utils import Database

from .storage.base import MAX_SEARCH_TERMS as MAX_SEARCH_TERMS
from .storage.base import Page as Page
from .storage.base import SchemaTooNew
from .storage.base import UsernameTaken as UsernameTaken
from .storage.base import now_iso as now_iso
from .storage.base import search_terms as search_terms
from .storage.sqlite_messages import SqliteMessages
from .storage.sqlite_schema import MIGRATIONS as MIGRATIONS
from .storage.sqlite_schema import _m1 as _m1
from .storage.sqlite_schema import _m2 as _m2
from .storage.sqlite_schema import _m3 as _m3
from .storage.sqlite_schema import _m4 as _m4

__all__ = ["MIGRATIONS", "Page", "Store", "UsernameTaken", "now_iso", "search_terms"]


class Store(SqliteMessages):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.db = Database(self.conn)
        if str(path) != ":memory:":
            self.db.enable_wal()
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self._migrate()

    # -- lifecycle -----------------------------------------------------------------

    def manual_checkpoints(self) -> None:
        """This connection's commits never checkpoint the WAL: its owner does
        (``PRAGMA wal_checkpoint`` on any connection to the file)."""
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")

    def _migrate(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value)")
        with self._tx():
            row = self.conn.execute(
                "SELECT value FROM store_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise SchemaTooNew(version, len(MIGRATIONS))
            for i, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(self.db)
                self.conn.execute(
                    "INSERT OR REPLACE INTO store_meta (key, value) VALUES ('schema_version', ?)",
                    (i,),
                )

    @property
    def schema_version(self) -> int:
        row = self.conn.execute(
            "SELECT value FROM store_meta WHERE key = 'schema_version'"
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def ping(self) -> None:
        """Raise ``sqlite3.Error`` if the database cannot be read."""
        self.conn.execute("SELECT count(*) FROM users").fetchone()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _insert(self, table: str, row: dict[str, Any]) -> None:
        # Plain SQL, not sqlite-utils' insert: that one wraps itself in
        # ``with conn:``, which would commit our enclosing transaction early.
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # -- users ---------------------------------------------------------------------

    def add_user(
        self,
        username: str,
        password_hash: str,
        role: str,
        email: str | None = None,
        *,
        user_id: str | None = None,
    ) -> dict[str, Any]:
        user = {
            "id": user_id or uuid.uuid4().hex,
            "username": username,
            "email": email,
            "role": role,
            "password_hash": password_hash,
            "created_at": now_iso(),
        }
        try:
            with self._tx():
                self._insert("users", user)
        except sqlite3.IntegrityError as exc:
            raise UsernameTaken(username) from exc
        return user

    def user_by_name(self, username: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM users WHERE username = ?", (username,))

    def user_by_id(self, user_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM users WHERE id = ?", (user_id,))

    def search_users(self, q: str, page: Page) -> tuple[list[dict[str, Any]], int]:
        like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where = "WHERE u.username LIKE ? ESCAPE '\\' OR coalesce(u.email, '') LIKE ? ESCAPE '\\'"
        total = self.conn.execute(f"SELECT count(*) FROM users u {where}", (like, like)).fetchone()[
            0
        ]
        rows = self._rows(
            f"""SELECT u.id, u.username, u.email, u.role,
                       (SELECT count(*) FROM chat_sessions s WHERE s.user_id = u.id)
                         AS session_count
                FROM users u {where} ORDER BY u.username LIMIT ? OFFSET ?""",
            (like, like, page.limit, page.offset),
        )
        return rows, total

    # -- chat sessions -------------------------------------------------------------

    def create_session(
        self,
        user_id: str,
        *,
        session_id: str | None,
        title: str,
        model_id: str,
        source: str,
        client_key: str | None = None,
    ) -> dict[str, Any] | None:
        """Insert a session; None if a client-chosen id (or this user's
        ``client_key``) is already taken."""
        now = now_iso()
        row = {
            "id": session_id or str(uuid.uuid4()),
            "user_id": user_id,
            "title": title,
            "model_id": model_id,
            "source": source,
            "created_at": now,
            "updated_at": now,
            "client_key": client_key,
        }
        try:
            with self._tx():
                self._insert("chat_sessions", row)
        except sqlite3.IntegrityError:
            return None
        return row

    def get_session(self, session_id: str, user_id: str | None = None) -> dict[str, Any] | None:
        """The session, or None when it does not exist *or* is not ``user_id``'s."""
        row = self._one("SELECT * FROM chat_sessions WHERE id = ?", (session_id,))
        if row is None or (user_id is not None and row["user_id"] != user_id):
            return None
        return row

    def session_by_key(self, user_id: str, client_key: str) -> dict[str, Any] | None:
        """``user_id``'s session that the client named ``client_key``, if any."""
        return self._one(
            "SELECT * FROM chat_sessions WHERE user_id = ? AND client_key = ?",
            (user_id, client_key),
        )

    def list_sessions(self, user_id: str, page: Page) -> tuple[list[dict[str, Any]], int]:
        total = self.conn.execute(
            "SELECT count(*) FROM chat_sessions WHERE user_id = ?", (user_id,)
        ).fetchone()[0]
        rows = self._rows(
            "SELECT * FROM chat_sessions WHERE user_id = ? "
            "ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",
            (user_id, page.limit, page.offset),
        )
        return rows, total

    def delete_session(self, session_id: str) -> None:
        with self._tx():
            self.conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            self.conn.execute("DELETE FROM chat_sessions WHERE id = ?", (session_id,))

    def delete_session_if_unused(self, session_id: str) -> bool:
        with self._tx():
            cur = self.conn.execute(
                "DELETE FROM chat_sessions WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM messages WHERE session_id = ?)",
                (session_id, session_id),
            )
        return bool(cur.rowcount)

    def touch_session(self, session_id: str) -> None:
        self.conn.execute(
            "UPDATE chat_sessions SET updated_at = ? WHERE id = ?", (now_iso(), session_id)
        )

    def rename_session(self, session_id: str, title: str) -> dict[str, Any] | None:
        """Set the session's title (and ``updated_at``); the row, or None if it is gone."""
        with self._tx():
            self.conn.execute(
                "UPDATE chat_sessions SET title = ?, updated_at = ? WHERE id = ?",
                (title, now_iso(), session_id),
            )
        return self.get_session(session_id)
