"""The SQLite store's messages, memory search, retention, telemetry and recovery.

A mixin of :class:`server.store.Store` (kept beside it so each module stays
small, as :mod:`server.storage.pg_messages` is PostgreSQL's). It runs on
the store's one connection (``conn``) and its helpers: ``_tx`` (one write
transaction), ``_insert``, ``_rows`` and ``_one``. Semantics match
:class:`server.storage.pg_messages.PostgresMessages`.
"""

from __future__ import annotations

import logging
import sqlite3
from abc import abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from .base import WORD as _WORD
from .base import NewMessages, Page, SessionGone, now_iso, search_terms

__all__ = ["SqliteMessages"]

T = TypeVar("T")

log = logging.getLogger("chinwag.store")

_warned_no_fts = False


class SqliteMessages(NewMessages):
    conn: sqlite3.Connection

    @abstractmethod
    def _tx(self) -> AbstractContextManager[sqlite3.Connection]: ...

    @abstractmethod
    def _insert(self, table: str, row: dict[str, Any]) -> None: ...

    @abstractmethod
    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...

    @abstractmethod
    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None: ...

    @abstractmethod
    def touch_session(self, session_id: str) -> None: ...

    @abstractmethod
    def delete_session(self, session_id: str) -> None: ...

    def _insert_messages(
        self,
        session_id: str,
        rows: list[dict[str, Any]],
        before: Callable[[Any], None] | None = None,
    ) -> list[dict[str, Any]]:
        try:
            with self._tx():
                if before is not None:
                    before(self.conn)
                for row in rows:
                    self._number_and_insert(row)
                self.touch_session(session_id)
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" not in str(exc):
                raise
            raise SessionGone(session_id) from None  # deleted since it was looked up
        return rows

    def _number_and_insert(self, row: dict[str, Any]) -> None:
        """Inside a transaction: the session's next ``seq``, then the row."""
        row["seq"] = self.conn.execute(
            "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = ?",
            (row["session_id"],),
        ).fetchone()[0]
        self._insert("messages", row)

    def _settling_tx(self, unit: Callable[[Any], T]) -> T:
        # The connection runs at NORMAL (no fsync per commit); a commit that
        # settles credits waits for the disk, as the ledger's own settle does.
        self.conn.execute("PRAGMA synchronous = FULL")
        try:
            with self._tx() as conn:
                return unit(conn)
        finally:
            self.conn.execute("PRAGMA synchronous = NORMAL")

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
        return self._finish_on(
            self.conn,
            message_id,
            (content, status, input_tokens, output_tokens, credits_charged),
            (finish_reason, cancel_reason),
            only_streaming=True,
        )

    def _finish_on(
        self,
        conn: sqlite3.Connection,
        message_id: str,
        amounts: tuple[str, str, int, int, int],
        reasons: tuple[str, str | None],
        only_streaming: bool = False,
    ) -> bool:
        content, status, input_tokens, output_tokens, credits_charged = amounts
        cur = conn.execute(
            """UPDATE messages SET content = ?, status = ?, input_tokens = ?, output_tokens = ?,
                   tokens_used = ?, credits_charged = ?, finish_reason = ?, cancel_reason = ?
               WHERE id = ?"""
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

    def list_messages(
        self, session_id: str, page: Page | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        total = self.conn.execute(
            "SELECT count(*) FROM messages WHERE session_id = ?", (session_id,)
        ).fetchone()[0]
        if page is None:
            page = Page(0, -1)
        rows = self._rows(
            "SELECT * FROM messages WHERE session_id = ? ORDER BY seq LIMIT ? OFFSET ?",
            (session_id, page.limit, page.offset),
        )
        return rows, total

    def recent_messages(self, session_id: str, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` messages, oldest first (one indexed query, not the whole session)."""
        rows = self._rows(
            "SELECT role, content FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
            (session_id, n),
        )
        rows.reverse()
        return rows

    def search_messages(
        self,
        user_id: str,
        query: str,
        *,
        limit: int,
        exclude_session: str | None = None,
    ) -> list[dict[str, Any]]:
        """``user_id``'s own finished messages that match ``query``, best first.

        Rows ``{id, session_id, role, content, created_at, rank}``; ``rank`` is
        higher for a better match (FTS5's bm25, negated). Only user and
        assistant messages with content that are not still ``streaming``; none
        from ``exclude_session``. Any text is a valid query: it is reduced to
        :func:`search_terms`, each quoted and OR-ed, so it can never be an FTS
        syntax error; with no terms left the answer is ``[]``.

        A PostgreSQL store answers the same question with a generated
        ``tsvector`` column (``to_tsvector('english', content)``) under a GIN
        index, ``WHERE user_id = $1 AND tsv @@ to_tsquery('english', 'w1 | w2')``
        (the same terms; or ``websearch_to_tsquery`` of the raw text), ordered
        by ``ts_rank(tsv, query) DESC``.

        Without an FTS5 index (an SQLite built without it) the fallback is a
        substring test per term over the user's messages (a scan; unstemmed,
        ASCII case-folding), ranked by how many terms matched, newest first:
        slower and cruder, but the same answer shape.
        """
        terms = search_terms(query)
        if not terms or limit < 1:
            return []
        # ``m.user_id = ?`` is the guard; the index's own user filter only narrows.
        scope = (
            "m.user_id = ? AND m.role IN ('user', 'assistant') AND m.status != 'streaming'"
            " AND m.content != '' AND (? IS NULL OR m.session_id != ?)"
        )
        scope_params = (user_id, exclude_session, exclude_session)
        if self._has_fts():
            match = "content : (" + " OR ".join(f'"{t}"' for t in terms) + ")"
            # Only an id with a token to filter on, and no NUL (which ends FTS5's string).
            if _WORD.search(user_id) and "\x00" not in user_id:
                match = 'user_id : "' + user_id.replace('"', '""') + '" AND ' + match
            return self._rows(
                f"""SELECT m.id, m.session_id, m.role, m.content, m.created_at,
                           -messages_fts.rank AS rank
                    FROM messages_fts JOIN messages m ON m.rowid = messages_fts.rowid
                    WHERE messages_fts MATCH ? AND {scope}
                    ORDER BY messages_fts.rank LIMIT ?""",
                (match, *scope_params, limit),
            )
        global _warned_no_fts
        if not _warned_no_fts:
            _warned_no_fts = True
            log.warning("no FTS5 index on messages: memory search uses a substring scan")
        hits = " + ".join("(instr(lower(m.content), ?) > 0)" for _ in terms)
        return self._rows(
            f"""SELECT * FROM (
                    SELECT m.id, m.session_id, m.role, m.content, m.created_at,
                           {hits} AS rank
                    FROM messages m
                    WHERE m.session_id IN (SELECT id FROM chat_sessions WHERE user_id = ?)
                      AND {scope})
                WHERE rank > 0 ORDER BY rank DESC, created_at DESC LIMIT ?""",
            (*terms, user_id, *scope_params, limit),
        )

    def _has_fts(self) -> bool:
        return (
            self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages_fts'"
            ).fetchone()
            is not None
        )

    def message_by_stream(self, streaming_session_id: str) -> dict[str, Any] | None:
        return self._one(
            "SELECT * FROM messages WHERE streaming_session_id = ? AND role = 'assistant'",
            (streaming_session_id,),
        )

    def delete_sessions_before(self, cutoff_iso: str, keep: set[str]) -> int:
        """Delete sessions (with their messages) last updated before ``cutoff_iso``."""
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM chat_sessions WHERE updated_at < ?", (cutoff_iso,)
            ).fetchall()
            if r[0] not in keep
        ]
        for session_id in ids:
            self.delete_session(session_id)
        return len(ids)

    def add_telemetry(self, type_: str, payload_json: str) -> None:
        self._telemetry_on(self.conn, type_, payload_json)

    def _telemetry_on(self, conn: sqlite3.Connection, type_: str, payload_json: str) -> None:
        conn.execute(
            "INSERT INTO telemetry_events (type, payload, created_at) VALUES (?, ?, ?)",
            (type_, payload_json, now_iso()),
        )

    def recent_telemetry(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` telemetry rows, newest first (``payload`` as stored: JSON text)."""
        return self._rows("SELECT * FROM telemetry_events ORDER BY id DESC LIMIT ?", (limit,))

    def recover_streaming(self) -> int:
        """Mark assistant messages cut by a crash (still ``streaming``) as interrupted.

        Every such message in the database: safe at start-up of the only
        process using it (cluster mode needs a per-node owner first).
        """
        cur = self.conn.execute(
            "UPDATE messages SET status = 'interrupted', finish_reason = 'server_restart' "
            "WHERE status = 'streaming'"
        )
        return cur.rowcount
