"""When a node dies, pauses past its lease, or Redis goes away (SPEC §9): real processes."""

from __future__ import annotations

import json
import signal

import trio

from tests.sse import Msg, events, messages

from .conftest import OwnRedis
from .conftest import own_redis as own_redis  # the fixture
from .nodes import Cluster, healthy, open_cluster, paced, post_stream, until_true
from .nodes import cluster as cluster  # the fixture
from .test_three_nodes import RATE, read_until

LEASE_S = 2.0


async def assert_recovered_once(cluster: Cluster, stream_id: str) -> None:
    """Exactly one node logged recovering the stream (a node's log lines are written
    from a thread of its own: the line may land just after what the test saw)."""

    def count() -> int:
        return sum(
            node.log.read_text().count(f"recovered stream {stream_id}")
            for node in cluster.nodes.values()
        )

    async def logged() -> bool:
        return count() > 0

    await until_true(logged, within=5)
    assert count() == 1


async def test_kill_9_mid_stream_is_recovered_once_by_a_survivor(cluster: Cluster):
    alice = cluster.user(credits=1_000_000)
    sup = cluster.user("supervisor")
    sid = await cluster.session("a", alice)
    async with post_stream(
        cluster["a"], sid, paced(RATE, alice["headers"]), "a long answer", 400
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        client_feed = messages(r)  # kept: dropping it would close the connection
        client = await read_until(client_feed, lambda got: len(events(got)) >= 8)
        async with cluster["b"].http.stream(
            "GET", f"/api/chat/sessions/{sid}/observe", headers=sup["headers"]
        ) as o:
            feed = messages(o)
            observed = await read_until(feed, lambda got: got[-1].event == "history-end")
            cluster.kill("a")
            killed_at = trio.current_time()
            with trio.fail_after(LEASE_S + 8):
                observed += await read_until(feed, lambda got: got[-1].event == "done")
            took = trio.current_time() - killed_at
    assert took < LEASE_S + 5, cluster.logs()
    tail = events(observed)
    assert [m.event for m in tail[-2:]] == ["error", "done"]
    assert tail[-2].data["errorCode"] == "NODE_LOST"
    done = tail[-1].data
    assert done["finishReason"] == "error" and done["streamingSessionId"] == stream_id
    produced = sum(m.event == "chunk" for m in tail)
    assert produced >= sum(m.event == "chunk" for m in events(client))
    # The ids go on without a gap or a duplicate after what the dead node published.
    ids = [m.id for m in tail if m.id]
    assert ids == list(range(ids[0], ids[0] + len(ids)))

    # The database: interrupted, charged for what the cluster saw produced, once.
    stored = cluster.store.message_by_stream(stream_id)
    assert stored["status"] == "interrupted"
    assert stored["output_tokens"] == done["outputTokens"] == produced
    assert stored["credits_charged"] == done["creditsCharged"] > 0
    assert cluster.book.open_reservations(alice["id"]) == []
    assert cluster.book.charges_for_stream(stream_id) == stored["credits_charged"]
    assert cluster.book.verify() == []
    text = "".join(m.data["text"] for m in tail if m.event == "chunk")
    assert stored["content"] == text
    await assert_recovered_once(cluster, stream_id)
    rows = [
        json.loads(row["payload"])
        for row in cluster.store.recent_telemetry(100)
        if stream_id in row["payload"]
    ]
    assert len(rows) == 1 and rows[0]["error_code"] == "NODE_LOST"

    # Its client resumes through C and is told the same; the session is free again.
    async with cluster.resume("c", sid, alice, stream_id, events(client)[-1].id) as resumed:
        rest = await read_until(messages(resumed), lambda got: got[-1].event == "done")
    assert events(rest)[-1].data == done
    active = await cluster["c"].http.get("/api/chat/streams/active", headers=sup["headers"])
    assert active.json()["streams"] == []
    async with post_stream(cluster["c"], sid, alice["headers"], "again", 5) as r:
        assert r.status_code == 200
        again = await read_until(messages(r), lambda got: got[-1].event == "done")
    assert events(again)[-1].data["finishReason"] == "length"


async def test_a_node_paused_past_its_lease_does_not_undo_the_recovery(cluster: Cluster):
    alice = cluster.user(credits=1_000_000)
    sid = await cluster.session("a", alice)
    async with post_stream(
        cluster["a"], sid, paced(RATE, alice["headers"]), "a long answer", 400
    ) as r:
        stream_id = r.headers["x-streaming-session-id"]
        feed = messages(r)
        client = await read_until(feed, lambda got: len(events(got)) >= 5)
        cluster["a"].proc.send_signal(signal.SIGSTOP)

        async def recovered_already() -> bool:
            return bool(cluster.store.message_by_stream(stream_id)["status"] != "streaming")

        try:
            await until_true(recovered_already, within=LEASE_S + 10)
        finally:
            cluster["a"].proc.send_signal(signal.SIGCONT)
        recovered = cluster.store.message_by_stream(stream_id)
        # A comes back, learns it was taken over, and ends the stream for its own
        # client without touching the database.
        with trio.fail_after(LEASE_S + 8):
            client += await read_until(feed, lambda got: got[-1].event == "done")
    tail = events(client)
    assert tail[-2].data["errorCode"] == "NODE_LOST"
    assert tail[-1].data["finishReason"] == "error"
    assert cluster.store.message_by_stream(stream_id) == recovered
    assert recovered["status"] == "interrupted"
    assert cluster.book.open_reservations(alice["id"]) == []
    assert cluster.book.charges_for_stream(stream_id) == recovered["credits_charged"]
    assert cluster.book.verify() == []
    await assert_recovered_once(cluster, stream_id)
    # A still serves, as a fresh incarnation.
    health = await cluster["a"].http.get("/api/health")
    assert health.status_code == 200


async def test_redis_restarted_mid_stream_degrades_never_corrupts(
    tmp_path, pg_url, nursery, own_redis: OwnRedis
):
    async with open_cluster(
        tmp_path, pg_url, nursery, redis_url=own_redis.url, CHINWAG_NODE_LEASE_MS="2000"
    ) as c:
        await c.start_all("ab")
        alice = c.user(credits=1_000_000)
        sid = await c.session("a", alice)
        other = await c.session("b", alice)
        async with post_stream(
            c["a"], sid, paced(RATE, alice["headers"]), "a long answer", 120
        ) as r:
            feed = messages(r)
            client = await read_until(feed, lambda got: len(events(got)) >= 5)
            own_redis.stop()
            # New streams are refused while Redis is away, with a Retry-After.
            refused = await c["b"].http.post(
                f"/api/chat/sessions/{other}/stream",
                json={"message": "x"},
                headers=alice["headers"],
            )
            assert refused.status_code == 503, refused.text
            assert refused.json()["errorCode"] == "SERVICE_UNAVAILABLE"
            assert int(refused.headers["Retry-After"]) >= 1
            health = await c["a"].http.get("/api/health")
            assert health.status_code == 503
            assert health.json()["redis"]["status"] == "unavailable"
            assert health.json()["database"]["status"] == "ok"
            # Reads that need no Redis go on.
            listed = await c["b"].http.get("/api/chat/sessions", headers=alice["headers"])
            assert listed.status_code == 200
            own_redis.start()
            await own_redis.wait_ready()
            # The running stream finished for its own client all along.
            client += await read_until(feed, lambda got: got[-1].event == "done")
        tail = events(client)
        assert [m.id for m in tail] == list(range(1, len(tail) + 1))
        assert tail[-1].data["finishReason"] == "length" and tail[-1].data["outputTokens"] == 120
        assert c.book.open_reservations(alice["id"]) == [] and c.book.verify() == []
        # Once Redis is back, the nodes are healthy and take new streams again.
        await until_true(lambda: healthy(c["b"]), within=15)
        async with post_stream(c["b"], other, alice["headers"], "y", 5) as r:
            assert r.status_code == 200
            after = await read_until(messages(r), lambda got: got[-1].event == "done")
        assert events(after)[-1].data["finishReason"] == "length"


async def test_a_redis_that_hangs_never_holds_up_a_streams_ending(
    tmp_path, pg_url, nursery, own_redis: OwnRedis
):
    """Redis stopped (SIGSTOP: connections hang rather than fail) mid-stream: the
    stream still ends for its client, stored and settled; once Redis answers again the
    claim and the live list catch up."""
    async with open_cluster(tmp_path, pg_url, nursery, redis_url=own_redis.url) as c:
        await c.start("a")
        alice = c.user(credits=1_000_000)
        sup = c.user("supervisor")
        sid = await c.session("a", alice)
        assert own_redis.proc is not None
        async with post_stream(
            c["a"], sid, paced(RATE, alice["headers"]), "a long answer", 60
        ) as r:
            stream_id = r.headers["x-streaming-session-id"]
            feed = messages(r)
            client = await read_until(feed, lambda got: len(events(got)) >= 5)
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(15):
                    client += await read_until(feed, lambda got: got[-1].event == "done")
                stored = c.store.message_by_stream(stream_id)
                assert stored["status"] == "complete" and stored["output_tokens"] == 60
                assert c.book.open_reservations(alice["id"]) == [] and c.book.verify() == []
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
        assert events(client)[-1].data["finishReason"] == "length"

        async def caught_up() -> bool:
            active = await c["a"].http.get("/api/chat/streams/active", headers=sup["headers"])
            return active.status_code == 200 and active.json()["streams"] == []

        await until_true(caught_up, within=15)
        # The claim's release is retried once Redis answers (every second): until then
        # the session refuses a second stream (409), then takes it.
        again: list[Msg] = []

        async def next_stream_taken() -> bool:
            async with post_stream(c["a"], sid, alice["headers"], "again", 5) as r:
                if r.status_code == 409:
                    return False
                assert r.status_code == 200, r.status_code
                again.extend(await read_until(messages(r), lambda got: got[-1].event == "done"))
                return True

        await until_true(next_stream_taken, within=15)
        assert events(again)[-1].data["finishReason"] == "length"
