"""What the streaming hot path's database calls cost, SQLite vs PostgreSQL (issue 11).

    .venv/bin/python scripts/bench_storage.py [--quick] [--json PATH] [--n 2000]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres] [--no-postgres]

The two moments of a stream that touch the database, with the calls
``server/streams.py`` makes today:

* **open**: ``ledger.open_account`` + ``ledger.reserve`` + two
  ``store.add_message`` (the user's turn, the empty assistant message);
* **settle**: ``store.finish_message`` + ``ledger.settle`` +
  ``store.add_telemetry``.

Each is timed per call and as the whole moment, p50/p99, three ways: a
plain synchronous call; each call through ``trio.to_thread.run_sync`` (one
thread hop per call, how the server must call PostgreSQL); the whole moment
in one hop. Then throughput with 16 Trio tasks through a
``CapacityLimiter(8)`` (PostgreSQL) — each stream on its own account, and
all on one hot account (its row lock serialises them). SQLite's store holds
one connection that is not safe across threads, so its concurrent run is on
the Trio thread, as the server calls it today.

PostgreSQL runs in a private database ``chinwag_bench_<random>``, created
through the maintenance URL and dropped at the end; ``--no-postgres`` (or
an unreachable server) measures SQLite alone.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import arg_parser, finish, fmt, ms, pct, print_table

from ledger import LedgerBackend, open_ledger
from server.storage import StoreBackend, open_store

STEPS_OPEN = (
    "ledger.open_account",
    "ledger.reserve",
    "store.add_message user",
    "store.add_message assistant",
)
STEPS_SETTLE = ("store.finish_message", "ledger.settle", "store.add_telemetry")


class Fixture:
    """One backend's store and ledger, with users, sessions and credits to spend."""

    def __init__(self, target: str, users: int) -> None:
        self.store: StoreBackend = open_store(target, max_connections=16)
        self.ledger: LedgerBackend = open_ledger(target, max_connections=16)
        self.users: list[tuple[str, str]] = []
        for i in range(users):
            uid = self.store.add_user(f"bench{i}", "x", "enduser")["id"]
            session = self.store.create_session(
                uid, session_id=None, title="bench", model_id="m", source="bench"
            )
            assert session is not None
            self.ledger.open_account(uid)
            self.ledger.allocate(uid, 10**12)
            self.users.append((uid, session["id"]))

    def close(self) -> None:
        self.store.close()
        self.ledger.close()

    # The two moments, as steps (name, call) so each can be timed alone.
    def open_steps(self, who: int, state: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
        uid, session = self.users[who]
        stream = f"bench-{secrets.token_hex(6)}"

        def reserve() -> None:
            state["res"] = self.ledger.reserve(uid, 500, model_id="m", streaming_session_id=stream)

        def assistant() -> None:
            state["msg"] = self.store.add_message(
                session, uid, role="assistant", content="", model_id="m",
                status="streaming", streaming_session_id=stream,
            )  # fmt: skip

        return [
            ("ledger.open_account", lambda: self.ledger.open_account(uid)),
            ("ledger.reserve", reserve),
            ("store.add_message user", lambda: self.store.add_message(
                session, uid, role="user", content="hello there", model_id="m")),
            ("store.add_message assistant", assistant),
        ]  # fmt: skip

    def settle_steps(self, state: dict[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
        return [
            ("store.finish_message", lambda: self.store.finish_message(
                state["msg"]["id"], content="general kenobi " * 20, status="complete",
                input_tokens=12, output_tokens=40, credits_charged=7, finish_reason="stop")),
            ("ledger.settle", lambda: self.ledger.settle(
                state["res"].id, 7, input_tokens=12, output_tokens=40)),
            ("store.add_telemetry", lambda: self.store.add_telemetry(
                "model_call", '{"model":"m","ttftMs":3.1,"outputTokens":40}')),
        ]  # fmt: skip


def _timed(samples: dict[str, list[float]], name: str, call: Callable[[], Any]) -> None:
    t = time.perf_counter()
    call()
    samples.setdefault(name, []).append(time.perf_counter() - t)


def latency_sync(fx: Fixture, n: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for i in range(n):
        state: dict[str, Any] = {}
        t = time.perf_counter()
        for name, call in fx.open_steps(i % len(fx.users), state):
            _timed(samples, name, call)
        samples.setdefault("OPEN", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        for name, call in fx.settle_steps(state):
            _timed(samples, name, call)
        samples.setdefault("SETTLE", []).append(time.perf_counter() - t)
    return samples


async def latency_threaded(fx: Fixture, n: int, *, one_hop: bool) -> dict[str, list[float]]:
    """Each call in its own ``to_thread`` hop, or each moment in one hop."""
    limiter = trio.CapacityLimiter(8)
    samples: dict[str, list[float]] = {}

    async def hop(call: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(call, limiter=limiter)

    def run_all(steps: list[tuple[str, Callable[[], Any]]]) -> None:
        for _, call in steps:
            call()

    for i in range(n):
        state: dict[str, Any] = {}
        for moment, steps in (
            ("OPEN", fx.open_steps(i % len(fx.users), state)),
            ("SETTLE", None),
        ):
            if steps is None:
                steps = fx.settle_steps(state)
            t = time.perf_counter()
            if one_hop:
                await hop(lambda s=steps: run_all(s))  # type: ignore[misc]
            else:
                for name, call in steps:
                    t1 = time.perf_counter()
                    await hop(call)
                    samples.setdefault(name, []).append(time.perf_counter() - t1)
            samples.setdefault(moment, []).append(time.perf_counter() - t)
    return samples


async def throughput(fx: Fixture, streams: int, *, hot: bool, threaded: bool) -> dict[str, float]:
    """16 tasks open and settle ``streams`` streams; streams/s and the p99 of a whole one."""
    limiter = trio.CapacityLimiter(8)
    whole: list[float] = []
    counter = iter(range(streams))

    async def call(fn: Callable[[], Any]) -> None:
        if threaded:
            await trio.to_thread.run_sync(fn, limiter=limiter)
        else:
            fn()
            await trio.lowlevel.checkpoint()

    async def worker(index: int) -> None:
        for i in counter:
            who = 0 if hot else (index + i) % len(fx.users)
            state: dict[str, Any] = {}
            t = time.perf_counter()
            for _, fn in fx.open_steps(who, state):
                await call(fn)
            for _, fn in fx.settle_steps(state):
                await call(fn)
            whole.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(16):
            nursery.start_soon(worker, index)
    elapsed = time.perf_counter() - t0
    return {"streamsPerS": round(streams / elapsed, 1), "p99Ms": ms(pct(whole, 99))}


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {"p50Ms": ms(pct(values, 50)), "p99Ms": ms(pct(values, 99)), "n": len(values)}
        for name, values in samples.items()
    }


@contextmanager
def postgres_database(maintenance_url: str) -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"chinwag_bench_{secrets.token_hex(4)}"
    with psycopg.connect(maintenance_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        parts = urlsplit(maintenance_url)
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, "", ""))
    finally:
        with psycopg.connect(maintenance_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def measure(backend: str, target: str, n: int, streams: int) -> dict[str, Any]:
    fx = Fixture(target, users=32)
    try:
        latency_sync(fx, max(20, n // 10))  # warm up: connections, prepared statements
        result: dict[str, Any] = {"sync": summarize(latency_sync(fx, n))}
        threaded_ok = backend == "postgres"  # SQLite's store: one connection, not thread-safe
        if threaded_ok:
            result["perCallHop"] = summarize(
                trio.run(lambda: latency_threaded(fx, n, one_hop=False))
            )
            result["oneHop"] = summarize(trio.run(lambda: latency_threaded(fx, n, one_hop=True)))
        for name, hot in (("spread", False), ("hotAccount", True)):
            result[name] = trio.run(
                lambda h=hot: throughput(fx, streams, hot=h, threaded=threaded_ok)  # type: ignore[misc]
            )
        problems = fx.ledger.verify()
        result["verify"] = problems
        return result
    finally:
        fx.close()


def report(results: dict[str, Any]) -> None:
    for backend in ("sqlite", "postgres"):
        if backend not in results:
            continue
        r = results[backend]
        print(f"\n{backend}  (n = {results['n']} per call; p50 / p99 ms)")
        rows: list[tuple[str, str, str]] = []
        for name in ("OPEN", *STEPS_OPEN, "SETTLE", *STEPS_SETTLE):
            line = [f"{fmt(r['sync'][name]['p50Ms'])} / {fmt(r['sync'][name]['p99Ms'])}"]
            for mode in ("perCallHop", "oneHop"):
                if mode in r and name in r[mode]:
                    v = r[mode][name]
                    line.append(f"{fmt(v['p50Ms'])} / {fmt(v['p99Ms'])}")
            label = name if name in ("OPEN", "SETTLE") else f"  {name}"
            rows.append((label, line[0], "   ".join(line[1:])))
        print("  call                         sync           to_thread per call   one hop")
        print_table(rows)
        for name in ("spread", "hotAccount"):
            v = r[name]
            how = "to_thread, limiter 8" if "perCallHop" in r else "Trio thread"
            print(f"  16 tasks, {name:<10} ({how}): {fmt(v['streamsPerS'])} streams/s,"
                  f" whole stream p99 {fmt(v['p99Ms'])} ms")  # fmt: skip
        print(f"  verify(): {r['verify'] or 'clean'}")


def failures(results: dict[str, Any]) -> list[str]:
    return [
        f"{backend}: verify() found {r['verify']}"
        for backend, r in results.items()
        if isinstance(r, dict) and r.get("verify")
    ]


def main() -> int:
    parser = arg_parser(__doc__ or "", "200 samples, 200 streams: a smoke run for CI")
    parser.add_argument("--n", type=int, default=2000, help="samples per call")
    parser.add_argument("--streams", type=int, default=2000, help="streams per throughput run")
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="maintenance URL (a private database is created in it)",
    )  # fmt: skip
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    n, streams = (200, 200) if args.quick else (args.n, args.streams)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"n": n, "streams": streams}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = measure("sqlite", str(Path(tmp) / "bench.db"), n, streams)
    if not args.no_postgres:
        try:
            with postgres_database(args.postgres) as url:
                results["postgres"] = measure("postgres", url, n, streams)
        except Exception as exc:  # unreachable: say so, measure SQLite alone
            if "postgres" in results:
                raise
            from ledger import mask_url

            print(f"PostgreSQL not measured ({mask_url(args.postgres)}): {exc}", file=sys.stderr)
    return finish(results, t0, report, failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
