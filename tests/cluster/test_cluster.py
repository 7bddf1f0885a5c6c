"""All the parts together, as the server will wire them: two nodes in one process."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from observation import ObservationManager
from server.cluster import (
    ClusterUnavailable,
    RecoveredStream,
    SessionBusy,
    StreamInfo,
    mirror_encoder,
    open_cluster,
)
from server.settings import Settings
from server.sse import encode_event

from .conftest import REDIS_URL, free_port

NODE_LOST = '{"message":"The server running this answer stopped.","errorCode":"NODE_LOST"}'


def settings(node: str, tmp_path: Path) -> Settings:
    return Settings(
        db_path=tmp_path / "c.db",
        redis_url=REDIS_URL,
        node_id=node,
        node_lease_ms=300,
        observe_ring=64,
        stream_buffer_ms=5_000,
    )


async def test_a_node_dies_mid_stream_a_survivor_ends_it_once(prefix: str, tmp_path: Path):
    recovered: list[RecoveredStream] = []

    async def settle(stream: RecoveredStream) -> list[tuple[str, str]]:
        recovered.append(stream)  # the server: message interrupted, reservation settled
        done = {"finishReason": "error", "outputTokens": stream.tokens}
        return [("error", NODE_LOST), ("done", json.dumps(done))]

    async def handle(kind: str, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    obs_a = ObservationManager(ring_size=64, linger=5, encode=encode_event)
    obs_b = ObservationManager(ring_size=64, linger=5, encode=mirror_encoder())
    async with (
        open_cluster(settings("a", tmp_path), obs_a, prefix=prefix) as a,
        open_cluster(settings("b", tmp_path), obs_b, prefix=prefix) as b,
    ):
        try:
            async with trio.open_nursery() as outer:
                a_scope = trio.CancelScope()

                async def run_a(task_status: trio.TaskStatus[None]) -> None:
                    with a_scope:
                        await a.run(settle, handle, task_status=task_status)

                await outer.start(b.run, settle, handle)
                await outer.start(run_a)
                # Node a starts a stream: admission, registry, its ring, the copy.
                admission = await a.claims.admit("session-1", "alice", "stream-1")
                with pytest.raises(SessionBusy):
                    await b.claims.admit("session-1", "alice", "stream-2")
                await a.registry.register(
                    StreamInfo(
                        "stream-1",
                        "session-1",
                        "alice",
                        "m",
                        "res-1",
                        "msg-1",
                        "chat",
                        time.time(),
                        "a",
                    )
                )
                stream = obs_a.open_stream("stream-1", group="session-1")
                for i in range(10):
                    event = stream.publish_nowait("chunk", json.dumps({"text": f"t{i}"}))
                    a.publisher.add("stream-1", event.id, "chunk", event.data, tokens=1)
                await a.publisher.wait_idle()
                rows = await b.registry.active()
                assert [(r.info.stream_id, r.info.node_id) for r in rows] == [("stream-1", "a")]
                # An observer on node b.
                mirrored = await b.mirror.open_latest("session-1")
                assert mirrored is not None
                # Node a dies (kill -9: nothing more is written, its lease runs out).
                a_scope.cancel()
                wire = b""
                with trio.fail_after(10), mirrored.reader(0) as reader:
                    async for batch in reader:
                        wire += batch.wire
                assert [s.stream_id for s in recovered] == ["stream-1"]
                assert recovered[0].tokens == 10 and recovered[0].last_id == 10
                assert recovered[0].reservation_id == "res-1"
                assert wire.endswith(
                    encode_event(11, "error", NODE_LOST)
                    + encode_event(12, "done", '{"finishReason": "error", "outputTokens": 10}')
                )
                assert wire.count(b"event: chunk") == 10
                assert await b.registry.active() == []
                # The session is free again, cluster-wide.
                await b.claims.admit("session-1", "alice", "stream-3")
                assert admission.stream_id == "stream-1"
                assert (await b.health())["status"] == "ok"
                outer.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await b.redis.delete_prefix()


async def test_open_cluster_without_redis_is_cluster_unavailable(tmp_path: Path):
    unreachable = replace(
        settings("a", tmp_path), redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0"
    )
    obs = ObservationManager(ring_size=64, linger=5, encode=encode_event)
    with pytest.raises(ClusterUnavailable) as err:
        async with open_cluster(unreachable, obs):
            pass
    assert "pw" not in str(err.value)
