"""The PostgreSQL store's messages, memory search, retention, telemetry and recovery.

A mixin of :class:`server.storage.postgres.PostgresStore` (kept beside it so
each module stays small); it runs every statement through the store's units
of work: ``_read`` (autocommit, retried once on a dead connection: reads and
idempotent writes), ``_tx`` (one transaction) and ``_snapshot`` (several
reads, one committed state). Semantics match ``server.store.Store``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from .base import NewMessages, Page, Row, SessionGone, now_iso, search_terms
from .pgsql import Conn, delete_sessions, select_all, select_one, select_value

__all__ = ["PostgresMessages"]

T = TypeVar("T")

# The same scope as SQLite's search: the user's own finished, non-empty
# user/assistant messages, outside the excluded session.
_SEARCH = """
    SELECT m.id, m.session_id, m.role, m.content, m.created_at,
           ts_rank(to_tsvector('english'::regconfig, m.content), q.query) AS rank
      FROM messages m, to_tsquery('english'::regconfig, %s) AS q(query)
     WHERE to_tsvector('english'::regconfig, m.content) @@ q.query
       AND m.user_id = %s AND m.role IN ('user', 'assistant') AND m.status <> 'streaming'
       AND m.content <> '' AND (%s::text IS NULL OR m.session_id <> %s)
     ORDER BY rank DESC, m.created_at DESC, m.id
     LIMIT %s
"""


def tsquery_of(terms: list[str]) -> str:
    """``'w1' | 'w2' | …``: any of the words, each a quoted lexeme (stemmed by the config).

    The terms are letters and digits only (:func:`search_terms`), so quoting
    leaves no tsquery operator a user could inject.
    """
    return " | ".join(f"'{term}'" for term in terms)


#: Messages are numbered by the database: the session's next seq, in the INSERT itself.
_MESSAGE_COLUMNS = ", ".join(NewMessages._draft("", "", None))
_MESSAGE_VALUES = ", ".join(
    "(SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = %(session_id)s)"
    if name == "seq"
    else f"%({name})s"
    for name in NewMessages._draft("", "", None)
)
_INSERT_MESSAGE = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_VALUES}) RETURNING seq"
)


def _insert_numbered(c: Conn, session_id: str, rows: list[Row]) -> list[Row]:
    """Inside the unit's transaction: ``rows`` numbered after every committed
    message of the session, in order; all statements in one round trip.

    Touch the session first: its row lock serialises writers of this
    session, and each INSERT, a later statement (READ COMMITTED: a fresh
    snapshot, which sees this transaction's own earlier rows), numbers its
    message after the others. (BEGIN and COMMIT stay apart from the
    pipeline: a connection lost before COMMIT is sent is then known to have
    committed nothing, and the unit is retried.)
    """
    with c.pipeline():
        c.execute(
            "UPDATE chat_sessions SET updated_at = %s WHERE id = %s",
            (rows[-1]["created_at"], session_id),
        )
        cursors = [c.execute(_INSERT_MESSAGE, row) for row in rows]
    numbered = []
    for row, cur in zip(rows, cursors, strict=True):
        (seq,) = cur.fetchone() or (0,)
        numbered.append({**row, "seq": int(seq)})
    return numbered


class PostgresMessages(NewMessages):
    @abstractmethod
    def _read(self, work: Callable[[Conn], T]) -> T: ...

    @abstractmethod
    def _tx(self, work: Callable[[Conn], T]) -> T: ...

    @abstractmethod
    def _write(self, work: Callable[[Conn], T]) -> T: ...

    @abstractmethod
    def _snapshot(self, work: Callable[[Conn], T]) -> T: ...

    def _insert_messages(
        self, session_id: str, rows: list[Row], before: Callable[[Any], None] | None = None
    ) -> list[Row]:
        def unit(c: Conn) -> list[Row]:
            if before is not None:
                before(c)
            try:
                return _insert_numbered(c, session_id, rows)
            except psycopg.errors.ForeignKeyViolation:
                raise SessionGone(session_id) from None  # deleted since it was looked up

        return self._tx(unit)

    def _settling_tx(self, unit: Callable[[Conn], T]) -> T:
        return self._tx(unit)  # PostgreSQL's commit waits for its WAL by default

    def _finish_on(
        self,
        conn: Conn,
        message_id: str,
        amounts: tuple[str, str, int, int, int],
        reasons: tuple[str, str | None],
        only_streaming: bool = False,
    ) -> bool:
        return _finish(conn, message_id, amounts, reasons, only_streaming)

    def _telemetry_on(self, conn: Conn, type_: str, payload_json: str) -> None:
        _telemetry(conn, type_, payload_json)

    def finish_message(
        self,
        message_id: str,
        *,
        content: str,
        status: str,
        input_tokens: int,
        output_tokens: int,
        credits_charged: int,
        finish_reason: str,
        cancel_reason: str | None = None,
    ) -> bool:
        # One idempotent statement: safe to retry on a dead connection.
        return self._read(
            lambda c: _finish(
                c,
                message_id,
                (content, status, input_tokens, output_tokens, credits_charged),
                (finish_reason, cancel_reason),
                only_streaming=True,
            )
        )

    def list_messages(self, session_id: str, page: Page | None = None) -> tuple[list[Row], int]:
        offset, limit = (0, None) if page is None else (page.offset, page.limit)
        if limit is not None and limit < 0:
            limit = None  # SQLite's LIMIT -1: no limit

        def work(c: Conn) -> tuple[list[Row], int]:
            total = select_value(
                c, "SELECT count(*) FROM messages WHERE session_id = %s", (session_id,)
            )
            found = select_all(
                c,
                "SELECT * FROM messages WHERE session_id = %s ORDER BY seq LIMIT %s OFFSET %s",
                (session_id, limit, offset),
            )
            return found, int(total)

        return self._snapshot(work)

    def recent_messages(self, session_id: str, n: int) -> list[Row]:
        """The newest ``n`` messages, oldest first (one indexed query, not the whole session)."""
        found = self._read(
            lambda c: select_all(
                c,
                "SELECT role, content FROM messages WHERE session_id = %s"
                " ORDER BY seq DESC LIMIT %s",
                (session_id, n),
            )
        )
        found.reverse()
        return found

    def search_messages(
        self,
        user_id: str,
        query: str,
        *,
        limit: int,
        exclude_session: str | None = None,
    ) -> list[Row]:
        """``user_id``'s own finished messages that match ``query``, best first.

        Rows ``{id, session_id, role, content, created_at, rank}``; ``rank`` is
        ``ts_rank`` (higher is better). Any text is a valid query: it is reduced
        to :func:`search_terms`, each quoted and OR-ed; with no terms left the
        answer is ``[]``. The GIN index over ``to_tsvector('english', content)``
        finds the candidates; ``user_id`` is the guard.
        """
        terms = search_terms(query)
        if not terms or limit < 1:
            return []
        params = (tsquery_of(terms), user_id, exclude_session, exclude_session, limit)
        return self._read(lambda c: select_all(c, _SEARCH, params))

    def message_by_stream(self, streaming_session_id: str) -> Row | None:
        return self._read(
            lambda c: select_one(
                c,
                "SELECT * FROM messages WHERE streaming_session_id = %s AND role = 'assistant'",
                (streaming_session_id,),
            )
        )

    def delete_sessions_before(self, cutoff_iso: str, keep: set[str]) -> int:
        """Delete sessions (with their messages) last updated before ``cutoff_iso``.

        One transaction for the whole sweep; the sessions in ``keep`` (those
        with a live stream) are spared.
        """

        def work(c: Conn) -> int:
            found = c.execute(
                "SELECT id FROM chat_sessions WHERE updated_at < %s FOR UPDATE", (cutoff_iso,)
            ).fetchall()
            ids = [row[0] for row in found if row[0] not in keep]
            if ids:
                delete_sessions(c, ids)
            return len(ids)

        return self._tx(work)

    def add_telemetry(self, type_: str, payload_json: str) -> None:
        self._write(lambda c: _telemetry(c, type_, payload_json))

    def recent_telemetry(self, limit: int = 100) -> list[Row]:
        """The newest ``limit`` telemetry rows, newest first (``payload`` as stored: JSON text)."""
        return self._read(
            lambda c: select_all(
                c, "SELECT * FROM telemetry_events ORDER BY id DESC LIMIT %s", (limit,)
            )
        )

    def recover_streaming(self) -> int:
        """Mark assistant messages cut by a crash (still ``streaming``) as interrupted.

        Every such message in the database: safe at start-up of the only
        process using it (cluster mode needs a per-node owner first).
        """

        def work(c: Conn) -> int:
            cur = c.execute(
                "UPDATE messages SET status = 'interrupted', finish_reason = 'server_restart'"
                " WHERE status = 'streaming'"
            )
            return int(cur.rowcount)

        return self._read(work)


def _finish(
    c: Conn,
    message_id: str,
    amounts: tuple[str, str, int, int, int],
    reasons: tuple[str, str | None],
    only_streaming: bool = False,
) -> bool:
    """The message's final row: ``(content, status, input, output, credits)``,
    ``(finish_reason, cancel_reason)``; ``only_streaming``: unless it was ended
    already. Whether it was written."""
    content, status, input_tokens, output_tokens, credits_charged = amounts
    cur = c.execute(
        """UPDATE messages SET content = %s, status = %s, input_tokens = %s,
               output_tokens = %s, tokens_used = %s, credits_charged = %s,
               finish_reason = %s, cancel_reason = %s
           WHERE id = %s"""
        + (" AND status = 'streaming'" if only_streaming else ""),
        (
            content,
            status,
            input_tokens,
            output_tokens,
            input_tokens + output_tokens,
            credits_charged,
            *reasons,
            message_id,
        ),
    )
    return bool(cur.rowcount)


def _telemetry(c: Conn, type_: str, payload_json: str) -> None:
    c.execute(
        "INSERT INTO telemetry_events (type, payload, created_at) VALUES (%s, %s, %s)",
        (type_, payload_json, now_iso()),
    )
