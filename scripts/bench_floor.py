"""chinwag beside its floor: the same Hypercorn, the same pacing, the same load generator.

    .venv/bin/python scripts/bench_floor.py --quick              # CI: tiny sizes, < 60 s
    .venv/bin/python scripts/bench_floor.py [--streams 250,500,1000] [--rate 20]
        [--seconds 30] [--targets floor-sleep,floor-timer,floor-quart,chinwag] [--grid-ms 5]
        [--repeat 1] [--sequential 300] [--pin]
        [--only micro,streams] [--profile DIR] [--json benchmarks/floor.json]

"The floor" is what this stack costs before chinwag does anything: a bare
ASGI app (no Quart) served by ``hypercorn.trio.serve`` with chinwag's own
Hypercorn configuration (``server.serving.hypercorn_config``) and garbage
collector settings (``tune_gc``, ``freeze_heap``), one task per
connection, answering a POST like chinwag's stream endpoint: SSE headers,
``: connected``, a TTFT (50 ms), then one ~60-byte event per write
(``id: n`` / ``event: chunk`` / ``data: {"text":" word"}``) paced at
``--rate`` per second on an absolute schedule, then ``done``. Two pacings:

- ``floor-sleep``: ``trio.sleep_until`` per chunk (a cancel scope per wait);
- ``floor-timer``: one timer task for the process (``server.timers.Timers``,
  deadlines on a ``--grid-ms`` grid).

and ``floor-quart``: the same routes as a Quart-Trio app (timer pacing), the
floor of the stack as the design card fixes it (``--app quart``).

It also answers ``POST /api/chat/sessions`` (201 and an id), so the one load
generator drives it exactly as it drives chinwag. This script runs itself as
that server (``bench_floor.py floor-serve``) in a child process.

For each N in ``--streams``, each target gets a fresh server, then N streams
of ``rate x seconds`` chunks, opened at once (at most ``--open-window``
handshakes in flight), driven by ``bench_streams``' load generator
(``bench_concurrent``: raw sockets, one process). ``chinwag`` is a real
``chinwag serve`` with ``CHINWAG_SIM_TOKENS_PER_S=--rate``,
``CHINWAG_SIM_TTFT_MS=50`` and a user with ample credits. Per target:

- server CPU (% of one core) and CPU per delivered event (µs), over the
  window where all N streams were live (else over the whole run, flagged
  ``~``: chinwag's is then the per-stream setup and settle cost included);
- events/s delivered vs asked (``N x rate``), time until all N had their
  headers (all open) and their first chunk;
- lateness of each chunk against its stream's own schedule (the first
  chunk's arrival + k / rate) p50/p99/max — a late first chunk makes the
  rest look early, so p50 may be a little negative — and failed streams;
- the share of wall time each process was runnable but had no CPU (from
  ``/proc/PID/task/*/schedstat``): above 5% the row says NOISY, the
  machine's other load is in the figures;
- chinwag ÷ each floor: CPU per event and lateness p99.

``--pin``: each server on the last CPU, the load generator on the others
(``benchlib.pin``), so that neither takes the other's core.

``--baseline REV``: also runs chinwag as it was at REV (a temporary git
worktree), as the target ``chinwag-base``, beside the others in every
round: chinwag ÷ chinwag-base is the A/B of the changes since REV, paired
per round like the floors' ratios (the VM's drift falls on both alike).

``--repeat N``: N rounds per stream count, every target once per round in
turn, so that a drift of the machine's speed (±15% between runs here) falls
on all of them alike; each figure is the median of its runs, and a ratio is
the median of the rounds' own ratios (paired within a round).

Targets (issue 10), reported, never an exit status: at 250 x 20/s chinwag's
CPU per event <= 1.25 x the floor's; at 500 x 20/s all open within 3 s,
lateness p99 <= 50 ms, 0 failures; at 1,000 x 20/s all open within 10 s.

``micro`` (in-process, no HTTP): 500 tasks waking 20 times a second for 5 s,
``trio.sleep_until`` per wake-up vs ``Timers.sleep_until``: CPU µs per
wake-up and lateness.

``--profile DIR``: while chinwag is at full load, ``py-spy record`` (if
installed; ``--nonblocking``, ``--profile-rate`` Hz, 100 by default)
samples the server for the all-live window; the collapsed stacks go to DIR and the top frames are printed.

The server and the load generator share the machine's cores: the load
generator's own CPU is reported. Exit status: 1 if something is
functionally broken (a failed stream, no events), never because of speed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import trio
from bench_streams import (
    STREAM_SLACK_S,
    BenchEnv,
    bench_concurrent,
    bench_first_byte,
)
from benchlib import (
    ROOT,
    Server,
    arg_parser,
    finish,
    fmt,
    machine,
    ms,
    pct,
    pin,
    pin_cpus,
    print_table,
    raise_fd_limit,
    sched_wait_s,
)

TARGETS = ("floor-sleep", "floor-timer", "floor-quart", "floor-relay", "chinwag", "chinwag-base")
#: What chinwag's ratios are taken against, in the report's order.
BASES = ("floor-timer", "floor-quart", "floor-relay", "floor-sleep", "chinwag-base")
TTFT_MS = 50
FLOOR_READY = "floor listening on"
LINE_NO = re.compile(r":\d+\)$")

#: A process that spent more than this share of the wall time runnable but
#: without a CPU measured the machine's other load, not itself.
NOISY_RUNQ_PCT = 5.0

# Issue 10's targets, by stream count.
CPU_RATIO_TARGET = 1.25  # at 250 streams
OPEN_TARGET_S = {500: 3.0, 1000: 10.0}
LATENESS_P99_TARGET_MS = {500: 50.0}


# -- the floor server (child process: ``bench_floor.py floor-serve``) ----------------------------

_WORDS = [b"the", b"stream", b"of", b"tokens", b"arrives", b"in", b"order", b"and", b"every"]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-store, must-revalidate"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]

Sleep = Callable[[float], Awaitable[None]]


def _chunk(k: int) -> bytes:
    return b'id: %d\nevent: chunk\ndata: {"text":" %s"}\n\n' % (k, _WORDS[k % len(_WORDS)])


def _done(tokens: int) -> bytes:
    return b'id: %d\nevent: done\ndata: {"outputTokens":%d,"finishReason":"stop"}\n\n' % (
        tokens + 1,
        tokens,
    )


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def floor_app(sleep_until: Sleep, rate: float, ttft_s: float) -> Callable[..., Awaitable[None]]:
    """The bare ASGI app: chinwag's two routes that the load generator uses, nothing else.

    It does not watch for a client's disconnect: the load generator reads
    every stream to its end, and a stream to a gone client merely runs out.
    """
    interval = 1 / rate
    session_ids = itertools.count(1)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        path = scope["path"]
        if scope["method"] == "POST" and path == "/api/chat/sessions":
            payload = json.dumps({"sessionId": str(next(session_ids))}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 201,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        if scope["method"] != "POST" or not path.endswith("/stream"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        tokens = int(json.loads(body or b"{}").get("maxTokens", 200))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})
        # Paced on an absolute schedule (as the simulated model is): lateness
        # does not accumulate, and a chunk already due is sent without a wait.
        deadline = trio.current_time() + ttft_s
        await sleep_until(deadline)
        for k in range(1, tokens + 1):
            deadline += interval
            await sleep_until(deadline)
            await send({"type": "http.response.body", "body": _chunk(k), "more_body": True})
        await send({"type": "http.response.body", "body": _done(tokens), "more_body": False})

    return app


def relay_floor_app(
    sleep_until: Sleep, rate: float, ttft_s: float, nursery: trio.Nursery
) -> Callable[..., Awaitable[None]]:
    """The bare app with chinwag's shape: two tasks per stream, two wake-ups per event.

    A producer task (in a nursery of the server's, not the connection's)
    paces the chunks into a list and wakes the connection's task parked on
    a ``ParkingLot``, which writes everything pending in one ``send``. Set
    against ``floor-timer`` it prices the second task switch alone.
    """
    interval = 1 / rate
    bare = floor_app(sleep_until, rate, ttft_s)

    async def produce(tokens: int, pending: list[bytes], lot: trio.lowlevel.ParkingLot) -> None:
        deadline = trio.current_time() + ttft_s
        await sleep_until(deadline)
        for k in range(1, tokens + 1):
            deadline += interval
            await sleep_until(deadline)
            pending.append(_chunk(k))
            lot.unpark_all()
        pending.append(b"")  # the end
        lot.unpark_all()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/stream"):
            return await bare(scope, receive, send)
        body = await _read_body(receive)
        tokens = int(json.loads(body or b"{}").get("maxTokens", 200))
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})
        pending: list[bytes] = []
        lot = trio.lowlevel.ParkingLot()
        nursery.start_soon(produce, tokens, pending, lot)
        while True:
            if not pending:
                await lot.park()
            wire = b"".join(pending)
            ended = pending[-1] == b""
            pending.clear()
            if ended:
                break
            await send({"type": "http.response.body", "body": wire, "more_body": True})
        await send({"type": "http.response.body", "body": wire + _done(tokens), "more_body": False})

    return app


class _Watched:
    """One stream of the fan-out floor: its events so far (event k at index k - 1),
    and the lot its observers park on until there are more."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.ended = False
        self.lot = trio.lowlevel.ParkingLot()


def fanout_floor_app(
    sleep_until: Sleep, rate: float, ttft_s: float
) -> Callable[..., Awaitable[None]]:
    """The bare app with observers (``bench_observe.py --target floor-fanout``): the
    floor of a stream's fan-out on this stack.

    The stream route writes its chunks as the bare app does, keeps each, and
    wakes every parked observer (``ParkingLot.unpark_all``) per chunk.
    ``GET …/observe`` writes what chinwag's feed starts with (``observer``
    connected, ``history-start``, the events so far, ``history-end``), then
    parks and, at each wake-up, writes every event it has not had in one
    ``send``, to ``done``: one task per observer, woken by each publish, and
    observers that fall behind coalesce, as chinwag's. Nothing else: no
    auth, no database, no ring bound, no heartbeats, no cap on the readers
    let through per scheduler pass.
    """
    interval = 1 / rate
    bare = floor_app(sleep_until, rate, ttft_s)
    streams: dict[str, _Watched] = {}
    started: dict[str, trio.Event] = {}  # sessions observers wait on (``?wait=``)

    async def stream(session_id: str, tokens: int, send: Any) -> None:
        watched = streams[session_id] = _Watched()
        if session_id in started:
            started.pop(session_id).set()
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})
        deadline = trio.current_time() + ttft_s
        await sleep_until(deadline)
        for k in range(1, tokens + 2):
            if k <= tokens:
                deadline += interval
                await sleep_until(deadline)
            event = _chunk(k) if k <= tokens else _done(tokens)
            watched.events.append(event)
            watched.ended = k > tokens
            watched.lot.unpark_all()
            await send(
                {"type": "http.response.body", "body": event, "more_body": not watched.ended}
            )

    async def observe(session_id: str, wait: bool, send: Any) -> None:
        watched = streams.get(session_id)
        if watched is None and not wait:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await send({"type": "http.response.body", "body": b": connected\n\n", "more_body": True})
        if watched is None:
            waiting = b'event: observer\ndata: {"status":"waiting","sessionId":"%s"}\n\n'
            body = waiting % session_id.encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            await started.setdefault(session_id, trio.Event()).wait()
            watched = streams[session_id]
        events = watched.events
        sent = len(events)
        connected = json.dumps(
            {"status": "connected", "sessionId": session_id, "observers": len(watched.lot)}
        )
        head = (
            b"event: observer\ndata: %s\n\n"
            b'event: history-start\ndata: {"count":%d,"fromId":1}\n\n'
            % (connected.encode(), sent)
            + b"".join(events)
            + b'event: history-end\ndata: {"lastId":%d}\n\n' % sent
        )
        await send({"type": "http.response.body", "body": head, "more_body": True})
        while not (watched.ended and sent == len(events)):
            if sent == len(events):
                await watched.lot.park()
            wire = b"".join(events[sent:])
            sent = len(events)
            await send({"type": "http.response.body", "body": wire, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.endswith(("/stream", "/observe")):
            return await bare(scope, receive, send)
        session_id = path.split("/")[-2]
        if path.endswith("/observe"):
            return await observe(session_id, b"wait=" in scope["query_string"], send)
        body = await _read_body(receive)
        await stream(session_id, int(json.loads(body or b"{}").get("maxTokens", 200)), send)

    return app


def quart_floor_app(sleep_until: Sleep, rate: float, ttft_s: float) -> Any:
    """The same two routes as a Quart-Trio app: what Quart's request layer adds.

    The stream route is a plain ``Response`` over a generator, as chinwag's
    is; nothing else (no auth, no database, no hooks).
    """
    from quart import Response, request
    from quart_trio import QuartTrio

    interval = 1 / rate
    session_ids = itertools.count(1)
    app = QuartTrio("floor")

    @app.post("/api/chat/sessions")
    async def create_session() -> Any:
        return {"sessionId": str(next(session_ids))}, 201

    @app.post("/api/chat/sessions/<session_id>/stream")
    async def stream(session_id: str) -> Response:
        tokens = int((await request.get_json() or {}).get("maxTokens", 200))

        async def events() -> Any:
            yield b": connected\n\n"
            deadline = trio.current_time() + ttft_s
            await sleep_until(deadline)
            for k in range(1, tokens + 1):
                deadline += interval
                await sleep_until(deadline)
                yield _chunk(k)
            yield _done(tokens)

        response = Response(events(), headers={k.decode(): v.decode() for k, v in _SSE_HEADERS})
        response.timeout = None
        return response

    return app


def floor_serve(argv: list[str]) -> int:
    """``floor-serve --pacing sleep|timer [--app bare|quart]``: a floor app on chinwag's
    Hypercorn config."""
    import argparse

    p = argparse.ArgumentParser(prog="bench_floor.py floor-serve")
    p.add_argument("--pacing", choices=("sleep", "timer"), required=True)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--ttft-ms", type=float, default=TTFT_MS)
    p.add_argument("--grid-ms", type=float, default=5.0)
    p.add_argument("--app", choices=("bare", "quart", "relay", "fanout"), default="bare")
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from hypercorn.trio import serve

    from server.serving import TIMER_PER_PASS, freeze_heap, hypercorn_config, tune_gc
    from server.settings import Settings
    from server.timers import Timers

    tune_gc()  # the process as `chinwag serve` sets it up, so the ratio is chinwag's own code

    settings = Settings.from_env()
    config = hypercorn_config(settings)

    async def shutdown_trigger() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        config.graceful_timeout = 1.0  # idle keep-alive connections only, by now

    async def main() -> None:
        timers = Timers(grid=args.grid_ms / 1000, per_pass=TIMER_PER_PASS)
        sleep_until: Sleep = timers.sleep_until if args.pacing == "timer" else trio.sleep_until
        async with trio.open_nursery() as nursery:
            if args.app == "relay":
                app = relay_floor_app(sleep_until, args.rate, args.ttft_ms / 1000, nursery)
            else:
                make = {"quart": quart_floor_app, "fanout": fanout_floor_app}.get(
                    args.app, floor_app
                )
                app = make(sleep_until, args.rate, args.ttft_ms / 1000)
            if args.pacing == "timer":
                await nursery.start(timers.run)

            async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve(
                    app,
                    config,
                    shutdown_trigger=shutdown_trigger,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # the timer service too

            binds = await nursery.start(serving)
            freeze_heap()
            print(f"{FLOOR_READY} {' '.join(binds)} (pacing={args.pacing})", flush=True)

    trio.run(main)
    return 0


def start_floor(
    env: BenchEnv,
    name: str,
    target: str,
    rate: float,
    grid_ms: float,
    ttft_ms: float = TTFT_MS,
) -> Server:
    """The floor ``target`` (floor-sleep, floor-timer, floor-quart) in a child process."""
    pacing = "sleep" if target == "floor-sleep" else "timer"
    command = [
        str(Path(__file__).resolve()),
        "floor-serve",
        "--pacing",
        pacing,
        "--app",
        {"floor-quart": "quart", "floor-relay": "relay", "floor-fanout": "fanout"}.get(
            target, "bare"
        ),
        "--rate",
        f"{rate:g}",
        "--ttft-ms",
        f"{ttft_ms:g}",
        "--grid-ms",
        f"{grid_ms:g}",
    ]
    return Server(env, name, {}, ready=FLOOR_READY, command=command)


# -- micro: 500 tasks waking 20 times a second, trio vs one timer task ---------------------------


async def micro_run(
    mode: str, tasks: int, rate: float, seconds: float, grid: float
) -> dict[str, Any]:
    """``tasks`` tasks, each waking ``rate`` times a second (phases spread) for ``seconds``."""
    sys.path.insert(0, str(ROOT))
    from server.timers import Timers

    timers = Timers(grid=grid)
    sleep_until: Sleep = timers.sleep_until if mode == "timers" else trio.sleep_until
    interval = 1 / rate
    late = array("d")
    now = trio.current_time

    async def one(i: int, start: float, end: float) -> None:
        deadline = start + interval * i / tasks
        while (deadline := deadline + interval) <= end:
            await sleep_until(deadline)
            late.append(now() - deadline)

    async with trio.open_nursery() as nursery:
        if mode == "timers":
            await nursery.start(timers.run)
        start = now() + 0.05
        c0, w0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as waiters:
            for i in range(tasks):
                waiters.start_soon(one, i, start, start + seconds)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        nursery.cancel_scope.cancel()
    stats = timers.statistics()
    return {
        "mode": mode,
        "grid": grid if mode == "timers" else None,
        "tasks": tasks,
        "rate": rate,
        "seconds": seconds,
        "wakeups": len(late),
        "cpuS": round(cpu, 3),
        "cpuPct": round(100 * cpu / wall, 1),
        "cpuUsPerWakeup": round(1e6 * cpu / len(late), 2) if late else None,
        "latenessP50Ms": ms(pct(late, 50)),
        "latenessP99Ms": ms(pct(late, 99)),
        "passes": stats.passes if mode == "timers" else None,
    }


def bench_micro(tasks: int, rate: float, seconds: float, grid: float) -> dict[str, Any]:
    runs = [
        trio.run(micro_run, "trio", tasks, rate, seconds, 0.0),
        trio.run(micro_run, "timers", tasks, rate, seconds, grid),
        trio.run(micro_run, "timers", tasks, rate, seconds, 0.0),
    ]
    base = runs[0]["cpuUsPerWakeup"]
    for r in runs:
        r["vsTrio"] = round(base / r["cpuUsPerWakeup"], 2) if base and r["cpuUsPerWakeup"] else None
    return {"tasks": tasks, "rate": rate, "seconds": seconds, "runs": runs}


# -- streams: floor (both pacings) and chinwag, one after the other ----------------------------


def summarize(cc: dict[str, Any]) -> dict[str, Any]:
    """The per-target figures the comparison needs, from ``bench_concurrent``'s result."""
    c = cc["cpu"]
    steady = cc["serverCpuPctAllLive"] is not None and cc["eventsPerSAllLive"]
    if steady:
        cpu_pct, events_per_s = cc["serverCpuPctAllLive"], cc["eventsPerSAllLive"]
        us_per_event = 1e4 * cpu_pct / events_per_s
    else:  # never all live at once: the whole run, stream setup and settle included
        cpu_pct, events_per_s = c["serverCpuPct"], cc["eventsPerSOverall"]
        us_per_event = 1e6 * c["serverCpuS"] / cc["chunks"] if cc["chunks"] else math.nan
    return {
        "steady": bool(steady),
        "serverCpuPct": cpu_pct,
        "cpuUsPerEvent": round(us_per_event, 1),
        "cpuUsPerEventRun": round(1e6 * c["serverCpuS"] / cc["chunks"], 1)
        if cc["chunks"]
        else None,
        "eventsPerS": events_per_s,
        "eventsPerSTarget": cc["eventsPerSTarget"],
        "allOpenS": cc["allHeadersS"],
        "allFirstChunkS": cc["allFirstChunkS"],
        "latenessP50Ms": cc["latenessP50Ms"],
        "latenessP99Ms": cc["latenessP99Ms"],
        "latenessMaxMs": cc["latenessMaxMs"],
        "failures": cc["failures"],
        "clientCpuPct": c["clientCpuPct"],
        "runqWaitPct": cc["runqWait"]["serverPct"],
        "clientRunqWaitPct": cc["runqWait"]["clientPct"],
    }


def ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(float(a) / float(b), 2)


def targets_for(n: int, level: dict[str, Any]) -> list[tuple[str, bool]]:
    """Issue 10's targets that apply at ``n`` streams: (description, met)."""
    cw = level["targets"].get("chinwag")
    if cw is None:
        return []
    s = cw["summary"]
    out = []
    r = level["ratios"].get("cpuPerEventVsFloorTimer")
    if n == 250 and r is not None:
        what = f"cpu/event <= {CPU_RATIO_TARGET} x floor"
        rounds = [
            x for x in level["ratios"].get("cpuPerEventVsFloorTimerRounds") or [] if x is not None
        ]
        if rounds and min(rounds) <= CPU_RATIO_TARGET < max(rounds):
            # One round's ratio is noisy (the VM drifts): say when they disagree.
            what += f"; rounds {min(rounds):.2f}-{max(rounds):.2f} on both sides: not conclusive"
        out.append((what, r <= CPU_RATIO_TARGET))
    if n in OPEN_TARGET_S:
        out.append((f"all open <= {OPEN_TARGET_S[n]:g} s", s["allOpenS"] <= OPEN_TARGET_S[n]))
    if n in LATENESS_P99_TARGET_MS:
        out.append(
            (
                f"lateness p99 <= {LATENESS_P99_TARGET_MS[n]:g} ms",
                s["latenessP99Ms"] <= LATENESS_P99_TARGET_MS[n],
            )
        )
        out.append(("0 failures", s["failures"] == 0))
    return out


class Profiler:
    """``py-spy record`` on a server for a while (collapsed stacks), if py-spy is installed."""

    def __init__(self, out_dir: Path, name: str, pid: int, seconds: float, rate: int = 100) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.path = out_dir / f"{name}.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        if not Path(exe).exists():
            print("  (py-spy not installed: no profile)", flush=True)
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._err = open(out_dir / f"{name}.err", "wb")  # noqa: SIM115 (closed in top())
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                str(rate),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )

    def top(self, n: int = 15) -> dict[str, Any] | None:
        """Wait for py-spy; the top frames by own time and by inclusive time (% of samples)."""
        if self.proc is None:
            return None
        self.proc.wait(timeout=600)
        self._err.close()
        if self.proc.returncode != 0 or not self.path.exists():
            err = Path(self._err.name).read_text(errors="replace").strip()[-300:]
            print(f"  (py-spy failed: {err})", flush=True)
            return None
        own: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        for line in self.path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            k = int(count)
            # "func (file:line)" -> "func (file)": one row per function.
            frames = [LINE_NO.sub(")", f) for f in stack.split(";")]
            total += k
            own[frames[-1]] += k
            for frame in set(frames):
                incl[frame] += k
        if not total:
            return None
        # Inclusive: leave out the root chain (runpy, main, trio.run, ...), in
        # (nearly) every sample. Sampling without pausing the process sometimes
        # gets a partial stack: inclusive shares are lower bounds.
        root = max(incl.values()) * 0.95
        incl = Counter({f: k for f, k in incl.items() if k < root})

        def share(c: Counter[str]) -> list[tuple[str, float]]:
            return [(f, round(100 * k / total, 1)) for f, k in c.most_common(n)]

        return {
            "samples": total,
            "file": str(self.path),
            "own": share(own),
            "inclusive": share(incl),
        }


def start_profiler(
    into: list[Profiler], out_dir: Path, name: str, seconds: float, rate: int, pid: int
) -> None:
    into.append(Profiler(out_dir, name, pid, seconds, rate))


async def measure(
    port: int,
    pid: int,
    token: str,
    n: int,
    rate: float,
    tokens: int,
    window: int,
    profile: Callable[[int], None] | None,
) -> dict[str, Any]:
    """``bench_concurrent``, plus the time both processes waited for a CPU.

    ``profile(pid)`` (if given) is called once every stream should be open.
    """
    wall0, srv0, cli0 = time.perf_counter(), sched_wait_s(pid), sched_wait_s()
    async with trio.open_nursery() as nursery:
        if profile is not None:

            async def later() -> None:
                await trio.sleep(min(3 + n / 150, tokens / rate / 3))
                profile(pid)

            nursery.start_soon(later)
        result = await bench_concurrent(port, pid, token, n, rate, tokens, window)
        nursery.cancel_scope.cancel()
    wall = time.perf_counter() - wall0
    result["runqWait"] = {
        "serverPct": round(100 * (sched_wait_s(pid) - srv0) / wall, 1),
        "clientPct": round(100 * (sched_wait_s() - cli0) / wall, 1),
    }
    return result


def bench_first(env: BenchEnv, args: Any) -> dict[str, Any]:
    """Request → first byte, ``--sequential`` streams one after another, per target.

    No TTFT and no pacing (the first byte is the headers and ``: connected``,
    flushed before any upstream call); each stream is 5 chunks.
    """
    out: dict[str, Any] = {"streams": args.sequential, "targets": {}}
    for target in args.targets:
        print(f"[first] {target}: {args.sequential} sequential streams", flush=True)
        if target.startswith("chinwag"):
            srv = Server(
                env,
                f"{target}-first",
                {"CHINWAG_SIM_TTFT_MS": "0", "CHINWAG_SIM_TOKENS_PER_S": "0"},
                cwd=args.baseline_dir if target == "chinwag-base" else None,
            )
        else:
            srv = start_floor(env, f"{target}-first", target, 100_000, args.grid_ms, ttft_ms=0)
        try:
            result = trio.run(bench_first_byte, srv.port, srv.pid, env.token, args.sequential)
        finally:
            srv.stop()
        out["targets"][target] = result
    return out


def run_target(env: BenchEnv, n: int, target: str, args: Any, tokens: int) -> dict[str, Any]:
    """One run of ``target`` at ``n`` streams on a fresh server: its summary, detail, profile."""
    if target.startswith("chinwag"):
        srv = Server(
            env,
            f"{target}-{n}",
            {
                "CHINWAG_SIM_TTFT_MS": str(TTFT_MS),
                "CHINWAG_SIM_TOKENS_PER_S": f"{args.rate:g}",
                "CHINWAG_SIM_ANSWER_TOKENS": str(tokens),
            },
            cwd=args.baseline_dir if target == "chinwag-base" else None,
        )
    else:
        srv = start_floor(env, f"{target}-{n}", target, args.rate, args.grid_ms)
    profilers: list[Profiler] = []
    profile = None
    if args.profile and target in args.profile_targets:
        seconds = max(1.0, tokens / args.rate - (3 + n / 150) - 2)
        profile = partial(
            start_profiler,
            profilers,
            Path(args.profile),
            f"{target}-{n}",
            seconds,
            args.profile_rate,
        )
    try:
        result = trio.run(
            measure,
            srv.port,
            srv.pid,
            env.token,
            n,
            args.rate,
            tokens,
            args.open_window,
            profile,
        )
    finally:
        code = srv.stop()
    entry = {"summary": summarize(result), "detail": result, "exitCode": code}
    if profilers and (top := profilers[0].top()):
        entry["profile"] = top
    return entry


#: Summary figures that are combined over repeated runs by their median.
MEDIAN_FIELDS = (
    "serverCpuPct",
    "cpuUsPerEvent",
    "cpuUsPerEventRun",
    "eventsPerS",
    "allOpenS",
    "allFirstChunkS",
    "latenessP50Ms",
    "latenessP99Ms",
    "latenessMaxMs",
    "clientCpuPct",
    "runqWaitPct",
    "clientRunqWaitPct",
)


def combine(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's repeated runs as one entry: medians, summed failures, the worst detail."""
    if len(entries) == 1:
        return entries[0]
    runs = [e["summary"] for e in entries]
    summary = dict(runs[-1])
    for field in MEDIAN_FIELDS:
        values = [r[field] for r in runs if r.get(field) is not None]
        summary[field] = statistics.median(values) if values else None
    summary["steady"] = all(r["steady"] for r in runs)
    summary["failures"] = sum(r["failures"] for r in runs)
    worst = max(entries, key=lambda e: (e["detail"]["failures"], not e["detail"]["chunks"]))
    return {
        "summary": summary,
        "runs": runs,
        "detail": worst["detail"],
        "exitCode": next((e["exitCode"] for e in entries if e["exitCode"] != 0), 0),
        **({"profile": entries[0]["profile"]} if "profile" in entries[0] else {}),
    }


def bench_level(env: BenchEnv, n: int, args: Any) -> dict[str, Any]:
    """Every target at ``n`` streams, ``--repeat`` rounds, the targets in turn in each round
    (so a drift of the machine's speed falls on all of them alike)."""
    tokens = round(args.rate * args.seconds)
    level: dict[str, Any] = {
        "streams": n,
        "rate": args.rate,
        "seconds": args.seconds,
        "tokens": tokens,
        "repeat": args.repeat,
        "targets": {},
    }
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(args.repeat):
        this: dict[str, dict[str, Any]] = {}
        for target in args.targets:
            round_note = f" (round {i + 1} of {args.repeat})" if args.repeat > 1 else ""
            print(
                f"[streams] {target}: {n} streams x {args.rate:g}/s x {tokens} chunks{round_note}",
                flush=True,
            )
            this[target] = run_target(env, n, target, args, tokens)
        rounds.append(this)
    level["targets"] = {t: combine([r[t] for r in rounds]) for t in args.targets}
    level["ratios"] = {}
    if "chinwag" in args.targets:
        for floor in BASES:
            if floor not in args.targets:
                continue
            suffix = "Vs" + "".join(w.capitalize() for w in floor.split("-"))
            for field, name in (("cpuUsPerEvent", "cpuPerEvent"), ("latenessP99Ms", "latenessP99")):
                # Each round's own ratio, then their median: paired within a round.
                per_round = [
                    ratio(r["chinwag"]["summary"][field], r[floor]["summary"][field])
                    for r in rounds
                ]
                values = [x for x in per_round if x is not None]
                level["ratios"][name + suffix] = (
                    round(statistics.median(values), 2) if values else None
                )
                if args.repeat > 1:
                    level["ratios"][name + suffix + "Rounds"] = per_round
    level["issueTargets"] = [{"target": d, "met": ok} for d, ok in targets_for(n, level)]
    return level


# -- report ----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    if micro := results.get("micro"):
        rows.append(
            (
                f"micro: {micro['tasks']} tasks x {fmt(micro['rate'])}/s x {fmt(micro['seconds'])} s",
                "cpu/wake-up",
                "in-process, no HTTP",
            )
        )
        for r in micro["runs"]:
            name = (
                "trio.sleep_until"
                if r["mode"] == "trio"
                else f"Timers grid {fmt(r['grid'] * 1000)} ms"
            )
            note = (
                f"{fmt(r['wakeups'])} wake-ups, cpu {fmt(r['cpuPct'])}%, lateness p50/p99 "
                f"{fmt(r['latenessP50Ms'])}/{fmt(r['latenessP99Ms'])} ms"
            )
            if r["mode"] == "timers":
                note += f", {fmt(r['passes'])} passes, {fmt(r['vsTrio'])}x less than trio"
            rows.append((f"  {name}", f"{fmt(r['cpuUsPerWakeup'])} µs", note))
    if first := results.get("first"):
        rows.append(
            (
                f"request -> first byte, {fmt(first['streams'])} sequential streams",
                "p50",
                "p99; first chunk p50; server cpu",
            )
        )
        for target, r in first["targets"].items():
            rows.append(
                (
                    f"  {target}",
                    f"{fmt(r['firstByteP50Ms'])} ms",
                    f"{fmt(r['firstByteP99Ms'])} ms; {fmt(r['firstChunkP50Ms'])} ms; "
                    f"{fmt((r['cpu'] or {}).get('serverCpuPct'))}%; failures {r['failures']}",
                )
            )
    for level in results.get("levels", []):
        n = level["streams"]
        rows.append(
            (
                f"{fmt(n)} streams x {fmt(level['rate'])}/s x {fmt(level['seconds'])} s",
                "cpu/event",
                "srv cpu; events/s got/asked; all open; lateness p50/p99/max; failures",
            )
        )
        for target, entry in level["targets"].items():
            s = entry["summary"]
            rows.append(
                (
                    f"  {target}",
                    f"{fmt(s['cpuUsPerEvent'], places=1)} µs" + ("" if s["steady"] else " ~"),
                    f"{fmt(s['serverCpuPct'])}%; {fmt(s['eventsPerS'])}/{fmt(s['eventsPerSTarget'])}; "
                    f"{fmt(s['allOpenS'])} s; {fmt(s['latenessP50Ms'])}/{fmt(s['latenessP99Ms'])}/"
                    f"{fmt(s['latenessMaxMs'])} ms; {s['failures']}"
                    + (
                        f" (load generator {fmt(s['clientCpuPct'])}%)"
                        if (s["clientCpuPct"] or 0) > 70
                        else ""
                    )
                    + (
                        f"; NOISY: waited for a CPU {fmt(s['runqWaitPct'])}% srv / "
                        f"{fmt(s['clientRunqWaitPct'])}% cli"
                        if max(s["runqWaitPct"] or 0, s["clientRunqWaitPct"] or 0) > NOISY_RUNQ_PCT
                        else ""
                    )
                    + (
                        "; runs: "
                        + " / ".join(f"{fmt(x['cpuUsPerEvent'], places=1)}" for x in entry["runs"])
                        + " µs"
                        if "runs" in entry
                        else ""
                    ),
                )
            )
        r = level["ratios"]
        for floor in BASES:
            suffix = "Vs" + "".join(w.capitalize() for w in floor.split("-"))
            if r.get("cpuPerEvent" + suffix) is None:
                continue
            rounds = r.get("cpuPerEvent" + suffix + "Rounds")
            rows.append(
                (
                    f"  chinwag ÷ {floor}",
                    f"{fmt(r['cpuPerEvent' + suffix])} x",
                    f"cpu/event; lateness p99 {fmt(r.get('latenessP99' + suffix))} x"
                    + (
                        f"; median of rounds {' / '.join(fmt(x) for x in rounds)}" if rounds else ""
                    ),
                )
            )
        for t in level["issueTargets"]:
            rows.append(("  target", "met" if t["met"] else "MISSED", t["target"]))
        for target, entry in level["targets"].items():
            if prof := entry.get("profile"):
                rows.append(
                    (f"  {target} profile", f"{fmt(prof['samples'])} samples", prof["file"])
                )
                for kind in ("own", "inclusive"):
                    for frame, share in prof[kind][:10]:
                        rows.append((f"    {kind}", f"{share}%", frame[:100]))
    print()
    m = results["machine"]
    print(
        f"chinwag vs floor - commit {m.get('commit')}, {m['nproc']} cpus ({m.get('cpu')}), "
        f"Python {m['python']}, load average {m.get('loadAvg')}"
        + (
            f", servers pinned to cpu {m['pinned']['server']}, load to {m['pinned']['client']}"
            if m.get("pinned")
            else ""
        )
    )
    print("  (~ = never all live at once: whole run, stream setup and settle included)")
    print_table(rows)


def functional_failures(results: dict[str, Any]) -> list[str]:
    bad = []
    for target, r in results.get("first", {}).get("targets", {}).items():
        if r["failures"] or math.isnan(r["firstByteP50Ms"]):
            bad.append(f"first byte {target}: {r['failures']} failures {r['failureSamples']}")
    for level in results.get("levels", []):
        for target, entry in level["targets"].items():
            d = entry["detail"]
            if d["failures"] or not d["chunks"]:
                bad.append(
                    f"{target} {level['streams']} streams: {d['failures']} failures "
                    f"{d['failureSamples']}"
                )
    for r in results.get("micro", {}).get("runs", []):
        if not r["wakeups"]:
            bad.append(f"micro {r['mode']}: no wake-ups")
    return bad


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["floor-serve"]:
        return floor_serve(argv[1:])
    p = arg_parser(__doc__, "tiny sizes (CI): 20 streams x 2 s, a 1 s micro; well under 60 s")
    p.add_argument("--streams", default="250,500,1000", help="comma-separated stream counts")
    p.add_argument("--rate", type=int, default=20, help="chunks/s per stream")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each stream")
    p.add_argument(
        "--targets",
        default=",".join(t for t in TARGETS if t != "chinwag-base"),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    p.add_argument("--grid-ms", type=float, default=5.0, help="the timer service's grid")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds per stream count, the targets in turn in each (medians; ratios paired per round)",
    )
    p.add_argument("--open-window", type=int, default=64, help="handshakes in flight (0: all)")
    p.add_argument(
        "--only", default="micro,first,streams", help="comma-separated: micro,first,streams"
    )
    p.add_argument("--sequential", type=int, default=300, help="streams for first byte")
    p.add_argument("--micro-tasks", type=int, default=500)
    p.add_argument("--micro-seconds", type=float, default=5.0)
    p.add_argument("--profile", metavar="DIR", help="py-spy the servers (see above)")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument(
        "--profile-targets", default="chinwag", help="comma-separated targets to profile"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (DB, server logs)")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also run chinwag at REV (a git worktree) as chinwag-base, for an A/B (see above)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="run each server on the last CPU and the load generator on the others",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.streams, args.seconds, args.sequential = "20", 2.0, 20
        args.micro_tasks, args.micro_seconds = 100, 1.0
    levels = [int(x) for x in args.streams.split(",") if x.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(args.targets) - set(TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.baseline and "chinwag-base" not in args.targets:
        args.targets.append("chinwag-base")
    if "chinwag-base" in args.targets and not args.baseline:
        p.error("chinwag-base needs --baseline REV")
    only = {x.strip() for x in args.only.split(",")}
    args.profile_targets = {t.strip() for t in args.profile_targets.split(",")}

    nofile = raise_fd_limit(max(levels, default=0) * 2 + 4096)
    pinned = pin_cpus() if args.pin else None
    if pinned is not None:
        pin(*pinned)
    results: dict[str, Any] = {
        "machine": machine(
            fdLimit=nofile,
            loadAvg=" ".join(f"{x:.2f}" for x in os.getloadavg()),
            pinned=None
            if pinned is None
            else {"server": sorted(pinned[0]), "client": sorted(pinned[1])},
        ),
        "args": vars(args),
        "streamSlackS": STREAM_SLACK_S,
    }
    t0 = time.perf_counter()
    with baseline_tree(args.baseline) as args.baseline_dir:
        if args.baseline:
            results["baseline"] = args.baseline
        return run_all(args, results, only, levels, t0)


@contextlib.contextmanager
def baseline_tree(rev: str | None) -> Iterator[Path | None]:
    """A detached git worktree of ``rev`` for the ``chinwag-base`` target (None: no baseline)."""
    if not rev:
        yield None
        return
    where = Path(tempfile.mkdtemp(prefix="chinwag-base-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--quiet", str(where), rev],
        cwd=ROOT,
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)
        shutil.rmtree(where.parent, ignore_errors=True)


def run_all(
    args: Any, results: dict[str, Any], only: set[str], levels: list[int], t0: float
) -> int:
    if "micro" in only:
        print(
            f"[micro] {args.micro_tasks} tasks x {args.rate}/s x {args.micro_seconds:g} s",
            flush=True,
        )
        results["micro"] = bench_micro(
            args.micro_tasks, args.rate, args.micro_seconds, args.grid_ms / 1000
        )
    if {"first", "streams"} & only:
        env = BenchEnv(keep=args.keep)
        try:
            env.create_user()
            if "first" in only:
                results["first"] = bench_first(env, args)
            if "streams" in only and levels:
                results["levels"] = [bench_level(env, n, args) for n in levels]
        finally:
            env.cleanup()
    return finish(results, t0, report, functional_failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
