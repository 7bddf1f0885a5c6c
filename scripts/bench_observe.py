"""End-to-end observation benchmark of chinwag: the real server, a raw-socket load generator.

    .venv/bin/python scripts/bench_observe.py --quick          # CI: tiny sizes, < 30 s
    .venv/bin/python scripts/bench_observe.py [--json out.json] [--observers 10,100,1000]
        [--tokens 500] [--rate 50] [--replays 20] [--late-joins 5]
        [--mem-streams 200] [--mem-tokens 300] [--mem-rate 25] [--open-window 64]
        [--target chinwag|floor-fanout]

The script starts ``python -m server.cli serve`` itself (``CHINWAG_PORT=0``, a
temporary ``CHINWAG_DB``, ``CHINWAG_RATE_LIMIT=1000000``,
``CHINWAG_SIM_TTFT_MS=0``, ``CHINWAG_SSE_HEARTBEAT_MS=60000``), one server per
measurement, creates an enduser and a supervisor with the CLI (``user add``,
``credits allocate``, ``token``), a fresh chat session over HTTP for every
stream (``/observe`` attaches to the newest live *or lingering* stream of a
session), and measures (SPEC §6):

1. **fan-out** (``CHINWAG_SIM_TOKENS_PER_S=--rate``, ``--tokens`` chunks): one
   stream watched by N observers, N in ``--observers``, in two modes:

   * ``wait``: the N observers connect with ``?wait=30`` *before* the stream
     starts (each gets ``observer {"status":"waiting"}``), then the client
     POSTs. Reported: attach (client request sent -> the observer's
     ``history-end``).
   * ``join``: the client POSTs; once it has its first chunk the N observers
     connect at once (at most ``--open-window`` handshakes in flight: the
     listen backlog is 100). Reported: join (connect -> ``history-end``
     received), p50/p99, and the time until all have joined.

   In both: each observer's delivery lag per live event (observer receive
   time - the client's receive time of the same event id, events after the
   observer's ``history-end``; p50/p99/max over all observers x events;
   in ``join`` mode also over the events the client got once every
   observer had joined, apart from the joins' own load), the
   client's own lateness (receive time - first-chunk receive time - k/rate)
   compared with a 0-observer run of the same stream (run before and after
   the observer runs), and every observer is checked: HTTP 200, ids 1..done
   consecutive (no gap, no duplicate), history-start/history-end consistent,
   no ``lagged``, every event byte-identical to the client's (CRC32 per
   event), ``done`` with the client's id.
2. **replay** (``CHINWAG_OBSERVE_RING=4096``, ``CHINWAG_SIM_TOKENS_PER_S=2000``,
   4,400-token answers): (a) ``--late-joins`` times, a stream runs and an
   observer joins when the client has seen 4,096 chunks (ring full); (b) a
   4,096-token stream finishes and ``--replays`` observers, one after the
   other, observe it within ``CHINWAG_STREAM_BUFFER_MS`` (it replays 4,096
   events up to ``done``). Time from writing the request on an already
   connected socket to receiving ``history-end``, p50/p99.
3. **memory** (``CHINWAG_STREAM_BUFFER_MS=2000``): server RSS idle (after a
   warm-up), with ``--mem-streams`` streams each observed (peak while all are
   live), and after they finish + the buffer time; ``GET
   /api/chat/streams/active`` during and after, and ``GET .../observe`` on
   every session after (must be 404 ``SESSION_NOT_ACTIVE``: the rings are gone).

The load generator is one trio process. Connections are raw non-blocking
sockets speaking HTTP/1.1; their reads are driven by one trio task that waits
on an ``epoll`` set (``trio.lowlevel.wait_readable`` on the epoll fd) and reads
every ready socket in turn, timestamping each ``recv`` — far cheaper per read
than one trio task per socket, so 1,000 observers cost little of the 2 cores
the server and the load generator share. The chunked body is decoded
incrementally (chunk-size lines and their CRLFs are checked, even when split
across reads) and SSE blocks are split on ``\\n\\n``. The load generator's
CPU (``time.process_time()``) and the server's CPU and RSS (``/proc/PID``) are
reported for every run.

``--target floor-fanout`` runs the fan-out part against the floor of the
stack instead of chinwag: ``bench_floor.py``'s bare ASGI app on the same
Hypercorn configuration, with a stream route that wakes every observer per
chunk and an observe route that writes what chinwag's feed starts with, then
everything new at each wake-up (``bench_floor.fanout_floor_app``). The same
load, the same checks: what one process of this stack costs per observer
write, and what lag that gives, before chinwag adds anything.

Exit status: 1 if something is functionally broken (an HTTP error, an observer
missing events, a gap or a duplicate, a mismatched event, ``lagged``, a stream
not released), never because of speed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import select
import socket
import sys
import time
import zlib
from array import array
from typing import Any

import trio
from bench_floor import start_floor
from benchlib import (
    HOST,
    Env,
    Meter,
    Server,
    arg_parser,
    create_session,
    create_sessions,
    finish,
    http_json,
    ms,
    pct,
    print_table,
    proc_sample,
    raise_fd_limit,
    request_bytes,
)
from benchlib import fmt as fmt_number

ENDUSER, SUPERVISOR, PASSWORD = "obs-client", "obs-supervisor", "bench-password"
MODEL = "amazon.nova-micro-v1:0"  # maxTokens 5000
RECV_SIZE = 262144
WAITING_MARK = b'event: observer\ndata: {"status":"waiting"'
BODY_END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body (no trailers)
TAIL = max(len(WAITING_MARK), len(BODY_END))
NAN = math.nan

#: Targets (1,000 observers) and what peers measured on this machine.
TARGETS = {
    "lagP50Ms": 5.0,
    "lagP99Ms": 20.0,
    "joinP50Ms": 50.0,
    "clientP99Ratio": 1.10,
    "replayMs": 5.0,
}
PEERS = "FastAPI lag p99 45 ms / join p50 653 ms; Fastify 16.7 ms / 74 ms"


def fmt(v: Any, unit: str = "") -> str:
    return fmt_number(v, unit, places=2)


# -- processes: CLI, server -------------------------------------------------------------


class ObserveEnv(Env):
    """The temp dir, the DB and the two users shared by every server this run starts."""

    def __init__(self, keep: bool) -> None:
        super().__init__(
            keep,
            "chinwag-bench-observe-",
            {"CHINWAG_SIM_TTFT_MS": "0", "CHINWAG_SSE_HEARTBEAT_MS": "60000"},
        )
        self.user_token = ""
        self.sup_token = ""

    def create_users(self) -> None:
        self.user_token = self.add_user(ENDUSER, PASSWORD, "enduser", 1_000_000_000)
        self.sup_token = self.add_user(SUPERVISOR, PASSWORD, "supervisor")


# -- the load generator: raw sockets read from one epoll set -----------------------------------


class Conn:
    """One HTTP/1.1 SSE response being read: the client's stream or an observer's.

    ``feed`` takes each ``recv`` with its receive time: it parses the head,
    decodes the chunked body incrementally and splits SSE blocks. Per event id
    it keeps the receive time and the CRC32 of the event's block, so events
    can be compared with the client's after the run.
    """

    __slots__ = (
        "_body_ended",
        "_chunked",
        "_crlf",
        "_head",
        "_left",
        "_sizeline",
        "_sse",
        "_tail",
        "connected_info",
        "crcs",
        "deferred",
        "done_id",
        "errors",
        "events",
        "finish_reason",
        "finished",
        "first_id",
        "gate",
        "head",
        "history",
        "history_end",
        "label",
        "lagged",
        "next_id",
        "raw",
        "reads",
        "sock",
        "status",
        "t_connected",
        "t_headers",
        "t_history_end",
        "t_sent",
        "t_start",
        "t_waiting",
        "times",
        "waiting",
        "watch",
        "writes",
    )

    def __init__(self, label: str, capacity: int, deferred: bool = False) -> None:
        self.label = label
        # Deferred: the reactor only stores each read with its time (and spots
        # "waiting" and the end of the body); parse() does the rest after the run,
        # so parsing one connection never delays the timestamp of another's read.
        self.deferred = deferred
        self.raw: list[tuple[bytes, float]] = []
        self._tail = b""
        self.sock: socket.socket | None = None
        self.status: int | None = None
        self.times = array("d", [NAN]) * capacity  # receive time per event id
        self.crcs = array("L", [0]) * capacity  # CRC32 of each event's SSE block
        self.first_id: int | None = None
        self.next_id: int | None = None
        self.events = 0
        self.reads = 0  # recv calls that carried body bytes
        self.writes = 0  # HTTP chunks received: the server writes one per wake-up
        self.done_id: int | None = None
        self.finish_reason: str | None = None
        self.errors: list[str] = []
        self.lagged = 0
        self.history: dict[str, Any] | None = None  # history-start data
        self.history_end: int | None = None  # history-end lastId
        self.connected_info: dict[str, Any] | None = None
        self.t_start = self.t_connected = self.t_sent = self.t_headers = NAN
        self.t_waiting = self.t_history_end = NAN
        self.finished = trio.Event()  # done + end of body, EOF, or failure
        # Set when observer {"status":"waiting"} arrives (t_waiting) or the conn closes.
        self.waiting = trio.Event()
        self.head = trio.Event()  # set when the response head arrives or the conn closes
        self.gate: trio.Semaphore | None = None  # released when the head arrives
        self.watch: tuple[int, trio.Event] | None = None  # set when next_id > n
        self._head = b""
        self._chunked = False
        self._left = 0
        self._crlf = 0
        self._sizeline = b""
        self._sse = b""
        self._body_ended = False

    def error(self, why: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(why)

    def release_gate(self) -> None:
        if self.gate is not None:
            self.gate.release()
            self.gate = None

    # The hot path. Returns True when the connection is finished (close it).
    def feed(self, data: bytes, t: float) -> bool:
        if self.status is None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return False
            self._head = b""
            self.t_headers = t
            self.head.set()
            self.release_gate()
            try:
                self.status = int(head[: head.find(b"\r\n")].split(b" ", 2)[1])
            except (ValueError, IndexError):
                self.status = -1
            if self.status != 200:
                self.error(f"HTTP {self.status}: {head[end + 4 : end + 204]!r}")
                return True
            self._chunked = b"\r\ntransfer-encoding: chunked" in head[:end].lower()
            data = head[end + 4 :]
            if not data:
                return False
        if self.deferred:
            self.raw.append((data, t))
            scan = self._tail + data
            if WAITING_MARK in scan:
                self.t_waiting = t
                self.waiting.set()
            self._tail = scan[-TAIL:]
            return scan.endswith(BODY_END) if self._chunked else False
        return self._consume(data, t)

    def parse(self) -> None:
        """Parse what a deferred connection stored (after the run)."""
        raw, self.raw, self.deferred = self.raw, [], False
        for data, t in raw:
            if self._body_ended:
                break
            self._consume(data, t)

    def _consume(self, data: bytes, t: float) -> bool:
        self.reads += 1
        payload = self._dechunk(data) if self._chunked else data
        if payload:
            self._on_payload(payload, t)
        return self._body_ended or bool(self.errors and self.status != 200)

    def _dechunk(self, data: bytes) -> bytes:
        if self._sizeline:
            data = self._sizeline + data
            self._sizeline = b""
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n and not self._body_ended:
            if self._left:
                end = min(n, pos + self._left)
                out.append(data[pos:end])
                self._left -= end - pos
                pos = end
                if not self._left:
                    self._crlf = 2
            elif self._crlf:
                take = min(self._crlf, n - pos)
                want = b"\r\n"[2 - self._crlf : 2 - self._crlf + take]
                if data[pos : pos + take] != want:
                    self.error(f"bad chunk framing: {data[pos : pos + 8]!r} for {want!r}")
                    self._body_ended = True
                    break
                self._crlf -= take
                pos += take
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    self._sizeline = data[pos:]
                    if len(self._sizeline) > 64:
                        self.error("chunk-size line too long")
                        self._body_ended = True
                    break
                try:
                    size = int(data[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self.error(f"bad chunk size {data[pos:eol][:20]!r}")
                    self._body_ended = True
                    break
                pos = eol + 2
                self.writes += 1
                if size == 0:
                    self._body_ended = True  # (a trailer CRLF follows; not read)
                    break
                self._left = size
        return out[0] if len(out) == 1 else b"".join(out)

    def _on_payload(self, payload: bytes, t: float) -> None:
        buf = self._sse + payload if self._sse else payload
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._sse = buf
            return
        self._sse = buf[end + 2 :]
        times, crcs = self.times, self.crcs
        for block in buf[:end].split(b"\n\n"):
            if block[:4] == b"id: ":
                nl = block.find(b"\n")
                eid = int(block[4:nl])
                nxt = self.next_id
                if nxt is None:
                    self.first_id = eid
                elif eid != nxt:
                    self.error(f"{'duplicate' if eid < nxt else 'gap'}: id {eid} after {nxt - 1}")
                self.next_id = eid + 1
                self.events += 1
                if eid >= len(times):
                    grow = eid + 1 - len(times) + 1024
                    times.extend(array("d", [NAN]) * grow)
                    crcs.extend(array("L", [0]) * grow)
                times[eid] = t
                crcs[eid] = zlib.crc32(block)
                if block.startswith(b"event: done\n", nl + 1):
                    self.done_id = eid
                    m = re.search(rb'"finishReason":"([a-z_]+)"', block)
                    self.finish_reason = m.group(1).decode() if m else None
                elif block.startswith(b"event: error\n", nl + 1):
                    self.error(f"error event: {block[nl + 1 :][:200]!r}")
            elif block[:1] == b":" or not block:
                continue  # ": connected", heartbeats
            else:
                self._control(block, t)
        if self.watch is not None and self.next_id is not None and self.next_id > self.watch[0]:
            self.watch[1].set()
            self.watch = None

    def _control(self, block: bytes, t: float) -> None:
        name = data = None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
        if name == "observer":
            status = data.get("status") if data else None
            if status == "waiting":
                self.t_waiting = t
                self.waiting.set()
            elif status == "connected":
                self.t_connected = t
                self.connected_info = data
            else:
                self.error(f"observer {data}")
        elif name == "history-start":
            self.history = data
        elif name == "history-end":
            self.history_end = int((data or {}).get("lastId", -1))
            self.t_history_end = t
            if self.history is None:
                self.error("history-end before history-start")
            elif (
                self.history["count"]
                and self.history_end != self.history["fromId"] + self.history["count"] - 1
            ):
                self.error(f"history-end {data} does not match history-start {self.history}")
            last_seen = (self.next_id or 1) - 1
            if last_seen != self.history_end:
                self.error(f"history-end lastId {self.history_end} after id {last_seen}")
        elif name == "lagged":
            self.lagged += int(data["skipped"]) if data else 1
            self.error(f"lagged {data}")
        else:
            self.error(f"unexpected event {name!r}: {block[:120]!r}")


class Reactor:
    """Reads every registered socket from one epoll set, in one trio task."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}

    def add(self, conn: Conn) -> None:
        assert conn.sock is not None
        self.conns[conn.sock.fileno()] = conn
        self.ep.register(conn.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def close(self, conn: Conn) -> None:
        sock = conn.sock
        if sock is not None:
            fd = sock.fileno()
            if self.conns.pop(fd, None) is not None:
                self.ep.unregister(fd)
            sock.close()
            conn.sock = None
        conn.release_gate()
        conn.finished.set()
        conn.waiting.set()
        conn.head.set()

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.ep.close()

    async def run(self) -> None:
        ep, conns, perf = self.ep, self.conns, time.perf_counter
        while True:
            await trio.lowlevel.wait_readable(ep.fileno())
            for fd, _ in ep.poll(0, 4096):
                conn = conns.get(fd)
                if conn is None or conn.sock is None:
                    continue
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    conn.error(f"recv: {exc}")
                    self.close(conn)
                    continue
                t = perf()
                if not data:
                    if not conn.deferred and not (conn.done_id and conn._body_ended):
                        conn.error(f"EOF after {conn.events} events")
                    self.close(conn)
                elif conn.feed(data, t):
                    self.close(conn)


async def tcp_connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        err = sock.connect_ex((HOST, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        if err:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def send_request(reactor: Reactor, conn: Conn, sock: socket.socket, req: bytes) -> None:
    """Write the request on a connected socket and hand the socket to the reactor."""
    conn.sock = sock
    conn.t_sent = time.perf_counter()
    view = memoryview(req)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
    reactor.add(conn)


async def open_conn(
    reactor: Reactor, port: int, conn: Conn, req: bytes, gate: trio.Semaphore | None = None
) -> None:
    """Connect (holding a ``gate`` slot until the response head), send, register."""
    if gate is not None:
        await gate.acquire()
        conn.gate = gate
    conn.t_start = time.perf_counter()
    try:
        sock = await tcp_connect(port)
        await send_request(reactor, conn, sock, req)
    except OSError as exc:
        conn.error(f"connect/send: {exc}")
        conn.release_gate()
        conn.finished.set()
        conn.waiting.set()
        conn.head.set()


def observe_req(sid: str, token: str, wait: float | None) -> bytes:
    q = f"?wait={wait:g}" if wait else ""
    return request_bytes("GET", f"/api/chat/sessions/{sid}/observe{q}", token)


def stream_req(sid: str, token: str, tokens: int, message: str = "Tell me a story") -> bytes:
    return request_bytes(
        "POST",
        f"/api/chat/sessions/{sid}/stream",
        token,
        {"message": message, "modelId": MODEL, "maxTokens": tokens},
    )


async def wait_all(conns: list[Conn], limit_s: float) -> bool:
    """Wait until every conn finished; False on timeout (the rest are then failed)."""
    with trio.move_on_after(limit_s):
        for c in conns:
            await c.finished.wait()
        return True
    for c in conns:
        if not c.finished.is_set():
            c.error(f"timeout after {limit_s:.0f} s ({c.events} events)")
    return False


def check_client(c: Conn, chunks: int) -> list[str]:
    out = list(c.errors)
    if c.status != 200:
        out.append(f"client HTTP {c.status}")
    elif c.done_id is None:
        out.append(f"client: no done ({c.events} events)")
    else:
        if c.first_id != 1 or c.done_id != chunks + 1:
            out.append(f"client: ids {c.first_id}..{c.done_id}, expected 1..{chunks + 1}")
        if c.finish_reason not in ("stop", "length"):
            out.append(f"client finishReason {c.finish_reason!r}")
    return out


def check_observer(o: Conn, client: Conn, first: int = 1) -> list[str]:
    """What is wrong with an observer's feed, compared with the client's ([] if nothing)."""
    out = list(o.errors)
    if o.status != 200:
        return out or [f"HTTP {o.status}"]
    if o.history is None or o.history_end is None:
        out.append(f"no history-start/history-end ({o.events} events)")
    if o.done_id is None:
        out.append(f"no done ({o.events} events, last id {(o.next_id or 1) - 1})")
        return out
    if o.first_id != first:
        out.append(f"first id {o.first_id}, expected {first}")
    if client.done_id is not None:
        if o.done_id != client.done_id:
            out.append(f"done id {o.done_id}, client's {client.done_id}")
        lo, hi = o.first_id or 1, o.done_id + 1
        if o.crcs[lo:hi] != client.crcs[lo:hi]:
            bad = next(i for i in range(lo, hi) if o.crcs[i] != client.crcs[i])
            out.append(f"event {bad} differs from the client's")
    if o.events != o.done_id - (o.first_id or 1) + 1:
        out.append(f"{o.events} events for ids {o.first_id}..{o.done_id}")
    return out


def lateness(c: Conn, chunks: int, rate: float, after: float = -math.inf) -> list[float]:
    """Client chunk k (id k+1): receive time - first-chunk receive time - k/rate;
    only the chunks received after ``after`` (a perf_counter time)."""
    t = c.times
    if chunks < 1 or math.isnan(t[1]):
        return []
    t0, step = t[1], 1 / rate
    return [
        t[i] - t0 - (i - 1) * step
        for i in range(1, min(chunks, len(t) - 1) + 1)
        if not math.isnan(t[i]) and t[i] > after
    ]


async def sample_rss(pid: int, out: list[tuple[float, int]], every: float = 0.25) -> None:
    while True:
        out.append((time.perf_counter(), proc_sample(pid).rss_kb))
        await trio.sleep(every)


# -- 1. fan-out: one paced stream, N observers ----------------------------------------------


async def bench_fanout(
    port: int,
    pid: int,
    user: str,
    sup: str,
    n_obs: int,
    mode: str,
    tokens: int,
    rate: float,
    window: int,
) -> dict[str, Any]:
    """mode: "none" (no observers), "wait" (connect before the stream), "join" (right after)."""
    sid = await create_session(port, user, f"fan-out {mode} {n_obs}")
    cap = tokens + 4
    client = Conn("client", cap)
    observers = [Conn(f"obs{i}", cap, deferred=True) for i in range(n_obs)]
    gate = trio.Semaphore(window) if window > 0 else None
    rss: list[tuple[float, int]] = []
    duration = tokens / rate
    reactor = Reactor()
    out: dict[str, Any] = {"observers": n_obs, "mode": mode, "tokens": tokens, "rate": rate}
    failures: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            nursery.start_soon(sample_rss, pid, rss)
            meter = Meter(pid, "loadgen")
            t_first_obs = NAN
            if mode == "wait":
                req = observe_req(sid, sup, 30)
                t_first_obs = time.perf_counter()
                for o in observers:
                    nursery.start_soon(open_conn, reactor, port, o, req, gate)
                with trio.move_on_after(30 + n_obs * 0.05):
                    for o in observers:
                        await o.waiting.wait()
                out["allWaitingS"] = round(time.perf_counter() - t_first_obs, 3)
                not_waiting = [o for o in observers if o.t_waiting != o.t_waiting]
                if not_waiting:
                    failures.append(
                        f"{len(not_waiting)} observers never got 'waiting': "
                        f"{not_waiting[0].errors[:1]}"
                    )
            client.watch = (1, trio.Event())
            first_chunk = client.watch[1]
            nursery.start_soon(open_conn, reactor, port, client, stream_req(sid, user, tokens))
            if mode == "join":
                with trio.move_on_after(10):
                    await first_chunk.wait()
                req = observe_req(sid, sup, None)
                t_first_obs = time.perf_counter()
                for o in observers:
                    nursery.start_soon(open_conn, reactor, port, o, req, gate)
            ok = await wait_all([client, *observers], duration + 60)
            cpu = meter.result()
            nursery.cancel_scope.cancel()
    finally:
        reactor.close_all()
    for o in observers:
        o.parse()

    failures += check_client(client, tokens)
    bad_obs = 0
    for o in observers:
        why = check_observer(o, client)
        if why:
            bad_obs += 1
            if len(failures) < 8:
                failures.append(f"{o.label}: {'; '.join(why[:2])}")
    # Lag: events after each observer's history-end, vs. the client's receive time;
    # and the same only for events the client got once every observer had joined.
    ct = client.times
    joined_at = max((o.t_history_end for o in observers), default=NAN)
    lags, settled = array("d"), array("d")
    for o in observers:
        if o.done_id is None or o.history_end is None:
            continue
        ot = o.times
        for i in range(o.history_end + 1, o.done_id + 1):
            a, b = ot[i], ct[i]
            if a == a and b == b:  # not nan
                lags.append(a - b)
                if b > joined_at:
                    settled.append(a - b)
    late = lateness(client, tokens, rate)
    joins = [o.t_history_end - o.t_start for o in observers if o.t_history_end == o.t_history_end]
    attach = [
        o.t_history_end - client.t_sent for o in observers if o.t_history_end == o.t_history_end
    ]
    obs_writes = sum(o.writes for o in observers)
    server_writes = obs_writes + client.writes
    ct1 = ct[1] if len(ct) > 1 else NAN
    ctn = ct[tokens] if len(ct) > tokens else NAN
    stream_s = ctn - ct1
    live_events = sum(o.events - (o.history_end or 0) for o in observers if o.done_id)
    live_reads = sum(o.reads for o in observers if o.done_id)
    out.update(
        {
            "ok": ok,
            "clientLatenessP50Ms": ms(pct(late, 50)),
            "clientLatenessP99Ms": ms(pct(late, 99)),
            "clientLatenessMaxMs": ms(max(late)) if late else NAN,
            "clientChunks": client.events - (1 if client.done_id else 0),
            # How long the client's chunks took (first -> last) against the paced schedule:
            # a server too busy to run the producer stretches the stream.
            "clientStreamS": round(stream_s, 3),
            "clientStreamNominalS": round((tokens - 1) / rate, 3),
            "clientEffectiveRate": round((tokens - 1) / stream_s, 1) if stream_s > 0 else None,
            "observerWrites": obs_writes,
            "eventsPerObserverWrite": round(sum(o.events for o in observers) / obs_writes, 2)
            if obs_writes
            else None,
            "serverCpuUsPerWrite": round(1e6 * cpu["serverCpuS"] / server_writes, 1)
            if server_writes
            else None,
            "lagSamples": len(lags),
            "lagP50Ms": ms(pct(lags, 50)),
            "lagP99Ms": ms(pct(lags, 99)),
            "lagMaxMs": ms(max(lags)) if lags else NAN,
            "lagMinMs": ms(min(lags)) if lags else NAN,
            "lagAllJoinedSamples": len(settled),
            "lagAllJoinedP50Ms": ms(pct(settled, 50)),
            "lagAllJoinedP99Ms": ms(pct(settled, 99)),
            "eventsPerObserverRead": round(
                sum(o.events for o in observers) / max(1, sum(o.reads for o in observers)), 2
            )
            if observers
            else None,
            "liveEventsPerRead": round(live_events / live_reads, 2) if live_reads else None,
            "failedObservers": bad_obs,
            "failures": len(failures),
            "failureSamples": failures[:8],
            "rssPeakKb": max((r for _, r in rss), default=0),
            "cpu": cpu,
        }
    )
    if mode == "join" and joins:
        # The client's lateness once every observer is in: watching alone, no joins.
        late_settled = lateness(client, tokens, rate, after=joined_at)
        out.update(
            {
                "clientLatenessAllJoinedSamples": len(late_settled),
                "clientLatenessAllJoinedP50Ms": ms(pct(late_settled, 50)),
                "clientLatenessAllJoinedP99Ms": ms(pct(late_settled, 99)),
                "joinP50Ms": ms(pct(joins, 50)),
                "joinP99Ms": ms(pct(joins, 99)),
                "joinMaxMs": ms(max(joins)),
                "allJoinedS": round(
                    max(o.t_history_end for o in observers if o.t_history_end == o.t_history_end)
                    - t_first_obs,
                    3,
                ),
                "historyCountP50": pct([o.history["count"] for o in observers if o.history], 50),
            }
        )
    if mode == "wait" and attach:
        out.update(
            {
                "attachP50Ms": ms(pct(attach, 50)),
                "attachP99Ms": ms(pct(attach, 99)),
                "attachMaxMs": ms(max(attach)),
                "historyCountMax": max(
                    (o.history["count"] for o in observers if o.history), default=None
                ),
            }
        )
    return out


# -- 2. replay: a late observer to history-end ------------------------------------------------


async def bench_late_join(
    port: int, pid: int, user: str, sup: str, tokens: int, repeats: int, join_at: int
) -> dict[str, Any]:
    """A stream runs; an observer joins once the client has ``join_at`` chunks."""
    sids = await create_sessions(port, user, repeats)
    times_: list[float] = []
    counts: list[int] = []
    failures: list[str] = []
    lagged_joins = skipped = 0
    heads: list[float] = []
    meter = Meter(pid, "loadgen")
    for sid in sids:
        client, obs = Conn("client", tokens + 4), Conn("late", tokens + 4, deferred=True)
        reactor = Reactor()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reactor.run)
                sock = await tcp_connect(port)  # connected before the clock starts
                client.watch = (join_at, trio.Event())
                seen = client.watch[1]
                await open_conn(reactor, port, client, stream_req(sid, user, tokens))
                with trio.move_on_after(30):
                    await seen.wait()
                if client.next_id is None or client.next_id <= join_at:
                    failures.append(f"client did not reach {join_at} chunks ({client.events})")
                    sock.close()
                else:
                    await send_request(reactor, obs, sock, observe_req(sid, sup, None))
                await wait_all([client, obs], 60)
                nursery.cancel_scope.cancel()
        finally:
            reactor.close_all()
        obs.parse()
        why = check_client(client, tokens) + check_observer(obs, client, first=obs.first_id or 1)
        if obs.history and obs.first_id != obs.history["fromId"]:
            why.append(
                f"history-start announced {obs.history['count']} events from id "
                f"{obs.history['fromId']}, the first delivered was id {obs.first_id}"
            )
        if obs.lagged:
            lagged_joins += 1
            skipped += obs.lagged
        if why:
            failures.append("; ".join(why[:3]))
        if obs.t_history_end == obs.t_history_end and obs.history:
            # Timed even when the observer was skipped forward: history-end still
            # closes the (shortened) replay.
            times_.append(obs.t_history_end - obs.t_sent)
            counts.append(obs.history["count"])
            heads.append(obs.t_headers - obs.t_sent)
    return {
        "repeats": repeats,
        "tokens": tokens,
        "joinAtChunks": join_at,
        "historyCountMin": min(counts) if counts else None,
        "historyCountMax": max(counts) if counts else None,
        "headP50Ms": ms(pct(heads, 50)),
        "historyEndP50Ms": ms(pct(times_, 50)),
        "historyEndP99Ms": ms(pct(times_, 99)),
        "historyEndMinMs": ms(min(times_)) if times_ else NAN,
        "samplesMs": [ms(x) for x in times_],
        "laggedJoins": lagged_joins,
        "skippedEvents": skipped,
        "failures": len(failures),
        "failureSamples": failures[:5],
        "cpu": meter.result(),
    }


async def bench_replay_ended(
    port: int, pid: int, user: str, sup: str, tokens: int, repeats: int
) -> dict[str, Any]:
    """A ``tokens``-chunk stream finishes; observers replay it (to ``done``) one at a time."""
    sid = await create_session(port, user, "replay ended")
    client = Conn("client", tokens + 4)
    failures: list[str] = []
    times_: list[float] = []
    counts: list[int] = []
    heads: list[float] = []
    reactor = Reactor()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            await open_conn(reactor, port, client, stream_req(sid, user, tokens))
            await wait_all([client], 60)
            failures += check_client(client, tokens)
            meter = Meter(pid, "loadgen")
            for i in range(repeats if not failures else 0):
                obs = Conn(f"replay{i}", tokens + 4, deferred=True)
                sock = await tcp_connect(port)
                await send_request(reactor, obs, sock, observe_req(sid, sup, None))
                await wait_all([obs], 20)
                obs.parse()
                heads.append(obs.t_headers - obs.t_sent)
                first = (client.done_id or 0) + 1 - obs.history["count"] if obs.history else 1
                why = check_observer(obs, client, first=first)
                if obs.history_end != client.done_id:
                    why.append(f"history-end {obs.history_end}, expected {client.done_id}")
                if why or obs.history is None:
                    failures.append("; ".join(why[:3]) or "no history-start")
                else:
                    times_.append(obs.t_history_end - obs.t_sent)
                    counts.append(obs.history["count"])
            cpu = meter.result()
            nursery.cancel_scope.cancel()
    finally:
        reactor.close_all()
    return {
        "repeats": repeats,
        "tokens": tokens,
        "historyCount": counts[0] if counts else None,
        "headP50Ms": ms(pct(heads, 50)),
        "historyEndP50Ms": ms(pct(times_, 50)),
        "historyEndP99Ms": ms(pct(times_, 99)),
        "historyEndMinMs": ms(min(times_)) if times_ else NAN,
        "failures": len(failures),
        "failureSamples": failures[:5],
        "cpu": cpu,
    }


# -- 3. memory per observed stream -----------------------------------------------------------


async def memory_round(
    port: int,
    pid: int,
    user: str,
    sup: str,
    k: int,
    per: int,
    tokens: int,
    rate: float,
    buffer_ms: int,
    window: int,
    tag: str,
) -> dict[str, Any]:
    """K streams, each watched by ``per`` observers from its start; RSS during and after."""
    failures: list[str] = []
    sids = await create_sessions(port, user, k)
    cap = tokens + 4
    clients = [Conn(f"{tag}client{i}", cap) for i in range(k)]
    observers = [
        [Conn(f"{tag}obs{i}.{j}", cap, deferred=True) for j in range(per)] for i in range(k)
    ]
    gate = trio.Semaphore(window) if window > 0 else None
    samples: list[tuple[float, int, int]] = []  # t, rss, live clients
    reactor = Reactor()
    active_during: Any = None
    meter = Meter(pid, "loadgen")

    def live_clients() -> int:
        return sum(1 for c in clients if c.t_headers == c.t_headers and not c.finished.is_set())

    async def sampler() -> None:
        while True:
            samples.append((time.perf_counter(), proc_sample(pid).rss_kb, live_clients()))
            await trio.sleep(0.25)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            nursery.start_soon(sampler)
            for i, sid in enumerate(sids):
                for o in observers[i]:
                    nursery.start_soon(open_conn, reactor, port, o, observe_req(sid, sup, 60), gate)
            with trio.move_on_after(30 + k * per * 0.05):
                for row in observers:
                    for o in row:
                        await o.waiting.wait()
            for c, sid in zip(clients, sids, strict=True):
                nursery.start_soon(open_conn, reactor, port, c, stream_req(sid, user, tokens), gate)
            # Half-way: the hub lists every stream, each with its observers.
            with trio.move_on_after(30):
                for c in clients:
                    await c.head.wait()
            await trio.sleep(min(tokens / rate / 2, 5))
            status, active_during = await http_json(port, "GET", "/api/chat/streams/active", sup)
            if status != 200:
                failures.append(f"/streams/active -> {status}")
            ok = await wait_all(clients + [o for row in observers for o in row], tokens / rate + 60)
            t_end = time.perf_counter()
            ended = proc_sample(pid)
            await trio.sleep(buffer_ms / 1000 + 0.5)
            after = proc_sample(pid)
            nursery.cancel_scope.cancel()
    finally:
        reactor.close_all()
    cpu = meter.result()
    for row in observers:
        for o in row:
            o.parse()

    for c in clients:
        failures += [f"{c.label}: {w}" for w in check_client(c, tokens)][:1]
    for i, row in enumerate(observers):
        for o in row:
            why = check_observer(o, clients[i])
            if why:
                failures.append(f"{o.label}: {why[0]}")
    during = active_during.get("streams", []) if isinstance(active_during, dict) else []
    if len(during) != k:
        failures.append(f"/streams/active listed {len(during)} streams while {k} were live")
    elif any(s.get("observers") != per for s in during):
        failures.append(
            "/streams/active observer counts differ from "
            f"{per}: {sorted({s.get('observers') for s in during})}"
        )
    status, active_after = await http_json(port, "GET", "/api/chat/streams/active", sup)
    after_streams = active_after.get("streams", []) if isinstance(active_after, dict) else None
    if status != 200 or after_streams:
        failures.append(
            f"/streams/active after the end: {status} {len(after_streams or [])} streams"
        )
    # Past CHINWAG_STREAM_BUFFER_MS every ring must be gone: observe is a 404.
    still = 0
    for sid in sids:
        status, body = await http_json(port, "GET", f"/api/chat/sessions/{sid}/observe", sup)
        if not (status == 404 and (body or {}).get("errorCode") == "SESSION_NOT_ACTIVE"):
            still += 1
    if still:
        failures.append(f"{still} sessions still observable after the buffer time")
    full = [s for s in samples if s[2] == k and s[0] < t_end]
    rss_open = max((s[1] for s in full), default=max((s[1] for s in samples), default=0))
    return {
        "ok": ok,
        "rssAllObservedKb": rss_open,
        "rssEndedKb": ended.rss_kb,
        "rssAfterBufferKb": after.rss_kb,
        "activeDuring": len(during),
        "activeAfter": len(after_streams) if after_streams is not None else None,
        "observableAfter": still,
        "failures": failures,
        "cpu": cpu,
    }


async def bench_memory(
    port: int,
    pid: int,
    user: str,
    sup: str,
    k: int,
    per: int,
    tokens: int,
    rate: float,
    buffer_ms: int,
    window: int,
) -> dict[str, Any]:
    """Two identical rounds of K observed streams on one server.

    Round 1 gives RSS per observed stream and what is left after the buffer time;
    round 2 tells a leak (RSS grows again by as much) from allocator retention
    (the freed memory is reused: RSS stays flat).
    """
    failures: list[str] = []
    # Warm-up: one observed stream end to end, then let it expire.
    warm = await bench_fanout(port, pid, user, sup, 1, "wait", min(tokens, 20), rate, window)
    if warm["failures"]:
        failures.append(f"warm-up: {warm['failureSamples'][:2]}")
    await trio.sleep(buffer_ms / 1000 + 0.5)
    idle = proc_sample(pid)
    r1 = await memory_round(port, pid, user, sup, k, per, tokens, rate, buffer_ms, window, "a")
    r2 = await memory_round(port, pid, user, sup, k, per, tokens, rate, buffer_ms, window, "b")
    failures += r1.pop("failures") + r2.pop("failures")
    open1 = r1["rssAllObservedKb"]
    return {
        "streams": k,
        "observersPerStream": per,
        "tokens": tokens,
        "rate": rate,
        "bufferMs": buffer_ms,
        "ok": r1["ok"] and r2["ok"],
        "rssIdleKb": idle.rss_kb,
        "rssAllObservedKb": open1,
        "rssPerStreamKb": round((open1 - idle.rss_kb) / k, 1),
        "rssEndedKb": r1["rssEndedKb"],
        "rssAfterBufferKb": r1["rssAfterBufferKb"],
        "rssRetainedKb": r1["rssAfterBufferKb"] - idle.rss_kb,
        "rssReleasedPct": round(
            100 * (open1 - r1["rssAfterBufferKb"]) / max(1, open1 - idle.rss_kb), 1
        ),
        "round2AllObservedKb": r2["rssAllObservedKb"],
        "round2AfterBufferKb": r2["rssAfterBufferKb"],
        "round2GrowthKb": r2["rssAfterBufferKb"] - r1["rssAfterBufferKb"],
        "activeDuring": r1["activeDuring"],
        "activeAfter": r1["activeAfter"],
        "observableAfter": r1["observableAfter"] + r2["observableAfter"],
        "round2": r2,
        "failures": len(failures),
        "failureSamples": failures[:8],
        "cpu": r1["cpu"],
    }


# -- report ----------------------------------------------------------------------------------


def verdict(value: Any, target: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "ok" if value <= target else "MISS"


def baseline_p99(results: dict[str, Any]) -> float:
    runs = [
        r["clientLatenessP99Ms"]
        for r in results.get("baseline", [])
        if not math.isnan(r["clientLatenessP99Ms"])
    ]
    return sum(runs) / len(runs) if runs else NAN


def report(results: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    base = baseline_p99(results)
    for b in results.get("baseline", []):
        c = b["cpu"]
        rows.append(
            (
                f"0 observers ({b['label']})",
                f"client late p50/p99 {fmt(b['clientLatenessP50Ms'])} / "
                f"{fmt(b['clientLatenessP99Ms'])} ms",
                f"max {fmt(b['clientLatenessMaxMs'])} ms; srv cpu {fmt(c['serverCpuPct'])}%, "
                f"loadgen {fmt(c['loadgenCpuPct'])}%",
            )
        )
    for r in results.get("fanout", []):
        n, big = r["observers"], r["observers"] >= 1000
        c = r["cpu"]
        t = TARGETS
        label = f"{n} obs {r['mode']}"
        lag_note = (
            f"max {fmt(r['lagMaxMs'])}, min {fmt(r['lagMinMs'])} ms over "
            f"{fmt(r['lagSamples'])} events; {fmt(r['liveEventsPerRead'])} ev/read"
        )
        if big:
            lag_note += (
                f"; target p50<={t['lagP50Ms']:g} [{verdict(r['lagP50Ms'], t['lagP50Ms'])}]"
                f" p99<={t['lagP99Ms']:g} [{verdict(r['lagP99Ms'], t['lagP99Ms'])}]"
            )
        rows.append(
            (f"{label}: lag p50/p99", f"{fmt(r['lagP50Ms'])} / {fmt(r['lagP99Ms'])} ms", lag_note)
        )
        if r["mode"] == "join":
            rows.append(
                (
                    "  lag once all had joined p50/p99",
                    f"{fmt(r['lagAllJoinedP50Ms'])} / {fmt(r['lagAllJoinedP99Ms'])} ms",
                    f"over {fmt(r['lagAllJoinedSamples'])} events",
                )
            )
            note = f"max {fmt(r.get('joinMaxMs'))} ms; all joined in {fmt(r.get('allJoinedS'))} s"
            if big:
                note += f"; target p50<={t['joinP50Ms']:g} [{verdict(r.get('joinP50Ms'), t['joinP50Ms'])}]"
            rows.append(
                (
                    "  join (connect->history-end) p50/p99",
                    f"{fmt(r.get('joinP50Ms'))} / {fmt(r.get('joinP99Ms'))} ms",
                    note,
                )
            )
        else:
            rows.append(
                (
                    "  attach (POST->history-end) p50/p99",
                    f"{fmt(r.get('attachP50Ms'))} / {fmt(r.get('attachP99Ms'))} ms",
                    f"all {n} waiting after {fmt(r.get('allWaitingS'))} s",
                )
            )
        ratio = r["clientLatenessP99Ms"] / base if base and not math.isnan(base) else NAN
        note = f"max {fmt(r['clientLatenessMaxMs'])} ms; p99 = {fmt(ratio)}x no-observer {fmt(base)} ms"
        if big:
            note += f" [{verdict(ratio, t['clientP99Ratio'])}]"
        rows.append(
            (
                "  client late p50/p99",
                f"{fmt(r['clientLatenessP50Ms'])} / {fmt(r['clientLatenessP99Ms'])} ms",
                note,
            )
        )
        if r["mode"] == "join":
            rows.append(
                (
                    "  client late once all had joined",
                    f"{fmt(r.get('clientLatenessAllJoinedP50Ms'))} / "
                    f"{fmt(r.get('clientLatenessAllJoinedP99Ms'))} ms",
                    f"over {fmt(r.get('clientLatenessAllJoinedSamples'))} chunks",
                )
            )
        rows.append(
            (
                "  client stream / writes",
                f"{fmt(r['clientStreamS'])} s for {fmt(r['clientStreamNominalS'])} s",
                f"effective {fmt(r['clientEffectiveRate'])} chunks/s; {fmt(r['observerWrites'])} "
                f"observer writes, {fmt(r['eventsPerObserverWrite'])} events/write, "
                f"{fmt(r['serverCpuUsPerWrite'])} us server CPU/write",
            )
        )
        rows.append(
            (
                "  cpu / rss",
                f"srv {fmt(c['serverCpuPct'])}% loadgen {fmt(c['loadgenCpuPct'])}%",
                f"server RSS peak {fmt(r['rssPeakKb'])} KB; failures {r['failures']} "
                f"{'; '.join(r['failureSamples'][:2])}",
            )
        )
    if lj := results.get("lateJoin"):
        rows.append(
            (
                "late join at 4,096: history-end p50/p99",
                f"{fmt(lj['historyEndP50Ms'])} / {fmt(lj['historyEndP99Ms'])} ms",
                f"{lj['repeats']} joins, history {lj['historyCountMin']}..{lj['historyCountMax']} "
                f"events (head p50 {fmt(lj['headP50Ms'])} ms), live at 2000/s; "
                f"target <= {TARGETS['replayMs']:g} "
                f"[{verdict(lj['historyEndP50Ms'], TARGETS['replayMs'])}]; lagged at join "
                f"{lj['laggedJoins']}/{lj['repeats']} (skipped {lj['skippedEvents']}); "
                f"failures {lj['failures']}",
            )
        )
    if rp := results.get("replayEnded"):
        rows.append(
            (
                "replay ended 4,096: history-end p50/p99",
                f"{fmt(rp['historyEndP50Ms'])} / {fmt(rp['historyEndP99Ms'])} ms",
                f"{rp['repeats']} replays of {rp['historyCount']} events to done (head p50 "
                f"{fmt(rp['headP50Ms'])} ms); target <= "
                f"{TARGETS['replayMs']:g} [{verdict(rp['historyEndP50Ms'], TARGETS['replayMs'])}];"
                f" failures {rp['failures']}",
            )
        )
    if mem := results.get("memory"):
        c = mem["cpu"]
        rows += [
            (
                f"memory: {mem['streams']} streams x {mem['observersPerStream']} obs",
                f"{fmt(mem['rssPerStreamKb'])} KB/stream",
                f"idle {fmt(mem['rssIdleKb'])} KB, all observed {fmt(mem['rssAllObservedKb'])} KB, "
                f"{mem['tokens']} events each",
            ),
            (
                "  after done + buffer",
                f"{fmt(mem['rssAfterBufferKb'])} KB",
                f"retained {fmt(mem['rssRetainedKb'])} KB over idle ({fmt(mem['rssReleasedPct'])}% "
                f"released); /streams/active {mem['activeDuring']} -> {mem['activeAfter']}; "
                f"observable after {mem['observableAfter']}; failures {mem['failures']}",
            ),
            (
                "  round 2 (same again)",
                f"{fmt(mem['round2AfterBufferKb'])} KB",
                f"peak {fmt(mem['round2AllObservedKb'])} KB; growth over round 1 "
                f"{fmt(mem['round2GrowthKb'])} KB (~0: freed memory is reused, no leak)",
            ),
            (
                "  cpu",
                f"srv {fmt(c['serverCpuPct'])}% loadgen {fmt(c['loadgenCpuPct'])}%",
                f"wall {fmt(c['wallS'])} s",
            ),
        ]
    print()
    target = results.get("target", "chinwag")
    print(f"{target} observation benchmark (peers: {PEERS})")
    print_table(rows)


def functional_failures(results: dict[str, Any]) -> list[str]:
    bad = []
    for r in results.get("baseline", []) + results.get("fanout", []):
        if r["failures"] or not r["clientChunks"]:
            bad.append(f"fan-out {r['observers']} {r['mode']}: {r['failureSamples']}")
        elif r["observers"] and not r["lagSamples"]:
            bad.append(f"fan-out {r['observers']} {r['mode']}: no live events observed")
    for key in ("lateJoin", "replayEnded"):
        if (r := results.get(key)) and (r["failures"] or math.isnan(r["historyEndP50Ms"])):
            bad.append(f"{key}: {r['failures']} failures {r['failureSamples']}")
    if (m := results.get("memory")) and m["failures"]:
        bad.append(f"memory: {m['failureSamples']}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = arg_parser(__doc__, "tiny sizes (CI), well under 30 s")
    p.add_argument("--observers", default="10,100,1000", help="comma-separated observer counts")
    p.add_argument("--modes", default="wait,join", help="comma-separated: wait, join")
    p.add_argument("--tokens", type=int, default=500, help="chunks in the fan-out stream")
    p.add_argument("--rate", type=float, default=50.0, help="chunks/s of the fan-out stream")
    p.add_argument(
        "--open-window",
        type=int,
        default=64,
        help="max observer handshakes in flight (listen backlog is 100; 0 = no limit)",
    )
    p.add_argument("--ring", type=int, default=4096, help="CHINWAG_OBSERVE_RING for the replay")
    p.add_argument("--late-joins", type=int, default=5, help="late joins at a full ring")
    p.add_argument("--replays", type=int, default=20, help="replays of an ended stream")
    p.add_argument("--mem-streams", type=int, default=200)
    p.add_argument("--mem-observers", type=int, default=1, help="observers per stream")
    p.add_argument("--mem-tokens", type=int, default=300)
    p.add_argument("--mem-rate", type=float, default=25.0, help="chunks/s of each memory stream")
    p.add_argument("--buffer-ms", type=int, default=2000, help="CHINWAG_STREAM_BUFFER_MS (memory)")
    p.add_argument(
        "--only",
        default="fanout,replay,memory",
        help="comma-separated subset of: fanout,replay,memory",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (DB, server logs)")
    p.add_argument(
        "--target",
        choices=("chinwag", "floor-fanout"),
        default="chinwag",
        help="floor-fanout: the fan-out part against the bare stack's floor (module docstring)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.observers, args.tokens = "5", 60
        args.late_joins, args.replays = 1, 1
        args.mem_streams, args.mem_tokens, args.mem_rate, args.buffer_ms = 5, 60, 50.0, 500
    levels = [int(x) for x in args.observers.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    only = {x.strip() for x in args.only.split(",")}
    if args.target != "chinwag":
        only &= {"fanout"}  # the floor has no replay bound or memory to measure
    replay_tokens = args.ring + 304  # the stream still runs when the observer joins at `ring`

    nofile = raise_fd_limit(
        max(max(levels, default=0), args.mem_streams * (1 + args.mem_observers)) * 2 + 4096
    )
    env = ObserveEnv(keep=args.keep)
    results: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0], "fdLimit": nofile},
        "args": vars(args),
        "targets": TARGETS,
        "peers": PEERS,
        "target": args.target,
    }
    t0 = time.perf_counter()
    try:
        env.create_users()
        user, sup = env.user_token, env.sup_token
        if "fanout" in only:
            if args.target == "floor-fanout":
                srv = start_floor(env, "floor-fanout", "floor-fanout", args.rate, 5.0, ttft_ms=0)
            else:
                srv = Server(
                    env,
                    "serve-fanout",
                    {
                        "CHINWAG_SIM_TOKENS_PER_S": f"{args.rate:g}",
                        "CHINWAG_SIM_ANSWER_TOKENS": str(args.tokens),
                        "CHINWAG_STREAM_BUFFER_MS": "2000",
                    },
                )
            results["server"] = {"fanoutPid": srv.pid}
            try:

                def fan(n: int, mode: str) -> dict[str, Any]:
                    return trio.run(
                        bench_fanout,
                        srv.port,
                        srv.pid,
                        user,
                        sup,
                        n,
                        mode,
                        args.tokens,
                        args.rate,
                        args.open_window,
                    )

                print(f"[1] fan-out: {args.tokens} chunks at {args.rate:g}/s; warm-up", flush=True)
                if not args.quick:  # warm-up (imports, first JWT, DB)
                    fan(min(2, max(levels, default=2)), "join")
                results["baseline"] = []
                print("    0 observers (baseline)", flush=True)
                results["baseline"].append({**fan(0, "none"), "label": "before"})
                results["fanout"] = []
                for n in levels:
                    for mode in modes:
                        print(f"    {n} observers, {mode}", flush=True)
                        results["fanout"].append(fan(n, mode))
                print("    0 observers (baseline again)", flush=True)
                results["baseline"].append({**fan(0, "none"), "label": "after"})
            finally:
                srv.stop()
        if "replay" in only:
            srv = Server(
                env,
                "serve-replay",
                {
                    "CHINWAG_SIM_TOKENS_PER_S": "2000",
                    "CHINWAG_SIM_ANSWER_TOKENS": str(replay_tokens),
                    "CHINWAG_OBSERVE_RING": str(args.ring),
                    "CHINWAG_STREAM_BUFFER_MS": "60000",
                },
            )
            try:
                print(
                    f"[2] late join at {args.ring:,} chunks of {replay_tokens:,} (2000/s) "
                    f"x {args.late_joins}",
                    flush=True,
                )
                if not args.quick:  # warm-up
                    trio.run(bench_late_join, srv.port, srv.pid, user, sup, 200, 1, 100)
                results["lateJoin"] = trio.run(
                    bench_late_join,
                    srv.port,
                    srv.pid,
                    user,
                    sup,
                    replay_tokens,
                    args.late_joins,
                    args.ring,
                )
                print(
                    f"    replay of an ended {args.ring:,}-chunk stream x {args.replays}",
                    flush=True,
                )
                results["replayEnded"] = trio.run(
                    bench_replay_ended, srv.port, srv.pid, user, sup, args.ring, args.replays
                )
            finally:
                srv.stop()
        if "memory" in only:
            srv = Server(
                env,
                "serve-memory",
                {
                    "CHINWAG_SIM_TOKENS_PER_S": f"{args.mem_rate:g}",
                    "CHINWAG_SIM_ANSWER_TOKENS": str(args.mem_tokens),
                    "CHINWAG_STREAM_BUFFER_MS": str(args.buffer_ms),
                },
            )
            try:
                print(
                    f"[3] memory: {args.mem_streams} streams x {args.mem_observers} observers, "
                    f"{args.mem_tokens} chunks at {args.mem_rate:g}/s",
                    flush=True,
                )
                results["memory"] = trio.run(
                    bench_memory,
                    srv.port,
                    srv.pid,
                    user,
                    sup,
                    args.mem_streams,
                    args.mem_observers,
                    args.mem_tokens,
                    args.mem_rate,
                    args.buffer_ms,
                    args.open_window,
                )
            finally:
                srv.stop()
    finally:
        env.cleanup()
    return finish(results, t0, report, functional_failures, args.json)


if __name__ == "__main__":
    sys.exit(main())
