"""Telemetry rows, /metrics and the JSON logs."""

from __future__ import annotations

import json
import logging

import trio
import trio.testing

from server.logs import JsonFormatter
from server.telemetry import telemetry_rows
from tests.conftest import PASSWORD


async def test_each_model_call_leaves_a_telemetry_row_and_metrics(client, harness):
    alice = harness.user(credits=1000)
    sup = harness.user("supervisor")
    r = await client.post("/api/chat/sessions", json={}, headers=alice["headers"])
    sid = (await r.get_json())["sessionId"]
    r = await client.post(
        f"/api/chat/sessions/{sid}/messages", json={"message": "hi"}, headers=alice["headers"]
    )
    answer = await r.get_json()
    [row] = telemetry_rows(harness.svc.store)
    payload = row["payload"]
    assert row["type"] == "model_call"
    assert payload["provider_retry_count"] == 0 and payload["finish_reason"] == "stop"
    assert payload["output_tokens"] == 20 and payload["credits_charged"] == answer["creditsCharged"]
    assert payload["ttft_ms"] is not None and payload["total_ms"] >= payload["ttft_ms"]
    assert "hi" not in json.dumps(payload)  # no message bodies

    r = await client.get("/metrics", headers=alice["headers"])
    assert r.status_code == 403
    r = await client.get("/metrics", headers=sup["headers"])
    text = (await r.get_data()).decode()
    assert r.content_type.startswith("text/plain")
    assert 'chinwag_model_calls_total{finish_reason="stop"} 1' in text
    assert 'chinwag_tokens_total{direction="output"} 20' in text
    assert "chinwag_ttft_seconds_count 1" in text
    assert "chinwag_streams_open 0" in text
    assert "chinwag_ledger_reservations_open 0" in text


async def test_access_logs_are_json_with_request_ids_and_no_secrets(client, harness, caplog):
    harness.user(name="logme")
    with caplog.at_level(logging.INFO, logger="chinwag.access"):
        r = await client.post(
            "/api/auth/login",
            json={"username": "logme", "password": PASSWORD},
            headers={"X-Request-Id": "log-1"},
        )
        token = (await r.get_json())["accessToken"]
        # The line is logged once the response's first bytes are out (a callback
        # the loop runs right after): let it run.
        await trio.testing.wait_all_tasks_blocked()
    lines = [JsonFormatter().format(rec) for rec in caplog.records if rec.name == "chinwag.access"]
    [line] = lines
    entry = json.loads(line)
    assert entry["requestId"] == "log-1" and entry["status"] == 200
    assert entry["path"] == "/api/auth/login"
    assert PASSWORD not in line and token not in line


def test_log_lines_are_written_by_a_thread_of_their_own(capsys):
    """A log call queues; the writer thread writes the JSON, in order, the
    traceback made at the call; everything queued is written at the end."""
    import threading

    from server import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    writers: list[str] = []
    real_format = logs.JsonFormatter.format

    def format_and_note(self, record):
        writers.append(threading.current_thread().name)
        return real_format(self, record)

    try:
        logs.JsonFormatter.format = format_and_note  # type: ignore[method-assign]
        logs.configure()
        log = logging.getLogger("chinwag.test")
        for i in range(50):
            log.info("line %d", i, extra={"fields": {"i": i}})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        logs._stop()  # what the process does at exit
    finally:
        logs.JsonFormatter.format = real_format  # type: ignore[method-assign]
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["i"] for line in lines[:50]] == list(range(50))
    assert lines[0]["message"] == "line 0" and lines[0]["logger"] == "chinwag.test"
    assert lines[50]["level"] == "error" and "ValueError: boom" in lines[50]["exception"]
    assert len(writers) == 51 and threading.current_thread().name not in writers
