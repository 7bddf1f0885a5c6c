"""Fuzz the live server against its own contract with schemathesis.

    .venv/bin/python scripts/fuzz_contract.py            # CI: 25 examples per operation
    .venv/bin/python scripts/fuzz_contract.py --examples 200 --seed 7

Starts ``python -m server.cli serve`` on a free loopback port with a fresh
SQLite file and the fast simulated model, makes an admin token with the CLI,
downloads ``/api/openapi.json`` and runs ``st run`` against it. The checks:
no 5xx, every response's status and content type documented, every error
body ``{"message","errorCode"}``, schema-violating input rejected, and auth
not ignored (``schemathesis.toml`` lists the rejection statuses).

Schemathesis only sends what a schema can describe. A second phase sends
hand-made hostile bodies to every JSON operation of the document, whole and
as the value of each declared field: nesting far deeper than a parser
recurses, lone surrogate escapes (valid JSON syntax, not Unicode text),
numbers past a float (``1e400``) or past Python's int conversion limit,
``NaN``, very long strings. Each must get a documented refusal: no 5xx, a
JSON ``{"message","errorCode"}`` body. Then the server must have logged no
error and must exit 0 on SIGTERM.

The observe routes are left out: with ``?wait=`` they hold the request open
by design (tests/e2e/test_observe.py covers them over real sockets).
"""

from __future__ import annotations

import argparse
import http.client
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
from typing import Any

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


#: Nesting far deeper than json.loads can recurse, well under the body limit.
DEEP = b"[" * 200_000 + b"]" * 200_000
#: Sent as the whole body.
HOSTILE_BODIES = {
    "deep nesting": DEEP,
    "deep nesting in a field": b'{"x":' + DEEP + b"}",
    "a lone surrogate in a key": rb'{"\ud800":1}',
    "NaN": b'{"x":NaN}',
    "not UTF-8": b'{"x":"\xff"}',
    "UTF-16": '{"x":"\u00e9"}'.encode("utf-16"),
}
#: Sent as the value of each declared field, one at a time.
HOSTILE_VALUES = {
    "nested 40 deep": b"[" * 40 + b"]" * 40,
    "a lone high surrogate": rb'"a\ud800b"',
    "a lone low surrogate": rb'"\udfff"',
    "a reversed pair": rb'"\ude00\ud83d"',
    "an encoded surrogate": b'"a\xed\xa0\x80b"',
    "1e400": b"1e400",
    "-1e400": b"-1e400",
    "10**400": b"1" + b"0" * 400,
    "a 5000-digit integer": b"1" + b"0" * 5000,
    "Infinity": b"Infinity",
    "a 500 kB string": b'"' + b"x" * 500_000 + b'"',
    "a 100 kB string of escapes": b'"' + b"\\n" * 50_000 + b'"',
}


def json_operations(schema: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """Every operation that takes a JSON body: (method, path, declared fields)."""
    out = []
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                out.append((method.upper(), path, sorted(body["schema"].get("properties", {}))))
    return out


def hostile_requests(schema: dict[str, Any]) -> list[tuple[str, str, str, bytes]]:
    """(what, method, path template, body) for every JSON operation."""
    out = []
    for method, path, fields in json_operations(schema):
        for what, body in HOSTILE_BODIES.items():
            out.append((what, method, path, body))
        for field in fields:
            for what, value in HOSTILE_VALUES.items():
                body = b'{"%s":%s}' % (field.encode(), value)
                out.append((f"{what} as {field!r}", method, path, body))
    return out


def send(port: int, method: str, path: str, body: bytes, token: str) -> tuple[int, str, bytes]:
    """One request on its own connection: status, content type, and a JSON body (else b"")."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            method,
            path,
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        r = conn.getresponse()
        ctype = r.getheader("Content-Type", "")
        # A stream (text/event-stream) is not read: only its status matters here.
        return r.status, ctype, r.read() if ctype.startswith("application/json") else b""
    finally:
        conn.close()


def problem(status: int, ctype: str, body: bytes) -> str | None:
    """What is wrong with an answer to a hostile body, if anything."""
    if status >= 500:
        return f"{status} {body[:200]!r}"
    if status < 400:
        return None
    if not ctype.startswith("application/json"):
        return f"{status} with content type {ctype!r}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:200]!r}"
    if not (
        isinstance(answer, dict)
        and isinstance(answer.get("message"), str)
        and isinstance(answer.get("errorCode"), str)
    ):
        return f"{status} without {{message, errorCode}}: {body[:200]!r}"
    return None


def hostile_phase(port: int, schema: dict[str, Any], token: str, session_id: str) -> int:
    """Send every hostile request; print each bad answer; return how many there were."""
    requests = hostile_requests(schema)
    statuses: dict[int, int] = {}
    failures = 0
    for what, method, template, body in requests:
        path = template.replace("{session_id}", session_id).replace("{stream_id}", "stream-0-x")
        status, ctype, answer = send(port, method, path, body, token)
        statuses[status] = statuses.get(status, 0) + 1
        wrong = problem(status, ctype, answer)
        if wrong:
            failures += 1
            print(f"hostile body: {method} {template} with {what}: {wrong}", file=sys.stderr)
    print(
        f"hostile bodies: {len(requests)} requests to {len(json_operations(schema))} "
        f"JSON operations, statuses {dict(sorted(statuses.items()))}, {failures} bad answers"
    )
    return failures


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
                document = json.loads(schema.read_bytes())
                operations = sum(len(v) for v in document["paths"].values())
                _, _, created = send(port, "POST", "/api/chat/sessions", b"{}", token)
                hostile = hostile_phase(port, document, token, json.loads(created)["sessionId"])
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
            ok = status == 0 and not hostile and not errors and code == 0
            print(
                f"contract fuzz: {'PASS' if ok else 'FAIL'} (schemathesis exit {status}, "
                f"{hostile} bad answers to hostile bodies, "
                f"{len(errors)} server error lines, server exit {code})"
            )
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
