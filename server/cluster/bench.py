"""``python -m server.cluster.bench [URL]``: what one Redis round trip costs here.

Measures, on its own key prefix (deleted afterwards), with the client the
cluster uses: one ``XADD … MAXLEN ~`` per round trip (p50, p99), pipelined
XADDs in batches of 10 and 100 (per second), and how long a blocked
``XREAD`` takes to wake after an ``XADD`` from another connection. Prints
one JSON object. The numbers quoted in :mod:`server.cluster.redis` come
from here.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from typing import Any

import trio
from coredis.tokens import PureToken

from .redis import open_redis


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def measure(url: str, *, round_trips: int = 2000, total: int = 20_000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with open_redis(url, prefix=f"chinwag-bench:{secrets.token_hex(4)}:") as redis:
        client, key = redis.client, redis.keys("stream")
        fields = {"n": "chunk", "d": '{"text":"hello"}', "t": "1"}
        try:
            times = []
            for _ in range(round_trips):
                t0 = time.perf_counter()
                await client.xadd(
                    key,
                    fields,
                    trim_strategy=PureToken.MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                    threshold=4096,
                )
                times.append(time.perf_counter() - t0)
            out["xadd_round_trip_us"] = {
                "p50": round(_percentile(times, 0.5) * 1e6),
                "p99": round(_percentile(times, 0.99) * 1e6),
            }
            for batch in (10, 100):
                t0 = time.perf_counter()
                for _ in range(total // batch):
                    async with client.pipeline(transaction=False) as pipe:
                        for _ in range(batch):
                            pipe.xadd(
                                key,
                                fields,
                                trim_strategy=PureToken.MAXLEN,
                                trim_operator=PureToken.APPROXIMATELY,
                                threshold=4096,
                            )
                out[f"pipelined_xadd_per_s_batch_{batch}"] = round(
                    total / (time.perf_counter() - t0)
                )
            wakes = []
            for _ in range(50):
                last = "$"
                sent = 0.0

                async def add() -> None:
                    nonlocal sent
                    await trio.sleep(0.005)
                    sent = time.perf_counter()
                    await client.xadd(key, fields)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(add)
                    await client.xread({key: last}, block=1000, count=1)
                    wakes.append(time.perf_counter() - sent)
            out["xread_wake_after_xadd_us"] = {"p50": round(_percentile(wakes, 0.5) * 1e6)}
        finally:
            await redis.delete_prefix()
    return out


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
    print(json.dumps(trio.run(measure, url), indent=2))


if __name__ == "__main__":
    main()
