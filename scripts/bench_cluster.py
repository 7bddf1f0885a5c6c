"""Cluster-mode benchmark of chinwag (issue 12): real ``chinwag serve`` processes on one
Redis and one database, driven by the raw-socket load generators of the other scripts.

    .venv/bin/python scripts/bench_cluster.py --quick          # CI: tiny sizes, < 60 s
    .venv/bin/python scripts/bench_cluster.py [--json out.json] [--only observe,scale]
        [--observers 10,1000] [--modes join,wait] [--tokens 1000] [--rate 50]
        [--streams 2000] [--stream-rate 20] [--stream-tokens 600]
        [--configs w1,w1-redis,w2-redis] [--repeat 2] [--database auto|pg|sqlite]

What it starts, and cleans up afterwards:

- a Redis key prefix of its own (``CHINWAG_REDIS_URL=redis://…/0?prefix=bench-<random>``,
  ``--redis-url``); its keys are deleted at the end with SCAN + DEL on
  ``chinwag:bench-<random>:`` only (never FLUSHDB: the Redis is shared);
- a database: a PostgreSQL database of its own (``chinwag_bench_<random>``,
  created on ``--postgres-url``'s server and dropped at the end), or with
  ``--database sqlite`` (or ``auto`` when PostgreSQL does not answer) the one
  SQLite file of a temporary directory, shared by every process;
- the users with the CLI (``user add``, ``credits allocate``, ``token``), the
  chat sessions over HTTP, as ``bench_streams.py`` and ``bench_observe.py`` do.

It measures (the simulated model, ``CHINWAG_SIM_TTFT_MS=0``):

1. **observe**: what the Redis hop adds to an observer on another node. Two
   nodes, A and B (``chinwag serve``, ``CHINWAG_NODE_ID`` bench-a / bench-b).
   One stream on A (``--tokens`` chunks at ``--rate``/s) and N observers
   (``--observers``) either on A itself (``local``: they read A's ring) or on
   B (``remote``: B mirrors the stream from Redis into a ring of its own, one
   reader for all N). Modes as in ``bench_observe.py``: ``join`` (the
   observers connect once the client has its first chunk; join = connect ->
   ``history-end``) and ``wait`` (they connect with ``?wait=30`` before the
   stream starts, then are held ``--hold`` seconds waiting: the CPU that
   costs is reported; attach = the client's request -> ``history-end``).
   Lag = an observer's receive time of event k - the client's receive time of
   event k, over every live event of every observer, p50/p99. As the client
   is itself late when the observers load its node, each observer's own
   lateness is given too: receive time of chunk k - (the client's first chunk
   + (k - 1)/rate), the client's schedule. Every observer
   is checked as in ``bench_observe.py`` (ids consecutive, every event
   byte-identical to the client's, no ``lagged``, ``done``). Reported: lag,
   join/attach, the client's own lateness, CPU of A, B, Redis, the database
   and the load generator.
2. **scale**: ``--streams`` streams x ``--stream-rate`` chunks/s, each
   ``--stream-tokens`` chunks, against one port served by ``--configs``:
   ``w1`` (``chinwag serve``, no Redis), ``w1-redis`` (``serve --workers 1``
   with ``CHINWAG_REDIS_URL``: the same process, plus every event copied to
   Redis), ``w2-redis`` (``serve --workers 2``: two processes on one port,
   ``SO_REUSEPORT``; cluster mode is required for more than one). Each config
   on a fresh server, ``--repeat`` times, alternating configs. Streams are
   opened at once with at most ``--open-window`` handshakes in flight.
   Reported: time until every stream has its headers / its first chunk,
   delivered events/s while every stream is live (or, if they never all are,
   at the most live), the clients' lateness (receive time - first-chunk
   receive time - k/rate) p50/p99, failures, and the CPU (% of one core) of
   the server (the sum of its processes), the load generator, Redis, the
   database's backends and everything else on the machine. With Redis, the
   copy itself is checked after the run: every stream's Redis Stream holds
   every event and the end marker, within 30 s of the last client's ``done``
   (the copy may run behind the clients: how long it took is reported). A follower reads the copies of a few
   streams (``--copy-sample``) from Redis as they are written: how far the
   copy runs behind the clients (copy lag p50/p99).

The load generator is ``bench_observe.py``'s: raw non-blocking sockets read by
one trio task from an epoll set, each read timestamped and parsed after the
run, so thousands of connections cost it little of the 2 cores it shares
with the servers. CPU is read from ``/proc`` (``utime + stime`` of each
process; ``/proc/stat`` for the whole machine).

Exit status: 1 if something is functionally broken (a failed stream or
observer, a missing or mismatched event, ``lagged``, an incomplete Redis
copy), never because of speed. Redis not reachable and ``CI`` unset: a
one-line skip, exit 0.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from bench_observe import (
    Conn,
    Reactor,
    check_client,
    check_observer,
    lateness,
    observe_req,
    open_conn,
    stream_req,
    wait_all,
)
from bench_redis_clients import unreachable_reason
from benchlib import (
    CLK_TCK,
    ROOT,
    Env,
    Server,
    arg_parser,
    create_session,
    create_sessions,
    finish,
    fmt,
    machine,
    ms,
    pct,
    print_table,
    proc_sample,
    raise_fd_limit,
)

sys.path.insert(0, str(ROOT))  # the server package: its Redis client deletes our keys

ENDUSER, SUPERVISOR, PASSWORD = "cluster-client", "cluster-supervisor", "bench-password"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NAN = math.nan
#: A scale run's streams that have not ended this long after their nominal duration fail.
STREAM_SLACK_S = 300.0
#: How long the Redis copies may take to be complete after the last client's ``done``.
COPY_GRACE_S = 30.0
CONFIGS = {
    # name: (serve argv, ready line, cluster mode)
    "w1": (("serve",), "chinwag listening on", False),
    "w1-redis": (("serve", "--workers", "1"), "chinwag listening on", True),
    "w2-redis": (("serve", "--workers", "2"), "chinwag: 2 workers on", True),
}


# -- the machine: CPU of process groups ---------------------------------------------------------


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (``serve --workers N``'s workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_sample(pid).cpu_s
        except (OSError, ValueError):
            continue  # gone
    return total


def pids_matching(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (the database's backends)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    out.append(int(entry.name))
        except OSError:
            continue
    return out


def machine_busy_s() -> float:
    """CPU seconds spent by the whole machine (all cores), not idle or waiting for I/O."""
    with open("/proc/stat") as f:
        fields_ = [int(x) for x in f.readline().split()[1:]]
    idle = fields_[3] + fields_[4]
    return (sum(fields_[:8]) - idle) / CLK_TCK


class Probe:
    """CPU seconds of named process groups, this process and the machine, on demand.

    ``groups`` maps a label to a function returning the group's pids (called at
    every read: a database backend can come and go).
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups

    def read(self) -> dict[str, float]:
        out = {label: cpu_s(pids()) for label, pids in self.groups.items()}
        out["loadgen"] = time.process_time()
        out["machine"] = machine_busy_s()
        out["t"] = time.perf_counter()
        return out

    @staticmethod
    def pct(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        """% of one core per group between two reads; ``other``: the rest of the machine."""
        wall = b["t"] - a["t"]
        if wall <= 0:
            return {}
        out = {k: round(100 * (b[k] - a[k]) / wall, 1) for k in a if k != "t"}
        out["other"] = round(
            out["machine"] - sum(v for k, v in out.items() if k not in ("machine", "other")), 1
        )
        out["wallS"] = round(wall, 2)
        return out


async def sample(probe: Probe, out: list[dict[str, float]], every: float = 0.25) -> None:
    while True:
        out.append(probe.read())
        await trio.sleep(every)


def window_cpu(samples: list[dict[str, float]], t0: float, t1: float) -> dict[str, float]:
    """CPU % between the first sample at/after ``t0`` and the last at/before ``t1``."""
    inside = [s for s in samples if t0 <= s["t"] <= t1]
    if len(inside) < 2:
        return {}
    return Probe.pct(inside[0], inside[-1])


# -- the shared engines: a Redis prefix, a database ---------------------------------------------


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def postgres_reason(admin_url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A database of our own on ``admin_url``'s server; dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"chinwag_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def delete_redis_prefix(url: str, prefix: str) -> int:
    """Delete our keys (``prefix`` only) with SCAN + DEL."""
    from server.cluster.redis import open_redis

    async def go() -> int:
        async with open_redis(url) as redis:
            return await redis.delete_prefix(prefix)

    return trio.run(go)


class ClusterEnv(Env):
    """The temp dir, the database, the Redis prefix and the two users of a run."""

    def __init__(self, keep: bool, database_url: str | None, redis_url: str, name: str) -> None:
        settings = {"CHINWAG_SIM_TTFT_MS": "0", "CHINWAG_SSE_HEARTBEAT_MS": "60000"}
        if database_url:
            settings["CHINWAG_DATABASE_URL"] = database_url
        super().__init__(keep, "chinwag-bench-cluster-", settings)
        self.redis_base = redis_url
        self.name = name
        self.user_token = ""
        self.sup_token = ""

    def create_users(self) -> None:
        self.user_token = self.add_user(ENDUSER, PASSWORD, "enduser", 1_000_000_000)
        self.sup_token = self.add_user(SUPERVISOR, PASSWORD, "supervisor")

    def redis_url(self, tag: str) -> str:
        """A cluster of its own: the key prefix ``chinwag:<name>-<tag>:``. Each server set
        gets one, so what one leaves in Redis is never recovered by the next."""
        return f"{self.redis_base}?prefix={self.name}-{tag}"

    def serve(
        self,
        name: str,
        config: str = "w1-redis",
        node_id: str | None = None,
        cluster_tag: str = "",
        **settings: str,
    ) -> Server:
        argv, ready, cluster = CONFIGS[config]
        extra = dict(settings)
        if cluster:
            extra["CHINWAG_REDIS_URL"] = self.redis_url(cluster_tag or name)
        if node_id:
            extra["CHINWAG_NODE_ID"] = node_id
        return Server(self, name, extra, argv=argv, ready=ready)


def unsettled(env: ClusterEnv) -> dict[str, int]:
    """Answers still ``streaming`` and reservations still ``open`` in the database.

    Read after a server has stopped (SIGTERM: it settles everything it runs),
    the difference from before its run is what it left unsettled.
    """
    queries = {
        "streaming": "SELECT count(*) FROM messages WHERE status = 'streaming'",
        "open": "SELECT count(*) FROM ledger_reservations WHERE status = 'open'",
    }
    url = env.settings.get("CHINWAG_DATABASE_URL")
    if url:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            return {k: int(conn.execute(q).fetchone()[0]) for k, q in queries.items()}  # type: ignore[index]
    import sqlite3

    with sqlite3.connect(f"file:{env.db}?mode=ro", uri=True) as conn:
        return {k: int(conn.execute(q).fetchone()[0]) for k, q in queries.items()}


def server_pids(server: Server) -> Callable[[], list[int]]:
    """The server's processes: itself and (``--workers N``) its workers."""
    return lambda: [server.pid, *children(server.pid)]


# -- 1. observe: observers on the stream's node vs on another node --------------------------------


async def bench_observe(
    env: ClusterEnv,
    a: Server,
    obs_node: Server,
    probe: Probe,
    n_obs: int,
    mode: str,
    tokens: int,
    rate: float,
    window: int,
    hold: float,
) -> dict[str, Any]:
    """One stream on ``a``; ``n_obs`` observers on ``obs_node`` (``a`` itself, or B).

    mode: "none" (no observers), "join" (connect once the client has its
    first chunk) or "wait" (connect with ``?wait=`` before it starts).
    """
    user, sup = env.user_token, env.sup_token
    sid = await create_session(a.port, user, f"cluster {mode} {n_obs}")
    cap = tokens + 4
    client = Conn("client", cap)
    observers = [Conn(f"obs{i}", cap, deferred=True) for i in range(n_obs)]
    gate = trio.Semaphore(window) if window > 0 else None
    samples: list[dict[str, float]] = []
    reactor = Reactor()
    out: dict[str, Any] = {"observers": n_obs, "mode": mode, "tokens": tokens, "rate": rate}
    failures: list[str] = []
    t_first_obs = NAN
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            nursery.start_soon(sample, probe, samples)
            if mode == "wait":
                req = observe_req(sid, sup, 30)
                t_first_obs = time.perf_counter()
                for o in observers:
                    nursery.start_soon(open_conn, reactor, obs_node.port, o, req, gate)
                with trio.move_on_after(25):
                    for o in observers:
                        await o.waiting.wait()
                out["allWaitingS"] = round(time.perf_counter() - t_first_obs, 3)
                if any(math.isnan(o.t_waiting) for o in observers):
                    failures.append("observers never got 'waiting'")
                hold0 = probe.read()
                await trio.sleep(hold)  # what waiting costs, before the stream starts
                out["holdCpu"] = Probe.pct(hold0, probe.read())
            t0 = probe.read()
            client.watch = (1, trio.Event())
            first_chunk = client.watch[1]
            nursery.start_soon(open_conn, reactor, a.port, client, stream_req(sid, user, tokens))
            if mode == "join":
                with trio.move_on_after(10):
                    await first_chunk.wait()
                req = observe_req(sid, sup, None)
                t_first_obs = time.perf_counter()
                for o in observers:
                    nursery.start_soon(open_conn, reactor, obs_node.port, o, req, gate)
            await wait_all([client, *observers], tokens / rate + 60)
            out["cpu"] = Probe.pct(t0, probe.read())
            nursery.cancel_scope.cancel()
    finally:
        reactor.close_all()
    for o in observers:
        o.parse()

    failures += check_client(client, tokens)
    for o in observers:
        why = check_observer(o, client)
        if why and len(failures) < 8:
            failures.append(f"{o.label}: {'; '.join(why[:2])}")
        elif why:
            failures.append(o.label)
    ct = client.times
    lags, obs_late = array("d"), array("d")
    slot0 = ct[1] if len(ct) > 1 else NAN  # chunk k's slot: slot0 + (k - 1) / rate
    for o in observers:
        if o.done_id is None or o.history_end is None:
            continue
        ot = o.times
        for i in range(o.history_end + 1, o.done_id + 1):
            x, y = ot[i], ct[i]
            if x == x and y == y:  # neither is nan
                lags.append(x - y)
                if i <= tokens:
                    obs_late.append(x - slot0 - (i - 1) / rate)
    late = lateness(client, tokens, rate)
    joined = [o for o in observers if not math.isnan(o.t_history_end)]
    out.update(
        {
            "lagSamples": len(lags),
            "lagP50Ms": ms(pct(lags, 50)),
            "lagP99Ms": ms(pct(lags, 99)),
            "lagMaxMs": ms(max(lags)) if lags else NAN,
            # The observers' own lateness, against the stream's schedule as the client
            # measures its own: comparable whether the client's node is busy or not.
            "observerLatenessP50Ms": ms(pct(obs_late, 50)),
            "observerLatenessP99Ms": ms(pct(obs_late, 99)),
            "clientLatenessP50Ms": ms(pct(late, 50)),
            "clientLatenessP99Ms": ms(pct(late, 99)),
            "clientChunks": client.events - (1 if client.done_id else 0),
            "observerWrites": sum(o.writes for o in observers),
            "failures": len(failures),
            "failureSamples": failures[:8],
        }
    )
    if mode == "join" and joined:
        joins = [o.t_history_end - o.t_start for o in joined]
        out.update(
            {
                "joinP50Ms": ms(pct(joins, 50)),
                "joinP99Ms": ms(pct(joins, 99)),
                "allJoinedS": round(max(o.t_history_end for o in joined) - t_first_obs, 3),
            }
        )
    if mode == "wait" and joined:
        attach = [o.t_history_end - client.t_sent for o in joined]
        out.update({"attachP50Ms": ms(pct(attach, 50)), "attachP99Ms": ms(pct(attach, 99))})
    return out


def run_observe(env: ClusterEnv, args: Any) -> dict[str, Any]:
    """Nodes A and B; for each N: observers on A (local), then on B (remote)."""
    levels = [int(x) for x in args.observers.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    node_env = {
        "CHINWAG_SIM_TOKENS_PER_S": f"{args.rate:g}",
        "CHINWAG_SIM_ANSWER_TOKENS": str(args.tokens),
        # Long enough that an observer joining after the end (a slow join of 1,000 on a
        # saturated node) replays the stream rather than getting a 404.
        "CHINWAG_STREAM_BUFFER_MS": "30000",
    }
    a = env.serve("node-a", node_id="bench-a", cluster_tag="observe", **node_env)
    b = env.serve("node-b", node_id="bench-b", cluster_tag="observe", **node_env)
    db = database_pids(env)
    probe = Probe({"a": server_pids(a), "b": server_pids(b), "redis": redis_pids(env), "db": db})
    out: dict[str, Any] = {"baseline": [], "runs": []}
    try:

        def one(n: int, mode: str, where: str) -> dict[str, Any]:
            node = a if where == "local" else b
            r = trio.run(
                bench_observe,
                env,
                a,
                node,
                probe,
                n,
                mode,
                args.tokens,
                args.rate,
                args.open_window,
                args.hold,
            )
            return {**r, "where": where}

        print(f"[1] observe: {args.tokens} chunks at {args.rate:g}/s on node A", flush=True)
        if not args.quick:  # warm-up both nodes (imports, first JWT, the mirror's code)
            one(2, "join", "local")
            one(2, "join", "remote")
        out["baseline"].append({**one(0, "none", "local"), "label": "before"})
        for n in levels:
            for mode in modes:
                for where in ("local", "remote"):
                    if args.quick and (mode, where) == ("wait", "local"):
                        continue  # bench_observe.py --quick covers it; CI's time is short
                    print(f"    {n} observers, {mode}, {where}", flush=True)
                    out["runs"].append(one(n, mode, where))
        if not args.quick:
            out["baseline"].append({**one(0, "none", "local"), "label": "after"})
    finally:
        a.stop()
        b.stop()
    return out


# -- 2. scale: many streams on serve, serve --workers 1 (+ Redis), serve --workers 2 --------------


class StreamConn(Conn):
    """A client's stream that also keeps its ``X-Streaming-Session-Id`` (the Redis key)."""

    __slots__ = ("stream_id",)

    def __init__(self, label: str, capacity: int) -> None:
        super().__init__(label, capacity, deferred=True)
        self.stream_id = ""

    def feed(self, data: bytes, t: float) -> bool:
        if self.status is None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                m = re.search(rb"(?i)\r\nx-streaming-session-id: *([^\r]+)", head[:end])
                self.stream_id = m.group(1).decode() if m else ""
        return super().feed(data, t)


async def follow_copies(
    redis_url: str, conns: list[StreamConn], arrivals: dict[str, dict[int, float]]
) -> None:
    """Read some streams' Redis copies as they are written: arrival time per event id."""
    from server.cluster.redis import open_redis, text

    async def follow(redis: Any, conn: StreamConn) -> None:
        await conn.head.wait()
        if not conn.stream_id:
            return
        key = redis.keys("stream", conn.stream_id)
        seen = arrivals[conn.stream_id] = {}
        last = "0-0"
        while True:
            reply = await redis.client.xread({key: last}, count=1000, block=1000)
            t = time.perf_counter()
            for entry in reply.get(key.encode(), ()) if reply else ():
                last = text(entry.identifier)
                major, minor = last.split("-")
                if major != "0":
                    return  # the end marker
                seen[int(minor)] = t

    async with open_redis(redis_url) as redis, trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(follow, redis, conn)


async def check_copies(
    redis_url: str, conns: list[StreamConn], within: float = COPY_GRACE_S
) -> tuple[list[str], float]:
    """Every stream's Redis copy: all its events (0-1 .. 0-done) and the end marker.

    The copy may run behind the clients (the publisher is a node's task like any
    other): the check is repeated until every copy is complete or ``within``
    seconds have passed. Returns what is still incomplete then, and how long
    after the last client's ``done`` the copies were complete (nan: never).
    """
    from server.cluster.redis import open_redis

    t0 = time.perf_counter()
    todo = [c for c in conns if c.stream_id and c.done_id]
    async with open_redis(redis_url) as redis:
        client = redis.client
        while True:
            bad: list[str] = []
            left: list[StreamConn] = []
            for i in range(0, len(todo), 200):
                part = todo[i : i + 200]
                async with client.pipeline(transaction=False) as pipe:
                    lens = [pipe.xlen(redis.keys("stream", c.stream_id)) for c in part]
                    ends = [
                        pipe.xrange(redis.keys("stream", c.stream_id), "1-0", "1-0") for c in part
                    ]
                for c, n_req, end_req in zip(part, lens, ends, strict=True):
                    n, end = await n_req, await end_req
                    end_id = int(end[0].field_values[b"end"]) if end else None
                    if end_id != c.done_id or n != (c.done_id or 0) + 1:
                        left.append(c)
                        bad.append(
                            f"copy of {c.stream_id}: {n} entries, end {end_id}, the client's "
                            f"done id {c.done_id}"
                        )
            todo = left
            waited = time.perf_counter() - t0
            if not todo:
                return [], waited
            if waited >= within:
                return bad, NAN
            await trio.sleep(0.5)


async def bench_scale(
    env: ClusterEnv,
    srv: Server,
    probe: Probe,
    n: int,
    rate: float,
    tokens: int,
    window: int,
    redis_url: str | None,
    copy_sample: int,
) -> dict[str, Any]:
    """``n`` streams at once on ``srv``; ``redis_url``: its cluster's (None: not a cluster)."""
    user = env.user_token
    sids = await create_sessions(srv.port, user, n + 5, parallel=16)
    # warm-up: a few short streams end to end
    warm = [StreamConn(f"warm{i}", 8) for i in range(5)]
    reactor = Reactor()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            for c, sid in zip(warm, sids[:5], strict=True):
                nursery.start_soon(open_conn, reactor, srv.port, c, stream_req(sid, user, 3))
            await wait_all([*warm], 30)
            nursery.cancel_scope.cancel()
    finally:
        reactor.close_all()
    sids = sids[5:]
    await trio.sleep(0.5)

    conns = [StreamConn(f"s{i}", tokens + 4) for i in range(n)]
    gate = trio.Semaphore(window) if window > 0 else None
    samples: list[dict[str, float]] = []
    arrivals: dict[str, dict[int, float]] = {}
    reactor = Reactor()
    t_start = time.perf_counter()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            nursery.start_soon(sample, probe, samples)
            if redis_url and copy_sample:
                step = max(1, n // copy_sample)
                nursery.start_soon(follow_copies, redis_url, conns[::step][:copy_sample], arrivals)
            for c, sid in zip(conns, sids, strict=True):
                nursery.start_soon(
                    open_conn, reactor, srv.port, c, stream_req(sid, user, tokens), gate
                )
            await wait_all([*conns], tokens / rate + STREAM_SLACK_S)
            samples.append(probe.read())
            nursery.cancel_scope.cancel()
    finally:
        reactor.close_all()
    for c in conns:
        c.parse()

    failures = []
    for c in conns:
        why = check_client(c, tokens)
        if why:
            failures.append(why[0])
    # What kind of failures, counted: "HTTP 503", "client: no done", "timeout"...
    kinds = Counter(re.sub(r"\(.*|: b.*|\d+ events", "", f).strip() for f in failures)
    copy_bad, copy_after = await check_copies(redis_url, conns) if redis_url else ([], NAN)

    # Each stream is live from its first chunk to its done. When every stream is
    # live at once (the plateau), its rate is the steady one; opening can be so
    # slow that the first streams end before the last open, so the best 5 s
    # (events received in a sliding 5 s window) and the whole run are given too.
    starts = sorted(c.times[1] for c in conns if len(c.times) > 1 and c.times[1] == c.times[1])
    ends = sorted(
        c.times[c.done_id] for c in conns if c.done_id and not math.isnan(c.times[c.done_id])
    )
    events = sorted(t for c in conns for t in c.times if t == t)
    all_first = starts[-1] if len(starts) == n else NAN
    max_live, w0, w1 = live_plateau(starts, ends)
    all_live = max_live == n and w1 > w0
    plateau_rate = sum(1 for t in events if w0 <= t <= w1) / (w1 - w0) if all_live else NAN
    peak_rate, p0 = best_window(events, 5.0)
    late = array("d")
    for c in conns:
        late.extend(lateness(c, tokens, rate))
    ok = [c for c in conns if c.status == 200]
    copy_lags = array("d")
    for c in conns:
        for eid, t in arrivals.get(c.stream_id, {}).items():
            if eid < len(c.times) and c.times[eid] == c.times[eid]:
                copy_lags.append(t - c.times[eid])
    whole = Probe.pct(samples[0], samples[-1]) if len(samples) > 1 else {}
    span = events[-1] - events[0] if len(events) > 1 else NAN
    return {
        "streams": n,
        "rate": rate,
        "tokens": tokens,
        "openWindow": window,
        "allHeadersS": round(max((c.t_headers for c in ok), default=NAN) - t_start, 2),
        "allFirstChunkS": round(all_first - t_start, 2),
        "headersP50Ms": ms(pct([c.t_headers - c.t_sent for c in ok], 50)),
        "headersP99Ms": ms(pct([c.t_headers - c.t_sent for c in ok], 99)),
        "firstDoneS": round(ends[0] - t_start, 2) if ends else NAN,
        "maxLive": max_live,
        "allLiveS": round(w1 - w0, 2) if all_live else 0,
        "eventsPerSAllLive": round(plateau_rate) if all_live else None,
        "eventsPerSPeak5s": round(peak_rate),
        "eventsPerSOverall": round(len(events) / span) if span == span and span > 0 else None,
        "eventsPerSTarget": round(n * rate),
        "events": len(events),
        "expectedEvents": n * (tokens + 1),
        "latenessP50Ms": ms(pct(late, 50)),
        "latenessP99Ms": ms(pct(late, 99)),
        "latenessMaxMs": ms(max(late)) if late else NAN,
        "copyLagP50Ms": ms(pct(copy_lags, 50)),
        "copyLagP99Ms": ms(pct(copy_lags, 99)),
        "copyLagSamples": len(copy_lags),
        "copyIncomplete": len(copy_bad),
        "copyCompleteAfterS": round(copy_after, 2),
        "failures": len(failures) + len(copy_bad),
        "failureSamples": sorted(set(failures))[:5] + copy_bad[:3],
        "failureKinds": dict(kinds.most_common()),
        "cpuAllLive": window_cpu(samples, w0, w1) if all_live else {},
        "cpuPeak5s": window_cpu(samples, p0, p0 + 5),
        "cpuAll": whole,
        # CPU per delivered event over the whole run, microseconds, per group.
        "cpuUsPerEvent": {
            k: round(v / 100 * whole["wallS"] * 1e6 / len(events), 1)
            for k, v in whole.items()
            if k not in ("wallS", "machine", "other")
        }
        if whole and events
        else {},
        "rssKb": {
            label: proc_sample(pid).rss_kb
            for label, pid in (
                ("server", srv.pid),
                *((f"w{i}", p) for i, p in enumerate(children(srv.pid))),
            )
        }
        if srv.proc.poll() is None
        else {},
    }


def log_warnings(path: Path) -> dict[str, int]:
    """The server's warning and error log lines, counted by what they say (ids left out)."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        m = re.search(r'"level": "(warning|error|critical)".*?"message": "([^"]*)', line)
        if m:
            what = re.sub(r"(stream|node) [^ :]+|\d+|redis://\S+|\(.*", "", m.group(2))
            counts[f"{m.group(1)}: {what.strip()[:80]}"] += 1
    return dict(counts.most_common(8))


def best_window(times: list[float], width: float) -> tuple[float, float]:
    """(the most events per second in any ``width``-second window, its start); times sorted."""
    best, start, j = 0, NAN, 0
    for i, t in enumerate(times):
        while times[j] < t - width:
            j += 1
        if i - j + 1 > best:
            best, start = i - j + 1, t - width
    return best / width, start


def live_plateau(starts: list[float], ends: list[float]) -> tuple[int, float, float]:
    """(most streams live at once, the first moment that many were, the last moment)."""
    moments = [(t, 1) for t in starts] + [(t, -1) for t in ends]
    moments.sort()
    live = best = 0
    for _, d in moments:
        live += d
        best = max(best, live)
    live = 0
    w0 = w1 = NAN
    for t, d in moments:
        was = live
        live += d
        if live == best and math.isnan(w0):
            w0 = t
        if was == best and live < best:
            w1 = t
    return best, w0, w1


def run_scale(env: ClusterEnv, args: Any) -> list[dict[str, Any]]:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    runs = []
    for i in range(args.repeat):
        for config in configs if i % 2 == 0 else configs[::-1]:
            print(
                f"[2] scale: {config}, {args.streams} streams x {args.stream_rate:g}/s x "
                f"{args.stream_tokens} chunks (run {i + 1}/{args.repeat})",
                flush=True,
            )
            srv = env.serve(
                f"scale-{config}-{i}",
                config,
                CHINWAG_SIM_TOKENS_PER_S=f"{args.stream_rate:g}",
                CHINWAG_SIM_ANSWER_TOKENS=str(args.stream_tokens),
                # Ended streams' copies must outlive the run (opening 2,000 can take
                # minutes): the check after the run reads every one.
                CHINWAG_STREAM_BUFFER_MS="900000",
            )
            redis_url = srv.settings.get("CHINWAG_REDIS_URL")
            before = unsettled(env)
            groups = {"server": server_pids(srv), "db": database_pids(env)}
            if redis_url:
                groups["redis"] = redis_pids(env)
            try:
                r = trio.run(
                    bench_scale,
                    env,
                    srv,
                    Probe(groups),
                    args.streams,
                    args.stream_rate,
                    args.stream_tokens,
                    args.open_window,
                    redis_url,
                    args.copy_sample,
                )
            finally:
                code = srv.stop()
            r["serverWarnings"] = log_warnings(srv.err_path)
            after = unsettled(env)
            r["leftUnsettled"] = {k: after[k] - before[k] for k in after}
            if any(r["leftUnsettled"].values()):
                r["failures"] += 1
                r["failureSamples"].append(f"left unsettled after SIGTERM: {r['leftUnsettled']}")
            runs.append({**r, "config": config, "run": i + 1, "exit": code})
            if code != 0:
                runs[-1]["failures"] += 1
                runs[-1]["failureSamples"].append(f"server exit {code}: {srv.stderr_tail(300)}")
            print_table(scale_rows(runs[-1]))  # now: a long run's figures survive a later crash
    return runs


# -- the engines' processes ------------------------------------------------------------------------


def redis_pids(env: ClusterEnv) -> Callable[[], list[int]]:
    from bench_redis_clients import redis_info_pid

    pid = redis_info_pid(env.redis_base)
    return lambda: [pid] if pid else []


def database_pids(env: ClusterEnv) -> Callable[[], list[int]]:
    """PostgreSQL: the backends serving our database (their process titles name it)."""
    url = env.settings.get("CHINWAG_DATABASE_URL")
    if not url:
        return list  # SQLite: inside the servers
    name = urlsplit(url).path.lstrip("/")
    return lambda: pids_matching(f" {name} ")


# -- report ------------------------------------------------------------------------------------


def cpu_note(c: dict[str, float], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k} {fmt(c.get(k))}%" for k in keys if k in c)


def report(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    obs = results.get("observe")
    if obs:
        for r in obs["baseline"]:
            rows.append(
                (
                    f"0 observers ({r['label']})",
                    f"client late p50/p99 {fmt(r['clientLatenessP50Ms'])} / "
                    f"{fmt(r['clientLatenessP99Ms'])} ms",
                    cpu_note(r["cpu"], ("a", "b", "redis", "loadgen")),
                )
            )
        for r in obs["runs"]:
            label = f"{r['observers']} obs {r['mode']} {r['where']}"
            rows.append(
                (
                    f"{label}: lag p50/p99",
                    f"{fmt(r['lagP50Ms'])} / {fmt(r['lagP99Ms'])} ms",
                    f"max {fmt(r['lagMaxMs'])} ms over {fmt(r['lagSamples'])} events; "
                    f"failures {r['failures']} {'; '.join(r['failureSamples'][:2])}",
                )
            )
            if r["mode"] == "join":
                rows.append(
                    (
                        "  join p50/p99",
                        f"{fmt(r.get('joinP50Ms'))} / {fmt(r.get('joinP99Ms'))} ms",
                        f"all joined in {fmt(r.get('allJoinedS'))} s",
                    )
                )
            else:
                rows.append(
                    (
                        "  attach p50/p99",
                        f"{fmt(r.get('attachP50Ms'))} / {fmt(r.get('attachP99Ms'))} ms",
                        f"all waiting after {fmt(r.get('allWaitingS'))} s; while waiting: "
                        + cpu_note(r.get("holdCpu", {}), ("a", "b", "redis")),
                    )
                )
            rows.append(
                (
                    "  client late p50/p99",
                    f"{fmt(r['clientLatenessP50Ms'])} / {fmt(r['clientLatenessP99Ms'])} ms",
                    f"observers late p50/p99 {fmt(r['observerLatenessP50Ms'])} / "
                    f"{fmt(r['observerLatenessP99Ms'])} ms (vs the schedule)",
                )
            )
            rows.append(
                ("  cpu", "", cpu_note(r["cpu"], ("a", "b", "redis", "db", "loadgen", "other")))
            )
    for r in results.get("scale", []):
        rows += scale_rows(r)
    print()
    m = results["machine"]
    print(
        f"chinwag cluster benchmark - commit {m.get('commit')}, {m['nproc']} cpus ({m.get('cpu')}), "
        f"Python {m['python']}, database {results['database']}, load average before "
        f"{'/'.join(f'{x:.2f}' for x in m['loadavg'])}"
    )
    if rows:
        print_table(rows)


def scale_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    c = r["cpuAll"]
    per = r["cpuUsPerEvent"]
    rows = [
        (
            f"{r['config']} #{r['run']}: {r['streams']} x {fmt(r['rate'])}/s all open",
            f"{fmt(r['allHeadersS'])} s",
            f"all first chunks {fmt(r['allFirstChunkS'])} s; open p50/p99 "
            f"{fmt(r['headersP50Ms'])} / {fmt(r['headersP99Ms'])} ms; first done "
            f"{fmt(r['firstDoneS'])} s; max live {r['maxLive']}",
        ),
        (
            "  events/s best 5 s",
            fmt(r["eventsPerSPeak5s"]),
            f"target {fmt(r['eventsPerSTarget'])}; all live: "
            + (
                f"{fmt(r['eventsPerSAllLive'])}/s over {fmt(r['allLiveS'])} s"
                if r["eventsPerSAllLive"]
                else "never"
            )
            + f"; whole run {fmt(r['eventsPerSOverall'])}/s; events "
            f"{fmt(r['events'])}/{fmt(r['expectedEvents'])}",
        ),
        (
            "  lateness p50/p99",
            f"{fmt(r['latenessP50Ms'])} / {fmt(r['latenessP99Ms'])} ms",
            f"max {fmt(r['latenessMaxMs'])} ms; failures {r['failures']} "
            f"{'; '.join(r['failureSamples'][:2])}",
        ),
        (
            "  cpu % (whole run)",
            f"server {fmt(c.get('server'))}%",
            cpu_note(c, ("loadgen", "redis", "db", "other", "machine"))
            + f"; best 5 s: server {fmt(r['cpuPeak5s'].get('server'))}%",
        ),
        (
            "  cpu us per event",
            f"server {fmt(per.get('server'))}",
            ", ".join(f"{k} {fmt(v)}" for k, v in per.items() if k != "server"),
        ),
    ]
    if r["failureKinds"]:
        kinds = "; ".join(f"{k} x {v}" for k, v in r["failureKinds"].items())
        rows.append(("  failures", fmt(r["failures"]), kinds))
    left = r.get("leftUnsettled", {})
    rows.append(
        (
            "  after SIGTERM",
            f"{left.get('streaming', 0)} / {left.get('open', 0)}",
            "answers left 'streaming' / reservations left 'open' (should be 0 / 0)",
        )
    )
    for what, count in r.get("serverWarnings", {}).items():
        rows.append(("  server log", f"{count} x", what))
    if r["copyLagSamples"]:
        rows.append(
            (
                "  Redis copy lag p50/p99",
                f"{fmt(r['copyLagP50Ms'])} / {fmt(r['copyLagP99Ms'])} ms",
                f"{fmt(r['copyLagSamples'])} events of sampled streams; all copies complete "
                f"{fmt(r['copyCompleteAfterS'])} s after the last done; incomplete "
                f"{r['copyIncomplete']}",
            )
        )
    return rows


def functional_failures(results: dict[str, Any]) -> list[str]:
    bad = []
    obs = results.get("observe") or {}
    for r in obs.get("baseline", []) + obs.get("runs", []):
        if r["failures"] or not r["clientChunks"]:
            bad.append(f"observe {r['observers']} {r['mode']} {r['where']}: {r['failureSamples']}")
        elif r["observers"] and not r["lagSamples"]:
            bad.append(f"observe {r['observers']} {r['mode']} {r['where']}: no live events")
    for r in results.get("scale", []):
        if r["failures"] or not r["events"]:
            bad.append(f"scale {r['config']} #{r['run']}: {r['failures']} {r['failureSamples']}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__, "tiny sizes (CI), under 60 s")
    p.add_argument("--only", default="observe,scale", help="comma-separated: observe, scale")
    p.add_argument("--observers", default="10,1000", help="comma-separated observer counts")
    p.add_argument("--modes", default="join,wait", help="comma-separated: join, wait")
    p.add_argument("--tokens", type=int, default=1000, help="chunks of the observed stream")
    p.add_argument("--rate", type=float, default=50.0, help="chunks/s of the observed stream")
    p.add_argument("--hold", type=float, default=3.0, help="wait mode: seconds held waiting")
    p.add_argument("--streams", type=int, default=2000, help="scale: concurrent streams")
    p.add_argument("--stream-rate", type=float, default=20.0, help="scale: chunks/s per stream")
    p.add_argument("--stream-tokens", type=int, default=600, help="scale: chunks per stream")
    p.add_argument("--configs", default="w1,w1-redis,w2-redis", help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--repeat", type=int, default=2, help="scale: runs of each config")
    p.add_argument("--copy-sample", type=int, default=20, help="scale: copies followed in Redis")
    p.add_argument("--open-window", type=int, default=64, help="handshakes in flight at most")
    p.add_argument(
        "--redis-url", default=os.environ.get("CHINWAG_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    )
    p.add_argument("--database", choices=("auto", "pg", "sqlite"), default="auto")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL, help="server to create ours on")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (servers' logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.observers, args.tokens, args.hold = "3", 40, 0.5
        args.streams, args.stream_tokens, args.repeat, args.copy_sample = 20, 40, 1, 3
    only = {x.strip() for x in args.only.split(",")}

    reason = unreachable_reason(args.redis_url)
    if reason is not None:
        print(f"bench_cluster: {'FAILED' if in_ci() else 'skipped'}: {reason}")
        return 1 if in_ci() else 0
    database = args.database
    if database == "auto":
        database = "pg" if postgres_reason(args.postgres_url) is None else "sqlite"
    if database == "pg" and (why := postgres_reason(args.postgres_url)):
        print(f"bench_cluster: PostgreSQL not reachable: {why}")
        return 1
    raise_fd_limit(max(args.streams * 2, 2 * max(int(x) for x in args.observers.split(","))) + 4096)

    name = f"bench-{secrets.token_hex(4)}"
    results: dict[str, Any] = {
        "machine": machine(loadavg=os.getloadavg()),
        "args": vars(args),
        "database": "PostgreSQL" if database == "pg" else "SQLite (one file)",
    }
    t0 = time.perf_counter()
    engine: AbstractContextManager[str | None]
    engine = nullcontext(None) if database == "sqlite" else postgres_database(args.postgres_url)
    with engine as database_url:
        env = ClusterEnv(args.keep, database_url, args.redis_url, name)
        try:
            env.create_users()
            if "observe" in only:
                results["observe"] = run_observe(env, args)
            if "scale" in only:
                results["scale"] = run_scale(env, args)
        finally:
            env.cleanup()
            deleted = delete_redis_prefix(args.redis_url, f"chinwag:{name}-")
            results["redisKeysDeleted"] = deleted
    results["machine"]["loadavgAfter"] = os.getloadavg()
    return finish(results, t0, report, functional_failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
