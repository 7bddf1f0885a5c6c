"""SQLite's store tables and their numbered migrations (``server.store.Store`` applies them).

Migration N here is the same change as migration N of
:mod:`server.storage.postgres_schema` (same tables, same columns, in the same
order), each in its own engine's terms: FTS5 here, ``tsvector`` + GIN there.
``server.store`` re-exports :data:`MIGRATIONS` and reads it from its own
namespace when it migrates (tests shorten it there to build old databases).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from sqlite_utils import Database

__all__ = ["MIGRATIONS"]

log = logging.getLogger("chinwag.store")


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
    nothing; :meth:`server.store.Store.search_messages` then falls back to a substring scan.
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
