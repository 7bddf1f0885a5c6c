"""The store's seam: :class:`StoreBackend`, its values and errors, shared by both backends.

Two backends implement it: ``server.store.Store`` (SQLite, the embedded
default) and :class:`server.storage.postgres.PostgresStore`. Every method is
synchronous and each write is one transaction, so a half-done change is
never visible or stored. Where a Trio caller may call them from:

* SQLite: statements take well under a millisecond of local I/O; calling
  on the Trio thread is fine (DESIGN.md §3) and atomic with respect to
  cancellation.
* PostgreSQL: every call is one or more network round trips. Call it
  through ``trio.to_thread.run_sync(fn, limiter=limiter)`` with one
  ``CapacityLimiter`` no larger than the store's pool; never on the Trio
  thread. A thread is not cancellable: an abandoned call still commits or
  rolls back whole.

Errors: ``UsernameTaken`` (``add_user``); ``None`` answers for "taken" in
``create_session``; :class:`StoreUnavailable` (PostgreSQL: unreachable, lost
mid-call, pool exhausted; answer 503); :class:`SchemaTooNew` at open. SQLite
raises ``sqlite3.Error`` for a database it cannot use, as it always has.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from ledger import Settlement

__all__ = [
    "MAX_SEARCH_TERMS",
    "NewMessages",
    "Page",
    "SchemaTooNew",
    "StoreBackend",
    "StoreError",
    "StoreUnavailable",
    "UsernameTaken",
    "now_iso",
    "search_terms",
]


class UsernameTaken(Exception):
    pass


class StoreError(Exception):
    """Base of the store's own errors (beyond ``UsernameTaken``)."""


class StoreUnavailable(StoreError):
    """The store's database cannot be used right now; retry later (HTTP 503).

    Nothing of the failed call was committed, except that a connection lost
    during ``COMMIT`` leaves it applied wholly or not at all. The message
    names the database by its masked URL, never its password.
    """


class SessionGone(StoreError):
    """A message's chat session was deleted meanwhile: nothing was written."""


class SchemaTooNew(StoreError):
    """The database's store schema is newer than this code: refused at open."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(found, supported)
        self.found = found
        self.supported = supported

    def __str__(self) -> str:
        return (
            f"store schema version {self.found} is newer than this code ({self.supported}):"
            " refusing to open it; upgrade chinwag"
        )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class NewMessages(ABC):
    """``add_message`` and ``start_turn`` for a backend that can number and insert
    a session's new rows in one transaction (:meth:`_insert_messages`)."""

    @abstractmethod
    def _insert_messages(
        self, session_id: str, rows: list[Row], before: Callable[[Any], None] | None = None
    ) -> list[Row]:
        """In one transaction: touch the session, number ``rows`` after its other
        messages, in order, and insert them; the rows with their ``seq``.
        ``before(connection)`` runs first in the same transaction (its error
        rolls back everything)."""

    @abstractmethod
    def _settling_tx(self, unit: Callable[[Any], T]) -> T:
        """``unit(connection)`` in one write transaction whose commit is durable
        (it settles credits)."""

    @abstractmethod
    def _finish_on(
        self,
        conn: Any,
        message_id: str,
        amounts: tuple[str, str, int, int, int],
        reasons: tuple[str, str | None],
        only_streaming: bool = False,
    ) -> bool:
        """On ``conn``: the message's final row, ``(content, status, input_tokens,
        output_tokens, credits_charged)`` and ``(finish_reason, cancel_reason)``;
        ``only_streaming``: unless it was ended already. Whether it was written."""

    @abstractmethod
    def _telemetry_on(self, conn: Any, type_: str, payload_json: str) -> None:
        """On ``conn``: one ``telemetry_events`` row."""

    def close_turn(
        self,
        message_id: str,
        *,
        settle: Callable[[Any], Settlement],
        content: str,
        status: str,
        input_tokens: int,
        output_tokens: int,
        finish_reason: str,
        cancel_reason: str | None,
        telemetry: Callable[[int], str],
    ) -> Settlement:
        def unit(conn: Any) -> Settlement:
            settlement = settle(conn)
            charged = settlement.charged
            amounts = (content, status, input_tokens, output_tokens, charged)
            self._finish_on(conn, message_id, amounts, (finish_reason, cancel_reason))
            self._telemetry_on(conn, "model_call", telemetry(charged))
            return settlement

        return self._settling_tx(unit)

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
    ) -> Row:
        row = {
            **self._draft(session_id, user_id, model_id),
            "role": role,
            "content": content,
            "status": status,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "tokens_used": input_tokens + output_tokens,
            "credits_charged": credits_charged,
            "finish_reason": finish_reason,
            "streaming_session_id": streaming_session_id,
        }
        (numbered,) = self._insert_messages(session_id, [row])
        return numbered

    def start_turn(
        self, session_id: str, user_id: str, *, text: str, model_id: str, streaming_session_id: str
    ) -> tuple[Row, Row]:
        first, second = self._insert_messages(
            session_id, self._turn(session_id, user_id, text, model_id, streaming_session_id)
        )
        return first, second

    def open_turn(
        self,
        session_id: str,
        user_id: str,
        *,
        text: str,
        model_id: str,
        streaming_session_id: str,
        reserve: Callable[[Any], T],
    ) -> tuple[T, Row, Row]:
        held: list[T] = []

        def before(conn: Any) -> None:
            held[:] = [reserve(conn)]  # a transaction tried again runs it again

        first, second = self._insert_messages(
            session_id,
            self._turn(session_id, user_id, text, model_id, streaming_session_id),
            before,
        )
        return held[0], first, second

    def _turn(
        self, session_id: str, user_id: str, text: str, model_id: str, streaming_session_id: str
    ) -> list[Row]:
        """The user's message and the assistant's, still streaming (unnumbered)."""
        user = {**self._draft(session_id, user_id, model_id), "role": "user", "content": text}
        assistant = {
            **self._draft(session_id, user_id, model_id),
            "role": "assistant",
            "status": "streaming",
            "streaming_session_id": streaming_session_id,
        }
        return [user, assistant]

    @staticmethod
    def _draft(session_id: str, user_id: str, model_id: str | None) -> Row:
        """A new message's row, in column order, before its role and content."""
        return {
            "id": str(uuid.uuid4()),
            "session_id": session_id,
            "user_id": user_id,
            "role": "",
            "content": "",
            "model_id": model_id,
            "status": "complete",
            "input_tokens": 0,
            "output_tokens": 0,
            "tokens_used": 0,
            "credits_charged": 0,
            "finish_reason": None,
            "streaming_session_id": None,
            "seq": 0,
            "created_at": now_iso(),
        }


@dataclass(frozen=True, slots=True)
class Page:
    offset: int
    limit: int


#: At most this many words of a query are searched for (the longest ones).
MAX_SEARCH_TERMS = 16
_MAX_TERM_CHARS = 64
WORD = re.compile(r"[^\W_]+")  # letters and digits: what FTS5's unicode61 calls a token
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
    for i, match in enumerate(WORD.finditer(text.lower())):
        word = match.group()
        if len(word) < 2 or len(word) > _MAX_TERM_CHARS or word in _STOP_WORDS:
            continue
        seen.setdefault(word, i)
    keep = sorted(seen, key=lambda w: (-len(w), seen[w]))[:MAX_SEARCH_TERMS]
    return sorted(keep, key=seen.__getitem__)


Row = dict[str, Any]
T = TypeVar("T")


@runtime_checkable
class StoreBackend(Protocol):
    """Users, chat sessions, messages, memory search, retention, telemetry, recovery.

    Rows are plain dicts keyed by column name, in the tables' column order,
    the same keys and value types on both backends.
    """

    @property
    def schema_version(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def ping(self) -> None: ...

    # users
    def add_user(
        self,
        username: str,
        password_hash: str,
        role: str,
        email: str | None = None,
        *,
        user_id: str | None = None,
    ) -> Row:
        """A new user (a new id unless ``user_id``: an external identity's ``sub``);
        a taken username or id → :class:`UsernameTaken`."""
        ...

    def user_by_name(self, username: str) -> Row | None: ...

    def user_by_id(self, user_id: str) -> Row | None: ...

    def search_users(self, q: str, page: Page) -> tuple[list[Row], int]: ...

    # chat sessions
    def create_session(
        self,
        user_id: str,
        *,
        session_id: str | None,
        title: str,
        model_id: str,
        source: str,
        client_key: str | None = None,
    ) -> Row | None: ...

    def get_session(self, session_id: str, user_id: str | None = None) -> Row | None: ...

    def session_by_key(self, user_id: str, client_key: str) -> Row | None: ...

    def list_sessions(self, user_id: str, page: Page) -> tuple[list[Row], int]: ...

    def delete_session(self, session_id: str) -> None: ...

    def delete_session_if_unused(self, session_id: str) -> bool:
        """Delete a session that holds no message (one statement); False if it
        holds one, or is gone."""
        ...

    def touch_session(self, session_id: str) -> None: ...

    def rename_session(self, session_id: str, title: str) -> Row | None: ...

    # messages
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
    ) -> Row: ...

    def start_turn(
        self, session_id: str, user_id: str, *, text: str, model_id: str, streaming_session_id: str
    ) -> tuple[Row, Row]:
        """The user's message and the assistant's, ``streaming``, in one transaction.

        Numbered one after the other after every earlier message of the
        session; the session is touched once.
        """
        ...

    def open_turn(
        self,
        session_id: str,
        user_id: str,
        *,
        text: str,
        model_id: str,
        streaming_session_id: str,
        reserve: Callable[[Any], T],
    ) -> tuple[T, Row, Row]:
        """:meth:`start_turn` with ``reserve(connection)`` (a unit of the ledger in
        this database, ``LedgerBackend.reservation``) first, in the same
        transaction: opening a stream is one commit, or nothing."""
        ...

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
        """End a message that is still ``streaming`` (one statement); False, and
        nothing written, if it was ended already (by its own run, say)."""
        ...

    def close_turn(
        self,
        message_id: str,
        *,
        settle: Callable[[Any], Settlement],
        content: str,
        status: str,
        input_tokens: int,
        output_tokens: int,
        finish_reason: str,
        cancel_reason: str | None,
        telemetry: Callable[[int], str],
    ) -> Settlement:
        """A call's ending as one commit, or nothing: ``settle(connection)`` (a unit
        of the ledger in this database, ``LedgerBackend.settlement``) first, then
        the message (:meth:`finish_message`) with the credits the settlement
        really charged, then the ``model_call`` telemetry row
        ``telemetry(charged)``. On SQLite the commit waits for the disk, as the
        ledger's own settlements do."""
        ...

    def list_messages(self, session_id: str, page: Page | None = None) -> tuple[list[Row], int]: ...

    def recent_messages(self, session_id: str, n: int) -> list[Row]: ...

    def search_messages(
        self,
        user_id: str,
        query: str,
        *,
        limit: int,
        exclude_session: str | None = None,
    ) -> list[Row]: ...

    def message_by_stream(self, streaming_session_id: str) -> Row | None: ...

    # retention, telemetry, recovery
    def delete_sessions_before(self, cutoff_iso: str, keep: set[str]) -> int: ...

    def add_telemetry(self, type_: str, payload_json: str) -> None: ...

    def recent_telemetry(self, limit: int = 100) -> list[Row]: ...

    def recover_streaming(self) -> int: ...
