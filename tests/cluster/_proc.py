"""Run by the tests as separate OS processes: ``python -m tests.cluster._proc CMD JSON``.

Each command waits until ``start_at`` (epoch seconds, the same for every
process), acts once against the real Redis, and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import trio

from server.cluster.claims import Claims, SessionBusy, UserAtCap
from server.cluster.nodes import Identity, Node, RecoveredStream
from server.cluster.redis import open_redis
from server.cluster.registry import Registry


async def admit(args: dict[str, Any]) -> dict[str, Any]:
    async with open_redis(args["url"], prefix=args["prefix"]) as redis:
        claims = Claims(redis, Identity(args["node"]), lease_ms=10_000, max_per_user=args["cap"])
        await trio.sleep(max(0.0, args["start_at"] - time.time()))
        won: list[str] = []
        refused: list[str] = []
        for session in args["sessions"]:
            try:
                await claims.admit(session, args["user"], f"{args['node']}-{session}")
                won.append(session)
            except (SessionBusy, UserAtCap) as exc:
                refused.append(type(exc).__name__)
        return {"won": won, "refused": refused}


async def recover(args: dict[str, Any]) -> dict[str, Any]:
    async with open_redis(args["url"], prefix=args["prefix"]) as redis:
        identity = Identity(args["node"])
        registry = Registry(redis, identity, buffer_ms=10_000)
        node = Node(redis, identity, registry, lease_ms=10_000, buffer_ms=10_000)
        await node.join()
        settled: list[str] = []

        async def settle(stream: RecoveredStream) -> list[tuple[str, str]]:
            settled.append(stream.stream_id)
            return [("done", json.dumps({"by": args["node"]}))]

        await trio.sleep(max(0.0, args["start_at"] - time.time()))
        await node.recover(settle)
        return {"settled": settled}


async def produce(args: dict[str, Any]) -> dict[str, Any]:
    """Run one stream on this process: register it, publish ``first`` events, say
    ``ready``, wait for a line on stdin, publish the rest and ``done``, end it."""
    from observation import ObservationManager
    from server.cluster.publisher import Publisher
    from server.cluster.registry import StreamInfo
    from server.sse import encode_event

    async with open_redis(args["url"], prefix=args["prefix"]) as redis:
        identity = Identity("producer")
        registry = Registry(redis, identity, buffer_ms=10_000)
        # Rings past the whole stream: it is published in one burst, and the test is
        # about the bytes that cross, not about a reader falling a ring behind.
        publisher = Publisher(redis, ring_size=256, buffer_ms=10_000)
        observations = ObservationManager(ring_size=256, linger=10, encode=encode_event)
        sid = args["stream"]
        await registry.register(
            StreamInfo(sid, "session", "user", "m", "r", "msg", "chat", time.time(), "producer")
        )
        stream = observations.open_stream(sid, group="session")
        wires: list[str] = []

        def publish(name: str, data: str) -> None:
            event = stream.publish_nowait(name, data)
            publisher.add(sid, event.id, name, data, tokens=1)
            wires.append(event.wire.decode())

        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            for i in range(args["first"]):
                publish("chunk", json.dumps({"text": f"é{i}\n"}))
            await publisher.wait_idle()
            print("ready", flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)
            for i in range(args["first"], args["total"]):
                publish("chunk", json.dumps({"text": f"é{i}\n"}))
                if i % 7 == 0:
                    await trio.sleep(0.001)
            publish("done", '{"finishReason":"stop"}')
            publisher.end(sid)
            await publisher.wait_idle()
            nursery.cancel_scope.cancel()
        return {"wires": wires}


def main() -> None:
    command, raw = sys.argv[1], sys.argv[2]
    commands = {"admit": admit, "recover": recover, "produce": produce}
    result = trio.run(commands[command], json.loads(raw))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
