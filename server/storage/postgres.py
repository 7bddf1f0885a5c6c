"""The store in PostgreSQL: :class:`PostgresStore`, the same methods and rows as SQLite's.

Same semantics as ``server.store.Store`` method by method (same keys and
value types in every row, ``UsernameTaken``, ``None`` for a taken session
id or client key, the same orderings: every text column is ``COLLATE "C"``,
byte order, as SQLite's ``BINARY``), with these engine differences:

* **Concurrency.** READ COMMITTED. ``add_message`` (and ``start_turn``,
  for its two messages) first updates its session's ``updated_at``, which
  takes the session row's lock, and only then inserts with ``max(seq) + 1``
  (all statements pipelined in one round trip): two writers to one session
  (threads, processes, nodes) are serialised and never number two messages
  alike. Multi-row
  changes (``delete_session``, ``delete_sessions_before``) are one
  transaction each.
* **Memory search.** ``to_tsvector('english', content)`` under a GIN
  expression index, matched by an OR of the query's :func:`search_terms`
  (each quoted, so no tsquery syntax from a user survives) and ranked by
  ``ts_rank``, best first. English stemming and stop words (no diacritic
  folding, unlike SQLite's ``unicode61 remove_diacritics``).
* **Faults.** Connection-level failures become :class:`StoreUnavailable`
  (masked URL, never the password); a write that fails before ``COMMIT``
  leaves nothing. Idempotent statements (reads, ``finish_message``,
  ``touch_session``, ``recover_streaming``) run in autocommit and are retried
  once on a dead connection; single-row inserts (``add_user``,
  ``create_session``, ``add_telemetry``) are one autocommit statement each,
  retried only when nothing can have been applied; multi-statement writes
  are one ``BEGIN … COMMIT`` (see :class:`ledger.PostgresPool`, the
  connection policy shared with the ledger).

Call every method through ``trio.to_thread.run_sync`` (network I/O), with a
``CapacityLimiter`` no larger than ``max_connections``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

import psycopg

from ledger import PostgresPool

from .base import Page, Row, StoreUnavailable, UsernameTaken, now_iso
from .pg_messages import PostgresMessages
from .pgsql import SNAPSHOT, Conn, delete_sessions, insert, select_all, select_one, select_value
from .postgres_schema import migrate

__all__ = ["PostgresStore"]

T = TypeVar("T")


class PostgresStore(PostgresMessages):
    """Users, chat sessions, messages and telemetry in one PostgreSQL database.

    Opening connects once (unreachable: :class:`StoreUnavailable` naming the
    masked URL), creates or upgrades the schema (newer: ``SchemaTooNew``),
    then keeps a pool of at most ``max_connections``. Thread-safe.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 10,
        pool_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        lock_timeout: float = 5.0,
        application_name: str = "chinwag-store",
    ) -> None:
        self._pool = PostgresPool(
            url,
            what="the store database",
            unavailable=StoreUnavailable,
            application_name=application_name,
            max_size=max_connections,
            timeout=pool_timeout,
            connect_timeout=connect_timeout,
            lock_timeout=lock_timeout,
        )
        self.url = self._pool.url
        try:
            self._pool.open(_migrate)
        except BaseException:
            self._pool.close()
            raise

    # -- plumbing ----------------------------------------------------------------------

    def _read(self, work: Callable[[Conn], T]) -> T:
        """One-statement reads, or idempotent one-statement writes: autocommit, retried."""
        return self._pool.run(work, begin=None, idempotent=True)

    def _tx(self, work: Callable[[Conn], T]) -> T:
        """One transaction: committed whole or not at all."""
        return self._pool.run(work, begin="BEGIN", idempotent=False)

    def _write(self, work: Callable[[Conn], T]) -> T:
        """Exactly one writing statement, in autocommit (one round trip)."""
        return self._pool.run(work, begin=None, idempotent=False)

    def _snapshot(self, work: Callable[[Conn], T]) -> T:
        """Several reads that see one committed state; retried on a dead connection."""
        return self._pool.run(work, begin=SNAPSHOT, idempotent=True)

    @property
    def schema_version(self) -> int:
        return int(
            self._read(
                lambda c: select_value(
                    c, "SELECT value FROM store_meta WHERE key = 'schema_version'"
                )
            )
        )

    def close(self) -> None:
        self._pool.close()

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
        """Raise :class:`StoreUnavailable` if the database cannot be read."""
        self._read(lambda c: select_value(c, "SELECT 1 FROM users LIMIT 1"))

    # -- users -------------------------------------------------------------------------

    def add_user(
        self,
        username: str,
        password_hash: str,
        role: str,
        email: str | None = None,
        *,
        user_id: str | None = None,
    ) -> Row:
        user = {
            "id": user_id or uuid.uuid4().hex,
            "username": username,
            "email": email,
            "role": role,
            "password_hash": password_hash,
            "created_at": now_iso(),
        }
        try:
            self._write(lambda c: insert(c, "users", user))
        except psycopg.IntegrityError as exc:
            raise UsernameTaken(username) from exc
        return user

    def user_by_name(self, username: str) -> Row | None:
        return self._read(
            lambda c: select_one(c, "SELECT * FROM users WHERE username = %s", (username,))
        )

    def user_by_id(self, user_id: str) -> Row | None:
        return self._read(lambda c: select_one(c, "SELECT * FROM users WHERE id = %s", (user_id,)))

    def search_users(self, q: str, page: Page) -> tuple[list[Row], int]:
        like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        # ILIKE: SQLite's LIKE ignores (ASCII) case too.
        where = "WHERE u.username ILIKE %s OR coalesce(u.email, '') ILIKE %s"

        def work(c: Conn) -> tuple[list[Row], int]:
            total = select_value(c, f"SELECT count(*) FROM users u {where}", (like, like))
            found = select_all(
                c,
                f"""SELECT u.id, u.username, u.email, u.role,
                           (SELECT count(*) FROM chat_sessions s WHERE s.user_id = u.id)
                             AS session_count
                    FROM users u {where} ORDER BY u.username LIMIT %s OFFSET %s""",
                (like, like, page.limit, page.offset),
            )
            return found, int(total)

        return self._snapshot(work)

    # -- chat sessions -----------------------------------------------------------------

    def create_session(
        self,
        user_id: str,
        *,
        session_id: str | None,
        title: str,
        model_id: str,
        source: str,
        client_key: str | None = None,
    ) -> Row | None:
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
            self._write(lambda c: insert(c, "chat_sessions", row))
        except psycopg.IntegrityError:
            return None
        return row

    def get_session(self, session_id: str, user_id: str | None = None) -> Row | None:
        """The session, or None when it does not exist *or* is not ``user_id``'s."""
        row = self._read(
            lambda c: select_one(c, "SELECT * FROM chat_sessions WHERE id = %s", (session_id,))
        )
        if row is None or (user_id is not None and row["user_id"] != user_id):
            return None
        return row

    def session_by_key(self, user_id: str, client_key: str) -> Row | None:
        """``user_id``'s session that the client named ``client_key``, if any."""
        return self._read(
            lambda c: select_one(
                c,
                "SELECT * FROM chat_sessions WHERE user_id = %s AND client_key = %s",
                (user_id, client_key),
            )
        )

    def list_sessions(self, user_id: str, page: Page) -> tuple[list[Row], int]:
        def work(c: Conn) -> tuple[list[Row], int]:
            total = select_value(
                c, "SELECT count(*) FROM chat_sessions WHERE user_id = %s", (user_id,)
            )
            found = select_all(
                c,
                "SELECT * FROM chat_sessions WHERE user_id = %s"
                " ORDER BY updated_at DESC, id LIMIT %s OFFSET %s",
                (user_id, page.limit, page.offset),
            )
            return found, int(total)

        return self._snapshot(work)

    def delete_session(self, session_id: str) -> None:
        self._tx(lambda c: delete_sessions(c, [session_id]))

    def delete_session_if_unused(self, session_id: str) -> bool:
        def work(c: Conn) -> bool:
            cur = c.execute(
                "DELETE FROM chat_sessions WHERE id = %s AND NOT EXISTS "
                "(SELECT 1 FROM messages WHERE session_id = %s)",
                (session_id, session_id),
            )
            return bool(cur.rowcount)

        return self._write(work)

    def touch_session(self, session_id: str) -> None:
        self._read(
            lambda c: c.execute(
                "UPDATE chat_sessions SET updated_at = %s WHERE id = %s", (now_iso(), session_id)
            )
        )

    def rename_session(self, session_id: str, title: str) -> Row | None:
        """Set the session's title (and ``updated_at``); the row, or None if it is gone."""

        def work(c: Conn) -> Row | None:
            c.execute(
                "UPDATE chat_sessions SET title = %s, updated_at = %s WHERE id = %s",
                (title, now_iso(), session_id),
            )
            return select_one(c, "SELECT * FROM chat_sessions WHERE id = %s", (session_id,))

        return self._tx(work)


def _migrate(conn: Conn) -> None:
    migrate(conn)
