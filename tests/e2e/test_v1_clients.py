"""The README's corrected v1 client (a fetch reader) run for real, in Node,
against a real server: what the README shows is what is tested."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
READER = ROOT / "scripts" / "clients" / "v1_chat_reader.mjs"

node = shutil.which("node")
if node is None and os.environ.get("CI"):
    raise RuntimeError("CI must have Node.js (Debian's nodejs) to test the JS client")
pytestmark = pytest.mark.skipif(node is None, reason="Node.js is not installed: JS client not run")


def test_the_readme_shows_the_tested_reader():
    readme = (ROOT / "README.md").read_text()
    assert READER.read_text().strip() in readme


async def run_reader(live, token: str, message: str) -> list[dict]:
    done = await trio.run_process(
        [node, str(READER), f"{live.url}/api/v1/chat", token, message],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


async def test_fetch_reader_gets_tokens_usage_and_done(live):
    alice = live.harness.user(credits=10_000)
    out = await run_reader(live, alice["token"], "Hello from Node")
    assert out[0] == {"comment": "Connected to chat stream"}
    tokens = [o["token"] for o in out if "token" in o]
    assert len(tokens) == 20
    usage = next(o["usage"] for o in out if "usage" in o)
    assert usage["tokens_out"] == 20 and usage["model"].startswith("amazon.")
    assert out[-1] == {"done": "stop"}
    stored = live.harness.svc.store.list_sessions(alice["id"], _page())[0]
    messages, _ = live.harness.svc.store.list_messages(stored[0]["id"])
    assert messages[-1]["content"] == "".join(tokens)


async def test_fetch_reader_reports_a_refusal_in_words(live):
    alice = live.harness.user(credits=0)
    done = await trio.run_process(
        [node, str(READER), f"{live.url}/api/v1/chat", alice["token"], "hi"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode != 0
    assert "402 INSUFFICIENT_CREDITS" in done.stderr.decode()


def _page():
    from server.store import Page

    return Page(offset=0, limit=10)
