"""Retention: old sessions go, recent ones and live ones stay; off by default."""

from __future__ import annotations

from dataclasses import replace

from server.app import create_app


def _age(app, session_id: str, iso: str) -> None:
    from tests.conftest import db_sql

    settings = app.extensions["chinwag"].settings
    db_sql(settings, "UPDATE chat_sessions SET updated_at = ? WHERE id = ?", (iso, session_id))


async def _seed(app) -> tuple[str, str]:
    store = app.extensions["chinwag"].store
    user = store.add_user("old", "scrypt$x$y", "enduser")
    old = store.create_session(user["id"], session_id=None, title="old", model_id="m", source="web")
    new = store.create_session(user["id"], session_id=None, title="new", model_id="m", source="web")
    store.add_message(old["id"], user["id"], role="user", content="bye", model_id="m")
    _age(app, old["id"], "2020-01-01T00:00:00.000Z")
    return old["id"], new["id"]


async def test_sessions_past_retention_are_deleted_at_start(settings):
    app = create_app(replace(settings, retention_days=30))
    old, new = await _seed(app)
    async with app.test_app():
        store = app.extensions["chinwag"].store
        assert store.get_session(old) is None
        assert store.list_messages(old)[1] == 0
        assert store.get_session(new) is not None


async def test_retention_is_off_by_default(settings):
    app = create_app(settings)
    old, _ = await _seed(app)
    async with app.test_app():
        assert app.extensions["chinwag"].store.get_session(old) is not None
