"""``chinwag``: serve, user add, credits allocate, token, fake-bedrock (SPEC §1)."""

from __future__ import annotations

import argparse
import getpass
import logging
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .settings import Settings, SettingsError

if TYPE_CHECKING:
    import socket

    from ledger import LedgerBackend

    from .storage import StoreBackend

log = logging.getLogger("chinwag")


def _serve(args: argparse.Namespace) -> int:
    from hypercorn.trio import serve

    from .app import create_app
    from .serving import cut_connections, freeze_heap, hypercorn_config, tune_gc

    tune_gc()
    settings = Settings.from_env()
    _check_redis(settings)
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
                        partial(serve, app, config, shutdown_trigger=shutdown_trigger)
                    )
                    freeze_heap()
                    print(
                        f"chinwag listening on {' '.join(binds)} "
                        f"(provider={settings.provider}, db={_describe_db(settings)})",
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


def _serve_workers(args: argparse.Namespace) -> int:
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
        return int(_serve(args))
    settings = Settings.from_env()
    if not settings.redis_url:
        raise SettingsError(
            f"serve --workers {args.workers} needs CHINWAG_REDIS_URL: the workers share "
            "streams, claims and rate limits through Redis"
        )
    settings = settings.with_secret()
    _check_redis(settings)
    with _storage(settings):
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
    try:
        print(
            f"chinwag: {args.workers} workers on http://{host}:{port} "
            f"(db={_describe_db(settings)}, redis={_describe_redis(settings)})",
            flush=True,
        )
        return _run_workers(sockets, settings.node_id, metrics_dir)
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_workers(sockets: list[socket.socket], base: str, metrics_dir: str) -> int:
    """Start a worker on each socket, forward signals, reap them: see ``_serve_workers``."""
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


def _describe_redis(settings: Settings) -> str:
    from ledger import mask_url

    return mask_url(settings.redis_url) if settings.redis_url else "unset"


def _settings_for_cli() -> Settings:
    return Settings.from_env().with_secret()


@contextmanager
def _storage(settings: Settings) -> Iterator[tuple[StoreBackend, LedgerBackend]]:
    """The configured store and ledger (SQLite file or CHINWAG_DATABASE_URL), closed after."""
    import ledger

    from .storage import open_store

    store = open_store(settings.database)
    try:
        with ledger.open_ledger(settings.database) as book:
            yield store, book
    finally:
        store.close()


class DatabaseProblem(Exception):
    """The configured database cannot be used; the message says why (never a password)."""


class RedisProblem(Exception):
    """``CHINWAG_REDIS_URL`` is set and Redis does not answer (the message masks the password)."""


def _check_redis(settings: Settings) -> None:
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


def _database_problem(exc: BaseException, settings: Settings) -> DatabaseProblem:
    where = "CHINWAG_DATABASE_URL" if settings.database_url else "CHINWAG_DB"
    return DatabaseProblem(f"the database named by {where} cannot be used: {exc}")


def _migrate(args: argparse.Namespace) -> int:
    settings = _settings_for_cli()
    with _storage(settings) as (store, book):  # opening creates or upgrades both schemas
        version = store.schema_version
        book.statistics()  # and the ledger's reads
    print(f"schema up to date (store version {version}) at {_describe_db(settings)}")
    return 0


def _describe_db(settings: Settings) -> str:
    from ledger import mask_url

    return mask_url(settings.database_url) if settings.database_url else str(settings.db_path)


def _user_add(args: argparse.Namespace) -> int:

    from .users import InvalidUser, UserExists, add_user

    settings = _settings_for_cli()
    password = args.password or getpass.getpass("Password: ")
    try:
        with _storage(settings) as (store, book):
            user = add_user(store, book, args.username, password, args.role, args.email)
    except InvalidUser as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except UserExists:
        print(f"error: user {args.username!r} already exists", file=sys.stderr)
        return 1
    print(f"created {args.role} {args.username} (id {user['id']})")
    return 0


def _credits_allocate(args: argparse.Namespace) -> int:
    import ledger

    settings = _settings_for_cli()
    with _storage(settings) as (store, book):
        user = store.user_by_name(args.username)
        if user is None:
            print(f"error: no user {args.username!r}", file=sys.stderr)
            return 1
        book.open_account(user["id"])
        try:
            b = book.allocate(
                user["id"],
                args.amount,
                reason=args.reason or "cli",
                idempotency_key=args.idempotency_key,
            )
        except ledger.LedgerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(f"{args.username}: balance {b.balance}, available {b.available}")
    return 0


def _token(args: argparse.Namespace) -> int:
    from .auth import TokenService

    settings = _settings_for_cli()
    with _storage(settings) as (store, _):
        user = store.user_by_name(args.username)
    if user is None:
        print(f"error: no user {args.username!r}", file=sys.stderr)
        return 1
    tokens = TokenService(settings.jwt_secret, ttl_s=settings.jwt_ttl_s)
    print(tokens.mint(user["id"], user["username"], user["role"]))
    return 0


def _fake_bedrock(args: argparse.Namespace) -> int:
    from .providers import fake_bedrock

    return fake_bedrock.run_from_args(args)


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chinwag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server (Quart-Trio on Hypercorn)")
    p.add_argument("--host", help="bind address (default CHINWAG_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default CHINWAG_PORT or 3002)")
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="worker processes on one port (SO_REUSEPORT); more than 1 needs CHINWAG_REDIS_URL",
    )
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # set by --workers
    p.set_defaults(func=_serve_workers)

    user = sub.add_parser("user", help="manage users").add_subparsers(dest="action", required=True)
    p = user.add_parser("add", help="add a user")
    p.add_argument("username")
    p.add_argument("--password", help="password (prompted when omitted)")
    p.add_argument("--role", choices=("enduser", "supervisor", "admin"), default="enduser")
    p.add_argument("--email")
    p.set_defaults(func=_user_add)

    credits = sub.add_parser("credits", help="the credits ledger").add_subparsers(
        dest="action", required=True
    )
    p = credits.add_parser("allocate", help="allocate credits to a user")
    p.add_argument("username")
    p.add_argument("amount", type=int)
    p.add_argument("--reason")
    p.add_argument("--idempotency-key")
    p.set_defaults(func=_credits_allocate)

    p = sub.add_parser("migrate", help="create or upgrade the configured database's schema")
    p.set_defaults(func=_migrate)

    p = sub.add_parser("token", help="print a signed access token for a user (development aid)")
    p.add_argument("username")
    p.set_defaults(func=_token)

    p = sub.add_parser("fake-bedrock", help="run the local Bedrock-compatible server")
    try:
        from .providers import fake_bedrock

        fake_bedrock.add_arguments(p)
    except ImportError:  # pragma: no cover - only while the module is being written
        p.add_argument("--port", type=int, default=0)
    p.set_defaults(func=_fake_bedrock)
    return parser


def _guarded(args: argparse.Namespace) -> Any:
    """Run the command; a database that cannot be used becomes one clear line."""
    import ledger

    from .storage import SchemaTooNew, StoreError

    try:
        return args.func(args)
    except (StoreError, ledger.LedgerUnavailable, ledger.SchemaTooNew, SchemaTooNew) as exc:
        raise _database_problem(exc, Settings.from_env()) from None


def main(argv: list[str] | None = None) -> int:
    from .logs import configure, flush

    configure()
    args = build_parser().parse_args(argv)
    try:
        result: Any = _guarded(args)
    except (SettingsError, DatabaseProblem, RedisProblem) as exc:
        flush()  # the logs so far, then the one line that says why, last
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
