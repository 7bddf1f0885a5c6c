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


def main() -> None:
    command, raw = sys.argv[1], sys.argv[2]
    result = trio.run({"admit": admit, "recover": recover}[command], json.loads(raw))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
