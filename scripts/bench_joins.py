"""What opening an SSE response costs the server when many come at once: chinwag beside floor-quart.

    .venv/bin/python scripts/bench_joins.py            # 1,000 requests, 64 in flight, 3 rounds
    .venv/bin/python scripts/bench_joins.py --quick    # CI: 50 requests, 1 round

``--requests`` requests are opened at once (at most ``--open-window``
handshakes in flight, as ``bench_observe.py``'s joins), and the server's CPU
(``/proc``, all its threads) from the first connect to the last response
head, divided by their number, is what one costs. No event flows meanwhile
(the streams wait out a long time to first token), so it is the request
alone:

- ``floor-quart``: its stream route, a Quart-Trio ``Response`` over a
  generator on chinwag's Hypercorn configuration (``bench_floor.py``);
- ``join``: a supervisor's ``GET /api/chat/sessions/{id}/observe`` of one
  live stream (SPEC §6): the observer's head, history and first bytes;
- ``open``: an end user's ``POST /api/chat/sessions/{id}/stream``, each on a
  session of its own: validation, the reservation and the turn's rows in
  one transaction, the run's start (SPEC §5.1).

Each round runs the three in turn; reported are the medians over rounds and
chinwag ÷ floor-quart (the median of the rounds' own ratios). Session 10 of
BENCHMARKS.md: a join costs ~1.0 ms here, and 1,000 joins are worth ~24,000
observer writes. Exit status 1 only if a request failed.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import trio
from bench_floor import start_floor
from bench_observe import Conn, Reactor, observe_req, open_conn, stream_req
from bench_streams import BenchEnv, start_chinwag
from benchlib import (
    arg_parser,
    create_sessions,
    finish,
    fmt,
    machine,
    print_table,
    proc_sample,
    raise_fd_limit,
    request_bytes,
)

#: No token before this: the requests are measured alone.
TTFT_MS = 600_000


async def open_many(port: int, pid: int, requests: list[bytes], window: int) -> dict[str, Any]:
    """Open every request at once (``window`` in flight); server CPU per request."""
    conns = [Conn(f"r{i}", 8) for i in range(len(requests))]
    reactor = Reactor()
    gate = trio.Semaphore(window)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run)
        s0, t0 = proc_sample(pid), time.perf_counter()
        for conn, req in zip(conns, requests, strict=True):
            nursery.start_soon(open_conn, reactor, port, conn, req, gate)
        with trio.fail_after(60 + len(conns) * 0.05):
            for conn in conns:
                await conn.head.wait()
        s1, t1 = proc_sample(pid), time.perf_counter()
        nursery.cancel_scope.cancel()
    reactor.close_all()
    failed = [c for c in conns if c.status != 200]
    return {
        "requests": len(conns),
        "wallS": round(t1 - t0, 3),
        "serverCpuS": round(s1.cpu_s - s0.cpu_s, 3),
        "usPerRequest": round((s1.cpu_s - s0.cpu_s) / len(conns) * 1e6, 1),
        "failures": len(failed),
        "firstFailure": failed[0].errors[:1] if failed else [],
    }


async def chinwag_round(env: BenchEnv, port: int, pid: int, n: int, window: int) -> dict[str, Any]:
    # One live stream to join (waiting for its first token), and a session per open.
    ids = await create_sessions(port, env.token, n + 1, title="joins")
    watched, own = ids[0], ids[1:]
    client = Conn("client", 8)
    reactor = Reactor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run)
        nursery.start_soon(open_conn, reactor, port, client, stream_req(watched, env.token, 10))
        with trio.fail_after(30):
            await client.head.wait()
        join = await open_many(port, pid, [observe_req(watched, env.supervisor, None)] * n, window)
        open_ = await open_many(port, pid, [stream_req(sid, env.token, 10) for sid in own], window)
        nursery.cancel_scope.cancel()
    reactor.close_all()
    return {"join": join, "open": open_}


def run_round(env: BenchEnv, n: int, window: int, k: int) -> dict[str, Any]:
    floor = start_floor(env, f"floor-quart-joins-{k}", "floor-quart", 1.0, 5.0, ttft_ms=TTFT_MS)
    try:
        reqs = [
            request_bytes("POST", f"/api/chat/sessions/{i}/stream", "x", {"maxTokens": 10})
            for i in range(n)
        ]
        out = {"floor-quart": trio.run(open_many, floor.port, floor.pid, reqs, window)}
    finally:
        floor.stop()
    srv = start_chinwag(env, f"chinwag-joins-{k}", CHINWAG_SIM_TTFT_MS=str(TTFT_MS))
    try:
        out.update(trio.run(chinwag_round, env, srv.port, srv.pid, n, window))
    finally:
        srv.stop()
    return out


def report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\nopening SSE responses at once - commit {m['commit']}, {m['nproc']} cpus "
        f"({m['cpu']}), Python {m['python']}; {results['args']['requests']:,} requests, "
        f"{results['args']['open_window']} in flight, {len(results['rounds'])} round(s)"
    )
    rows = []
    for name in ("floor-quart", "join", "open"):
        per = [r[name]["usPerRequest"] for r in results["rounds"]]
        wall = statistics.median(r[name]["wallS"] for r in results["rounds"])
        rows.append(
            (
                f"  {name}",
                f"{fmt(statistics.median(per))} µs",
                f"server CPU per request (rounds {' / '.join(fmt(x) for x in per)}); "
                f"all heads in {fmt(wall)} s",
            )
        )
    for name in ("join", "open"):
        ratios = [
            r[name]["usPerRequest"] / r["floor-quart"]["usPerRequest"] for r in results["rounds"]
        ]
        rows.append(
            (f"  {name} ÷ floor-quart", f"{statistics.median(ratios):.2f} x", "median of rounds")
        )
    print_table(rows)


def failures(results: dict[str, Any]) -> list[str]:
    return [
        f"round {k + 1} {name}: {r[name]['failures']} failed {r[name]['firstFailure']}"
        for k, r in enumerate(results["rounds"])
        for name in ("floor-quart", "join", "open")
        if r[name]["failures"]
    ]


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__ or "", "tiny sizes (CI): 50 requests, 1 round")
    p.add_argument("--requests", type=int, default=1000, help="requests opened at once")
    p.add_argument("--open-window", type=int, default=64, help="handshakes in flight")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the targets in turn in each")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (DB, server logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 50, 1
    raise_fd_limit(args.requests * 2 + 4096)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args),
        "rounds": [],
    }
    env = BenchEnv(keep=args.keep)
    try:
        env.create_user()
        env.supervisor = env.add_user("watcher", "watcher-password", "supervisor")
        for k in range(args.rounds):
            print(f"[joins] round {k + 1} of {args.rounds}", flush=True)
            results["rounds"].append(run_round(env, args.requests, args.open_window, k))
    finally:
        env.cleanup()
    return finish(results, t0, report, failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
