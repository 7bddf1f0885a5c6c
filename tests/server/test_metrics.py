"""``/metrics`` on prometheus-client: one registry per app, and the sum of every worker.

The multiprocess tests run real processes: ``PROMETHEUS_MULTIPROC_DIR`` must be
set before prometheus-client is imported, so never in this test process.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.multiprocess import mark_process_dead

from server.cluster.redis import open_redis
from server.telemetry import MULTIPROC_ENV, CallRecord, Telemetry
from tests.cluster.conftest import REDIS_URL, require_redis, unreachable_reason
from tests.cluster.nodes import announced_url
from tests.storage.pg import in_ci

ROOT = Path(__file__).resolve().parent.parent.parent


def parse(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line of an exposition."""
    lines = [ln.rpartition(" ") for ln in text.splitlines() if ln[:1] not in ("", "#")]
    return {name: float(value) for name, _, value in lines}


def call(finish_reason: str = "stop", error_code: str | None = None) -> CallRecord:
    return CallRecord("s", "u", "m", "simulated", 1, 12.0, 30.0, 3, 5, 2, finish_reason, error_code)


def test_each_telemetry_has_its_own_registry():
    one, two = Telemetry(), Telemetry()  # no duplicate-registration error
    one.count(call())
    one.count(call("error", "UPSTREAM_ERROR"))
    seen = parse(one.render({"chinwag_ledger_reservations_open": 2}).decode())
    assert seen['chinwag_model_calls_total{finish_reason="stop"}'] == 1
    assert seen['chinwag_stream_errors_total{code="UPSTREAM_ERROR"}'] == 1
    assert seen['chinwag_tokens_total{direction="output"}'] == 10
    assert seen["chinwag_upstream_retries_total"] == 2
    assert seen["chinwag_credits_charged_total"] == 4
    assert seen["chinwag_ttft_seconds_count"] == 2
    assert seen['chinwag_ttft_seconds_bucket{le="0.025"}'] == 2
    assert seen["chinwag_ledger_reservations_open"] == 2
    assert not any(name.endswith("_created") for name in seen)
    untouched = parse(two.render({}).decode())
    assert 'chinwag_model_calls_total{finish_reason="stop"}' not in untouched
    assert untouched["chinwag_streams_open"] == 0


# One process of a multiprocess set: counts, sets its gauges, maybe renders.
PROCESS = """
import json, os, sys
from server.telemetry import CallRecord, Telemetry
args = json.loads(sys.argv[1])
telemetry = Telemetry()
assert telemetry.multiprocess_dir
for _ in range(args["calls"]):
    telemetry.count(CallRecord("s", "u", "m", "simulated", 0, 20.0, 40.0, 3, 5, 2, "stop", None))
telemetry.set_local(args["local"])
print(json.dumps({"pid": os.getpid(), "text": telemetry.render(args["database"]).decode()}))
"""


def run_process(directory: Path, calls: int, local: dict[str, int], database: dict[str, int]):
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    args = json.dumps({"calls": calls, "local": local, "database": database})
    done = subprocess.run(
        [sys.executable, "-c", PROCESS, args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    )
    out = json.loads(done.stdout)
    return out["pid"], parse(out["text"])


def test_multiprocess_mode_sums_processes_and_reads_the_database_once(tmp_path: Path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    first, _ = run_process(directory, 3, {"chinwag_streams_open": 2, "chinwag_readers": 4}, {})
    run_process(directory, 4, {"chinwag_streams_open": 1, "chinwag_readers": 1}, {})
    database = {"chinwag_ledger_reservations_open": 5, "chinwag_ledger_reserved_credits": 70}
    _, seen = run_process(directory, 0, {}, database)
    assert seen['chinwag_model_calls_total{finish_reason="stop"}'] == 7
    assert seen['chinwag_tokens_total{direction="output"}'] == 35
    assert seen["chinwag_credits_charged_total"] == 14
    assert seen["chinwag_ttft_seconds_count"] == 7
    assert seen["chinwag_streams_open"] == 3 and seen["chinwag_readers"] == 5  # live: summed
    # The database's gauges: what the scraped process read, once (not times the processes).
    assert seen["chinwag_ledger_reservations_open"] == 5
    assert seen["chinwag_ledger_reserved_credits"] == 70
    assert list(seen).count("chinwag_streams_open") == 1  # livesum: no pid label

    mark_process_dead(first, str(directory))  # what `serve --workers` does when one exits
    _, seen = run_process(directory, 0, {}, database)
    assert seen["chinwag_streams_open"] == 1 and seen["chinwag_readers"] == 1
    assert seen['chinwag_model_calls_total{finish_reason="stop"}'] == 7  # its counts stay


# --- `chinwag serve --workers 2`: real processes ------------------------------------------

SECRET = "metrics-test-secret-0123456789-abcdefgh"
PASSWORD = "metrics-password-1"


def need_redis() -> None:
    reason = unreachable_reason()
    if reason is not None and not in_ci():
        pytest.skip(reason)
    require_redis()


def worker_env(tmp_path: Path, prefix: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    base.pop(MULTIPROC_ENV, None)
    return {
        **base,
        "CHINWAG_DB": str(tmp_path / "chinwag.db"),
        "CHINWAG_JWT_SECRET": SECRET,
        "CHINWAG_NODE_ID": "m",
        "CHINWAG_REDIS_URL": f"{REDIS_URL}?prefix={prefix}",
        "CHINWAG_SHUTDOWN_GRACE_MS": "2000",
        "CHINWAG_SIM_TTFT_MS": "0",
        "CHINWAG_SIM_TOKENS_PER_S": "0",
        "CHINWAG_SIM_ANSWER_TOKENS": "5",
        "CHINWAG_TEST_SCENARIOS": "1",  # lets one stream wait for its first token (X-Sim-Ttft-Ms)
    }


def metrics_dirs(parent: int) -> list[Path]:
    """The metrics directories of the ``serve --workers`` parent with this pid."""
    return list(Path(tempfile.gettempdir()).glob(f"chinwag-metrics-{parent}-*"))


async def cli(env: dict[str, str], *args: str) -> str:
    done = await trio.run_process(
        [sys.executable, "-m", "server.cli", *args], env=env, capture_stdout=True
    )
    return done.stdout.decode().strip()


@asynccontextmanager
async def through_a_worker(
    url: str, headers: dict[str, str], *, node: str | None = None
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A new connection (the kernel picks a worker), open: its worker's node and client.

    ``node``: connect again until that worker answers (``!name``: any other one).
    """
    while True:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as http:
            answered = (await http.get("/api/health")).json()["node"]
            if (
                node is None
                or answered == node
                or (node.startswith("!") and answered != node.removeprefix("!"))
            ):
                yield answered, http
                return


async def test_metrics_sum_both_workers_of_serve_workers(tmp_path: Path):
    need_redis()
    prefix = f"test-{secrets.token_hex(4)}"
    env = worker_env(tmp_path, prefix)
    await cli(env, "user", "add", "watcher", "--password", PASSWORD, "--role", "supervisor")
    await cli(env, "user", "add", "talker", "--password", PASSWORD)
    await cli(env, "credits", "allocate", "talker", "1000000")
    sup = {"Authorization": f"Bearer {await cli(env, 'token', 'watcher')}"}
    user = {"Authorization": f"Bearer {await cli(env, 'token', 'talker')}"}

    command = [sys.executable, "-m", "server.cli", "serve", "--workers", "2", "--port", "0"]
    proc = await trio.lowlevel.open_process(command, env=env, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        url = await announced_url(proc, rb"2 workers on (http://127\.0\.0\.1:\d+)")
        # The workers' metrics directory, removed when the parent exits (checked below).
        assert len(metrics_dirs(proc.pid)) == 1
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=user) as http:
            with trio.fail_after(30):
                while True:  # until a worker has opened its app
                    try:
                        answer = await http.post("/api/chat/sessions", json={})
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.1)
            assert answer.status_code == 201, answer.text
            sid = answer.json()["sessionId"]

        # Model calls until both workers have answered some; which one answers a
        # call is the one that answered /api/health just before on its connection.
        served: dict[str, int] = {}
        with trio.fail_after(60):
            while len(served) < 2 or sum(served.values()) < 6:
                async with through_a_worker(url, user) as (node, http):
                    answer = await http.post(
                        f"/api/chat/sessions/{sid}/messages", json={"message": "count me"}
                    )
                    assert answer.status_code == 200, answer.text
                    assert (await http.get("/api/health")).json()["node"] == node
                served[node] = served.get(node, 0) + 1
        calls = sum(served.values())
        assert set(served) == {"m-0", "m-1"}

        # The sum, whichever worker is scraped: each of them, twice.
        for node in ["m-0", "m-1", "m-0", "m-1"]:
            with trio.fail_after(30):
                while True:
                    async with through_a_worker(url, sup, node=node) as (_, http):
                        answer = await http.get("/metrics")
                    assert answer.status_code == 200
                    assert answer.headers["content-type"].startswith("text/plain")
                    seen = parse(answer.text)
                    # The other worker's gauges are as of its last refresh (every
                    # GAUGE_REFRESH_S), which may have come while a call was open.
                    if seen["chinwag_streams_open"] == 0:
                        break
                    await trio.sleep(0.2)
            assert seen['chinwag_model_calls_total{finish_reason="stop"}'] == calls, (node, served)
            assert seen['chinwag_tokens_total{direction="output"}'] == 5 * calls
            assert seen["chinwag_ttft_seconds_count"] == calls

        # A slow stream on one worker: a scrape through the other sees it (gauges are
        # kept current by each worker), and its reservation once (read from the database).
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=user) as http:
            other = (await http.post("/api/chat/sessions", json={})).json()["sessionId"]
        async with (
            through_a_worker(url, user) as (producer, streaming),
            streaming.stream(
                "POST",
                f"/api/chat/sessions/{other}/stream",
                json={"message": "slowly"},
                headers={"X-Sim-Ttft-Ms": "60000"},  # open until this client goes
            ) as live,
        ):
            assert live.status_code == 200
            for node in [f"!{producer}", producer]:
                with trio.fail_after(30):
                    while True:
                        async with through_a_worker(url, sup, node=node) as (_, http):
                            seen = parse((await http.get("/metrics")).text)
                        if seen["chinwag_streams_open"] == 1:
                            break
                        assert seen["chinwag_streams_open"] == 0
                        await trio.sleep(0.2)
                assert seen["chinwag_ledger_reservations_open"] == 1
                assert seen['chinwag_model_calls_total{finish_reason="stop"}'] == calls

        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            # SIGTERM first: killed, the parent would leave its workers (own sessions) running.
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        async with open_redis(REDIS_URL) as redis:
            await redis.delete_prefix(f"chinwag:{prefix}:")
    assert metrics_dirs(proc.pid) == []
