"""``chinwag``: serve, user add, credits allocate, token, fake-bedrock (SPEC §1)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from .db import backends
from .processes import RedisProblem, serve_workers
from .settings import Settings, SettingsError


def _settings_for_cli() -> Settings:
    return Settings.from_env().with_secret()


class DatabaseProblem(Exception):
    """The configured database cannot be used; the message says why (never a password)."""


def _database_problem(exc: BaseException, settings: Settings) -> DatabaseProblem:
    where = "CHINWAG_DATABASE_URL" if settings.database_url else "CHINWAG_DB"
    return DatabaseProblem(f"the database named by {where} cannot be used: {exc}")


def _migrate(args: argparse.Namespace) -> int:
    settings = _settings_for_cli()
    with backends(settings.database) as (store, book):  # opening creates or upgrades both schemas
        version = store.schema_version
        book.statistics()  # and the ledger's reads
    print(f"schema up to date (store version {version}) at {settings.describe()['database']}")
    return 0


def _user_add(args: argparse.Namespace) -> int:

    from .users import InvalidUser, UserExists, add_user

    settings = _settings_for_cli()
    password = args.password or getpass.getpass("Password: ")
    try:
        with backends(settings.database) as (store, book):
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
    with backends(settings.database) as (store, book):
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
    with backends(settings.database) as (store, _):
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
    p.set_defaults(func=serve_workers)

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
    except (
        StoreError,
        ledger.LedgerUnavailable,
        ledger.SchemaTooNew,
        SchemaTooNew,
        ledger.InvalidDatabaseUrl,
    ) as exc:
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
