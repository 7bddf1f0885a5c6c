"""End-to-end streaming benchmark of chinwag: the real server, a raw-socket load generator.

    .venv/bin/python scripts/bench_streams.py --quick          # CI: tiny sizes, < 60 s
    .venv/bin/python scripts/bench_streams.py [--json out.json] [--sequential 500]
        [--unpaced-events 200000] [--unpaced-runs 3] [--concurrency 500,1000,2000]
        [--rate 20] [--answer-tokens 200] [--open-window 64] [--disconnects 100]

The script starts ``python -m server.cli serve`` itself (``CHINWAG_PORT=0``, a
temporary ``CHINWAG_DB``), one server process per configuration, creates a
user with the CLI (``user add``, ``credits allocate``, ``token``), creates the
chat sessions over HTTP (one per stream: one stream per session at a time),
and measures:

1. **first byte**: N sequential streams (``CHINWAG_SIM_TTFT_MS=0``, no
   pacing, 5 tokens each), request → first response byte (the headers and
   ``: connected`` are flushed before any upstream call) and request → first
   ``chunk`` event, p50/p99. The request is sent on an already-connected
   socket; connect time is reported apart.
2. **unpaced**: one stream, ``CHINWAG_SIM_TOKENS_PER_S=0`` and a long answer
   (a bench model with ``maxTokens`` 1,000,000 is added through
   ``CHINWAG_MODELS_FILE``): ``chunk`` events / wall time (request → ``done``).
3. **concurrent**: for each N in ``--concurrency``, a fresh server
   (``CHINWAG_SIM_TOKENS_PER_S=--rate``), N streams opened at once (at most
   ``--open-window`` handshakes in flight: Hypercorn's listen backlog is 100),
   each ``--answer-tokens`` long. Reports the time until every stream has its
   headers and its first chunk, delivered events/s (over the window where
   every stream is live), lateness (receive time - the chunk's slot on its own
   stream's schedule: first-chunk receive time + k/rate) p50/p99/max,
   failures, and server RSS per stream ((RSS with all open - RSS idle) / N).
4. **disconnect**: ``chinwag fake-bedrock`` plus chinwag with
   ``CHINWAG_PROVIDER=bedrock``; start a stream, read 3 chunks, close the
   socket (wall time taken just before ``close``), then read the fake's
   ``GET /_fake/connections``: its ``closedAt`` - our close time, p50/p99.

The load generator is one trio process speaking HTTP/1.1 on raw
``trio.socket`` sockets: it writes the request bytes itself, parses the status
line and headers, then counts SSE events in the chunked body by scanning for
``event: chunk`` markers (each server write is one chunk of whole events). Its
own CPU (``time.process_time()``) and the server's CPU and RSS (``/proc/PID``)
are reported for every measurement: the server and the load generator share
the machine's cores.

Exit status: 1 if something is functionally broken (a failed stream, no
events, a disconnect that never reached the upstream), never because of speed.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from benchlib import (
    HOST,
    Env,
    Meter,
    Server,
    arg_parser,
    connect,
    create_sessions,
    finish,
    fmt,
    http_json,
    machine,
    ms,
    pct,
    print_table,
    proc_sample,
    raise_fd_limit,
    request_bytes,
    send_all,
)

USER, PASSWORD = "bench", "bench-password"
BENCH_MODEL = "bench.unpaced"
DEFAULT_MODEL = "amazon.nova-micro-v1:0"

CHUNK_MARK = b"event: chunk\n"
DONE_MARK = b"event: done\n"
ERROR_MARK = b"event: error\n"
TAIL = len(CHUNK_MARK) - 1  # bytes kept between reads: a marker may straddle two reads
END_OF_BODY = b"\r\n0\r\n\r\n"
FINISH_RE = re.compile(rb'"finishReason":"([a-z_]+)"')

#: A paced stream that has not ended this long after its nominal duration is a failure.
STREAM_SLACK_S = 120.0


# -- processes: CLI, server, fake-bedrock ----------------------------------------------


class BenchEnv(Env):
    """The temp dir, the DB, the bench model and the user shared by every server."""

    def __init__(self, keep: bool, database_url: str | None = None) -> None:
        extra = {"CHINWAG_DATABASE_URL": database_url} if database_url else {}
        super().__init__(keep, "chinwag-bench-", extra)
        self.models_file = self.dir / "models.json"
        self.models_file.write_text(
            json.dumps(
                [
                    {
                        "id": BENCH_MODEL,
                        "name": "Bench (unpaced)",
                        "inputPer1k": 0,
                        "outputPer1k": 1,
                        "maxTokens": 1_000_000,
                    }
                ]
            )
        )
        self.settings["CHINWAG_MODELS_FILE"] = str(self.models_file)
        self.token = ""

    def create_user(self) -> None:
        self.token = self.add_user(USER, PASSWORD, "enduser", 1_000_000_000)


def start_chinwag(env: Env, name: str, **settings: str) -> Server:
    return Server(env, name, settings)


# -- one SSE stream --------------------------------------------------------------------------


@dataclass
class StreamResult:
    session_id: str
    status: int | None = None
    t_send: float = math.nan  # perf_counter() just before the request bytes are written
    t_connect: float = math.nan  # seconds spent in connect()
    t_first_byte: float = math.nan  # first response byte (status line)
    t_headers: float = math.nan  # the end of the header block
    t_first_chunk: float = math.nan  # the read that brought the first ``chunk`` event
    t_last_chunk: float = math.nan
    t_done: float = math.nan  # the read that brought ``done``
    t_close_wall: float = math.nan  # time.time() just before close (stop_after only)
    chunks: int = 0
    done: bool = False
    error_event: bool = False
    finish_reason: str | None = None
    failure: str | None = None


@dataclass
class Shared:
    """Counters every stream of one measurement adds to (one trio thread: no locks)."""

    interval: float = 0.0  # the paced schedule, seconds per chunk (0 = no lateness)
    lateness: array[float] = field(default_factory=lambda: array("d"))
    chunks: int = 0
    live: int = 0
    max_live: int = 0
    opened: int = 0


async def run_stream(
    port: int,
    token: str,
    session_id: str,
    body: dict[str, Any],
    shared: Shared,
    *,
    limit_s: float,
    stop_after: int | None = None,
    recv_size: int = 65536,
    open_gate: trio.Semaphore | None = None,
) -> StreamResult:
    """POST .../stream and read it to ``done`` (or close after ``stop_after`` chunks)."""
    res = StreamResult(session_id)
    path = f"/api/chat/sessions/{session_id}/stream"
    req = request_bytes("POST", path, token, body, port=port)
    perf = time.perf_counter
    interval = shared.interval
    late = shared.lateness
    gate_held = False
    sock = None
    with trio.move_on_after(limit_s) as scope:
        try:
            if open_gate is not None:
                await open_gate.acquire()
                gate_held = True
            t = perf()
            sock = await connect(port)
            res.t_connect = perf() - t
            res.t_send = perf()
            await send_all(sock, req)
            buf = b""
            while (end := buf.find(b"\r\n\r\n")) < 0:
                data = await sock.recv(recv_size)
                if not data:
                    res.failure = "EOF before headers"
                    return res
                if not buf:
                    res.t_first_byte = perf()
                buf += data
            res.t_headers = perf()
            if gate_held and open_gate is not None:
                open_gate.release()
                gate_held = False
            res.status = int(buf[: buf.find(b"\r\n")].split(b" ", 2)[1])
            if res.status != 200:
                rest = buf[end + 4 :]
                with trio.move_on_after(2):
                    while len(rest) < 4096 and (data := await sock.recv(4096)):
                        rest += data
                        if b"}" in data:
                            break
                res.failure = f"HTTP {res.status}: {rest[:200]!r}"
                return res
            shared.opened += 1
            shared.live += 1
            if shared.live > shared.max_live:
                shared.max_live = shared.live
            try:
                data = buf[end + 4 :]
                tail = b""
                done_buf = b""
                t = res.t_headers
                while True:
                    if data:
                        scan = tail + data
                        n = scan.count(CHUNK_MARK)
                        if n:
                            k = res.chunks
                            if k == 0:
                                res.t_first_chunk = t
                            res.chunks = k + n
                            res.t_last_chunk = t
                            shared.chunks += n
                            if interval:  # the first chunk defines the schedule: not counted
                                slot = res.t_first_chunk + k * interval
                                for j in range(k, k + n):
                                    if j:
                                        late.append(t - slot)
                                    slot += interval
                            if stop_after is not None and res.chunks >= stop_after:
                                res.t_close_wall = time.time()
                                sock.close()
                                return res
                        if done_buf:
                            done_buf += data
                        elif (at := scan.find(DONE_MARK)) >= 0:
                            res.done = True
                            res.t_done = t
                            done_buf = scan[at:]
                        if ERROR_MARK in scan:
                            res.error_event = True
                        if done_buf and done_buf.endswith(END_OF_BODY):
                            break  # the terminating zero-length chunk
                        tail = scan[-TAIL:]
                    data = await sock.recv(recv_size)
                    t = perf()
                    if not data:
                        break
                if done_buf:
                    m = FINISH_RE.search(done_buf)
                    res.finish_reason = m.group(1).decode() if m else None
            finally:
                shared.live -= 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            res.failure = f"{type(exc).__name__}: {exc}"
        finally:
            if gate_held and open_gate is not None:
                open_gate.release()
            if sock is not None:
                sock.close()
    if scope.cancelled_caught and res.failure is None:
        res.failure = f"timeout after {limit_s:.0f} s ({res.chunks} chunks)"
    if res.failure is None and not res.done:
        res.failure = f"no done event ({res.chunks} chunks)"
    if res.failure is None and res.error_event:
        res.failure = "error event"
    return res


def check(res: StreamResult, expect_chunks: int | None) -> str | None:
    if res.failure:
        return res.failure
    if expect_chunks is not None and res.chunks != expect_chunks:
        return f"{res.chunks} chunks, expected {expect_chunks}"
    if res.finish_reason not in ("stop", "length"):
        return f"finishReason {res.finish_reason!r}"
    return None


# -- 1. first byte / first chunk ----------------------------------------------------------


async def bench_first_byte(
    port: int, pid: int, token: str, n: int, warmup: int = 5
) -> dict[str, Any]:
    sessions = await create_sessions(port, token, n + warmup)
    body = {"message": "Say hello", "modelId": BENCH_MODEL, "maxTokens": 5}
    first_byte, headers, first_chunk, connect_t, total = [], [], [], [], []
    failures: list[str] = []
    shared = Shared()
    meter = None
    for i, sid in enumerate(sessions):
        if i == warmup:
            meter = Meter(pid)
        res = await run_stream(port, token, sid, body, shared, limit_s=10)
        if (why := check(res, 5)) is not None:
            failures.append(why)
            continue
        if i < warmup:
            continue
        first_byte.append(res.t_first_byte - res.t_send)
        headers.append(res.t_headers - res.t_send)
        first_chunk.append(res.t_first_chunk - res.t_send)
        connect_t.append(res.t_connect)
        total.append(res.t_done - res.t_send)
    return {
        "streams": n,
        "firstByteP50Ms": ms(pct(first_byte, 50)),
        "firstByteP99Ms": ms(pct(first_byte, 99)),
        "headersP50Ms": ms(pct(headers, 50)),
        "firstChunkP50Ms": ms(pct(first_chunk, 50)),
        "firstChunkP99Ms": ms(pct(first_chunk, 99)),
        "doneP50Ms": ms(pct(total, 50)),
        "connectP50Ms": ms(pct(connect_t, 50)),
        "failures": len(failures),
        "failureSamples": failures[:5],
        "cpu": meter.result() if meter else None,
    }


# -- 2. one unpaced stream -------------------------------------------------------------------


async def bench_unpaced(port: int, pid: int, token: str, events: int, runs: int) -> dict[str, Any]:
    sessions = await create_sessions(port, token, runs + 1)
    body = {"message": "Tell me everything", "modelId": BENCH_MODEL, "maxTokens": events}
    # warm-up (small)
    await run_stream(port, token, sessions[0], {**body, "maxTokens": 200}, Shared(), limit_s=30)
    out_runs: list[dict[str, Any]] = []
    failures: list[str] = []
    for sid in sessions[1:]:
        meter = Meter(pid)
        res = await run_stream(port, token, sid, body, Shared(), limit_s=120, recv_size=262144)
        cpu = meter.result()
        if (why := check(res, events)) is not None:
            failures.append(why)
        wall = res.t_done - res.t_send
        out_runs.append(
            {
                "events": res.chunks,
                "wallS": round(wall, 3),
                "eventsPerS": round(res.chunks / wall) if wall > 0 else 0,
                "firstToLastEventsPerS": round(
                    (res.chunks - 1) / (res.t_last_chunk - res.t_first_chunk)
                )
                if res.chunks > 1
                else 0,
                "cpu": cpu,
            }
        )
    rates = sorted(r["eventsPerS"] for r in out_runs)
    return {
        "eventsPerStream": events,
        "runs": out_runs,
        "eventsPerSMedian": rates[len(rates) // 2] if rates else 0,
        "eventsPerSBest": rates[-1] if rates else 0,
        "failures": len(failures),
        "failureSamples": failures[:5],
    }


# -- 3. N concurrent paced streams -----------------------------------------------------------


async def bench_concurrent(
    port: int, pid: int, token: str, n: int, rate: float, tokens: int, open_window: int
) -> dict[str, Any]:
    sessions = await create_sessions(port, token, n + 5)
    body = {"message": "Stream to me", "modelId": DEFAULT_MODEL, "maxTokens": tokens}
    # warm-up: a few short streams end to end, so the idle RSS includes the code paths
    warm = Shared(interval=1 / rate)
    async with trio.open_nursery() as nursery:
        for sid in sessions[:5]:
            nursery.start_soon(
                partial(run_stream, port, token, sid, {**body, "maxTokens": 3}, warm, limit_s=30)
            )
    await trio.sleep(0.5)
    idle = proc_sample(pid)
    sessions = sessions[5:]

    shared = Shared(interval=1 / rate)
    results: list[StreamResult] = []
    samples: list[tuple[float, int, int, int, float]] = []  # t, chunks, live, rss_kb, cpu_s
    gate = trio.Semaphore(open_window) if open_window > 0 else None
    duration = tokens / rate

    async def one(sid: str) -> None:
        results.append(
            await run_stream(
                port, token, sid, body, shared, limit_s=duration + STREAM_SLACK_S, open_gate=gate
            )
        )

    async def sampler() -> None:
        while True:
            s = proc_sample(pid)
            samples.append((time.perf_counter(), shared.chunks, shared.live, s.rss_kb, s.cpu_s))
            await trio.sleep(0.25)

    meter = Meter(pid)
    t_start = time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(sampler)
        async with trio.open_nursery() as nursery:
            for sid in sessions:
                nursery.start_soon(one, sid)
        outer.cancel_scope.cancel()
    cpu = meter.result()

    failures = [why for r in results if (why := check(r, tokens)) is not None]
    ok = [r for r in results if r.status == 200]
    all_headers = max((r.t_headers for r in ok), default=math.nan) - t_start
    all_first = max((r.t_first_chunk for r in ok), default=math.nan) - t_start
    # Steady state: samples while every stream was live.
    full = [s for s in samples if s[2] == n]
    if len(full) >= 2:
        steady_rate = (full[-1][1] - full[0][1]) / (full[-1][0] - full[0][0])
        steady_cpu = 100 * (full[-1][4] - full[0][4]) / (full[-1][0] - full[0][0])
        rss_open = max(s[3] for s in full)
    else:
        steady_rate = steady_cpu = math.nan
        rss_open = max((s[3] for s in samples), default=0)
    peak_rss = max((s[3] for s in samples), default=0)
    first_chunk = min((r.t_first_chunk for r in ok if r.chunks), default=math.nan)
    last_chunk = max((r.t_last_chunk for r in ok if r.chunks), default=math.nan)
    late = shared.lateness
    total_chunks = sum(r.chunks for r in results)
    return {
        "streams": n,
        "rate": rate,
        "answerTokens": tokens,
        "openWindow": open_window,
        "allHeadersS": round(all_headers, 3),
        "allFirstChunkS": round(all_first, 3),
        "connectP99Ms": ms(pct([r.t_connect for r in ok], 99)),
        "headersP99Ms": ms(pct([r.t_headers - r.t_send for r in ok], 99)),
        "chunks": total_chunks,
        "expectedChunks": n * tokens,
        "eventsPerSOverall": round(total_chunks / (last_chunk - first_chunk))
        if last_chunk > first_chunk
        else 0,
        "eventsPerSAllLive": round(steady_rate) if not math.isnan(steady_rate) else None,
        "eventsPerSTarget": round(n * rate),
        "serverCpuPctAllLive": round(steady_cpu, 1) if not math.isnan(steady_cpu) else None,
        "latenessP50Ms": ms(pct(late, 50)),
        "latenessP99Ms": ms(pct(late, 99)),
        "latenessMaxMs": ms(max(late)) if late else math.nan,
        "failures": len(failures),
        "failureSamples": sorted(set(failures))[:5],
        "maxLive": shared.max_live,
        "rssIdleKb": idle.rss_kb,
        "rssAllOpenKb": rss_open,
        "rssPeakKb": peak_rss,
        # Every stream open at once: (RSS then - idle) / N. Otherwise (peak - idle) / the
        # most streams that were open at once (an approximation, flagged).
        "rssPerStreamKb": round((rss_open - idle.rss_kb) / n, 1)
        if full
        else round((peak_rss - idle.rss_kb) / max(shared.max_live, 1), 1),
        "rssPerStreamExact": bool(full),
        "cpu": cpu,
        # one row per second: [t since start s, chunks so far, live streams, server RSS KB,
        # server CPU s since start]
        "timeline": [
            [round(t - t_start, 2), c, live, rss, round(cpu_s - samples[0][4], 2)]
            for t, c, live, rss, cpu_s in samples[::4]
        ],
    }


# -- 4. disconnect -> upstream closed -------------------------------------------------------


async def bench_disconnect(
    port: int, fake_port: int, token: str, n: int, read_chunks: int = 3
) -> dict[str, Any]:
    status, _ = await http_json(
        fake_port,
        "PUT",
        "/_fake/settings",
        body={"ttftMs": 0, "tokensPerS": 50, "answerTokens": 2000},
    )
    if status != 200:
        raise RuntimeError(f"PUT /_fake/settings -> {status}")
    sessions = await create_sessions(port, token, n + 1)
    body = {"message": "Keep talking", "modelId": DEFAULT_MODEL, "maxTokens": 2000}
    delays: list[float] = []
    failures: list[str] = []
    for i, sid in enumerate(sessions):
        _, before = await http_json(fake_port, "GET", "/_fake/connections")
        known = {c["id"]: c["closedAt"] for c in before}
        res = await run_stream(port, token, sid, body, Shared(), limit_s=30, stop_after=read_chunks)
        if res.failure or math.isnan(res.t_close_wall):
            failures.append(res.failure or f"stream ended before {read_chunks} chunks")
            continue
        closed_at = None
        with trio.move_on_after(5):
            await trio.sleep(0.03)
            while closed_at is None:
                _, conns = await http_json(fake_port, "GET", "/_fake/connections")
                for c in conns:
                    if (
                        (c["path"] or "").endswith("/converse-stream")
                        and c["closedAt"] is not None
                        and known.get(c["id"]) is None
                        and c["closedAt"] >= res.t_close_wall * 1000 - 1000
                    ):
                        closed_at = c["closedAt"]
                        break
                else:
                    await trio.sleep(0.02)
        if closed_at is None:
            failures.append("upstream connection not closed within 5 s")
        elif i > 0:  # the first is a warm-up (aiobotocore client, first connection)
            delays.append(closed_at / 1000 - res.t_close_wall)
    return {
        "disconnects": n,
        "closeP50Ms": ms(pct(delays, 50)),
        "closeP99Ms": ms(pct(delays, 99)),
        "closeMaxMs": ms(max(delays)) if delays else math.nan,
        "failures": len(failures),
        "failureSamples": failures[:5],
    }


# -- driver ---------------------------------------------------------------------------------


def run_phase(fn: Callable[..., Any], *args: Any) -> Any:
    return trio.run(fn, *args)


def report(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    if fb := results.get("firstByte"):
        c = fb["cpu"] or {}
        rows += [
            (
                "first byte p50 / p99",
                f"{fmt(fb['firstByteP50Ms'])} / {fmt(fb['firstByteP99Ms'])} ms",
                f"{fb['streams']} sequential streams; target <= 1.5 / 5 ms",
            ),
            (
                "first chunk p50 / p99",
                f"{fmt(fb['firstChunkP50Ms'])} / {fmt(fb['firstChunkP99Ms'])} ms",
                f"TTFT 0; done p50 {fmt(fb['doneP50Ms'])} ms; connect p50 {fmt(fb['connectP50Ms'])} ms",
            ),
            (
                "  cpu",
                f"srv {fmt(c.get('serverCpuPct'))}% cli {fmt(c.get('clientCpuPct'))}%",
                f"failures {fb['failures']}",
            ),
        ]
    if up := results.get("unpaced"):
        rows.append(
            (
                "unpaced events/s (median)",
                fmt(up["eventsPerSMedian"]),
                f"best {fmt(up['eventsPerSBest'])}; {fmt(up['eventsPerStream'])} events; "
                f"target >= 150,000; failures {up['failures']}",
            )
        )
        for i, r in enumerate(up["runs"]):
            c = r["cpu"]
            rows.append(
                (
                    f"  run {i + 1}",
                    fmt(r["eventsPerS"]),
                    f"{r['wallS']} s; srv cpu {fmt(c['serverCpuS'])} s "
                    f"({fmt(c['serverCpuPct'])}%), cli cpu {fmt(c['clientCpuS'])} s "
                    f"({fmt(c['clientCpuPct'])}%)",
                )
            )
    for cc in results.get("concurrent", []):
        n = cc["streams"]
        c = cc["cpu"]
        rows += [
            (
                f"{n} x {fmt(cc['rate'])}/s: all headers",
                f"{fmt(cc['allHeadersS'])} s",
                f"all first chunks {fmt(cc['allFirstChunkS'])} s; open window {cc['openWindow']}; "
                f"headers p99 {fmt(cc['headersP99Ms'])} ms",
            ),
            (
                "  events/s all live",
                fmt(cc["eventsPerSAllLive"]),
                f"target {fmt(cc['eventsPerSTarget'])}; overall {fmt(cc['eventsPerSOverall'])}; "
                f"chunks {fmt(cc['chunks'])}/{fmt(cc['expectedChunks'])}",
            ),
            (
                "  lateness p50 / p99 / max",
                f"{fmt(cc['latenessP50Ms'])} / {fmt(cc['latenessP99Ms'])} / {fmt(cc['latenessMaxMs'])} ms",
                f"failures {cc['failures']} {'; '.join(cc['failureSamples'])}",
            ),
            (
                "  max live at once",
                f"{fmt(cc['maxLive'])} / {fmt(n)}",
                "streams open and streaming at the same moment",
            ),
            (
                "  RSS per stream",
                f"{fmt(cc['rssPerStreamKb'])} KB" + ("" if cc["rssPerStreamExact"] else " ~"),
                f"idle {fmt(cc['rssIdleKb'])} KB, all open {fmt(cc['rssAllOpenKb'])} KB, "
                f"peak {fmt(cc['rssPeakKb'])} KB",
            ),
            (
                "  cpu",
                f"srv {fmt(c['serverCpuPct'])}% cli {fmt(c['clientCpuPct'])}%",
                f"server {fmt(cc['serverCpuPctAllLive'])}% of a core while all live; "
                f"wall {fmt(c['wallS'])} s",
            ),
        ]
        if c["clientCpuPct"] and c["clientCpuPct"] > 70:
            rows.append(
                (
                    "  note",
                    "load generator busy",
                    "client >70% of a core: lateness includes the client's own delay",
                )
            )
    if dc := results.get("disconnect"):
        rows.append(
            (
                "disconnect -> upstream closed p50 / p99",
                f"{fmt(dc['closeP50Ms'])} / {fmt(dc['closeP99Ms'])} ms",
                f"max {fmt(dc['closeMaxMs'])} ms; {dc['disconnects']} streams; "
                f"target p99 <= 5 ms; failures {dc['failures']}",
            )
        )
    print()
    m = results["machine"]
    print(
        f"chinwag streaming benchmark - commit {m.get('commit')}, {m['nproc']} cpus "
        f"({m.get('cpu')}), Python {m['python']}"
    )
    print_table(rows)


def functional_failures(results: dict[str, Any]) -> list[str]:
    bad = []
    if (fb := results.get("firstByte")) and (fb["failures"] or math.isnan(fb["firstChunkP50Ms"])):
        bad.append(f"first byte: {fb['failures']} failures {fb['failureSamples']}")
    if (up := results.get("unpaced")) and (up["failures"] or not up["eventsPerSMedian"]):
        bad.append(f"unpaced: {up['failures']} failures {up['failureSamples']}")
    for cc in results.get("concurrent", []):
        if cc["failures"] or not cc["chunks"]:
            bad.append(
                f"{cc['streams']} concurrent: {cc['failures']} failures {cc['failureSamples']}"
            )
    if (dc := results.get("disconnect")) and (dc["failures"] or math.isnan(dc["closeP50Ms"])):
        bad.append(f"disconnect: {dc['failures']} failures {dc['failureSamples']}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__, "tiny sizes (CI), well under 60 s")
    p.add_argument("--sequential", type=int, default=500, help="streams for first byte")
    p.add_argument("--unpaced-events", type=int, default=200_000)
    p.add_argument("--unpaced-runs", type=int, default=3)
    p.add_argument("--concurrency", default="500,1000,2000", help="comma-separated stream counts")
    p.add_argument("--rate", type=float, default=20.0, help="chunks/s per concurrent stream")
    p.add_argument("--answer-tokens", type=int, default=200, help="chunks per concurrent stream")
    p.add_argument(
        "--open-window",
        type=int,
        default=64,
        help="max stream handshakes in flight while opening (0 = all at once)",
    )
    p.add_argument("--disconnects", type=int, default=100)
    p.add_argument(
        "--only",
        default="first,unpaced,concurrent,disconnect",
        help="comma-separated subset of: first,unpaced,concurrent,disconnect",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (DB, server logs)")
    p.add_argument(
        "--database-url",
        help="run the servers on this PostgreSQL database (CHINWAG_DATABASE_URL) instead of SQLite",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sequential, args.unpaced_events, args.unpaced_runs = 20, 5000, 1
        args.concurrency, args.answer_tokens, args.disconnects = "50", 40, 5
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    only = {x.strip() for x in args.only.split(",")}

    nofile = raise_fd_limit(max(levels, default=0) * 2 + 4096)
    if levels and max(levels) * 2 + 256 > nofile:
        print(f"warning: fd limit {nofile} is low for {max(levels)} streams", file=sys.stderr)

    env = BenchEnv(keep=args.keep, database_url=args.database_url)
    results: dict[str, Any] = {
        "machine": machine(fdLimit=nofile),
        "args": vars(args),
    }
    t0 = time.perf_counter()
    try:
        env.create_user()
        if only & {"first", "unpaced"}:
            srv = start_chinwag(
                env,
                "serve-unpaced",
                CHINWAG_SIM_TTFT_MS="0",
                CHINWAG_SIM_TOKENS_PER_S="0",
                CHINWAG_SIM_ANSWER_TOKENS=str(max(args.unpaced_events, 200)),
            )
            try:
                if "first" in only:
                    print(f"[1] first byte: {args.sequential} sequential streams", flush=True)
                    results["firstByte"] = run_phase(
                        bench_first_byte, srv.port, srv.pid, env.token, args.sequential
                    )
                if "unpaced" in only:
                    print(
                        f"[2] unpaced: {args.unpaced_runs} x {args.unpaced_events:,} events",
                        flush=True,
                    )
                    results["unpaced"] = run_phase(
                        bench_unpaced,
                        srv.port,
                        srv.pid,
                        env.token,
                        args.unpaced_events,
                        args.unpaced_runs,
                    )
            finally:
                srv.stop()
        if "concurrent" in only:
            results["concurrent"] = []
            for n in levels:
                print(
                    f"[3] concurrent: {n} streams x {args.rate:g}/s x {args.answer_tokens} chunks",
                    flush=True,
                )
                srv = start_chinwag(
                    env,
                    f"serve-paced-{n}",
                    CHINWAG_SIM_TTFT_MS="0",
                    CHINWAG_SIM_TOKENS_PER_S=f"{args.rate:g}",
                    CHINWAG_SIM_ANSWER_TOKENS=str(args.answer_tokens),
                )
                try:
                    results["concurrent"].append(
                        run_phase(
                            bench_concurrent,
                            srv.port,
                            srv.pid,
                            env.token,
                            n,
                            args.rate,
                            args.answer_tokens,
                            args.open_window,
                        )
                    )
                finally:
                    srv.stop()
        if "disconnect" in only:
            print(f"[4] disconnect: {args.disconnects} streams via fake-bedrock", flush=True)
            fake = Server(
                env,
                "fake-bedrock",
                {},
                argv=["fake-bedrock", "--port", "0"],
                ready="fake-bedrock listening on",
            )
            try:
                srv = start_chinwag(
                    env,
                    "serve-bedrock",
                    CHINWAG_PROVIDER="bedrock",
                    CHINWAG_BEDROCK_ENDPOINT_URL=f"http://{HOST}:{fake.port}",
                    AWS_ACCESS_KEY_ID="test",
                    AWS_SECRET_ACCESS_KEY="test",
                    AWS_DEFAULT_REGION="us-east-1",
                    AWS_REGION="us-east-1",
                    AWS_CONFIG_FILE="/nonexistent",
                    AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                )
                try:
                    results["disconnect"] = run_phase(
                        bench_disconnect, srv.port, fake.port, env.token, args.disconnects
                    )
                finally:
                    srv.stop()
            finally:
                fake.stop()
    finally:
        env.cleanup()
    return finish(results, t0, report, functional_failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
