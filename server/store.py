"""Users, chat sessions and messages in SQLite (WAL), through sqlite-utils.

Every method is synchronous: statements take well under a millisecond, so
the server calls them on the Trio thread (DESIGN.md §3) rather than paying a
thread hop. Each write is one transaction; a multi-row change (deleting a
session with its messages) is atomic.

Schema changes are numbered migrations applied at start-up, idempotently
(``store_meta.schema_version``). The ledger keeps its own ``ledger_*``
tables in the same file.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

__all__ = ["Store", "UsernameTaken", "now_iso", "search_terms"]

log = logging.getLogger("chinwag.store")


class UsernameTaken(Exception):
    pass


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _m1(db: Database) -> None:
    db.table("users").create(
        {
            "id": str,
            "username": str,
            "email": str,
            "role": str,
            "password_hash": str,
            "created_at": str,
        },
        pk="id",
        not_null={"username", "role", "password_hash", "created_at"},
    )
    db.table("users").create_index(["username"], unique=True)
    db.table("chat_sessions").create(
        {
            "id": str,
            "user_id": str,
            "title": str,
            "model_id": str,
            "source": str,
            "created_at": str,
            "updated_at": str,
        },
        pk="id",
        foreign_keys=[("user_id", "users", "id")],
        not_null={"user_id", "created_at", "updated_at"},
    )
    db.table("chat_sessions").create_index(["user_id", "updated_at"])
    db.table("messages").create(
        {
            "id": str,
            "session_id": str,
            "user_id": str,
            "role": str,
            "content": str,
            "model_id": str,
            "status": str,
            "input_tokens": int,
            "output_tokens": int,
            "tokens_used": int,
            "credits_charged": int,
            "finish_reason": str,
            "streaming_session_id": str,
            "seq": int,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("session_id", "chat_sessions", "id")],
        not_null={"session_id", "role", "content", "status", "created_at"},
    )
    db.table("messages").create_index(["session_id", "seq"])
    db.table("messages").create_index(["streaming_session_id"])


def _m2(db: Database) -> None:
    db.table("telemetry_events").create(
        {"id": int, "type": str, "payload": str, "created_at": str},
        pk="id",
        not_null={"type", "payload", "created_at"},
    )
    db.table("telemetry_events").create_index(["type", "created_at"])


def _m3(db: Database) -> None:
    """Full-text index over messages' content, for memory search (issue 9).

    An external-content FTS5 table: it stores only the index, the text stays
    in ``messages``, and triggers keep the two in step. The update trigger
    matters: an assistant message is inserted empty and finished with its
    content. ``user_id`` is indexed too, so a search narrows to one user's
    messages inside the index (``user_id:"…" AND content:(…)``) instead of
    ranking every user's matches; it weighs nothing in the rank. Rows that
    already exist are indexed by the ``rebuild``.

    Without FTS5 in this SQLite build the migration logs a warning and adds
    nothing; :meth:`Store.search_messages` then falls back to a substring scan.
    Caveats: once indexed, the file needs an SQLite with FTS5 to write messages
    (the triggers use it); and the index is keyed by ``messages.rowid``, which
    a ``VACUUM`` may renumber (the table has a TEXT key), so after one run
    ``INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')``.
    """
    try:
        db.execute(
            """CREATE VIRTUAL TABLE messages_fts USING fts5(
                   content, user_id,
                   content='messages', content_rowid='rowid',
                   tokenize='porter unicode61 remove_diacritics 2')"""
        )
        db.execute(
            "INSERT INTO messages_fts (messages_fts, rank) VALUES ('rank', 'bm25(1.0, 0.0)')"
        )
    except sqlite3.OperationalError as exc:
        if "fts5" not in str(exc).lower():
            raise
        log.warning("SQLite has no FTS5 (%s): memory search falls back to a substring scan", exc)
        return
    db.execute(
        """CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN
               INSERT INTO messages_fts (rowid, content, user_id)
               VALUES (new.rowid, new.content, new.user_id);
           END"""
    )
    db.execute(
        """CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN
               INSERT INTO messages_fts (messages_fts, rowid, content, user_id)
               VALUES ('delete', old.rowid, old.content, old.user_id);
           END"""
    )
    db.execute(
        """CREATE TRIGGER messages_fts_au AFTER UPDATE OF content, user_id ON messages BEGIN
               INSERT INTO messages_fts (messages_fts, rowid, content, user_id)
               VALUES ('delete', old.rowid, old.content, old.user_id);
               INSERT INTO messages_fts (rowid, content, user_id)
               VALUES (new.rowid, new.content, new.user_id);
           END"""
    )
    db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")


def _m4(db: Database) -> None:
    """A supervisor's reason kept with the message they stopped (SPEC §6.1), and
    the client's own name for a session (``/api/v1/chat``'s ``sessionId``),
    unique per user so one user's names never collide with, or reveal,
    another's."""
    db.execute("ALTER TABLE messages ADD COLUMN cancel_reason TEXT")
    db.execute("ALTER TABLE chat_sessions ADD COLUMN client_key TEXT")
    db.execute(
        "CREATE UNIQUE INDEX chat_sessions_client_key ON chat_sessions (user_id, client_key)"
        " WHERE client_key IS NOT NULL"
    )


MIGRATIONS: tuple[Callable[[Database], None], ...] = (_m1, _m2, _m3, _m4)

#: At most this many words of a query are searched for (the longest ones).
MAX_SEARCH_TERMS = 16
_MAX_TERM_CHARS = 64
_WORD = re.compile(r"[^\W_]+")  # letters and digits: what FTS5's unicode61 calls a token
_STOP_WORDS = frozenset(
    """about after again all also am an and any are as at be been before being but by can
    could did do does doing done for from had has have having he her here hers him his how
    if in into is it its just me more most my no nor not now of off on once only or other
    our ours out over own same she should so some such than that the their theirs them then
    there these they this those through to too under until up very was we were what when
    where which while who whom why will with would you your yours""".split()  # noqa: SIM905
)


def search_terms(text: str) -> list[str]:
    """The words of free text worth searching for, lower-cased, distinct.

    Letters and digits only, so no FTS (or tsquery) syntax survives; words
    shorter than two characters and common English stop words are dropped;
    at most :data:`MAX_SEARCH_TERMS`, preferring the longest (usually the most
    specific), in the order they appear.
    """
    seen: dict[str, int] = {}
    for i, match in enumerate(_WORD.finditer(text.lower())):
        word = match.group()
        if len(word) < 2 or len(word) > _MAX_TERM_CHARS or word in _STOP_WORDS:
            continue
        seen.setdefault(word, i)
    keep = sorted(seen, key=lambda w: (-len(w), seen[w]))[:MAX_SEARCH_TERMS]
    return sorted(keep, key=seen.__getitem__)


_warned_no_fts = False


@dataclass(frozen=True, slots=True)
class Page:
    offset: int
    limit: int


class Store:
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

    def _migrate(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value)")
        with self._tx():
            row = self.conn.execute(
                "SELECT value FROM store_meta WHERE key = 'schema_version'"
            ).fetchone()
            version = int(row[0]) if row else 0
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
        self, username: str, password_hash: str, role: str, email: str | None = None
    ) -> dict[str, Any]:
        user = {
            "id": uuid.uuid4().hex,
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

    def touch_session(self, session_id: str) -> None:
        self.conn.execute(
            "UPDATE chat_sessions SET updated_at = ? WHERE id = ?", (now_iso(), session_id)
        )

    # -- messages ------------------------------------------------------------------

    def add_message(
        self,
        session_id: str,
        user_id: str,
        *,
        role: str,
        content: str,
        model_id: str | None,
        status: str = "complete",
        streaming_session_id: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        credits_charged: int = 0,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        with self._tx():
            seq = self.conn.execute(
                "SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE session_id = ?",
                (session_id,),
            ).fetchone()[0]
            row = {
                "id": str(uuid.uuid4()),
                "session_id": session_id,
                "user_id": user_id,
                "role": role,
                "content": content,
                "model_id": model_id,
                "status": status,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "tokens_used": input_tokens + output_tokens,
                "credits_charged": credits_charged,
                "finish_reason": finish_reason,
                "streaming_session_id": streaming_session_id,
                "seq": seq,
                "created_at": now_iso(),
            }
            self._insert("messages", row)
            self.touch_session(session_id)
        return row

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
    ) -> None:
        self.conn.execute(
            """UPDATE messages SET content = ?, status = ?, input_tokens = ?, output_tokens = ?,
                   tokens_used = ?, credits_charged = ?, finish_reason = ?, cancel_reason = ?
               WHERE id = ?""",
            (
                content,
                status,
                input_tokens,
                output_tokens,
                input_tokens + output_tokens,
                credits_charged,
                finish_reason,
                cancel_reason,
                message_id,
            ),
        )

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
        self.conn.execute(
            "INSERT INTO telemetry_events (type, payload, created_at) VALUES (?, ?, ?)",
            (type_, payload_json, now_iso()),
        )

    def recover_streaming(self) -> int:
        """Mark assistant messages cut by a crash (still ``streaming``) as interrupted."""
        cur = self.conn.execute(
            "UPDATE messages SET status = 'interrupted', finish_reason = 'server_restart' "
            "WHERE status = 'streaming'"
        )
        return cur.rowcount
