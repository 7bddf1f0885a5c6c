"""Every method of the store seam, on both backends, from the same tests.

Each test runs twice (``backend``: sqlite, postgres) and asserts what the
server relies on: row shapes, orderings, ``UsernameTaken``, ``None`` for a
taken id or client key, search scope and ranking, retention, telemetry,
recovery, schema versions.
"""

from __future__ import annotations

import threading

import pytest

import ledger
from server.storage import Page, SchemaTooNew, StoreBackend, UsernameTaken, open_store
from server.store import Store

from .conftest import Target

MESSAGE_COLUMNS = [
    *("id", "session_id", "user_id", "role", "content", "model_id", "status"),
    *("input_tokens", "output_tokens", "tokens_used", "credits_charged", "finish_reason"),
    *("streaming_session_id", "seq", "created_at", "cancel_reason"),
]
SESSION_COLUMNS = [
    *("id", "user_id", "title", "model_id", "source", "created_at", "updated_at", "client_key")
]
USER_COLUMNS = ["id", "username", "email", "role", "password_hash", "created_at"]


def _user(store: StoreBackend, name: str) -> str:
    return str(store.add_user(name, "scrypt$x$y", "enduser", f"{name}@example.com")["id"])


def _session(store: StoreBackend, user_id: str, **kwargs: object) -> str:
    row = store.create_session(
        user_id,
        session_id=kwargs.pop("session_id", None),  # type: ignore[arg-type]
        title="t",
        model_id="m",
        source="web",
        **kwargs,  # type: ignore[arg-type]
    )
    assert row is not None
    return str(row["id"])


def _say(store: StoreBackend, session: str, user: str, text: str, **kwargs: object) -> str:
    kwargs.setdefault("role", "user")
    return str(store.add_message(session, user, content=text, model_id="m", **kwargs)["id"])  # type: ignore[arg-type]


# -- opening ---------------------------------------------------------------------------


def test_open_store_picks_the_backend_and_migrates_once(target: Target) -> None:
    with target.open() as store:
        assert isinstance(store, StoreBackend)
        assert (type(store) is Store) == (target.backend == "sqlite")
        assert store.schema_version == 4
        _user(store, "alice")
    with open_store(target.url) as again:  # idempotent: nothing re-applied, nothing lost
        assert again.schema_version == 4
        assert again.user_by_name("alice") is not None
        again.ping()


def test_a_newer_schema_is_refused(target: Target) -> None:
    target.open().close()
    target.sql("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaTooNew, match="newer") as info:
        target.open()
    assert (info.value.found, info.value.supported) == (99, 4)


# -- users -----------------------------------------------------------------------------


def test_users(store: StoreBackend) -> None:
    row = store.add_user("alice", "hash", "admin", "alice@example.com")
    assert list(row) == USER_COLUMNS
    assert store.user_by_name("alice") == row
    assert store.user_by_id(row["id"]) == row
    assert store.user_by_name("nobody") is None and store.user_by_id("nope") is None
    with pytest.raises(UsernameTaken):
        store.add_user("alice", "hash2", "enduser")
    assert store.add_user("bob", "hash", "enduser")["email"] is None


def test_search_users_is_case_insensitive_escaped_and_paged(store: StoreBackend) -> None:
    for name in ("Alice", "alicia", "bob_b", "bobXb", "carol"):
        _user(store, name)
    _session(store, str(store.user_by_name("alicia")["id"]))  # type: ignore[index]
    rows, total = store.search_users("ALI", Page(0, 10))
    assert total == 2
    assert [r["username"] for r in rows] == ["Alice", "alicia"]  # byte order: "A" < "a"
    assert [r["session_count"] for r in rows] == [0, 1]
    assert set(rows[0]) == {"id", "username", "email", "role", "session_count"}
    # "_" and "%" are literal characters, not wildcards.
    assert [r["username"] for r in store.search_users("b_b", Page(0, 10))[0]] == ["bob_b"]
    assert store.search_users("%", Page(0, 10)) == ([], 0)
    rows, total = store.search_users("example.com", Page(1, 2))  # matches the email
    assert total == 5 and len(rows) == 2


# -- sessions --------------------------------------------------------------------------


def test_sessions(store: StoreBackend) -> None:
    alice, bob = _user(store, "alice"), _user(store, "bob")
    row = store.create_session(
        alice, session_id="s-1", title="T", model_id="m", source="web", client_key="k"
    )
    assert row is not None and list(row) == SESSION_COLUMNS
    assert store.get_session("s-1") == row
    assert store.get_session("s-1", alice) == row
    assert store.get_session("s-1", bob) is None
    # A taken id, or this user's taken client key: None.
    assert store.create_session(alice, session_id="s-1", title="", model_id="", source="") is None
    dup = store.create_session(
        alice, session_id=None, title="", model_id="", source="", client_key="k"
    )
    assert dup is None
    # Another user may use the same client key.
    assert _session(store, bob, client_key="k")
    assert store.session_by_key(alice, "k") == row
    assert store.session_by_key(alice, "other") is None


def test_rename_session(target: Target) -> None:
    with target.open() as store:
        alice = _user(store, "alice")
        _session(store, alice, session_id="s-1")
        target.sql("UPDATE chat_sessions SET updated_at = '2001-01-01T00:00:00.000Z'")
        row = store.rename_session("s-1", "<b>New</b> title")
        assert row is not None and list(row) == SESSION_COLUMNS
        assert row["title"] == "<b>New</b> title" and row["updated_at"] > "2001"
        assert store.get_session("s-1") == row
        assert store.rename_session("no-such-session", "x") is None


def test_list_sessions_newest_first_then_by_id(target: Target) -> None:
    with target.open() as store:
        alice = _user(store, "alice")
        for name in ("b", "a", "C", "d"):
            _session(store, alice, session_id=name)
        target.sql("UPDATE chat_sessions SET updated_at = '2001-01-01T00:00:00.000Z'")
        store.touch_session("d")
        rows, total = store.list_sessions(alice, Page(0, 10))
        assert total == 4
        assert [r["id"] for r in rows] == ["d", "C", "a", "b"]  # then by id, in byte order
        rows, total = store.list_sessions(alice, Page(1, 2))
        assert ([r["id"] for r in rows], total) == (["C", "a"], 4)


def test_delete_session_takes_its_messages(store: StoreBackend) -> None:
    alice = _user(store, "alice")
    s = _session(store, alice)
    _say(store, s, alice, "hello")
    store.delete_session(s)
    assert store.get_session(s) is None
    assert store.list_messages(s) == ([], 0)


# -- messages --------------------------------------------------------------------------


def test_messages_are_numbered_listed_and_finished(store: StoreBackend) -> None:
    alice = _user(store, "alice")
    s = _session(store, alice)
    before = store.get_session(s)
    first = store.add_message(s, alice, role="user", content="hi", model_id="m", input_tokens=3)
    assert list(first) == MESSAGE_COLUMNS[:-1]  # what add_message returns (no cancel_reason)
    assert (first["seq"], first["tokens_used"], first["status"]) == (1, 3, "complete")
    reply = store.add_message(
        s, alice, role="assistant", content="", model_id="m", status="streaming",
        streaming_session_id="stream-1",
    )  # fmt: skip
    assert reply["seq"] == 2
    assert store.get_session(s)["updated_at"] >= before["updated_at"]  # type: ignore[index]
    store.finish_message(
        reply["id"],
        content="hello there",
        status="complete",
        input_tokens=3,
        output_tokens=2,
        credits_charged=1,
        finish_reason="stop",
        cancel_reason="supervisor said so",
    )
    rows, total = store.list_messages(s)
    assert total == 2 and [list(r) for r in rows] == [MESSAGE_COLUMNS] * 2
    assert [r["seq"] for r in rows] == [1, 2]
    done = rows[1]
    assert (done["content"], done["tokens_used"], done["credits_charged"]) == ("hello there", 5, 1)
    assert done["cancel_reason"] == "supervisor said so"
    assert store.message_by_stream("stream-1") == done
    assert store.message_by_stream("nope") is None
    assert store.list_messages(s, Page(1, 5)) == ([done], 2)
    assert store.recent_messages(s, 1) == [{"role": "assistant", "content": "hello there"}]
    assert [r["role"] for r in store.recent_messages(s, 5)] == ["user", "assistant"]


def test_writers_to_one_session_never_share_a_seq(target: Target) -> None:
    with target.open() as setup:
        alice = _user(setup, "alice")
        s = _session(setup, alice)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with target.open() as own:  # its own connection(s), as another process would
                barrier.wait()
                for i in range(15):
                    _say(own, s, alice, f"message {i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with target.open() as store:
        rows, total = store.list_messages(s)
    assert total == 60
    assert [r["seq"] for r in rows] == list(range(1, 61))


# -- memory search -----------------------------------------------------------------------


def test_search_finds_stems_ranks_and_stays_in_scope(store: StoreBackend) -> None:
    alice, bob = _user(store, "alice"), _user(store, "bob")
    s, other = _session(store, alice), _session(store, alice)
    hit = _say(store, s, alice, "How do I deploy the billing service to Kubernetes?")
    _say(store, s, alice, "What is a good pasta recipe?")
    both = _say(store, other, alice, "kubernetes ingress: the kubernetes ingress controller")
    _say(store, _session(store, bob), bob, "kubernetes kubernetes ingress controller")
    _say(store, s, alice, "kubernetes still streaming", role="assistant", status="streaming")
    _say(store, s, alice, "kubernetes system prompt", role="system")

    rows = store.search_messages(alice, "Deploying KUBERNETES", limit=5)
    assert rows[0]["id"] == hit  # stemmed and case-folded; two terms beat one
    assert {r["id"] for r in rows} == {hit, both}
    assert set(rows[0]) == {"id", "session_id", "role", "content", "created_at", "rank"}
    ranked = store.search_messages(alice, "kubernetes ingress controller", limit=5)
    assert [r["id"] for r in ranked] == [both, hit]
    assert ranked[0]["rank"] > ranked[1]["rank"]
    assert [r["id"] for r in store.search_messages(alice, "kubernetes", limit=5,
                                                   exclude_session=other)] == [hit]  # fmt: skip
    assert store.search_messages(alice, "kubernetes", limit=0) == []
    assert len(store.search_messages(alice, "kubernetes", limit=1)) == 1


def test_a_turn_is_both_messages_numbered_in_one_go(store: StoreBackend) -> None:
    alice = _user(store, "alice")
    s = _session(store, alice)
    store.add_message(s, alice, role="user", content="earlier", model_id="m")
    before = store.get_session(s)
    user, assistant = store.start_turn(
        s, alice, text="hello", model_id="m", streaming_session_id="stream-9"
    )
    assert list(user) == list(assistant) == MESSAGE_COLUMNS[:-1]
    assert (user["seq"], user["role"], user["content"], user["status"]) == (
        2,
        "user",
        "hello",
        "complete",
    )
    assert (assistant["seq"], assistant["role"], assistant["content"]) == (3, "assistant", "")
    assert (assistant["status"], assistant["streaming_session_id"]) == ("streaming", "stream-9")
    rows, total = store.list_messages(s)
    assert total == 3 and [r["id"] for r in rows[1:]] == [user["id"], assistant["id"]]
    assert store.message_by_stream("stream-9")["id"] == assistant["id"]  # type: ignore[index]
    assert store.get_session(s)["updated_at"] >= before["updated_at"]  # type: ignore[index]
    # The next turn numbers after both.
    again, _ = store.start_turn(s, alice, text="more", model_id="m", streaming_session_id="s-10")
    assert again["seq"] == 4


def test_a_streams_opening_is_its_reservation_and_its_turn_in_one_commit(
    store: StoreBackend, target: Target
) -> None:
    """open_turn: the ledger's reservation unit and both messages commit together;
    a refused reservation leaves no message, a refused insert no reservation."""
    alice = _user(store, "alice")
    s = _session(store, alice)
    with ledger.open_ledger(target.url) as book:
        book.open_account(alice)
        book.allocate(alice, 100)
        held, user, assistant = store.open_turn(
            s,
            alice,
            text="hello",
            model_id="m",
            streaming_session_id="stream-1",
            reserve=book.reservation(alice, 40, model_id="m", streaming_session_id="stream-1"),
        )
        assert (user["seq"], assistant["seq"], assistant["status"]) == (1, 2, "streaming")
        assert (held.amount, held.status, held.streaming_session_id) == (40, "open", "stream-1")
        assert book.balance(alice).reserved == 40
        assert [r.id for r in book.open_reservations(alice)] == [held.id]

        with pytest.raises(ledger.InsufficientCredits):  # 60 left
            store.open_turn(
                s,
                alice,
                text="again",
                model_id="m",
                streaming_session_id="stream-2",
                reserve=book.reservation(alice, 61),
            )
        with pytest.raises(Exception, match=r"(?i)null"):  # the user's row is refused
            store.open_turn(
                s,
                alice,
                text=None,  # type: ignore[arg-type]
                model_id="m",
                streaming_session_id="stream-3",
                reserve=book.reservation(alice, 10),
            )
        assert store.list_messages(s)[1] == 2  # neither failed opening left a message
        assert [r.id for r in book.open_reservations(alice)] == [held.id]  # nor a reservation
        assert book.balance(alice).reserved == 40 and book.verify() == []
        # A user without an account gets one, empty: the reservation is then refused.
        bob = _user(store, "bob")
        with pytest.raises(ledger.InsufficientCredits):
            store.open_turn(
                _session(store, bob),
                bob,
                text="hi",
                model_id="m",
                streaming_session_id="stream-4",
                reserve=book.reservation(bob, 1),
            )
        assert book.open_reservations(bob) == []


def test_a_calls_ending_is_its_settlement_message_and_telemetry_in_one_commit(
    store: StoreBackend, target: Target
) -> None:
    """close_turn: the settlement unit, the message and the telemetry row commit
    together, the message and the row carrying what the ledger charged (capped at
    the reservation); a failure anywhere in it leaves all three as they were."""
    alice = _user(store, "alice")
    s = _session(store, alice)
    with ledger.open_ledger(target.url) as book:
        book.open_account(alice)
        book.allocate(alice, 100)

        def opened(stream: str) -> tuple[ledger.Reservation, str]:
            held, _, assistant = store.open_turn(
                s,
                alice,
                text="hi",
                model_id="m",
                streaming_session_id=stream,
                reserve=book.reservation(alice, 30, model_id="m", streaming_session_id=stream),
            )
            return held, assistant["id"]

        def close(
            held: ledger.Reservation, message: str, charge: int, telemetry
        ) -> ledger.Settlement:  # type: ignore[no-untyped-def]
            return store.close_turn(
                message,
                settle=book.settlement(held.id, charge, input_tokens=3, output_tokens=7),
                content="an answer",
                status="complete",
                input_tokens=3,
                output_tokens=7,
                finish_reason="length",
                cancel_reason=None,
                telemetry=telemetry,
            )

        rows_before = len(store.recent_telemetry(100))
        held, message = opened("stream-1")
        settled = close(held, message, 45, lambda charged: f'{{"charged": {charged}}}')
        assert settled.charged == 30  # capped at the reservation
        row = store.message_by_stream("stream-1")
        assert row is not None
        assert (row["status"], row["credits_charged"], row["output_tokens"]) == ("complete", 30, 7)
        telemetry = store.recent_telemetry(100)
        assert len(telemetry) == rows_before + 1 and telemetry[0]["payload"] == '{"charged": 30}'
        assert book.balance(alice).balance == 70 and book.balance(alice).reserved == 0

        # The last statement fails: nothing of the ending is kept, so it may be tried again.
        held, message = opened("stream-2")

        def broken(charged: int) -> str:
            raise RuntimeError("telemetry refused")

        with pytest.raises(RuntimeError):
            close(held, message, 10, broken)
        row = store.message_by_stream("stream-2")
        assert row is not None and row["status"] == "streaming" and row["credits_charged"] == 0
        assert [r.id for r in book.open_reservations(alice)] == [held.id]
        assert len(store.recent_telemetry(100)) == rows_before + 1
        settled = close(held, message, 10, lambda charged: "{}")  # tried again: it holds
        assert settled.charged == 10
        assert store.message_by_stream("stream-2")["status"] == "complete"  # type: ignore[index]

        # Settled already (exactly once): the message is not touched either.
        with pytest.raises(ledger.ReservationClosed):
            close(held, message, 5, lambda charged: "{}")
        assert store.message_by_stream("stream-2")["credits_charged"] == 10  # type: ignore[index]
        assert book.balance(alice).balance == 60 and book.verify() == []


def test_content_written_by_finish_message_is_found(store: StoreBackend) -> None:
    alice = _user(store, "alice")
    s = _session(store, alice)
    reply = store.add_message(
        s, alice, role="assistant", content="", model_id="m", status="streaming"
    )
    assert store.search_messages(alice, "capybara", limit=5) == []
    store.finish_message(
        reply["id"],
        content="capybaras are rodents",
        status="complete",
        input_tokens=1,
        output_tokens=1,
        credits_charged=0,
        finish_reason="stop",
    )
    assert [r["id"] for r in store.search_messages(alice, "capybara", limit=5)] == [reply["id"]]


@pytest.mark.parametrize(
    "query",
    ['"', "*", "NEAR(", "a & b | !c", "foo:*", "'; DROP TABLE messages; --", "\\", "\x00x",
     "kübernetés 部署 🚀", "", "   ", "x" * 4000, " ".join(f"word{i}" for i in range(500)),
     "the and of", "against itself"],
)  # fmt: skip
def test_any_text_is_a_valid_query(store: StoreBackend, query: str) -> None:
    alice = _user(store, "alice")
    _say(store, _session(store, alice), alice, "kubernetes deploy word7 部署")
    assert isinstance(store.search_messages(alice, query, limit=5), list)


# -- retention, telemetry, recovery ------------------------------------------------------


def test_delete_sessions_before_spares_live_and_recent_ones(target: Target) -> None:
    with target.open() as store:
        alice = _user(store, "alice")
        old, live, fresh = (_session(store, alice, session_id=n) for n in ("old", "live", "new"))
        _say(store, old, alice, "old words")
        target.sql(
            "UPDATE chat_sessions SET updated_at = '2000-01-01T00:00:00.000Z' WHERE id <> 'new'"
        )
        assert store.delete_sessions_before("2020-01-01T00:00:00.000Z", keep={live}) == 1
        assert store.get_session(old) is None and store.list_messages(old) == ([], 0)
        assert store.get_session(live) is not None and store.get_session(fresh) is not None
        assert store.delete_sessions_before("2020-01-01T00:00:00.000Z", keep={live}) == 0


def test_telemetry_newest_first(store: StoreBackend) -> None:
    for n in range(3):
        store.add_telemetry("model_call", f'{{"n":{n}}}')
    rows = store.recent_telemetry(2)
    assert [r["payload"] for r in rows] == ['{"n":2}', '{"n":1}']
    assert set(rows[0]) == {"id", "type", "payload", "created_at"}
    assert rows[0]["id"] > rows[1]["id"]


def test_recover_streaming_marks_cut_messages_interrupted(store: StoreBackend) -> None:
    alice = _user(store, "alice")
    s = _session(store, alice)
    cut = _say(store, s, alice, "half an ans", role="assistant", status="streaming")
    _say(store, s, alice, "done", role="assistant")
    assert store.recover_streaming() == 1
    assert store.recover_streaming() == 0
    row = next(r for r in store.list_messages(s)[0] if r["id"] == cut)
    assert (row["status"], row["finish_reason"]) == ("interrupted", "server_restart")
