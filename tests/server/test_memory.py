"""Memory search (``useMemory``): the caller's own history, found by its words, within budget."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server.store as store_module
from server.logs import JsonFormatter
from server.memory import HEADING, Recall, Snippet, recall, render_context
from server.providers.base import estimate_tokens
from server.settings import Settings, SettingsError
from server.store import MAX_SEARCH_TERMS, Store, search_terms

HOSTILE = [
    '"',
    '""',
    "*",
    "NEAR(",
    "NEAR(kubernetes deploy, 2)",
    "AND OR NOT",
    "kubernetes AND",
    "col:xyz",
    "content:kubernetes",
    "user_id:abc",
    "{content user_id}: kubernetes",
    "^kubernetes",
    "kube*",
    "(kubernetes",
    "kubernetes)",
    "-kubernetes",
    "+",
    "'; DROP TABLE messages; --",
    "\\",
    "\x00kubernetes\x00",
    "kübernetés 部署 🚀 \uff4b\uff55\uff42\uff45\uff52\uff4e\uff45\uff54\uff45\uff53",
    "",
    "   \n\t ",
    "kubernetes " * 400,
    "x" * 4000,
    " ".join(f"word{i}" for i in range(1000)),
]


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "chinwag.db")
    yield s
    s.close()


def _user(store: Store, name: str) -> str:
    return store.add_user(name, "scrypt$x$y", "enduser")["id"]


def _session(store: Store, user_id: str) -> str:
    row = store.create_session(user_id, session_id=None, title="t", model_id="m", source="web")
    assert row is not None
    return row["id"]


def _say(store: Store, session_id: str, user_id: str, text: str, role: str = "user") -> str:
    return store.add_message(session_id, user_id, role=role, content=text, model_id="m")["id"]


def _fts_consistent(store: Store) -> None:
    # With rank 1, FTS5 also checks the index against the content table.
    store.conn.execute(
        "INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)"
    )


# -- the store's search ----------------------------------------------------------------


def test_finds_an_earlier_message_of_the_user_by_a_word_in_it(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    hit = _say(store, s, alice, "How do I deploy the billing service to Kubernetes?")
    _say(store, s, alice, "What is a good pasta recipe?")
    rows = store.search_messages(alice, "kubernetes", limit=5)
    assert [r["id"] for r in rows] == [hit]
    assert set(rows[0]) == {"id", "session_id", "role", "content", "created_at", "rank"}
    assert rows[0]["session_id"] == s
    assert rows[0]["role"] == "user"
    # Stemmed and case-folded: "deploying" finds "deploy", "KUBERNETES" finds "Kubernetes".
    assert [r["id"] for r in store.search_messages(alice, "Deploying KUBERNETES", limit=5)] == [hit]


def test_best_match_first(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    one = _say(store, s, alice, "kubernetes once, and many other words about the weather today")
    both = _say(store, s, alice, "kubernetes ingress: the kubernetes ingress controller")
    rows = store.search_messages(alice, "kubernetes ingress controller", limit=5)
    assert [r["id"] for r in rows] == [both, one]
    assert rows[0]["rank"] > rows[1]["rank"]


def test_never_another_users_messages(store):
    alice, bob = _user(store, "alice"), _user(store, "bob")
    mine = _say(store, _session(store, alice), alice, "my secret project is called zanzibar")
    _say(store, _session(store, bob), bob, "my secret project is called zanzibar")
    _say(store, _session(store, bob), bob, "zanzibar zanzibar zanzibar", role="assistant")
    assert [r["id"] for r in store.search_messages(alice, "zanzibar secret", limit=10)] == [mine]
    # Bob's better matches never take Alice's places either.
    assert [r["id"] for r in store.search_messages(alice, "zanzibar", limit=1)] == [mine]
    assert all(
        r["id"] != mine for r in store.search_messages(bob, "zanzibar secret project", limit=10)
    )
    assert store.search_messages(_user(store, "carol"), "zanzibar", limit=10) == []


def test_assistant_content_added_by_finish_message_is_found(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    msg = store.add_message(
        s, alice, role="assistant", content="", model_id="m", status="streaming"
    )
    store.finish_message(
        msg["id"],
        content="Use a rolling update with maxSurge set to one.",
        status="complete",
        input_tokens=3,
        output_tokens=10,
        credits_charged=1,
        finish_reason="stop",
    )
    rows = store.search_messages(alice, "rolling update", limit=5)
    assert [(r["id"], r["role"]) for r in rows] == [(msg["id"], "assistant")]
    _fts_consistent(store)


def test_streaming_and_empty_messages_are_skipped(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    _say(store, s, alice, "")
    store.add_message(
        s,
        alice,
        role="assistant",
        content="partial answer about zebras",
        model_id="m",
        status="streaming",
    )
    assert store.search_messages(alice, "zebras", limit=5) == []
    # Once it is no longer streaming (cut by a crash, say), it counts.
    store.recover_streaming()
    assert len(store.search_messages(alice, "zebras", limit=5)) == 1


def test_exclude_session(store):
    alice = _user(store, "alice")
    here, there = _session(store, alice), _session(store, alice)
    _say(store, here, alice, "walrus facts")
    other = _say(store, there, alice, "walrus habitats")
    rows = store.search_messages(alice, "walrus", limit=5, exclude_session=here)
    assert [r["id"] for r in rows] == [other]
    assert len(store.search_messages(alice, "walrus", limit=5)) == 2


def test_deleted_sessions_are_gone_from_the_index(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    keep = _session(store, alice)
    _say(store, s, alice, "the okapi is a giraffid")
    _say(store, s, alice, "okapi stripes", role="assistant")
    kept = _say(store, keep, alice, "an okapi in the zoo")
    store.delete_session(s)
    assert [r["id"] for r in store.search_messages(alice, "okapi", limit=10)] == [kept]
    rowcount = store.conn.execute(
        "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'okapi'"
    ).fetchone()[0]
    assert rowcount == 1
    _fts_consistent(store)


def test_retention_sweep_keeps_the_index_in_step(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    _say(store, s, alice, "narwhal tusks")
    store.conn.execute("UPDATE chat_sessions SET updated_at = '2000-01-01T00:00:00.000Z'")
    assert store.delete_sessions_before("2001-01-01T00:00:00.000Z", keep=set()) == 1
    assert store.search_messages(alice, "narwhal", limit=5) == []
    _fts_consistent(store)


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(store, query):
    alice = _user(store, "alice")
    _say(store, _session(store, alice), alice, "kubernetes deploy near the column xyz")
    rows = store.search_messages(alice, query, limit=5)
    assert isinstance(rows, list)
    assert len(rows) <= 5


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=300), user_id=st.text(max_size=40))
def test_any_text_is_a_valid_query_for_any_user_id(store, query, user_id):
    assert isinstance(store.search_messages(user_id, query, limit=3), list)


WEIRD_IDS = ["auth0|alice", "AUTH0|Alice", 'a"b', 'a""b', "|||", "---", "a\x00b", "\x00", "é", "e"]


def test_odd_user_ids_see_exactly_their_own(store):
    # External identity providers' ``sub`` can be anything; ids that tokenize
    # alike ("auth0|alice" / "AUTH0|Alice", "é" / "e") must still not mix.
    s = {}
    for uid in WEIRD_IDS:
        store.conn.execute(
            "INSERT INTO users (id, username, role, password_hash, created_at)"
            " VALUES (?, ?, 'enduser', 'x', '2025-01-01T00:00:00.000Z')",
            (uid, f"user {uid!r}"),
        )
        s[uid] = _say(store, _session(store, uid), uid, f"the shared word pangolin, said by {uid}")
    for uid in WEIRD_IDS:
        assert [r["id"] for r in store.search_messages(uid, "pangolin", limit=50)] == [s[uid]]


def test_search_terms():
    assert search_terms("What did we say about the Kubernetes ingress?") == [
        "say",
        "kubernetes",
        "ingress",
    ]
    assert search_terms('NEAR( "x" * col:xyz AND OR NOT') == ["near", "col", "xyz"]
    assert search_terms("") == []
    assert search_terms("a I  the") == []
    assert search_terms("snake_case foo-bar") == ["snake", "case", "foo", "bar"]
    assert search_terms("deploy Deploy DEPLOY") == ["deploy"]
    many = search_terms(" ".join(f"w{i:03d}" for i in range(100)) + " averyspecificword")
    assert len(many) == MAX_SEARCH_TERMS
    assert "averyspecificword" in many


def test_limit(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    for i in range(8):
        _say(store, s, alice, f"lemur note {i}")
    assert len(store.search_messages(alice, "lemur", limit=3)) == 3
    assert store.search_messages(alice, "lemur", limit=0) == []


# -- migration -------------------------------------------------------------------------


def test_migration_indexes_a_database_made_by_the_previous_schema(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    full = store_module.MIGRATIONS
    before = full.index(store_module._m3)  # the FTS migration
    monkeypatch.setattr(store_module, "MIGRATIONS", full[:before])
    old = Store(path)
    assert old.schema_version == before
    assert not old._has_fts()
    # Rows as that schema held them (plain SQL: today's methods may write newer columns).
    sql = old.conn.execute
    for uid in ("alice", "bob"):
        sql(
            "INSERT INTO users (id, username, role, password_hash, created_at)"
            " VALUES (?, ?, 'enduser', 'x', '2025-01-01T00:00:00.000Z')",
            (uid, uid),
        )
        sql(
            "INSERT INTO chat_sessions (id, user_id, created_at, updated_at)"
            " VALUES (?, ?, '2025-01-01T00:00:00.000Z', '2025-01-01T00:00:00.000Z')",
            (f"s-{uid}", uid),
        )
    rows = [
        ("m1", "s-alice", "alice", "user", "remember the capybara", "complete", 1),
        ("m2", "s-bob", "bob", "user", "bob's capybara", "complete", 1),
        ("m3", "s-alice", "alice", "assistant", "", "streaming", 2),
    ]
    for row in rows:
        sql(
            "INSERT INTO messages (id, session_id, user_id, role, content, status, seq,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, '2025-01-01T00:00:01.000Z')",
            row,
        )
    old.close()

    monkeypatch.setattr(store_module, "MIGRATIONS", full)
    new = Store(path)
    try:
        assert new.schema_version == len(full)
        assert [r["id"] for r in new.search_messages("alice", "capybara", limit=5)] == ["m1"]
        assert [r["id"] for r in new.search_messages("bob", "capybara", limit=5)] == ["m2"]
        # The triggers work on rows that predate them.
        new.finish_message(
            "m3",
            content="capybaras are rodents",
            status="complete",
            input_tokens=1,
            output_tokens=1,
            credits_charged=0,
            finish_reason="stop",
        )
        assert len(new.search_messages("alice", "capybara", limit=5)) == 2
        _fts_consistent(new)
    finally:
        new.close()
    again = Store(path)  # idempotent: nothing re-applied
    assert again.schema_version == len(full)
    again.close()


def test_without_fts5_the_search_falls_back_and_stays_scoped(store, caplog):
    # As a database migrated by an SQLite built without FTS5 would be.
    for trigger in ("messages_fts_ai", "messages_fts_ad", "messages_fts_au"):
        store.conn.execute(f"DROP TRIGGER {trigger}")
    store.conn.execute("DROP TABLE messages_fts")
    alice, bob = _user(store, "alice"), _user(store, "bob")
    s = _session(store, alice)
    both = _say(store, s, alice, "Tapir and Kubernetes")
    one = _say(store, s, alice, "kubernetes alone")
    _say(store, _session(store, bob), bob, "tapir kubernetes")
    with caplog.at_level(logging.WARNING, logger="chinwag.store"):
        rows = store.search_messages(alice, "kubernetes tapir", limit=5)
    assert [r["id"] for r in rows] == [both, one]
    for query in HOSTILE:
        assert isinstance(store.search_messages(alice, query, limit=5), list)


# -- recall and its context ------------------------------------------------------------


def test_recall_respects_top_k(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    for i in range(10):
        _say(store, s, alice, f"gecko fact number {i}")
    got = recall(store, alice, "gecko", top_k=4, token_budget=10_000)
    assert got.results_count == 4
    assert got.candidates == 4
    assert got.total_tokens == estimate_tokens(HEADING) + sum(x.tokens for x in got.snippets)
    context = render_context(got)
    assert context is not None and estimate_tokens(context) <= got.total_tokens


def _line_tokens(text: str, role: str = "user") -> int:
    """What one recalled message costs in the rendered context (date: 10 characters)."""
    return estimate_tokens(f"\n- [2026-01-01] {role}: {text}")


def test_recall_keeps_whole_hits_within_the_token_budget(store):
    alice = _user(store, "alice")
    s = _session(store, alice)
    big = "iguana " * 200  # ~350 tokens, the best match
    _say(store, s, alice, big)
    small = [_say(store, s, alice, f"an iguana, note {i}") for i in range(3)]
    # The budget is what the model is sent (and the caller pays for): the
    # heading and each message's rendered line, not the bare texts.
    budget = estimate_tokens(HEADING) + 3 * _line_tokens("an iguana, note 0")
    got = recall(store, alice, "iguana", top_k=5, token_budget=budget)
    assert got.candidates == 4
    # The big one would overflow: skipped, not cut; the small ones fit.
    assert {x.message_id for x in got.snippets} == set(small)
    assert all(x.text.startswith("an iguana") for x in got.snippets)
    context = render_context(got)
    assert context is not None
    assert estimate_tokens(context) <= got.total_tokens <= budget

    tight = recall(store, alice, "iguana", top_k=5, token_budget=budget - 1)
    assert tight.results_count == 2
    bare = recall(
        store,
        alice,
        "iguana",
        top_k=5,
        token_budget=sum(estimate_tokens(t) for t in ["an iguana, note 0"] * 3),
    )
    assert bare.results_count == 0  # the texts alone would fit; their context does not


def test_recall_is_the_callers_own_and_skips_duplicates(store):
    alice, bob = _user(store, "alice"), _user(store, "bob")
    s = _session(store, alice)
    _say(store, s, alice, "axolotl care")
    _say(store, s, alice, "axolotl care")
    _say(store, _session(store, bob), bob, "axolotl tank")
    got = recall(store, alice, "axolotl", top_k=5, token_budget=500)
    assert [x.text for x in got.snippets] == ["axolotl care"]
    assert recall(store, bob, "care", top_k=5, token_budget=500).results_count == 0


def test_recall_logs_memory_ms_with_counts(store, caplog):
    alice = _user(store, "alice")
    s = _session(store, alice)
    _say(store, s, alice, "the quokka smiles")
    _say(store, s, alice, "quokka habitat", role="assistant")
    with caplog.at_level(logging.INFO, logger="chinwag.memory"):
        got = recall(store, alice, "quokka", top_k=5, token_budget=500)
    records = [r for r in caplog.records if r.name == "chinwag.memory"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["results_count"] == 2 == got.results_count
    assert fields["total_tokens"] == got.total_tokens > 0
    assert isinstance(fields["memory_ms"], float) and fields["memory_ms"] >= 0
    line = json.loads(JsonFormatter().format(records[0]))
    assert {"memory_ms", "results_count", "total_tokens"} <= set(line)
    assert "quokka" not in json.dumps(line)  # never the text


def test_recall_with_nothing_to_search_logs_zero(store, caplog):
    alice = _user(store, "alice")
    with caplog.at_level(logging.INFO, logger="chinwag.memory"):
        got = recall(store, alice, "   ", top_k=5, token_budget=500)
    assert got.snippets == () and got.total_tokens == 0
    assert caplog.records[-1].fields["results_count"] == 0  # type: ignore[attr-defined]
    assert render_context(got) is None


def test_recall_survives_a_broken_store(store, caplog):
    alice = _user(store, "alice")
    store.close()
    with caplog.at_level(logging.WARNING, logger="chinwag.memory"):
        got = recall(store, alice, "anything", top_k=5, token_budget=500)
    assert got.results_count == 0
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_render_context_oldest_first_with_roles():
    recalled = Recall(
        snippets=(
            Snippet(
                "b", "s", "assistant", "Rotate it\nthen restart.", "2026-11-21T10:00:00.000Z", 5
            ),
            Snippet("a", "s", "user", "How do I rotate the secret?", "2026-11-20T09:00:00.000Z", 7),
        ),
        candidates=2,
        total_tokens=12,
        ms=0.5,
    )
    assert render_context(recalled) == (
        f"{HEADING}\n"
        "- [2026-11-20] user: How do I rotate the secret?\n"
        "- [2026-11-21] assistant: Rotate it\n  then restart."
    )


# -- settings --------------------------------------------------------------------------


def test_memory_settings():
    d = Settings.from_env({})
    assert (d.memory_top_k, d.memory_token_budget) == (5, 500)
    s = Settings.from_env({"CHINWAG_MEMORY_TOP_K": "3", "CHINWAG_MEMORY_TOKEN_BUDGET": "800"})
    assert (s.memory_top_k, s.memory_token_budget) == (3, 800)
    for name in ("CHINWAG_MEMORY_TOP_K", "CHINWAG_MEMORY_TOKEN_BUDGET"):
        for bad in ("0", "-1", "many"):
            with pytest.raises(SettingsError, match=name):
                Settings.from_env({name: bad})
