"""Redis client on Trio, the cluster's hot path: coredis 6 (anyio, native on Trio) vs
redis-py's asyncio client through trio-asyncio (issue 12).

    .venv/bin/python scripts/bench_redis_clients.py --quick     # CI: tiny sizes, seconds
    .venv/bin/python scripts/bench_redis_clients.py [--url redis://127.0.0.1:6379/0]
        [--runs 3] [--round-trips 5000] [--pipelined 50000] [--wakes 200] [--json out.json]

redis-py is not a dependency of chinwag: install it into the venv only to
measure it (``.venv/bin/pip install redis``); without it the script says so
in one line and measures coredis alone.

Both clients do exactly the same Redis work, the work of
:mod:`server.cluster.publisher` and :mod:`server.cluster.mirror`, on a key
prefix of their own (``chinwag-bench-clients:<random>:``, deleted afterwards
with SCAN + DEL on that prefix only; never FLUSHDB):

1. **round trip**: one ``XADD key 0-N MAXLEN ~ 4096 n chunk d {...} t 1``
   per round trip (an explicit id, as the publisher writes them), awaited one
   after the other: latency p50/p99 and the client's CPU per command.
2. **pipelined**: the same XADDs in non-transactional pipelines of 10 and of
   100 commands (coredis: ``pipeline(transaction=False, raise_on_error=False)``
   and each reply awaited, as the publisher does; redis-py:
   ``pipeline(transaction=False)`` + ``execute(raise_on_error=False)``):
   XADD/s, the client's CPU per XADD and Redis's own CPU per XADD.
3. **wake-up**: a task blocks in ``XREAD BLOCK 2000 COUNT 1`` from the last id
   (as a mirror follows a stream); 5 ms later another task ``XADD``s on
   another connection of the same client. Time from just before the XADD is
   sent to the XREAD's return, p50/p99.
4. **the bridge alone** (redis-py only): ``aio_as_trio`` on a coroutine that
   does nothing, per call — what every command pays to cross from Trio to
   the asyncio loop and back.

A third row, ``raw-resp``, is not a candidate but the floor: the same
commands written as RESP2 bytes on two plain Trio sockets (one for commands,
one for the blocking read) and the replies parsed by 40 lines of Python — what
the work costs with no client library at all.

coredis is opened exactly as the server opens it
(:func:`server.cluster.redis.open_redis`); redis-py with
``redis.asyncio.Redis.from_url`` inside ``trio_asyncio.open_loop()``, every
command awaited with ``trio_asyncio.aio_as_trio``. Each run measures both
clients one after the other, each in a fresh ``trio.run``, the order
alternating from run to run (the machine is shared: a slower moment then
does not always hit the same client). The client's CPU is
``time.process_time()`` of this process; Redis's is read from
``/proc/<its pid>`` (``INFO server``'s ``process_id``, when Redis runs on this
machine).

Exit status: 1 if Redis is needed and does not answer, or a client failed a
command or missed a wake-up; never because of speed. Redis not reachable and
``CI`` unset: a one-line skip, exit 0.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from benchlib import ROOT, arg_parser, finish, fmt, machine, pct, print_table

sys.path.insert(0, str(ROOT))  # the server package, for the cluster's own client factory

DEFAULT_URL = "redis://127.0.0.1:6379/0"
FIELDS: dict[Any, Any] = {"n": "chunk", "d": '{"text":"hello"}', "t": "1"}
RING = 4096  # CHINWAG_OBSERVE_RING's default: the publisher's MAXLEN ~
WAKE_BLOCK_MS = 2000
WAKE_DELAY_S = 0.005
CLIENTS = ("coredis", "redis-py", "raw-resp")


# -- the two clients, behind one interface ------------------------------------------------------


@dataclass
class Ops:
    """The hot path's commands for one client, each awaitable from Trio."""

    name: str
    version: str
    xadd: Callable[[str, str], Awaitable[Any]]  # key, entry id
    xadd_pipeline: Callable[[str, list[str]], Awaitable[Any]]  # key, entry ids: one pipeline
    xread: Callable[[str, str, int], Awaitable[Any]]  # key, after id, block ms -> entries
    bridge: Callable[[], Awaitable[Any]] | None = None  # the Trio -> asyncio hop alone


@asynccontextmanager
async def coredis_ops(url: str) -> AsyncIterator[Ops]:
    import coredis
    from coredis.tokens import PureToken

    from server.cluster.redis import open_redis

    async with open_redis(url) as redis:
        client = redis.client

        async def xadd(key: str, ident: str) -> None:
            await client.xadd(
                key,
                FIELDS,
                identifier=ident,
                trim_strategy=PureToken.MAXLEN,
                trim_operator=PureToken.APPROXIMATELY,
                threshold=RING,
            )

        async def xadd_pipeline(key: str, idents: list[str]) -> None:
            async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
                requests = [
                    pipe.xadd(
                        key,
                        FIELDS,
                        identifier=ident,
                        trim_strategy=PureToken.MAXLEN,
                        trim_operator=PureToken.APPROXIMATELY,
                        threshold=RING,
                    )
                    for ident in idents
                ]
            for request in requests:
                await request

        async def xread(key: str, after: str, block_ms: int) -> Any:
            reply = await client.xread({key: after}, count=1, block=block_ms)
            return reply.get(key.encode(), ()) if reply else ()

        yield Ops("coredis", coredis.__version__, xadd, xadd_pipeline, xread)


@asynccontextmanager
async def redis_py_ops(url: str) -> AsyncIterator[Ops]:
    import redis
    import redis.asyncio as aioredis
    import redis.utils
    import trio_asyncio

    aio = trio_asyncio.aio_as_trio
    async with trio_asyncio.open_loop():
        client = aioredis.Redis.from_url(url, decode_responses=False, max_connections=1024)
        try:
            await aio(client.ping)()

            async def xadd(key: str, ident: str) -> None:
                await aio(client.xadd)(key, FIELDS, id=ident, maxlen=RING, approximate=True)

            async def xadd_pipeline(key: str, idents: list[str]) -> None:
                pipe = client.pipeline(transaction=False)
                for ident in idents:
                    pipe.xadd(key, FIELDS, id=ident, maxlen=RING, approximate=True)
                await aio(pipe.execute)(raise_on_error=False)

            async def xread(key: str, after: str, block_ms: int) -> Any:
                reply = await aio(client.xread)({key: after}, count=1, block=block_ms)
                return reply[0][1] if reply else ()

            async def nothing() -> None:
                return None

            async def bridge() -> None:
                await aio(nothing)()

            parser = "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure-Python parser"
            yield Ops(
                "redis-py",
                f"{redis.__version__} ({parser}), trio-asyncio {trio_asyncio.__version__}",
                xadd,
                xadd_pipeline,
                xread,
                bridge,
            )
        finally:
            await aio(client.aclose)()


class RespError(Exception):
    pass


def resp(*parts: str | int) -> bytes:
    """One command in RESP2."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespConnection:
    """A bare RESP2 connection on a Trio socket: no pool, no command layer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError("Redis closed the connection")
        self.buf += data

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                await self._fill()
            data = bytes(self.buf[:n])
            del self.buf[: n + 2]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [await self.reply() for _ in range(n)]
        raise RespError(f"unexpected reply {line[:40]!r}")

    async def call(self, commands: list[bytes]) -> list[Any]:
        await self.stream.send_all(b"".join(commands))
        return [await self.reply() for _ in commands]


@asynccontextmanager
async def raw_resp_ops(url: str) -> AsyncIterator[Ops]:
    """The floor, not a candidate: what the same commands cost with no client library."""
    where = urlsplit(url)
    db = int(where.path.strip("/") or 0)
    connections = []
    for _ in range(2):  # one for commands, one for the blocking read
        stream = await trio.open_tcp_stream(where.hostname or "127.0.0.1", where.port or 6379)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = RespConnection(stream)
        if db:
            await conn.call([resp("SELECT", db)])
        connections.append(conn)
    main, blocking = connections

    def xadd_command(key: str, ident: str) -> bytes:
        return resp(
            "XADD", key, "MAXLEN", "~", RING, ident, *(x for kv in FIELDS.items() for x in kv)
        )

    async def xadd(key: str, ident: str) -> None:
        (reply,) = await main.call([xadd_command(key, ident)])
        if isinstance(reply, RespError):
            raise reply

    async def xadd_pipeline(key: str, idents: list[str]) -> None:
        await main.call([xadd_command(key, ident) for ident in idents])

    async def xread(key: str, after: str, block_ms: int) -> Any:
        (reply,) = await blocking.call(
            [resp("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", key, after)]
        )
        return reply[0][1] if reply else ()

    try:
        yield Ops(
            "raw-resp", "RESP2 on trio sockets, no library (a floor)", xadd, xadd_pipeline, xread
        )
    finally:
        for conn in connections:
            await conn.stream.aclose()


OPENERS: dict[str, Callable[[str], Any]] = {
    "coredis": coredis_ops,
    "redis-py": redis_py_ops,
    "raw-resp": raw_resp_ops,
}


# -- the machine: Redis's own CPU ----------------------------------------------------------------


def redis_info_pid(url: str) -> int | None:
    """The pid of the Redis server if it runs on this machine (``INFO server``), else None."""
    where = urlsplit(url)
    try:
        with socket.create_connection((where.hostname or "127.0.0.1", where.port or 6379), 3) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            pid = int(line.split(":", 1)[1])
            return pid if Path(f"/proc/{pid}/stat").exists() else None
    return None


def proc_cpu_s(pid: int | None) -> float:
    if pid is None:
        return math.nan
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def unreachable_reason(url: str) -> str | None:
    where = urlsplit(url)
    host, port = where.hostname or "127.0.0.1", where.port or 6379
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return f"Redis not reachable at {host}:{port}: {exc}"
    if not answer.startswith(b"+PONG"):
        return f"Redis at {host}:{port} answered {answer[:40]!r} to PING"
    return None


# -- the measurement, the same for both -----------------------------------------------------------


class Cpu:
    """This process's and Redis's CPU over one measurement, per operation."""

    def __init__(self, redis_pid: int | None) -> None:
        self.redis_pid = redis_pid
        self.c0 = time.process_time()
        self.r0 = proc_cpu_s(redis_pid)
        self.t0 = time.perf_counter()

    def per_op_us(self, n: int) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        client = time.process_time() - self.c0
        redis = proc_cpu_s(self.redis_pid) - self.r0
        return {
            "clientCpuUsPerOp": round(1e6 * client / n, 1),
            "redisCpuUsPerOp": round(1e6 * redis / n, 1) if not math.isnan(redis) else math.nan,
            "clientCpuPct": round(100 * client / wall, 1),
        }


def us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


async def measure(
    ops: Ops, prefix: str, round_trips: int, pipelined: int, wakes: int, redis_pid: int | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"client": ops.name, "version": ops.version}
    perf = time.perf_counter

    # 1. one XADD per round trip
    key, n = prefix + "rt", 0
    for _ in range(min(200, round_trips)):  # warm-up: connections, code paths
        n += 1
        await ops.xadd(key, f"0-{n}")
    times = []
    cpu = Cpu(redis_pid)
    for _ in range(round_trips):
        n += 1
        t0 = perf()
        await ops.xadd(key, f"0-{n}")
        times.append(perf() - t0)
    out["roundTrip"] = {
        "n": round_trips,
        "p50Us": us(pct(times, 50)),
        "p99Us": us(pct(times, 99)),
        "meanUs": us(statistics.fmean(times)),
        **cpu.per_op_us(round_trips),
    }

    # 2. pipelined XADDs
    for batch in (10, 100):
        key, n = prefix + f"pipe{batch}", 0
        for _ in range(5):
            await ops.xadd_pipeline(key, [f"0-{n + i + 1}" for i in range(batch)])
            n += batch
        batches = max(1, pipelined // batch)
        cpu = Cpu(redis_pid)
        t0 = perf()
        for _ in range(batches):
            await ops.xadd_pipeline(key, [f"0-{n + i + 1}" for i in range(batch)])
            n += batch
        wall = perf() - t0
        out[f"pipelined{batch}"] = {
            "n": batches * batch,
            "perS": round(batches * batch / wall),
            **cpu.per_op_us(batches * batch),
        }

    # 3. a blocked XREAD woken by an XADD from another connection
    key, n = prefix + "wake", 1
    await ops.xadd(key, "0-1")
    wake_times: list[float] = []
    missed = 0
    for _ in range(wakes):
        after, n = f"0-{n}", n + 1
        sent = math.nan
        got: Any = ()

        async def read(after: str = after) -> None:
            nonlocal got
            got = await ops.xread(key, after, WAKE_BLOCK_MS)

        async def add(ident: str = f"0-{n}") -> None:
            nonlocal sent
            await trio.sleep(WAKE_DELAY_S)
            sent = perf()
            await ops.xadd(key, ident)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(add)
        woke = perf()
        if got:
            wake_times.append(woke - sent)
        else:
            missed += 1
    out["wake"] = {
        "n": wakes,
        "p50Us": us(pct(wake_times, 50)),
        "p99Us": us(pct(wake_times, 99)),
        "missed": missed,
    }

    # 4. the bridge alone
    if ops.bridge is not None:
        for _ in range(200):
            await ops.bridge()
        calls = max(1000, round_trips)
        c0, t0 = time.process_time(), perf()
        for _ in range(calls):
            await ops.bridge()
        out["bridge"] = {
            "n": calls,
            "wallUsPerCall": us((perf() - t0) / calls),
            "cpuUsPerCall": us((time.process_time() - c0) / calls),
        }
    return out


async def run_client(
    name: str, url: str, round_trips: int, pipelined: int, wakes: int, redis_pid: int | None
) -> dict[str, Any]:
    """One client's whole measurement in its own key prefix, deleted afterwards."""
    from server.cluster.redis import open_redis

    prefix = f"chinwag-bench-clients:{secrets.token_hex(4)}:"
    try:
        async with OPENERS[name](url) as ops:
            return await measure(ops, prefix, round_trips, pipelined, wakes, redis_pid)
    finally:
        with trio.CancelScope(shield=True):
            async with open_redis(url) as redis:
                await redis.delete_prefix(prefix)


# -- report ----------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if isinstance(v, int | float) and not math.isnan(v):
            values.append(v)
    return statistics.median(values) if values else math.nan


def report(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    for name in CLIENTS:
        runs = [r for r in results["runs"] if r.get("client") == name]
        if not runs:
            if name in results["skipped"]:
                rows.append((name, "skipped", results["skipped"][name]))
            continue
        rows.append((name, "", runs[0]["version"]))

        def seq(*path: str, runs: list[dict[str, Any]] = runs) -> str:
            out = []
            for r in runs:
                v: Any = r
                for p in path:
                    v = v[p]
                out.append(fmt(v))
            return ", ".join(out)

        rt = [
            ("  XADD round trip p50 / p99", "roundTrip", "p50Us", "p99Us", "us"),
            ("  XREAD wake-up after XADD p50 / p99", "wake", "p50Us", "p99Us", "us"),
        ]
        for label, key, a, b, unit in rt:
            rows.append(
                (
                    label,
                    f"{fmt(median_of(runs, key, a))} / {fmt(median_of(runs, key, b))} {unit}",
                    f"runs: p50 {seq(key, a)}; p99 {seq(key, b)}",
                )
            )
        rows.append(
            (
                "    CPU per round trip",
                f"client {fmt(median_of(runs, 'roundTrip', 'clientCpuUsPerOp'))} us",
                f"Redis {fmt(median_of(runs, 'roundTrip', 'redisCpuUsPerOp'))} us",
            )
        )
        for batch in (10, 100):
            k = f"pipelined{batch}"
            rows.append(
                (
                    f"  pipelined, batches of {batch}",
                    f"{fmt(median_of(runs, k, 'perS'))} XADD/s",
                    f"runs {seq(k, 'perS')}; CPU per XADD: client "
                    f"{fmt(median_of(runs, k, 'clientCpuUsPerOp'))} us, Redis "
                    f"{fmt(median_of(runs, k, 'redisCpuUsPerOp'))} us",
                )
            )
        if any("bridge" in r for r in runs):
            rows.append(
                (
                    "  aio_as_trio hop alone",
                    f"{fmt(median_of(runs, 'bridge', 'wallUsPerCall'))} us",
                    f"CPU {fmt(median_of(runs, 'bridge', 'cpuUsPerCall'))} us per call",
                )
            )
    print()
    m = results["machine"]
    print(
        f"Redis clients on Trio - commit {m.get('commit')}, {m['nproc']} cpus ({m.get('cpu')}), "
        f"Python {m['python']}, trio {trio.__version__}, Redis pid "
        f"{results.get('redisPid') or 'not local'}; medians of {results['args']['runs']} run(s)"
    )
    print_table(rows)


def functional_failures(results: dict[str, Any]) -> list[str]:
    bad = list(results.get("errors", []))
    for r in results["runs"]:
        if r["wake"]["missed"]:
            bad.append(f"{r['client']}: {r['wake']['missed']} XREADs were not woken by the XADD")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__, "tiny sizes (CI): a few seconds")
    p.add_argument("--url", default=os.environ.get("CHINWAG_BENCH_REDIS_URL", DEFAULT_URL))
    p.add_argument("--runs", type=int, default=3, help="each client is measured this many times")
    p.add_argument("--round-trips", type=int, default=5000)
    p.add_argument("--pipelined", type=int, default=50_000, help="XADDs per batch size")
    p.add_argument("--wakes", type=int, default=200)
    p.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.round_trips, args.pipelined, args.wakes = 1, 300, 2000, 20

    reason = unreachable_reason(args.url)
    if reason is not None:
        ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        print(f"bench_redis_clients: {'FAILED' if ci else 'skipped'}: {reason}")
        return 1 if ci else 0

    wanted = [c.strip() for c in args.clients.split(",") if c.strip()]
    skipped: dict[str, str] = {}
    if "redis-py" in wanted and importlib.util.find_spec("redis") is None:
        skipped["redis-py"] = "not installed (.venv/bin/pip install redis to measure it)"
        print("redis-py: skipped, not installed (.venv/bin/pip install redis to measure it)")
        wanted.remove("redis-py")

    redis_pid = redis_info_pid(args.url)
    results: dict[str, Any] = {
        "machine": machine(loadavg=os.getloadavg()),
        "args": vars(args),
        "redisPid": redis_pid,
        "skipped": skipped,
        "runs": [],
        "errors": [],
    }
    t0 = time.perf_counter()
    for i in range(args.runs):
        order = wanted if i % 2 == 0 else wanted[::-1]
        for name in order:
            print(f"[run {i + 1}/{args.runs}] {name}", flush=True)
            try:
                results["runs"].append(
                    trio.run(
                        run_client,
                        name,
                        args.url,
                        args.round_trips,
                        args.pipelined,
                        args.wakes,
                        redis_pid,
                    )
                )
            except Exception as exc:  # a client that fails is a functional failure
                results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    results["machine"]["loadavgAfter"] = os.getloadavg()
    return finish(results, t0, report, functional_failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
