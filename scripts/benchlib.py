"""What the end-to-end scripts (``bench_streams``, ``bench_observe``, ``soak``) share.

The scripts are run as ``python scripts/NAME.py``, so ``scripts/`` is on
``sys.path`` and ``import benchlib`` finds this file (mypy and ruff, given the
scripts' paths, resolve it the same way).

- numbers: ``pct``, ``ms``, ``fmt``, ``print_table``; a script's
  ``arg_parser`` and ``finish`` (the report, the JSON, the exit status); the machine:
  ``cpu_model``, ``git_commit``, ``raise_fd_limit``; a process:
  ``proc_sample`` (CPU and RSS from ``/proc``), ``sched_wait_s`` (time spent
  waiting for a CPU), ``Meter``;
- processes: ``Env`` (a temp dir with the SQLite DB, the CLI, the users) and
  ``Server`` (``python -m server.cli serve`` with ``CHINWAG_PORT=0``, or any
  ``python COMMAND``; the port read from its ``... listening on`` line,
  stopped with SIGTERM);
- HTTP/1.1 on raw ``trio.socket`` sockets: ``connect``, ``send_all``,
  ``request_bytes``, ``split_response``, ``response_complete``, ``http_json``,
  ``create_session(s)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"

try:
    import trio
except ImportError:  # run with a python that lacks the venv: re-run under the venv's
    if VENV_PY.exists() and Path(sys.executable).resolve() != VENV_PY.resolve():
        os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])
    raise

PY = str(VENV_PY) if VENV_PY.exists() else sys.executable
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVER_START_TIMEOUT_S = 30.0
_START_TIMEOUT_S = SERVER_START_TIMEOUT_S  # wrap_servers() may give more
SERVER_STOP_TIMEOUT_S = 20.0
CLI_TIMEOUT_S = 60.0


# -- numbers and the machine ---------------------------------------------------------------


def pct(values: Any, p: float) -> float:
    """The p-th percentile (nearest rank); nan for no values."""
    if not len(values):
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def ms(seconds: float) -> float:
    return math.nan if seconds is None or math.isnan(seconds) else round(seconds * 1000, 3)


def fmt(v: Any, unit: str = "", places: int | None = None) -> str:
    """A number for a table: thousands separators; ``places`` decimals (default: up to 3)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 100:
            v = f"{v:,.0f}"
        elif places is None:
            v = f"{v:,.3f}".rstrip("0").rstrip(".")
        else:
            v = f"{v:,.{places}f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def print_table(rows: Sequence[tuple[str, str, str]]) -> None:
    """Rows of (name, value, note): names left-aligned, values right-aligned."""
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{w0}}  {value:>{w1}}  {note}")


def arg_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A script's parser: the docstring's first paragraph, ``--quick`` and ``--json``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def finish(
    results: dict[str, Any],
    t0: float,
    report: Callable[[dict[str, Any]], None],
    failures: Callable[[dict[str, Any]], list[str]],
    json_path: str | None,
) -> int:
    """Record the total time, print the report, write the JSON; 1 if anything failed."""
    results["totalS"] = round(time.perf_counter() - t0, 1)
    report(results)
    print(f"  (total {results['totalS']} s)")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    bad = failures(results)
    for line in bad:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if bad else 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    """What a result was measured on: CPUs, CPU model, Python, commit (and ``extra``)."""
    return {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "cpu": cpu_model(),
        "commit": git_commit(),
        **extra,
    }


def git_commit() -> str | None:
    try:  # read-only
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class ProcSample:
    cpu_s: float  # user + system seconds
    rss_kb: int


def proc_sample(pid: int) -> ProcSample:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields_ = f.read().rsplit(b")", 1)[1].split()
    cpu = (int(fields_[11]) + int(fields_[12])) / CLK_TCK  # utime, stime
    rss_kb = 0
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss_kb = int(line.split()[1])
                break
    return ProcSample(cpu, rss_kb)


def sched_wait_s(pid: int | str = "self") -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU; nan if unknown.

    From ``/proc/PID/task/*/schedstat`` (its second field): on a busy machine
    this is what the CPU figures cannot show, time a process wanted and did
    not get. Threads that already exited are not counted.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return math.nan
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


class Meter:
    """CPU of the server (from /proc) and of this process (``who``) over one measurement."""

    def __init__(self, pid: int, who: str = "client") -> None:
        self.pid = pid
        self.who = who
        self.t0 = time.perf_counter()
        self.s0 = proc_sample(pid)
        self.c0 = time.process_time()

    def result(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        s1 = proc_sample(self.pid)
        client = time.process_time() - self.c0
        server = s1.cpu_s - self.s0.cpu_s
        return {
            "wallS": round(wall, 3),
            "serverCpuS": round(server, 3),
            "serverCpuPct": round(100 * server / wall, 1) if wall > 0 else None,
            f"{self.who}CpuS": round(client, 3),
            f"{self.who}CpuPct": round(100 * client / wall, 1) if wall > 0 else None,
            "serverRssKb": s1.rss_kb,
        }


# -- processes: CLI, servers ------------------------------------------------------------------


class Env:
    """A temp dir with the DB, shared by the CLI calls and every server a run starts.

    ``settings`` are CHINWAG_* variables for all of them (the caller's own
    CHINWAG_* environment is dropped); by default no rate or stream limit gets
    in a benchmark's way.
    """

    def __init__(
        self, keep: bool, prefix: str = "chinwag-bench-", settings: dict[str, str] | None = None
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep
        self.db = self.dir / "chinwag.db"
        self.settings = {
            "CHINWAG_RATE_LIMIT": "1000000",
            "CHINWAG_MAX_STREAMS_PER_USER": "100000",
            **(settings or {}),
        }
        self.servers: list[Server] = []

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
        env.update(
            {
                "CHINWAG_DB": str(self.db),
                "CHINWAG_HOST": HOST,
                "CHINWAG_PORT": "0",
                **self.settings,
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [PY, "-m", "server.cli", *args],
            cwd=ROOT,
            env=self.base_env(),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        if out.returncode != 0:
            raise SystemExit(f"chinwag {' '.join(args[:2])} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def add_user(self, name: str, password: str, role: str, credits: int = 0) -> str:
        """``user add`` (+ ``credits allocate``), then ``token``: the user's access token."""
        self.cli("user", "add", name, "--password", password, "--role", role)
        if credits:
            self.cli("credits", "allocate", name, str(credits))
        return self.cli("token", name).splitlines()[-1].strip()

    def cleanup(self) -> None:
        for server in self.servers:
            server.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


#: CPUs the servers started from now on are pinned to (``pin``); None: not pinned.
_SERVER_CPUS: set[int] | None = None
#: A command the servers started from now on run under (``wrap_servers``).
_SERVER_WRAP: list[str] = []


def pin(server_cpus: set[int], client_cpus: set[int]) -> None:
    """Servers started from now on run on ``server_cpus``, this process on ``client_cpus``.

    A benchmark's server and its load generator otherwise share the cores as
    the kernel sees fit, and their figures move with it (±15% between runs
    on a 2-core machine); pinned, neither takes the other's core.
    """
    global _SERVER_CPUS
    _SERVER_CPUS = set(server_cpus)
    os.sched_setaffinity(0, client_cpus)


def wrap_servers(prefix: Sequence[str], start_timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Servers started from now on run as ``prefix + their command`` (e.g. under
    ``valgrind``), given ``start_timeout_s`` to print their ready line."""
    global _SERVER_WRAP, _START_TIMEOUT_S
    _SERVER_WRAP = list(prefix)
    _START_TIMEOUT_S = start_timeout_s


def pin_cpus() -> tuple[set[int], set[int]] | None:
    """(server, client) CPU sets for ``--pin``: the last usable CPU for the
    server, the others for the load generator; None with fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def _pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Server:
    """A ``server.cli`` child process that prints ``<ready> http://127.0.0.1:PORT`` on stdout.

    ``command``, if given, replaces ``-m server.cli ARGV``: the child is
    ``python COMMAND`` (e.g. a script's own server mode), with the same
    environment, working directory and ready line.
    """

    def __init__(
        self,
        env: Env,
        name: str,
        extra_env: dict[str, str],
        argv: Sequence[str] = ("serve",),
        ready: str = "chinwag listening on",
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.settings = extra_env
        self.out_path = env.dir / f"{name}.out"
        self.err_path = env.dir / f"{name}.err"
        # Open for the child's whole life; closed in stop().
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*_SERVER_WRAP, PY, *command]
            if command is not None
            else [*_SERVER_WRAP, PY, "-m", "server.cli", *argv],
            cwd=cwd or ROOT,  # ``-m``: the packages of this directory (a worktree: another commit)
            env={**env.base_env(), **extra_env},
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            preexec_fn=_pinned(_SERVER_CPUS),
        )
        env.servers.append(self)
        self.port = self._wait_ready(ready)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, ready: str) -> int:
        pattern = re.compile(re.escape(ready) + r" http://127\.0\.0\.1:(\d+)")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            m = pattern.search(self.out_path.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        err = self.err_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"{self.name} did not start (exit {self.proc.returncode}):\n{err}")

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout`` (then SIGKILL); the exit status, None if killed."""
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._out.closed:
            self._out.close()
            self._err.close()
        return code

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            return self.err_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


# -- HTTP/1.1 on raw trio sockets ----------------------------------------------------------


async def connect(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        await sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


def request_bytes(
    method: str,
    path: str,
    token: str | None,
    body: Any = None,
    close: bool = False,
    port: int | None = None,
    headers: Sequence[str] = (),
) -> bytes:
    """An HTTP/1.1 request; ``body`` is sent as JSON, or as is when it is ``bytes``."""
    if body is None:
        payload = b""
    else:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    host = HOST if port is None else f"{HOST}:{port}"
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Accept: */*"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    if close:
        head.append("Connection: close")
    head += headers
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out)
        size = int(body[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = dechunk(body)
    return status, headers, body


def response_complete(raw: bytes) -> bool:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = raw[:end].lower()
    if b"transfer-encoding: chunked" in head:
        return raw.endswith(b"0\r\n\r\n")
    m = re.search(rb"content-length:\s*(\d+)", head)
    return m is None or len(raw) - end - 4 >= int(m.group(1))


async def http_raw(port: int, request: bytes, limit_s: float = 10.0) -> bytes:
    """Send one request on its own connection and read its whole response."""
    with trio.fail_after(limit_s):
        sock = await connect(port)
        try:
            await send_all(sock, request)
            raw = b""
            # Read to the end of the message (Hypercorn answers ``Connection: close``
            # but does not always close promptly, so EOF is not awaited).
            while not response_complete(raw):
                data = await sock.recv(65536)
                if not data:
                    break
                raw += data
        finally:
            sock.close()
    return raw


async def http_json(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    limit_s: float = 10.0,
) -> tuple[int, Any]:
    """One request on its own connection (``Connection: close``), read to the message end."""
    req = request_bytes(method, path, token, body, close=True, port=port)
    status, _, payload = split_response(await http_raw(port, req, limit_s))
    return status, (json.loads(payload) if payload else None)


async def create_session(port: int, token: str, title: str) -> str:
    status, body = await http_json(port, "POST", "/api/chat/sessions", token, {"title": title})
    if status != 201:
        raise RuntimeError(f"POST /api/chat/sessions -> {status} {body}")
    return str(body["sessionId"])


async def create_sessions(
    port: int, token: str, n: int, parallel: int = 8, title: str = "bench"
) -> list[str]:
    """``n`` chat sessions titled ``"<title> <i>"``, ``parallel`` requests at a time."""
    ids = [""] * n
    limit = trio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with limit:
            ids[i] = await create_session(port, token, f"{title} {i}")

    with trio.fail_after(30 + n * 0.05):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    return ids
