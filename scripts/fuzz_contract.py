"""Fuzz the live server against its own contract with schemathesis.

    .venv/bin/python scripts/fuzz_contract.py            # CI: 25 examples per operation
    .venv/bin/python scripts/fuzz_contract.py --examples 200 --seed 7

Starts ``python -m server.cli serve`` on a free loopback port with a fresh
SQLite file and the fast simulated model, makes an admin token with the CLI,
downloads ``/api/openapi.json`` and runs ``st run`` against it. The checks:
no 5xx, every response's status and content type documented, every error
body ``{"message","errorCode"}``, schema-violating input rejected, and auth
not ignored (``schemathesis.toml`` lists the rejection statuses). Then the
server must have logged no error and must exit 0 on SIGTERM.

The observe routes are left out: with ``?wait=`` they hold the request open
by design (tests/e2e/test_observe.py covers them over real sockets).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance,negative_data_rejection,ignored_auth"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def get(url: str, token: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        body: bytes = r.read()
        return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=25, help="examples per operation")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="chinwag-fuzz-") as tmp:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "CHINWAG_DB": f"{tmp}/fuzz.db",
            "CHINWAG_HOST": "127.0.0.1",
            "CHINWAG_PORT": str(port),
            "CHINWAG_RATE_LIMIT": "1000000",
            "CHINWAG_SIM_TOKENS_PER_S": "0",
            "CHINWAG_SIM_TTFT_MS": "0",
        }
        cli(env, "user", "add", "fuzz-admin", "--password", "fuzz-password-1", "--role", "admin")
        cli(env, "credits", "allocate", "fuzz-admin", "100000000")
        token = cli(env, "token", "fuzz-admin")

        with open(f"{tmp}/server.log", "w+") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve"],
                env=env,
                cwd=ROOT,
                stderr=log,
                stdout=log,
            )
            try:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        get(f"{base}/api/health")
                        break
                    except OSError:
                        if time.monotonic() > deadline or server.poll() is not None:
                            print("the server did not start", file=sys.stderr)
                            return 1
                        time.sleep(0.1)
                schema = Path(tmp, "openapi.json")
                schema.write_bytes(get(f"{base}/api/openapi.json", token))
                operations = sum(len(v) for v in json.loads(schema.read_bytes())["paths"].values())
                print(f"fuzzing {operations} operations of {base} ({args.examples} examples each)")
                st = [
                    str(Path(sys.executable).with_name("st")),
                    "run",
                    str(schema),
                    "--url",
                    base,
                    "--header",
                    f"Authorization: Bearer {token}",
                    "--checks",
                    CHECKS,
                    "--max-examples",
                    str(args.examples),
                    "--seed",
                    str(args.seed),
                    "--request-timeout",
                    "10",
                    "--exclude-path-regex",
                    "/observe",
                    "--output-truncate",
                    "true",
                ]
                status = subprocess.run(st, cwd=ROOT, env=env).returncode
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    code = server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
                    code = -9
            log.seek(0)
            errors = [
                line for line in log if '"level": "error"' in line or line.startswith("Traceback")
            ]
            for line in errors[:20]:
                print("server error log:", line.rstrip()[:500], file=sys.stderr)
            if code != 0:
                print(f"the server exited {code} on SIGTERM", file=sys.stderr)
            ok = status == 0 and not errors and code == 0
            print(
                f"contract fuzz: {'PASS' if ok else 'FAIL'} (schemathesis exit {status}, "
                f"{len(errors)} server error lines, server exit {code})"
            )
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
