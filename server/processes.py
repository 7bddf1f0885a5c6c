"""``chinwag serve``: one server process on Hypercorn, or N worker processes on one port.

:func:`serve` runs the app until SIGTERM/SIGINT, then drains: every stream
told, persisted and settled within ``CHINWAG_SHUTDOWN_GRACE_MS``, and the
connections of clients that stopped reading cut. :func:`serve_workers`
binds the port N times (``SO_REUSEPORT``) and supervises N such processes
(SPEC §9). The other commands are :mod:`server.cli`'s.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from functools import partial
from typing import TYPE_CHECKING

import trio

from .db import backends
from .settings import Settings, SettingsError

if TYPE_CHECKING:
    import socket

log = logging.getLogger("chinwag")


class RedisProblem(Exception):
    """``CHINWAG_REDIS_URL`` is set and Redis does not answer (the message masks the password)."""


def check_redis(settings: Settings) -> None:
    """Cluster mode: refuse to start, in one line, when Redis does not answer."""
    if not settings.redis_url:
        return
    from .cluster import ClusterUnavailable, open_redis

    async def ping() -> None:
        async with open_redis(settings.redis_url or ""):
            pass

    try:
        trio.run(ping)
    except ClusterUnavailable as exc:
        raise RedisProblem(f"CHINWAG_REDIS_URL cannot be used: {exc}") from None


def serve(args: argparse.Namespace) -> int:
    """One server process: the app on Hypercorn's Trio worker until a signal and the drain."""
    from hypercorn.trio import serve as hypercorn_serve

    from .app import create_app
    from .serving import cut_connections, freeze_heap, hypercorn_config, tune_gc

    tune_gc()
    settings = Settings.from_env()
    check_redis(settings)
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    # Start-up recovery (releasing what a dead process left) is for a process that
    # owns its database alone; in cluster mode (every worker of `serve --workers N`)
    # the survivors recover a dead node's streams through Redis instead.
    app = create_app(settings)

    config = hypercorn_config(settings, host, port)
    listen_fd = getattr(args, "listen_fd", None)
    if listen_fd is not None:  # a worker of `serve --workers N`: its parent bound the socket
        config.bind = [f"fd://{listen_fd}"]
    # Set when the drain ends: the streams are settled and Hypercorn's graceful
    # period for what is left has passed (or the shutdown grace is used up).
    drained = trio.Event()
    drain_end = math.inf

    async def shutdown_trigger() -> None:
        """Returns, so Hypercorn stops, once every stream is told, persisted and settled.

        Bounded by ``CHINWAG_SHUTDOWN_GRACE_MS`` from the signal; Hypercorn's own
        graceful period for the connections left fits inside that grace.
        """
        nonlocal drain_end
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                break
        # Tell every stream and observer, persist and settle, before Hypercorn stops.
        deadline = trio.current_time() + settings.shutdown_grace_ms / 1000
        with trio.move_on_at(deadline):
            await app.extensions["chinwag"].hub.shutdown()
        # What is left is short requests and idle keep-alive connections, which
        # Hypercorn would otherwise wait on for the whole graceful timeout.
        config.graceful_timeout = max(0.0, min(1.0, deadline - trio.current_time()))
        drain_end = trio.current_time() + config.graceful_timeout
        drained.set()

    async def cut_stuck_connections() -> None:
        """After the drain, abort the connections still open.

        Hypercorn cancels its connection tasks when the drain ends, but a task
        blocked writing to a client that stopped reading never sees that (its
        write is shielded): it would hold the process until the kernel's
        TCP_USER_TIMEOUT. By now the hub has ended their streams (or used up the
        grace): only the sockets are left.
        """
        await drained.wait()
        await trio.sleep_until(drain_end)
        cut = cut_connections(config.bound_ports)
        if cut:
            log.warning("shutdown: cut %d connections whose clients stopped reading", cut)

    async def run_server() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_stuck_connections)
            try:
                async with trio.open_nursery() as serving:
                    binds = await serving.start(
                        partial(hypercorn_serve, app, config, shutdown_trigger=shutdown_trigger)
                    )
                    freeze_heap()
                    print(
                        f"chinwag listening on {' '.join(binds)} "
                        f"(provider={settings.provider}, db={settings.describe()['database']})",
                        flush=True,
                    )
            finally:
                nursery.cancel_scope.cancel()  # served: nothing left to cut

    async def main() -> None:
        if settings.provider == "bedrock":
            import trio_asyncio

            # aiobotocore is asyncio: one asyncio loop for the whole server, inherited
            # by every task (DESIGN.md §3).
            async with trio_asyncio.open_loop():
                await run_server()
        else:
            await run_server()

    trio.run(main)
    return 0


def serve_workers(args: argparse.Namespace) -> int:
    """``chinwag serve --workers N``: N worker processes on one port (SPEC §9).

    The parent binds N listening sockets to the same address with
    ``SO_REUSEPORT`` (the kernel spreads new connections over them) and
    hands one to each worker, a plain ``chinwag serve`` with
    ``CHINWAG_NODE_ID`` = ``<base>-<i>`` (base: ``CHINWAG_NODE_ID``, else
    host name + the parent's pid). It creates the database schema and the
    JWT secret once, before the workers start, so they never race on them.
    It forwards SIGTERM and SIGINT to every worker, and exits once all have
    exited: 0 if every one shut down cleanly, 1 otherwise. A worker that
    fails on its own makes the parent stop the others (a supervisor then
    restarts the whole set). With N > 1, ``CHINWAG_REDIS_URL`` is required;
    the database is the configured one (PostgreSQL, or the same SQLite
    file: the workers share this machine). ``/metrics`` sums the workers:
    they write their metrics to a fresh temporary directory
    (``PROMETHEUS_MULTIPROC_DIR``, prometheus-client's multiprocess mode),
    which the parent removes when it exits.
    """
    import os
    import shutil
    import socket
    import tempfile

    if args.workers == 1:
        return int(serve(args))
    settings = Settings.from_env()
    if not settings.redis_url:
        raise SettingsError(
            f"serve --workers {args.workers} needs CHINWAG_REDIS_URL: the workers share "
            "streams, claims and rate limits through Redis"
        )
    settings = settings.with_secret()
    check_redis(settings)
    with backends(settings.database):
        # Creates or upgrades the schema once, before the workers open it. Nothing is
        # swept: in cluster mode what a dead set of workers left is recovered by the
        # survivors through Redis (server.cluster.nodes); a blanket sweep here would
        # release the live reservations of the cluster's other machines.
        pass
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    for _ in range(args.workers):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]  # port 0: the first socket picks, the others follow
        sock.listen(1024)
        sock.set_inheritable(True)
        sockets.append(sock)
    # The workers' metrics, summed by whichever one is scraped; fresh for each set
    # (a stale file would add a dead set's counts).
    metrics_dir = tempfile.mkdtemp(prefix=f"chinwag-metrics-{os.getpid()}-")
    described = settings.describe()
    try:
        print(
            f"chinwag: {args.workers} workers on http://{host}:{port} "
            f"(db={described['database']}, redis={described['redis'] or 'unset'})",
            flush=True,
        )
        return _run_workers(sockets, settings.node_id, metrics_dir)
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(sockets: list[socket.socket], base: str, metrics_dir: str) -> int:
    """Start a worker on each socket, forward signals, reap them: see :func:`serve_workers`."""
    import os
    import subprocess

    from prometheus_client.multiprocess import mark_process_dead

    from .telemetry import MULTIPROC_ENV

    workers: dict[int, subprocess.Popen[bytes]] = {}
    for i, sock in enumerate(sockets):
        env = {**os.environ, "CHINWAG_NODE_ID": f"{base}-{i}", MULTIPROC_ENV: metrics_dir}
        command = [sys.executable, "-m", "server.cli", "serve", "--listen-fd", str(sock.fileno())]
        # Its own session: a terminal's Ctrl-C reaches the parent only, which forwards it once.
        proc = subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),), start_new_session=True)
        workers[proc.pid] = proc
    for sock in sockets:
        sock.close()  # the workers hold them now

    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.returncode is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    while any(proc.returncode is None for proc in workers.values()):
        pid, status = os.wait()  # a signal runs `forward`, then the wait resumes
        reaped = workers.get(pid)
        if reaped is None:
            continue
        reaped.returncode = os.waitstatus_to_exitcode(status)
        # Its gauges leave the sum; its counts stay in it.
        mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
        if reaped.returncode != 0:
            failed = True
            log.error(
                "worker %d (pid %d) exited with %d",
                list(workers).index(pid),
                pid,
                reaped.returncode,
            )
            if not stopping:
                forward(signal.SIGTERM, None)
    return 1 if failed else 0
