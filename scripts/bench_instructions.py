"""chinwag beside its floor in instructions, not seconds: valgrind's callgrind counts them.

    .venv/bin/python scripts/bench_instructions.py --quick        # CI: tiny sizes, ~2 min
    .venv/bin/python scripts/bench_instructions.py [--targets floor-timer,floor-quart,chinwag]
        [--streams 8] [--rate 20] [--window 15] [--sequential 30] [--observers 4] [--json out.json]

Why: CPU seconds on this VM drift by ±20% between runs of the same commit
(BENCHMARKS.md, issue 10), more than the margin of the 1.25 x target, and
the VM exposes no hardware counters. ``valgrind --tool=callgrind`` counts
the instructions a process executes (all its threads), the same count for
the same work whatever else the machine does. It runs the server about 30x
slower, so the loads here are small; the figures are a companion to
``bench_floor.py``'s CPU per event at 250 streams, not a replacement: per
event they include the loop's per-wake-up overhead that many streams would
share.

Each target (``bench_floor.py``'s floors, and ``chinwag serve`` with the
simulated model at ``--rate`` and a 50 ms TTFT) runs once under callgrind,
pinned to the last CPU when there are two. Counters are zeroed
(``callgrind_control -z``) and dumped (``-d``) around three windows:

1. **per stream**: ``--sequential`` streams of 5 events, one after another
   (sessions created before the window): the instructions of a whole stream
   -- connection, request, headers, five paced events, ``done``, settlement,
   close.
2. **per event, one stream at a time**: one stream of ``--events`` events
   and one a quarter as long; the difference of their counts over the
   events between. With one stream live every event is one pass of the
   loop (a timer wake-up, the write), the same in every run, so this is
   the figure to compare changes by.
3. **per event, N streams**: ``--streams`` streams of long answers; once
   all are live, ``--window`` seconds of steady state: instructions /
   events the load generator received meanwhile. Closer to a loaded
   server (a timer pass serves every stream due on its 5 ms grid slot), but
   it moves with where the streams' schedules happen to fall on that grid
   (±15% between runs). "delivered" is the events against what the pacing
   asks (N x rate x window); below 95% valgrind saturated the server and
   its events came coalesced (fewer writes): the row says so.

4. **per observer event** (chinwag only; the floors have no observers):
   one stream of long answers, a ``--window`` with no observer, then
   ``--observers`` supervisors watching it over SSE and the same window
   again. The second window's instructions less the first's (scaled to
   the same events) over the events the observers received in it: what
   one observer costs per event it is sent. At this rate an observer is
   never behind, so that is one write per event.

Reports each target's figures and chinwag ÷ each floor. Needs valgrind
(``apt-get install valgrind``); without it the script says so in one line
and exits 0.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from bench_floor import TTFT_MS, start_floor
from bench_streams import (
    DEFAULT_MODEL,
    BenchEnv,
    Shared,
    create_sessions,
    run_stream,
    start_chinwag,
)
from benchlib import (
    arg_parser,
    finish,
    fmt,
    machine,
    pin,
    pin_cpus,
    print_table,
    wrap_servers,
)

TARGETS = ("floor-timer", "floor-quart", "chinwag")
#: Under callgrind a server takes ~30 s to start here.
START_TIMEOUT_S = 180.0
#: Events per stream in the per-stream window.
SHORT = 5
#: Below this share of the paced events, the per-event window was saturated.
SATURATED = 0.95


def long_answer(rate: float, window: float) -> int:
    """Tokens of an answer that outlasts the per-event window (and the opening)."""
    return int(rate * (window + 60))


class Counter:
    """A callgrind'ed server's instruction counter: zero it, read it."""

    def __init__(self, pid: int, out_dir: Path) -> None:
        self.pid = pid
        self.out_dir = out_dir

    def _control(self, flag: str) -> None:
        subprocess.run(["callgrind_control", flag, str(self.pid)], check=True, capture_output=True)

    def zero(self) -> None:
        self._control("-z")

    def read(self) -> int:
        """Instructions since the last zero (a dump; the newest dump file's totals)."""
        before = set(self.out_dir.iterdir())
        self._control("-d")
        new = [p for p in self.out_dir.iterdir() if p not in before]
        for line in max(new, key=lambda p: p.stat().st_mtime).read_text().splitlines():
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
        raise RuntimeError("callgrind dump without totals")


async def per_stream(
    port: int, token: str, counter: Counter, n: int, events: int = SHORT
) -> dict[str, Any]:
    """``n`` streams of ``events`` events, one after another: instructions per stream."""
    sessions = await create_sessions(port, token, n + 2)
    body = {"message": "Say hello", "modelId": DEFAULT_MODEL, "maxTokens": events}
    for sid in sessions[:2]:  # warm-up
        await run_stream(port, token, sid, {**body, "maxTokens": SHORT}, Shared(), limit_s=60)
    await trio.sleep(1)  # the warm-up's ends settle before the window
    counter.zero()
    failures = 0
    for sid in sessions[2:]:
        res = await run_stream(port, token, sid, body, Shared(), limit_s=60 + events / 5)
        failures += not (res.done and res.chunks == events)
    await trio.sleep(1)  # the last stream's settlement, inside the window
    total = counter.read()
    return {"streams": n, "events": events, "irPerStream": round(total / n), "failures": failures}


async def per_event(
    port: int, token: str, counter: Counter, n: int, rate: float, window: float
) -> dict[str, Any]:
    sessions = await create_sessions(port, token, n)
    body = {
        "message": "Stream to me",
        "modelId": DEFAULT_MODEL,
        "maxTokens": long_answer(rate, window),
    }
    shared = Shared(interval=1 / rate)
    async with trio.open_nursery() as nursery:
        for sid in sessions:
            nursery.start_soon(partial(run_stream, port, token, sid, body, shared, limit_s=600))
        with trio.fail_after(60):
            # bench_streams' counters have no event to wait for; sampled, as its sampler does
            while shared.live < n or shared.chunks < 2 * n:  # noqa: ASYNC110
                await trio.sleep(0.1)
        await trio.sleep(2)
        counter.zero()
        c0, t0 = shared.chunks, time.perf_counter()
        await trio.sleep(window)
        total = counter.read()
        c1, t1 = shared.chunks, time.perf_counter()
        nursery.cancel_scope.cancel()
    events = c1 - c0
    asked = n * rate * (t1 - t0)
    return {
        "streams": n,
        "rate": rate,
        "windowS": round(t1 - t0, 2),
        "events": events,
        "delivered": round(events / asked, 3) if asked else 0.0,
        "irPerEvent": round(total / events) if events else None,
    }


async def _observe(port: int, token: str, session_id: str, counts: list[int], i: int) -> None:
    """A supervisor watching ``session_id`` over SSE: ``counts[i]``, the events it got."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        f"GET /api/chat/sessions/{session_id}/observe HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    tail = b""
    async with stream:
        while data := await stream.receive_some(65536):
            counts[i] += (tail + data).count(b"\nid: ")  # the tail is too short to hold one
            tail = data[-4:]


async def per_observer_event(
    port: int,
    token: str,
    supervisor: str,
    counter: Counter,
    observers: int,
    rate: float,
    window: float,
) -> dict[str, Any]:
    """(A window with ``observers`` watching - one without) / the events they got."""
    (sid,) = await create_sessions(port, token, 1)
    body = {"message": "Watch me", "modelId": DEFAULT_MODEL, "maxTokens": long_answer(rate, window)}
    shared = Shared(interval=1 / rate)
    counts = [0] * observers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(run_stream, port, token, sid, body, shared, limit_s=600))
        with trio.fail_after(60):
            while shared.chunks < 10:  # noqa: ASYNC110  (sampled, as per_event does)
                await trio.sleep(0.1)
        counter.zero()
        c0 = shared.chunks
        await trio.sleep(window)
        alone, events_alone = counter.read(), shared.chunks - c0
        for i in range(observers):
            nursery.start_soon(_observe, port, supervisor, sid, counts, i)
        with trio.fail_after(120):
            while min(counts) < 2 * rate:  # noqa: ASYNC110  every observer live for ~2 s
                await trio.sleep(0.1)
        counter.zero()
        c1, o1 = shared.chunks, sum(counts)
        await trio.sleep(window)
        watched, events = counter.read(), shared.chunks - c1
        sent = sum(counts) - o1
        nursery.cancel_scope.cancel()
    extra = watched - alone * events / events_alone if events_alone else 0
    return {
        "observers": observers,
        "events": events,
        "observerEvents": sent,
        "delivered": round(sent / (events * observers), 3) if events else 0.0,
        "irPerObserverEvent": round(extra / sent) if sent else None,
    }


def run_target(env: BenchEnv, target: str, args: Any, out_dir: Path) -> dict[str, Any]:
    if target == "chinwag":
        srv = start_chinwag(
            env,
            "chinwag-ir",
            CHINWAG_SIM_TTFT_MS=str(TTFT_MS),
            CHINWAG_SIM_TOKENS_PER_S=f"{args.rate:g}",
            CHINWAG_SIM_ANSWER_TOKENS=str(long_answer(args.rate, args.window)),
        )
    else:
        srv = start_floor(env, f"{target}-ir", target, args.rate, args.grid_ms)
    counter = Counter(srv.pid, out_dir)
    try:
        stream = trio.run(per_stream, srv.port, env.token, counter, args.sequential)
        # One stream at a time, each event is one pass of the loop whatever the run:
        # the difference of two long streams' counts.
        short = trio.run(per_stream, srv.port, env.token, counter, 1, args.events // 4)
        longer = trio.run(per_stream, srv.port, env.token, counter, 1, args.events)
        event = trio.run(
            per_event, srv.port, env.token, counter, args.streams, args.rate, args.window
        )
        observer = None
        if target == "chinwag" and args.observers:
            observer = trio.run(
                per_observer_event,
                srv.port,
                env.token,
                env.supervisor,
                counter,
                args.observers,
                args.rate,
                args.window,
            )
    finally:
        srv.stop()
    stream["irPerEventAlone"] = round(
        (longer["irPerStream"] - short["irPerStream"]) / (longer["events"] - short["events"])
    )
    stream["failures"] += short["failures"] + longer["failures"]
    return {"perStream": stream, "perEvent": event, "perObserverEvent": observer}


def report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\ninstructions (callgrind Ir, all threads) - commit {m['commit']}, {m['nproc']} cpus "
        f"({m['cpu']}), Python {m['python']}"
    )
    targets = results["targets"]
    rows: list[tuple[str, str, str]] = []
    for name, r in targets.items():
        e, s = r["perEvent"], r["perStream"]
        note = f"{e['events']:,} events in {e['windowS']:g} s, delivered {e['delivered']:.0%}"
        if e["delivered"] < SATURATED:
            note += " SATURATED (coalesced)"
        rows.append(
            (
                f"{name}: per event, one stream at a time",
                fmt(s["irPerEventAlone"]),
                "(a long stream - a quarter as long) / the events between",
            )
        )
        rows.append((f"{name}: per event ({e['streams']} streams)", fmt(e["irPerEvent"]), note))
        rows.append(
            (
                f"{name}: per stream of {SHORT} events",
                fmt(s["irPerStream"]),
                f"{s['streams']} sequential; failures {s['failures']}",
            )
        )
        if o := r.get("perObserverEvent"):
            rows.append(
                (
                    f"{name}: per observer event ({o['observers']} observers)",
                    fmt(o["irPerObserverEvent"]),
                    f"{o['observerEvents']:,} sent, {o['delivered']:.0%} of "
                    f"{o['events']:,} events x {o['observers']}",
                )
            )
    for floor in (t for t in targets if t != "chinwag"):
        if "chinwag" not in targets:
            break
        c, f = targets["chinwag"], targets[floor]
        for what, key, sub in (
            ("event, alone", "irPerEventAlone", "perStream"),
            ("event", "irPerEvent", "perEvent"),
            ("stream", "irPerStream", "perStream"),
        ):
            if c[sub][key] and f[sub][key]:
                rows.append(
                    (f"chinwag / {floor}, per {what}", f"{c[sub][key] / f[sub][key]:.2f} x", "")
                )
    print_table(rows)


def failures(results: dict[str, Any]) -> list[str]:
    bad = []
    for name, r in results.get("targets", {}).items():
        if r["perStream"]["failures"]:
            bad.append(f"{name}: {r['perStream']['failures']} sequential streams failed")
        if not r["perEvent"]["events"]:
            bad.append(f"{name}: no events in the per-event window")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__ or "", "tiny sizes (CI): 2 targets, 2 streams, 3 s, 3 sequential")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    p.add_argument("--streams", type=int, default=8, help="streams in the per-event window")
    p.add_argument("--rate", type=float, default=20.0, help="events per second per stream")
    p.add_argument("--window", type=float, default=15.0, help="seconds of the per-event window")
    p.add_argument("--sequential", type=int, default=30, help="streams in the per-stream window")
    p.add_argument("--events", type=int, default=400, help="the long stream's events (alone)")
    p.add_argument("--observers", type=int, default=4, help="observers in their window (0: none)")
    p.add_argument("--grid-ms", type=float, default=5.0, help="the floors' timer grid")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (dumps, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.targets, args.streams, args.window, args.sequential = "floor-quart,chinwag", 2, 3, 3
        args.events, args.observers = 40, 2
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("bench_instructions: valgrind is not installed (apt-get install valgrind): skipped")
        return 0
    if (cpus := pin_cpus()) is not None:
        pin(*cpus)
    t0 = time.perf_counter()
    env = BenchEnv(keep=args.keep)
    out_dir = env.dir / "callgrind"
    out_dir.mkdir()
    wrap_servers(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/out.%p"],
        START_TIMEOUT_S,
    )
    results: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args),
        "targets": {},
    }
    try:
        env.create_user()
        env.supervisor = env.add_user("watcher", "watcher-password", "supervisor")
        for target in targets:
            print(f"[instructions] {target} under callgrind", flush=True)
            results["targets"][target] = run_target(env, target, args, out_dir)
    finally:
        env.cleanup()
    return finish(results, t0, report, failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
