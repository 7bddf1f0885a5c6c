"""`chinwag` on PostgreSQL as a user runs it: migrate, the other commands, and a
database that cannot be reached (one clear line, never the password)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.test_cli import CHINWAG, _env


def run(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHINWAG, *args],
        env=_env(tmp_path, CHINWAG_DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_then_every_command_uses_the_database(tmp_path: Path, pg_url: str) -> None:
    first = run(tmp_path, pg_url, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("schema up to date (store version ")
    assert run(tmp_path, pg_url, "migrate").stdout == first.stdout  # idempotent
    added = run(tmp_path, pg_url, "user", "add", "pgal", "--password", "pgal-password")
    assert added.returncode == 0, added.stderr
    credits = run(tmp_path, pg_url, "credits", "allocate", "pgal", "250")
    assert credits.stdout.strip() == "pgal: balance 250, available 250"
    assert run(tmp_path, pg_url, "token", "pgal").stdout.count(".") == 2  # a JWT
    # Nothing was written to the SQLite file the defaults would use.
    assert not (tmp_path / "cli.db").exists()


def test_an_unreachable_database_is_one_clear_line_without_the_password(tmp_path: Path) -> None:
    url = "postgresql://bob:s3cret-pw@127.0.0.1:1/nowhere"
    for args in (("migrate",), ("user", "add", "zed", "--password", "zed-password"), ("serve",)):
        done = run(tmp_path, url, *args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: the database named by CHINWAG_DATABASE_URL")
        assert "s3cret-pw" not in done.stderr + done.stdout
        assert "postgresql://bob:***@127.0.0.1:1/nowhere" in lines[-1]
        assert "Traceback" not in done.stderr


def test_a_malformed_url_is_one_clear_line_without_the_password(tmp_path: Path) -> None:
    url = "postgresql://bob:s3cret%2fpw@[::1"  # libpq echoes it back as written
    done = run(tmp_path, url, "migrate")
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the database named by CHINWAG_DATABASE_URL cannot be used")
    assert "invalid database URL" in last
    assert "s3cret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
