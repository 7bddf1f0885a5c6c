"""Python calls per event, chinwag beside its floor: what the per-event difference is made of.

    .venv/bin/python scripts/bench_calls.py --quick          # CI: tiny sizes, ~30 s
    .venv/bin/python scripts/bench_calls.py [--targets floor-timer,chinwag] [--streams 50]
        [--seconds 15] [--top 40]
    .venv/bin/python scripts/bench_calls.py --observers 4 [--seconds 20]   # per observer event

Why: CPU per event moves with the VM's speed (BENCHMARKS.md, issue 10) and
``bench_instructions.py`` counts instructions but not where they go by
Python function. Call counts do not drift at all. Each server of a
``bench_floor.py`` run is started under ``cProfile`` (a ``sitecustomize``
module on ``PYTHONPATH`` that profiles ``serve`` and ``floor-serve`` child
processes and writes their stats when they exit on SIGTERM); the load is
``bench_floor.py``'s, unchanged.

Per event is a difference, as in ``bench_instructions.py``: one run of
``--seconds`` and one a quarter as long, the same streams; each function's
calls in the long run less the short one's, over the events between. That
takes out start-up, the streams' opens and settlements, and shutdown.

The profiler makes every call dearer, so its times are not the server's;
the call counts are exact. Prints calls per event for each target, the
difference, and the functions that differ most.

``--observers N``: calls per event an *observer* is sent instead, chinwag
beside ``floor-fanout`` (``bench_floor.fanout_floor_app``: the bare app with
an observe route, one task per observer woken per chunk). Each target serves
one stream at ``--rate`` twice, once watched by N observers and once not (a
server each), profiled only over a ``--seconds`` window once everything is
running (the profiler is switched on and off by signals: no start-up, no
joins, no shutdown in the counts); the calls of the watched window less the
other's (scaled to the same stream events) over the events the observers
received in it. At this rate an observer is never behind: one write per
event.
"""

from __future__ import annotations

import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchlib import PY, ROOT, arg_parser, finish, machine

SITECUSTOMIZE = """
import atexit, cProfile, os, sys
_dir = os.environ.get("BENCH_CALLS_DIR")
if _dir and ("serve" in sys.argv or "floor-serve" in sys.argv):
    if "floor-serve" in sys.argv:
        _app = sys.argv[sys.argv.index("--app") + 1] if "--app" in sys.argv else "bare"
        _tag = {"bare": "floor-timer", "quart": "floor-quart", "relay": "floor-relay",
                "fanout": "floor-fanout"}[_app]
    else:
        _tag = "chinwag"
    _profile = cProfile.Profile()

    def _dump():
        _profile.disable()
        _profile.dump_stats(os.path.join(_dir, _tag + ".prof"))

    atexit.register(_dump)
    if os.environ.get("BENCH_CALLS_WINDOW"):  # on at SIGUSR1, off at SIGUSR2
        import signal
        signal.signal(signal.SIGUSR1, lambda *_: _profile.enable())
        signal.signal(signal.SIGUSR2, lambda *_: _profile.disable())
    else:
        _profile.enable()
"""

TARGETS = ("floor-timer", "floor-quart", "floor-relay", "chinwag")

Counts = dict[str, int]


def _label(key: tuple[str, int, str]) -> str:
    path, line, name = key
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if path == "~":  # a builtin; "<built-in method __new__ of type object at 0x...>"
        return re.sub(r" at 0x[0-9a-f]+", "", name)
    return f"{name} ({path}:{line})"


def counts(path: Path) -> Counts:
    """Calls per function in one profile, keyed by a readable label."""
    out: Counts = {}
    for key, (_, ncalls, *_rest) in pstats.Stats(str(path)).stats.items():  # type: ignore[attr-defined]
        label = _label(key)
        out[label] = out.get(label, 0) + ncalls
    return out


def profiled_run(
    targets: list[str], streams: int, seconds: float, rate: float, work: Path
) -> dict[str, tuple[Counts, int]]:
    """One ``bench_floor.py`` run with every server profiled: {target: (counts, events)}."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "sitecustomize.py").write_text(SITECUSTOMIZE)
    report = work / "floor.json"
    env = {
        **os.environ,
        "BENCH_CALLS_DIR": str(work),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")])),
    }
    cmd = [PY, str(ROOT / "scripts" / "bench_floor.py"), "--only", "streams"]
    cmd += ["--streams", str(streams), "--seconds", f"{seconds:g}", "--rate", f"{rate:g}"]
    cmd += ["--targets", ",".join(targets), "--json", str(report)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_floor.py failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    level = json.loads(report.read_text())["levels"][0]
    out: dict[str, tuple[Counts, int]] = {}
    for target in targets:
        summary = level["targets"][target]["summary"]
        if summary["failures"]:
            raise SystemExit(f"{target}: {summary['failures']} failed streams; no count")
        events = streams * level["tokens"]
        out[target] = (counts(work / f"{target}.prof"), events)
    return out


def observer_run(target: str, observers: int, seconds: float, rate: float, work: Path) -> Any:
    """One server of ``target``, one stream watched by ``observers``, profiled over
    ``seconds``: (calls per function, stream events, observer events) in that window."""
    import trio
    from bench_floor import TTFT_MS, start_floor
    from bench_instructions import _observe, long_answer
    from bench_streams import DEFAULT_MODEL, BenchEnv, Shared, run_stream, start_chinwag
    from benchlib import create_sessions

    work.mkdir(parents=True, exist_ok=True)
    (work / "sitecustomize.py").write_text(SITECUSTOMIZE)
    saved = {k: os.environ.get(k) for k in ("BENCH_CALLS_DIR", "BENCH_CALLS_WINDOW", "PYTHONPATH")}
    os.environ.update(BENCH_CALLS_DIR=str(work), BENCH_CALLS_WINDOW="1", PYTHONPATH=str(work))
    env = BenchEnv(keep=False)
    try:
        env.create_user()
        supervisor = env.add_user("watcher", "watcher-password", "supervisor")
        answer = long_answer(rate, seconds + 10)
        if target == "chinwag":
            srv = start_chinwag(
                env,
                target,
                CHINWAG_SIM_TTFT_MS=str(TTFT_MS),
                CHINWAG_SIM_TOKENS_PER_S=f"{rate:g}",
                CHINWAG_SIM_ANSWER_TOKENS=str(answer),
            )
        else:
            srv = start_floor(env, target, target, rate, 5.0)

        async def drive() -> tuple[int, int]:
            (sid,) = await create_sessions(srv.port, env.token, 1)
            body = {"message": "Watch me", "modelId": DEFAULT_MODEL, "maxTokens": answer}
            shared = Shared(interval=1 / rate)
            counts = [0] * observers
            async with trio.open_nursery() as nursery:
                run = partial(run_stream, srv.port, env.token, sid, body, shared, limit_s=600)
                nursery.start_soon(run)
                with trio.fail_after(60):
                    while shared.chunks < 10:  # noqa: ASYNC110  (sampled)
                        await trio.sleep(0.1)
                for i in range(observers):
                    nursery.start_soon(_observe, srv.port, supervisor, sid, counts, i)
                with trio.fail_after(60):
                    while min(counts, default=2 * rate) < 2 * rate:  # noqa: ASYNC110  (sampled)
                        await trio.sleep(0.1)
                os.kill(srv.pid, signal.SIGUSR1)
                c0, o0 = shared.chunks, sum(counts)
                await trio.sleep(seconds)
                os.kill(srv.pid, signal.SIGUSR2)
                c1, o1 = shared.chunks, sum(counts)
                nursery.cancel_scope.cancel()
            return c1 - c0, o1 - o0

        try:
            events, observed = trio.run(drive)
        finally:
            srv.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        env.cleanup()
    return counts(work / f"{target}.prof"), events, observed


def observer_calls(args: Any, work: Path) -> dict[str, Any]:
    """Calls per observer event, chinwag and floor-fanout (``--observers``)."""
    out: dict[str, Any] = {}
    per: dict[str, dict[str, float]] = {}
    for target in ("floor-fanout", "chinwag"):
        alone, events_alone, _ = observer_run(target, 0, args.seconds, args.rate, work / "0")
        watched, events, observed = observer_run(
            target, args.observers, args.seconds, args.rate, work / str(args.observers)
        )
        if not observed or not events_alone:
            raise SystemExit(f"{target}: no observer events")
        scale = events / events_alone
        per[target] = {
            k: (watched.get(k, 0) - alone.get(k, 0) * scale) / observed
            for k in watched.keys() | alone.keys()
        }
        out[target] = {"observerEvents": observed, "events": events}
    a, b = per["floor-fanout"], per["chinwag"]
    diff = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in a.keys() | b.keys()}
    top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]
    return {
        "runs": out,
        "callsPerObserverEvent": {t: round(sum(v.values()), 1) for t, v in per.items()},
        "largest": [
            {"function": k, "base": round(a.get(k, 0.0), 2), "chinwag": round(b.get(k, 0.0), 2)}
            for k, _ in top
        ],
    }


def report_observers(r: dict[str, Any]) -> None:
    a, o = r["args"], r["observers"]
    print(f"\nPython calls per observer event - commit {r['machine']['commit']}")
    print(f"  one stream at {a['rate']:g}/s, {a['observers']} observers for {a['seconds']:g} s,")
    print("  less the same stream unwatched (cProfile; the counts are exact)")
    for target, n in o["callsPerObserverEvent"].items():
        print(f"    {target:<12} {n:8.1f} calls per observer event")
    base, ours = o["callsPerObserverEvent"]["floor-fanout"], o["callsPerObserverEvent"]["chinwag"]
    print(f"    chinwag - floor-fanout: {ours - base:+.1f} ({ours / base:.2f} x); the largest:")
    for row in o["largest"]:
        delta = row["chinwag"] - row["base"]
        print(
            f"      {delta:+7.2f}  ({row['base']:6.2f} -> {row['chinwag']:6.2f})  {row['function']}"
        )


def main() -> int:
    p = arg_parser(__doc__ or "", "20 streams x 2 s and 0.5 s, the top 10")
    p.add_argument(
        "--targets", default="floor-timer,chinwag", help="subset of " + ",".join(TARGETS)
    )
    p.add_argument("--streams", type=int, default=50)
    p.add_argument(
        "--seconds", type=float, default=15.0, help="the long run (the short: a quarter)"
    )
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--top", type=int, default=40, help="functions to list")
    p.add_argument("--keep", action="store_true", help="keep the profiles")
    p.add_argument(
        "--observers", type=int, default=0, help="calls per observer event instead (docstring)"
    )
    args = p.parse_args()
    if args.quick:
        args.streams, args.seconds, args.top = 20, 2.0, 10
    if args.observers:
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="chinwag-calls-"))
        try:
            results = {"machine": machine(), "args": vars(args)}
            results["observers"] = observer_calls(args, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return finish(results, t0, report_observers, lambda _: [], args.json)
    targets = [t for t in args.targets.split(",") if t]
    if unknown := set(targets) - set(TARGETS):
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="chinwag-calls-"))
    long = profiled_run(targets, args.streams, args.seconds, args.rate, work / "long")
    short = profiled_run(targets, args.streams, args.seconds / 4, args.rate, work / "short")

    per_event: dict[str, dict[str, float]] = {}
    for target in targets:
        (c_long, e_long), (c_short, e_short) = long[target], short[target]
        events = e_long - e_short
        per_event[target] = {
            k: (c_long.get(k, 0) - c_short.get(k, 0)) / events
            for k in c_long.keys() | c_short.keys()
        }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    results: dict[str, Any] = {
        "machine": machine(),
        "args": vars(args),
        "callsPerEvent": {t: round(sum(per_event[t].values()), 1) for t in targets},
    }
    if "chinwag" in targets and len(targets) > 1:
        base = next(t for t in targets if t != "chinwag")
        a, b = per_event[base], per_event["chinwag"]
        diff = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in a.keys() | b.keys()}
        top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]
        results["difference"] = {
            "base": base,
            "callsPerEvent": round(sum(b.values()) - sum(a.values()), 1),
            "largest": [
                {"function": k, "base": round(a.get(k, 0.0), 2), "chinwag": round(b.get(k, 0.0), 2)}
                for k, _ in top
            ],
        }

    def report(r: dict[str, Any]) -> None:
        a = r["args"]
        print(f"\nPython calls per event - commit {r['machine']['commit']}, {a['streams']} streams")
        print(f"  x {a['rate']:g}/s: a {a['seconds']:g} s run less a {a['seconds'] / 4:g} s one")
        print("  (cProfile; the counts are exact, the profiler's times are not the server's)")
        for target, n in r["callsPerEvent"].items():
            print(f"    {target:<12} {n:8.1f} calls per event")
        if d := r.get("difference"):
            print(f"    chinwag - {d['base']}: {d['callsPerEvent']:+.1f}; the largest differences:")
            for row in d["largest"]:
                delta = row["chinwag"] - row["base"]
                print(
                    f"      {delta:+7.2f}  ({row['base']:6.2f} -> {row['chinwag']:6.2f})  {row['function']}"
                )
        if a["keep"]:
            print(f"  profiles kept in {work}")

    return finish(results, t0, report, lambda _: [], args.json)


if __name__ == "__main__":
    sys.exit(main())
