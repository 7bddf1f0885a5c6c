"""Memory for ``useMemory: true`` (SPEC §8, issue 9): the caller's own earlier messages.

The route asks once per request, before it stores the new message::

    recalled = recall(store, user_id, text, top_k=settings.memory_top_k,
                      token_budget=settings.memory_token_budget)
    context = render_context(recalled)   # None when nothing was recalled
    # ... hub.start(..., context=context)  → ModelRequest.system

:func:`recall` takes the best ``top_k`` full-text hits among the user's own
finished messages (:meth:`Store.search_messages`; never another user's) and
keeps each whole hit that still fits the token budget, best first: a hit is
never cut mid-way, and one that would overflow is skipped, so a later smaller
one may still fit. It logs one INFO record on ``chinwag.memory`` with
``memory_ms``, ``results_count`` and ``total_tokens`` (never the text).

The search is behind one method, :class:`MessageSearch`, so a store on another
database (PostgreSQL: ``tsvector`` + GIN, ``ts_rank``) plugs in unchanged.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol

from server.providers.base import estimate_tokens

__all__ = ["MessageSearch", "Recall", "Snippet", "recall", "render_context"]

log = logging.getLogger("chinwag.memory")

#: The first line of the rendered context.
HEADING = (
    "Relevant earlier messages from this user's past conversations "
    "(context only; they may be out of date):"
)


class MessageSearch(Protocol):
    """What memory needs from a store (``server.store.Store`` is one)."""

    def search_messages(
        self,
        user_id: str,
        query: str,
        *,
        limit: int,
        exclude_session: str | None = None,
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Snippet:
    """One recalled message, whole."""

    message_id: str
    session_id: str
    role: str
    text: str
    created_at: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Recall:
    #: Kept hits, best match first.
    snippets: tuple[Snippet, ...]
    #: How many hits the search returned (at most ``top_k``), before the budget.
    candidates: int
    #: Estimated tokens of the rendered context, heading included (≤ the budget).
    total_tokens: int
    #: Wall time of the search and the selection, milliseconds.
    ms: float

    @property
    def results_count(self) -> int:
        return len(self.snippets)


def recall(
    store: MessageSearch,
    user_id: str,
    query: str,
    *,
    top_k: int,
    token_budget: int,
    exclude_session: str | None = None,
) -> Recall:
    """The user's earlier messages relevant to ``query``, within ``token_budget``.

    Never raises for any ``query`` text. A database error is logged as a
    warning and answers an empty recall: memory is extra context, and the
    request can go on without it.
    """
    started = time.perf_counter()
    try:
        rows = store.search_messages(user_id, query, limit=top_k, exclude_session=exclude_session)
    except sqlite3.Error:
        log.warning("memory search failed; answering without memory", exc_info=True)
        rows = []
    kept: list[Snippet] = []
    seen: set[str] = set()
    total = 0
    for row in rows:
        text = row["content"]
        key = text.strip()
        if not key or key in seen:
            continue
        # What the model is sent (and the caller charged for): the snippet's
        # rendered line, and with the first one the heading. A sum of
        # estimates is never below the estimate of the whole text.
        tokens = estimate_tokens("\n" + _line(row["created_at"], row["role"], text))
        cost = tokens if kept else tokens + estimate_tokens(HEADING)
        if total + cost > token_budget:
            continue
        seen.add(key)
        total += cost
        kept.append(
            Snippet(
                message_id=row["id"],
                session_id=row["session_id"],
                role=row["role"],
                text=text,
                created_at=row["created_at"],
                tokens=tokens,
            )
        )
    result = Recall(
        snippets=tuple(kept),
        candidates=len(rows),
        total_tokens=total,
        ms=(time.perf_counter() - started) * 1000,
    )
    log.info(
        "memory retrieval completed",
        extra={
            "fields": {
                "memory_ms": round(result.ms, 3),
                "results_count": result.results_count,
                "total_tokens": result.total_tokens,
                "candidates": result.candidates,
                "userId": user_id,
            }
        },
    )
    return result


def render_context(recalled: Recall) -> str | None:
    """The recall as text for the model (``ModelRequest.system``), or None if empty.

    One line per message, oldest first, with its date and role; a message's
    own line breaks are indented under it::

        Relevant earlier messages from this user's past conversations (...):
        - [2026-11-20] user: How do I rotate the JWT secret?
        - [2026-11-20] assistant: Set CHINWAG_JWT_SECRET and restart...
    """
    if not recalled.snippets:
        return None
    lines = [HEADING]
    for s in sorted(recalled.snippets, key=lambda s: s.created_at):
        lines.append(_line(s.created_at, s.role, s.text))
    return "\n".join(lines)


def _line(created_at: str, role: str, text: str) -> str:
    """One recalled message as the model reads it (its line breaks indented)."""
    body = "\n  ".join(text.strip().splitlines())
    return f"- [{created_at[:10]}] {role}: {body}"
