"""Soak test of chinwag: the real server under mixed traffic, then its invariants.

    .venv/bin/python scripts/soak.py --quick          # CI: ~12 s of traffic
    .venv/bin/python scripts/soak.py [--duration 120] [--json out.json] [--keep]
        [--stream-workers 6] [--disconnect-workers 3] [--rate-limit 240]
        [--max-streams 20000] [--max-rss-growth-mb 20]

Starts ``python -m server.cli serve`` (loopback, ``CHINWAG_PORT=0``, a temp
``CHINWAG_DB``, the simulated model at 50 tokens/s), makes its users with the
CLI (``user add``, ``credits allocate``, ``token``), then runs concurrently for
``--duration`` s (or ``--max-streams`` streams): streams read to ``done``, some
watched by an observer that waits (``?wait=``), joins late or leaves early;
streams the client closes (FIN or RST) after 1-8 chunks; bad requests (each
must get its 4xx); and one user hammering past ``CHINWAG_RATE_LIMIT`` (each
429 must carry ``Retry-After`` and a JSON body). Server RSS is sampled every
second. Then: the ``/metrics`` gauges must drain to 0, SIGTERM must stop the
server (exit 0) within its bound, and on the SQLite file the ledger's
``verify()`` must hold, no message may be left ``streaming``, every balance must
equal its allocation minus its charges, and every charge must match its
``done`` event and its stored message.

Exit status 1 if any invariant fails (a 5xx, an error that is not
``{"message", "errorCode"}`` JSON or an unexpected status is one).
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import sqlite3
import struct
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import trio
from benchlib import (
    ROOT,
    Env,
    Server,
    arg_parser,
    connect,
    finish,
    fmt,
    http_raw,
    machine,
    print_table,
    proc_sample,
    request_bytes,
    response_complete,
    send_all,
    split_response,
)

PASSWORD = "soak-password"
CREDITS = 10_000_000
MODEL = "amazon.nova-micro-v1:0"
MIN_CYCLE_S = 0.75  # a worker loops at most this often: well under its user's rate limit
BUFFER_MS = 3000
GRACE_MS = 5000
SETTINGS = {
    "CHINWAG_PROVIDER": "simulated",
    "CHINWAG_MAX_STREAMS_PER_USER": "20",
    "CHINWAG_SIM_TTFT_MS": "50",
    "CHINWAG_SIM_TOKENS_PER_S": "50",
    "CHINWAG_SSE_HEARTBEAT_MS": "250",
    "CHINWAG_STREAM_BUFFER_MS": str(BUFFER_MS),
    "CHINWAG_MAX_BODY_BYTES": "65536",
    "CHINWAG_SHUTDOWN_GRACE_MS": str(GRACE_MS),
}
GAUGES = (
    "chinwag_streams_open",
    "chinwag_observers",
    "chinwag_readers",
    "chinwag_ledger_reservations_open",
    "chinwag_ledger_reserved_credits",
)
NET_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, trio.TooSlowError)


class Soak:
    """What every task shares (one trio thread: no locks)."""

    def __init__(self, port: int, tokens: dict[str, str], seconds: float, max_streams: int):
        self.port = port
        self.tokens = tokens
        self.deadline = time.monotonic() + seconds
        self.max_streams = max_streams
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.charged: dict[str, int] = {}  # streamingSessionId -> done.creditsCharged
        self.cut: list[str] = []  # streamingSessionIds the client cut

    def stopping(self) -> bool:
        return time.monotonic() >= self.deadline or self.counts["streams"] >= self.max_streams

    def fail(self, why: str) -> None:
        self.failures.append(why)

    def record(
        self, kind: str, status: int, headers: dict[str, str], payload: bytes, req: str
    ) -> Any:
        """Count one response; an error must be ``{"message", "errorCode"}`` JSON."""
        self.statuses[(kind, status)] += 1
        try:
            data = json.loads(payload) if payload else None
        except ValueError:
            data = None
        what = f"{kind}: {req} -> {status} {payload[:200]!r} ({headers.get('x-request-id')})"
        if status >= 500:
            self.fail(what)
        elif status == 429 and kind != "rate-limit":
            self.fail(f"unexpected 429: {what}")
        if status >= 400 and not (
            headers.get("content-type", "").startswith("application/json")
            and isinstance(data, dict)
            and isinstance(data.get("message"), str)
            and isinstance(data.get("errorCode"), str)
        ):
            self.fail(f"not a JSON error body: {what}")
        return data

    async def call(
        self, kind: str, method: str, path: str, token: str | None, body: Any = None, *, expect: Any
    ) -> tuple[int, dict[str, str], Any]:
        """One request on its own connection; ``expect``: the status, or a tuple of them."""
        req = request_bytes(method, path, token, body, close=True, port=self.port)
        status, headers, payload = split_response(await http_raw(self.port, req))
        data = self.record(kind, status, headers, payload, f"{method} {path}")
        if status not in (expect if isinstance(expect, tuple) else (expect,)):
            self.fail(f"{kind}: {method} {path} -> {status}, expected {expect}: {payload[:200]!r}")
        return status, headers, data


class SSE:
    """One SSE response (chunked HTTP/1.1 on a raw trio socket), read event by event."""

    def __init__(self, sock: trio.socket.SocketType, headers: dict[str, str], rest: bytes):
        self.sock, self.headers, self.buf, self.text = sock, headers, rest, b""

    @classmethod
    async def open(cls, s: Soak, kind: str, path: str, token: str, body: Any = None) -> SSE | None:
        """The event stream; None when the answer is something else (counted and checked)."""
        sock = await connect(s.port)
        try:
            req = request_bytes("GET" if body is None else "POST", path, token, body, port=s.port)
            await send_all(sock, req)
            raw = b""
            while b"\r\n\r\n" not in raw or (
                raw[9:12] != b"200" and not response_complete(raw)  # an error: its whole body
            ):
                if not (data := await sock.recv(65536)):
                    raise EOFError(f"EOF after {len(raw)} bytes")
                raw += data
            status, headers, payload = split_response(raw)
            what = f"{'GET' if body is None else 'POST'} {path}"
            s.record(kind, status, headers, b"" if status == 200 else payload, what)
            if status == 200:
                if headers.get("content-type", "").startswith("text/event-stream") and (
                    headers.get("transfer-encoding") == "chunked"
                ):
                    return cls(sock, headers, raw.partition(b"\r\n\r\n")[2])
                s.fail(f"{kind}: 200 but not a chunked event stream: {headers}")
        except BaseException:
            sock.close()
            raise
        sock.close()
        return None

    async def _chunk(self) -> bytes | None:
        while True:
            eol = self.buf.find(b"\r\n")
            if eol >= 0:
                size = int(self.buf[:eol].split(b";")[0], 16)
                end = eol + 2 + size
                if size == 0:
                    return None
                if len(self.buf) >= end + 2:
                    data, self.buf = self.buf[eol + 2 : end], self.buf[end + 2 :]
                    return data
            if not (data := await self.sock.recv(65536)):
                raise EOFError("EOF inside the chunked body")
            self.buf += data

    async def next_event(self) -> tuple[int | None, str, Any] | None:
        """(id, event, data) of the next event, comments skipped; None at the end."""
        while True:
            while (end := self.text.find(b"\n\n")) < 0:
                if (chunk := await self._chunk()) is None:
                    return None
                self.text += chunk
            block, self.text = self.text[:end], self.text[end + 2 :]
            eid, name, data = None, "", None
            for line in block.split(b"\n"):
                if line.startswith(b"id: "):
                    eid = int(line[4:])
                elif line.startswith(b"event: "):
                    name = line[7:].decode()
                elif line.startswith(b"data: "):
                    data = json.loads(line[6:])
            if name:
                return eid, name, data

    def close(self, reset: bool = False) -> None:
        if reset and self.sock.fileno() >= 0:  # SO_LINGER 0: close with a RST, not a FIN
            linger = struct.pack("ii", 1, 0)
            self.sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, linger)
        self.sock.close()


# -- traffic ---------------------------------------------------------------------------------


async def observe(s: Soak, sid: str, sup: str, mode: str, ready: trio.Event, reasons: Any) -> None:
    """Watch a session's stream: ``wait`` (before it starts), ``late``, ``leave`` (early)."""
    path = f"/api/chat/sessions/{sid}/observe" + ("?wait=10" if mode == "wait" else "")
    kind = f"observe-{mode}"
    ids: list[int] = []
    history = history_end = done = None
    try:
        if (conn := await SSE.open(s, kind, path, sup)) is None:
            return
        try:
            while (ev := await conn.next_event()) is not None:
                eid, name, data = ev
                if name == "observer":
                    if data["status"] == "waiting":
                        s.counts["observers that waited"] += 1
                        ready.set()
                    elif data["status"] != "connected":
                        s.fail(f"{kind}: observer {data}")
                elif name == "history-start":
                    history = data
                elif name == "history-end":
                    history_end = data["lastId"]
                elif eid is None:
                    s.fail(f"{kind}: unexpected event {name} {data}")
                else:
                    if ids and eid != ids[-1] + 1:
                        s.fail(f"{kind}: id {eid} after {ids[-1]}")
                    ids.append(eid)
                    done = data if name == "done" else None
                    if mode == "leave" and len(ids) >= 3 and done is None:
                        s.counts["observers that left early"] += 1
                        return
        finally:
            conn.close()
    finally:
        ready.set()
    if history is None or history_end is None or done is None:
        s.fail(f"{kind}: history {history}, history-end {history_end}, done {done}")
    elif history["count"] and ids[0] != history["fromId"]:
        s.fail(f"{kind}: first id {ids[0]}, history-start {history}")
    elif done.get("finishReason") not in reasons:
        s.fail(f"{kind}: finishReason {done.get('finishReason')}, expected {reasons}")
    else:
        s.counts["observers to done"] += 1


async def stream(
    s: Soak, sid: str, token: str, sup: str, mode: str, max_tokens: int, cut: int | None
) -> None:
    """One stream on session ``sid`` (the client closes after ``cut`` chunks), maybe observed."""
    kind = "stream-cut" if cut else "stream"
    reasons = ("client_disconnected",) if cut else ("stop", "length")
    body = {"message": f"Soak {uuid.uuid4().hex[:8]}", "modelId": MODEL, "maxTokens": max_tokens}
    async with trio.open_nursery() as nursery:
        if mode == "wait":
            ready = trio.Event()
            nursery.start_soon(observe, s, sid, sup, mode, ready, reasons)
            with trio.move_on_after(5):
                await ready.wait()
        s.counts["streams"] += 1
        if (
            conn := await SSE.open(s, kind, f"/api/chat/sessions/{sid}/stream", token, body)
        ) is None:
            return
        ssid = conn.headers.get("x-streaming-session-id", "")
        last = chunks = 0
        done = None
        try:
            while (ev := await conn.next_event()) is not None:
                eid, name, data = ev
                if eid != last + 1:
                    s.fail(f"{kind}: id {eid} after {last}")
                last = eid or last
                if name == "done":
                    done = data
                elif name != "chunk":
                    s.fail(f"{kind}: event {name} {data}")
                else:
                    chunks += 1
                    if chunks == 2 and mode in ("late", "leave"):
                        nursery.start_soon(observe, s, sid, sup, mode, trio.Event(), reasons)
                    if cut and chunks >= cut:
                        conn.close(reset=chunks % 2 == 0)
                        s.counts["streams cut by the client"] += 1
                        s.cut.append(ssid)
                        return
        finally:
            conn.close()
        if done is None or done.get("finishReason") not in reasons:
            s.fail(f"{kind}: ended with {done} after {chunks} chunks")
        else:
            s.counts["streams to done"] += 1
            s.charged[ssid] = done["creditsCharged"]


async def new_session(s: Soak, token: str) -> str:
    body = {"title": "soak"}
    _, _, data = await s.call("session", "POST", "/api/chat/sessions", token, body, expect=201)
    return str(data["sessionId"])


async def guarded(s: Soak, what: str, fn: Any) -> Any:
    """``await fn()`` within 60 s; a network error or a malformed answer is a failure."""
    try:
        with trio.fail_after(60):
            return await fn()
    except NET_ERRORS as exc:
        s.fail(f"{what}: {type(exc).__name__}: {exc}")
        return None


async def stream_worker(s: Soak, user: str, sup: str, seed: int, cutting: bool) -> None:
    rng = random.Random(seed)
    token, sid = s.tokens[user], None
    while not s.stopping():
        t0 = trio.current_time()
        if cutting:
            mode, cut, max_tokens = rng.choice(["plain", "wait"]), rng.randint(1, 8), 60
        else:
            mode, cut = rng.choice(["plain", "plain", "wait", "late", "leave"]), None
            max_tokens = rng.randint(10, 60)
        # A waiting observer wants a session with no lingering stream; a cut stream may still
        # be ending: a fresh session for those, the same one otherwise.
        if cutting or mode == "wait" or sid is None:
            sid = await guarded(s, "session", partial(new_session, s, token))
        if sid is not None:
            args = (s, sid, token, s.tokens[sup], mode, max_tokens, cut)
            await guarded(s, "stream", partial(stream, *args))
        await trio.sleep_until(t0 + MIN_CYCLE_S)


async def bad_worker(s: Soak) -> None:
    user, sup = s.tokens["soak-bad"], s.tokens["soak-sup0"]
    sid = await guarded(s, "session", partial(new_session, s, user))
    nowhere, own = f"/api/chat/sessions/{uuid.uuid4()}", f"/api/chat/sessions/{sid}"
    big = b'{"title":"' + b"x" * 70_000 + b'"}'  # over CHINWAG_MAX_BODY_BYTES
    cases: list[tuple[str, str, str, str | None, Any, int]] = [
        ("bad:malformed-json", "POST", "/api/chat/sessions", user, b'{"title": ', 400),
        ("bad:no-token", "GET", "/api/chat/sessions", None, None, 401),
        ("bad:bad-token", "GET", "/api/chat/sessions", "not.a.jwt", None, 401),
        ("bad:wrong-role", "GET", "/api/chat/streams/active", user, None, 403),
        ("bad:wrong-role", "GET", f"{own}/observe", user, None, 403),
        ("bad:unknown-session", "GET", nowhere, user, None, 404),
        ("bad:unknown-session", "POST", f"{nowhere}/stream", user, {"message": "hi"}, 404),
        ("bad:unknown-session", "GET", f"{nowhere}/observe", sup, None, 404),
        ("bad:oversized", "POST", "/api/chat/sessions", user, big, 413),
        ("bad:invalid-message", "POST", f"{own}/stream", user, {"message": "  "}, 400),
        (
            "bad:unknown-model",
            "POST",
            f"{own}/stream",
            user,
            {"message": "hi", "modelId": "x"},
            400,
        ),
    ]
    for i in itertools.count():
        if s.stopping():
            break
        kind, method, path, token, body, expect = cases[i % len(cases)]
        await guarded(s, kind, partial(s.call, kind, method, path, token, body, expect=expect))
        await trio.sleep(0.3)


async def rate_limit_worker(s: Soak, limit: int) -> None:
    """Empty the bucket (``limit`` + 20 at once), then 8 a second against a refill of limit/60."""
    call = partial(s.call, "rate-limit", "GET", "/api/credits/balance", s.tokens["soak-limited"])
    burst = limit + 20
    while not s.stopping():
        t0 = trio.current_time()
        for _ in range(burst):
            if s.stopping():
                break
            if (answer := await guarded(s, "rate-limit", partial(call, expect=(200, 429)))) is None:
                continue
            status, headers, data = answer
            retry = headers.get("retry-after", "")
            if status != 429:
                continue
            if retry.isdigit() and int(retry) >= 1 and data.get("errorCode") == "RATE_LIMITED":
                s.counts["429s with Retry-After + JSON"] += 1
            else:
                s.fail(f"rate-limit: 429 with Retry-After {retry!r}, body {data}")
        burst = 8
        await trio.sleep_until(t0 + 1)


# -- watching the server ---------------------------------------------------------------------


async def metrics(s: Soak) -> dict[str, float]:
    req = request_bytes("GET", "/metrics", s.tokens["soak-monitor"], close=True, port=s.port)
    status, headers, payload = split_response(await http_raw(s.port, req))
    s.record("metrics", status, headers, payload, "GET /metrics")
    lines = [ln.rpartition(" ") for ln in payload.decode().splitlines() if ln[:1] not in ("", "#")]
    return {name: float(value) for name, _, value in lines}


async def sample(s: Soak, pid: int, t0: float, rss: list[Any], peaks: dict[str, float]) -> None:
    """Server RSS every second; the gauges every 2 s (for their peaks)."""
    while True:
        rss.append((round(time.monotonic() - t0, 2), proc_sample(pid).rss_kb))
        if len(rss) % 2 and (m := await guarded(s, "metrics", partial(metrics, s))):
            for g in GAUGES:
                peaks[g] = max(peaks.get(g, 0), m.get(g, 0))
        await trio.sleep(1)


async def poll(s: Soak, settled: Any, limit_s: float) -> dict[str, float]:
    """``/metrics`` every 0.25 s until ``settled(metrics)`` (at most ``limit_s``): the last."""
    m: dict[str, float] = {}
    with trio.move_on_after(limit_s):
        while not settled(m := await metrics(s)):  # noqa: ASYNC110 - polling the server
            await trio.sleep(0.25)
    return m


def slope(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of (t, value)."""
    if len(points) < 3:
        return 0.0
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


async def traffic(s: Soak, pid: int, args: Any) -> dict[str, Any]:
    rss: list[tuple[float, int]] = []
    peaks: dict[str, float] = {}
    t0 = time.monotonic()
    async with trio.open_nursery() as outer:
        outer.start_soon(sample, s, pid, t0, rss, peaks)
        with trio.move_on_after(args.duration + 90) as scope:
            async with trio.open_nursery() as nursery:
                for i in range(args.stream_workers):
                    nursery.start_soon(stream_worker, s, f"soak-s{i}", f"soak-sup{i % 2}", i, False)
                for i in range(args.disconnect_workers):
                    sup = f"soak-sup{i % 2}"
                    nursery.start_soon(stream_worker, s, f"soak-d{i}", sup, 100 + i, True)
                nursery.start_soon(bad_worker, s)
                nursery.start_soon(rate_limit_worker, s, args.rate_limit)
        if scope.cancelled_caught:
            s.fail(f"the traffic did not stop within {args.duration:g} + 90 s")
        traffic_s = time.monotonic() - t0
        outer.cancel_scope.cancel()
    t1 = time.monotonic()  # drain: the gauges to zero, then the ended streams' rings expire
    m = await poll(s, lambda m: not any(m.get(g, 1) for g in GAUGES), 30)
    drained = {"drainS": round(time.monotonic() - t1, 2), "gauges": {g: m.get(g) for g in GAUGES}}
    m = await poll(s, lambda m: m.get("chinwag_streams_lingering") == 0, BUFFER_MS / 1000 + 10)
    half = [(t, r) for t, r in rss if t >= traffic_s / 2]
    per_s = slope(half)
    return {
        "trafficS": round(traffic_s, 1),
        "rss": {
            "startKb": rss[0][1],
            "peakKb": max(r for _, r in rss),
            "endOfTrafficKb": rss[-1][1],
            "afterDrainKb": proc_sample(pid).rss_kb,
            "secondHalfKbPerMin": round(per_s * 60, 1),
            "secondHalfGrowthKb": round(per_s * (half[-1][0] - half[0][0])) if half else 0,
            "samples": rss,
        },
        "gaugePeaks": peaks,
        "afterDrain": {**drained, "lingering": m.get("chinwag_streams_lingering")},
    }


# -- after the server has stopped: the SQLite file and the log ---------------------------------


def check_db(db: Path, users: dict[str, tuple[str, int]], s: Soak) -> dict[str, Any]:
    """The ledger's own verify(), then balances, charges and messages against what we saw."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from ledger import Ledger

    with Ledger(db) as book:
        problems, stats = book.verify(), book.statistics()
    conn = sqlite3.connect(db)
    try:
        q = conn.execute
        (streaming,) = q("SELECT COUNT(*) FROM messages WHERE status = 'streaming'").fetchone()
        balances = dict(q("SELECT account_id, balance FROM ledger_accounts").fetchall())
        sql = "SELECT account_id, kind, SUM(amount) FROM ledger_entries GROUP BY 1, 2"
        sums = {(a, k): v for a, k, v in q(sql)}
        sql = "SELECT streaming_session_id, -SUM(amount) FROM ledger_entries WHERE kind = 'charge'"
        charges = dict(q(sql + " GROUP BY 1").fetchall())
        sql = "SELECT streaming_session_id, status, credits_charged FROM messages WHERE role = ?"
        messages = {ssid: (status, credits) for ssid, status, credits in q(sql, ("assistant",))}
    finally:
        conn.close()
    balances_bad = []
    for name, (uid, allocated) in users.items():
        charged = -sums.get((uid, "charge"), 0)
        want = allocated - charged + sums.get((uid, "refund"), 0)
        if sums.get((uid, "allocation"), 0) != allocated or balances.get(uid, 0) != want:
            balances_bad.append(
                f"{name}: balance {balances.get(uid)}, allocations {sums.get((uid, 'allocation'))}"
                f" (we allocated {allocated}), charged {charged}"
            )
    return {
        "verify": problems,
        "openReservations": stats.open_reservations,
        "streamingMessages": streaming,
        "balances": balances_bad,
        "charges": [
            f"{ssid}: done said {c}, ledger {charges.get(ssid, 0)}, message {messages.get(ssid)}"
            for ssid, c in s.charged.items()
            if charges.get(ssid, 0) != c or messages.get(ssid) != ("complete", c)
        ],
        "cuts": [
            f"{ssid}: {messages.get(ssid)}"
            for ssid in s.cut
            if (messages.get(ssid) or ("",))[0] != "interrupted"
        ],
    }


def scan_log(path: Path) -> dict[str, Any]:
    """Error-level lines and tracebacks in the server's stderr (JSON log lines)."""
    bad, tracebacks = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if "Traceback" in line or "Error" in line:
                bad.append(line[:300])
        elif rec.get("level") in ("error", "critical") or "exception" in rec:
            exc = str(rec.get("exception", "")).strip()
            bad.append(
                f"{rec.get('message')} ({rec.get('requestId')}): {(exc.splitlines() or [''])[-1]}"
            )
            tracebacks.append(exc)
    return {"errors": len(bad), "samples": bad[:5], "tracebacks": tracebacks[:3]}


# -- driver ---------------------------------------------------------------------------------


def setup_users(env: Env, args: Any) -> dict[str, tuple[str, str, int]]:
    """name -> (token, user id, credits allocated), through the CLI (4 at a time)."""
    specs = [(f"soak-s{i}", "enduser", CREDITS) for i in range(args.stream_workers)]
    specs += [(f"soak-d{i}", "enduser", CREDITS) for i in range(args.disconnect_workers)]
    specs += [("soak-bad", "enduser", CREDITS), ("soak-limited", "enduser", CREDITS)]
    specs += [(name, "supervisor", 0) for name in ("soak-sup0", "soak-sup1", "soak-monitor")]
    first = env.add_user(specs[0][0], PASSWORD, specs[0][1], specs[0][2])  # creates the DB
    with ThreadPoolExecutor(4) as pool:
        tokens = [first, *pool.map(lambda u: env.add_user(u[0], PASSWORD, *u[1:]), specs[1:])]
    out = {}
    for (name, _, credits), token in zip(specs, tokens, strict=True):
        claims = token.split(".")[1]
        sub = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["sub"]
        out[name] = (token, sub, credits)
    return out


def invariants(r: dict[str, Any], args: Any) -> list[tuple[str, bool, str]]:
    """(name, holds, detail) for every invariant."""
    c, db, rss = Counter(r["counts"]), r["db"], r["rss"]
    drained, down = r["afterDrain"], r["shutdown"]
    codes = Counter[str]()
    for by in r["requests"].values():
        codes.update(by)
    fives = sum(n for code, n in codes.items() if code >= "500")
    done, cut = c["streams to done"], c["streams cut by the client"]
    watched, good_429 = c["observers to done"], c["429s with Retry-After + JSON"]
    gauges = ", ".join(f"{k[8:]}={fmt(v)}" for k, v in drained["gauges"].items())
    growth, limit_kb = rss["secondHalfGrowthKb"], args.max_rss_growth_mb * 1024
    in_time = down["exitCode"] == 0 and down["seconds"] <= down["boundS"]
    return [
        ("no 5xx response", fives == 0, f"{fives} seen"),
        ("every answer as expected", not r["failures"], f"{r['failureCount']} failures"),
        (
            "traffic of every kind",
            bool(done and cut and watched),
            f"{done} streams to done, {cut} cut, {watched} observers to done",
        ),
        (
            "429s, with Retry-After + JSON",
            0 < codes["429"] == good_429,
            f"{good_429}/{codes['429']}",
        ),
        ("/metrics gauges at 0 after the drain", not any(drained["gauges"].values()), gauges),
        (
            "ended streams released",
            drained["lingering"] == 0,
            f"lingering={fmt(drained['lingering'])}",
        ),
        (
            "SIGTERM: exit 0 in time",
            in_time,
            f"exit {down['exitCode']} in {down['seconds']} s (bound {down['boundS']:g} s)",
        ),
        ("ledger verify()", not db["verify"], f"{len(db['verify'])} problems"),
        ("no open reservation", db["openReservations"] == 0, f"{db['openReservations']} open"),
        ("no message left 'streaming'", not db["streamingMessages"], f"{db['streamingMessages']}"),
        ("balance = allocated - charged", not db["balances"], f"{len(db['balances'])} wrong"),
        ("charge = done = message", not db["charges"], f"{len(db['charges'])} wrong of {done}"),
        ("cut streams 'interrupted'", not db["cuts"], f"{len(db['cuts'])} wrong of {cut}"),
        (f"RSS 2nd half < +{args.max_rss_growth_mb:g} MB", growth <= limit_kb, f"{growth:+,} KB"),
        ("server log: no error", not r["serverLog"]["errors"], f"{r['serverLog']['errors']} lines"),
    ]


def report(r: dict[str, Any]) -> None:
    m, a, c, rss = r["machine"], r["args"], Counter(r["counts"]), r["rss"]
    print(
        f"\nchinwag soak - commit {m['commit']}, {m['nproc']} cpus, Python {m['python']}; "
        f"{r['trafficS']} s of traffic, {a['stream_workers']} stream + {a['disconnect_workers']} "
        f"disconnect workers, rate limit {a['rate_limit']}/min"
    )
    rows = [("requests by kind", "count", "by status")]
    for kind, by in sorted(r["requests"].items()):
        statuses = ", ".join(f"{k} x{n:,}" for k, n in by.items())
        rows.append((f"  {kind}", fmt(sum(by.values())), statuses))
    total = sum(n for by in r["requests"].values() for n in by.values())
    observers = sum(sum(by.values()) for k, by in r["requests"].items() if k.startswith("observe-"))
    rss_kb = " / ".join(fmt(rss[k]) for k in ("startKb", "peakKb", "endOfTrafficKb")) + " KB"
    rows += [
        ("  all", fmt(total), f"{total / r['trafficS']:.0f} requests/s"),
        (
            "streams",
            fmt(c["streams"]),
            f"to done {c['streams to done']:,}, cut by the client "
            f"{c['streams cut by the client']:,} (half FIN, half RST)",
        ),
        (
            "observers",
            fmt(observers),
            f"to done {c['observers to done']:,} (waited first "
            f"{c['observers that waited']:,}), left early {c['observers that left early']:,}",
        ),
        ("429s", fmt(c["429s with Retry-After + JSON"]), "with Retry-After and a JSON body"),
        (
            "server RSS start/peak/end",
            rss_kb,
            f"after the drain {fmt(rss['afterDrainKb'])} KB; "
            f"second half {rss['secondHalfKbPerMin']:+,.0f} KB/min ({rss['secondHalfGrowthKb']:+,} KB)",
        ),
        (
            "gauges peak",
            ", ".join(fmt(r["gaugePeaks"].get(g)) for g in GAUGES[:3]),
            "streams_open, observers, readers (sampled every 2 s)",
        ),
        (
            "drain / SIGTERM",
            f"{r['afterDrain']['drainS']} s / {r['shutdown']['seconds']} s",
            f"gauges to 0 / exit {r['shutdown']['exitCode']}",
        ),
    ]
    print_table(rows)
    print("  invariants")
    for name, ok, detail in r["invariants"]:
        print(f"    {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    db = r["db"]
    problems = db["verify"][:3] + db["balances"][:3] + db["charges"][:3] + db["cuts"][:3]
    for line in r["failures"][:5] + problems + r["serverLog"]["samples"]:
        print(f"  ! {line[:400]}")


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__, "about 12 s of traffic (CI)")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    p.add_argument("--stream-workers", type=int, default=6, help="streams read to done")
    p.add_argument("--disconnect-workers", type=int, default=3, help="streams the client cuts")
    p.add_argument("--rate-limit", type=int, default=240, help="CHINWAG_RATE_LIMIT, per minute")
    p.add_argument("--max-streams", type=int, default=20_000, help="then the traffic stops")
    p.add_argument("--max-rss-growth-mb", type=float, default=20.0, help="over the second half")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (DB, server logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 12.0
    env = Env(args.keep, "chinwag-soak-", dict(SETTINGS))
    env.settings["CHINWAG_RATE_LIMIT"] = str(args.rate_limit)
    # A set secret: the parallel CLI calls must not race to create one.
    env.settings["CHINWAG_JWT_SECRET"] = uuid.uuid4().hex + uuid.uuid4().hex
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    t0 = time.perf_counter()
    try:
        print(f"[1] users (CLI) in {env.dir}", flush=True)
        users = setup_users(env, args)
        results["users"] = {name: u[1] for name, u in users.items()}
        srv = Server(env, "soak", {})
        print(f"[2] {args.duration:g} s of traffic on port {srv.port} (pid {srv.pid})", flush=True)
        s = Soak(srv.port, {n: u[0] for n, u in users.items()}, args.duration, args.max_streams)
        results.update(trio.run(traffic, s, srv.pid, args))
        print("[3] SIGTERM, then the SQLite file", flush=True)
        t, bound = time.monotonic(), GRACE_MS / 1000 + 5
        code = srv.stop(timeout=bound)
        results["shutdown"] = {"exitCode": code, "seconds": round(time.monotonic() - t, 2)}
        results["shutdown"]["boundS"] = bound
        results["db"] = check_db(env.db, {n: (u[1], u[2]) for n, u in users.items()}, s)
        results["serverLog"] = scan_log(srv.err_path)
        results["requests"] = {}
        for (kind, status), n in sorted(s.statuses.items()):
            results["requests"].setdefault(kind, {})[str(status)] = n
        results["counts"] = {k: s.counts[k] for k in sorted(s.counts)}
        results.update(failureCount=len(s.failures), failures=s.failures[:50])
        results["invariants"] = invariants(results, args)
    finally:
        env.cleanup()
    failed = lambda r: [f"{n}: {d}" for n, ok, d in r["invariants"] if not ok]  # noqa: E731
    return finish(results, t0, report, failed, args.json)


if __name__ == "__main__":
    sys.exit(main())
