"""The `chinwag` command as a user runs it: real processes, a real socket, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import trio

CHINWAG = [sys.executable, "-m", "server.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update(
        {
            "CHINWAG_DB": str(tmp_path / "cli.db"),
            "CHINWAG_PORT": "0",
            "CHINWAG_SIM_TTFT_MS": "0",
            "CHINWAG_SIM_TOKENS_PER_S": "0",
        }
    )
    env.update(extra)
    return env


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHINWAG, *args],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Server:
    """``chinwag serve`` in a child process; ``url`` once it listens."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.url = ""
        self.output = b""

    async def wait_listening(self) -> None:
        assert self.proc.stdout is not None
        with trio.fail_after(30):
            while b"listening on " not in self.output:
                chunk = await self.proc.stdout.receive_some()
                assert chunk, self.output.decode()
                self.output += chunk
        line = self.output.split(b"listening on ", 1)[1].split()[0]
        self.url = line.decode()


async def start_server(tmp_path: Path, nursery: trio.Nursery, **env: str) -> Server:
    proc = await trio.lowlevel.open_process(
        [*CHINWAG, "serve"],
        env=_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    server = Server(proc)
    await server.wait_listening()
    return server


async def stop(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        return await server.proc.wait()


def test_user_add_credits_and_token(tmp_path):
    r = _run(
        tmp_path,
        "user",
        "add",
        "ann",
        "--password",
        "ann-password",
        "--role",
        "admin",
        "--email",
        "ann@example.com",
    )
    assert r.returncode == 0, r.stderr
    assert "ann-password" not in r.stdout + r.stderr
    r = _run(tmp_path, "user", "add", "ann", "--password", "ann-password", "--role", "admin")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = _run(tmp_path, "credits", "allocate", "ann", "250")
    assert r.returncode == 0 and "balance 250" in r.stdout
    r = _run(tmp_path, "credits", "allocate", "nobody", "5")
    assert r.returncode == 1
    r = _run(tmp_path, "token", "ann")
    token = r.stdout.strip()
    secret = (tmp_path / "cli.db.secret").read_text().strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["username"] == "ann" and claims["role"] == "admin"
    assert oct((tmp_path / "cli.db.secret").stat().st_mode & 0o777) == "0o600"


async def test_serve_answers_on_a_socket_and_stops_on_sigterm(tmp_path, nursery):
    assert _run(tmp_path, "user", "add", "bo", "--password", "bo-password-1").returncode == 0
    assert _run(tmp_path, "credits", "allocate", "bo", "1000").returncode == 0
    server = await start_server(tmp_path, nursery)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            assert (await http.get("/api/health")).json()["status"] == "ok"
            r = await http.post(
                "/api/auth/login", json={"username": "bo", "password": "bo-password-1"}
            )
            headers = {"Authorization": f"Bearer {r.json()['accessToken']}"}
            r = await http.post("/api/chat/sessions", json={"title": "cli"}, headers=headers)
            sid = r.json()["sessionId"]
            r = await http.post(
                f"/api/chat/sessions/{sid}/messages", json={"message": "hi"}, headers=headers
            )
            assert r.status_code == 200 and r.json()["assistantMessage"]["status"] == "complete"
            # A token the CLI mints is accepted by the server (same secret file).
            token = _run(tmp_path, "token", "bo").stdout.strip()
            r = await http.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
            assert r.json()["username"] == "bo"
    finally:
        code = await stop(server)
    assert code == 0


def test_bad_configuration_fails_fast_with_the_variable_named(tmp_path):
    r = subprocess.run(
        [*CHINWAG, "serve"],
        env=_env(tmp_path, CHINWAG_PORT="eighty"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "CHINWAG_PORT" in r.stderr
    r = subprocess.run(
        [*CHINWAG, "serve"],
        env=_env(tmp_path, CHINWAG_JWT_SECRET="short"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and "CHINWAG_JWT_SECRET" in r.stderr
