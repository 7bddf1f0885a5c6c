"""A run's bill (server.endings): only produced tokens are charged."""

from __future__ import annotations

from typing import Any

from server.endings import StreamCancelled, bill, told
from server.models import ModelInfo
from server.providers.base import Usage

MODEL = ModelInfo("m-1", "Model", input_per_1k=3, output_per_1k=15, max_tokens=1000)


def _bill(**overrides: Any) -> Any:
    args: dict[str, Any] = {
        "stream_id": "st-1",
        "user_id": "u-1",
        "model": MODEL,
        "provider": "simulated",
        "produced": 0,
        "usage": None,
        "request_input": 400,
        "finish_reason": "stop",
        "error": None,
        "retries": 0,
        "ttft_ms": None,
        "total_ms": 12.0,
    }
    return bill(**{**args, **overrides})


def test_a_call_that_produced_nothing_costs_nothing() -> None:
    b = _bill(produced=0, finish_reason="client_disconnected")
    assert (b.input_tokens, b.output_tokens, b.charge) == (0, 0, 0)
    assert b.status == "interrupted"
    assert b.call.credits_charged == 0


def test_produced_tokens_are_charged_at_the_model_price() -> None:
    b = _bill(produced=200, finish_reason="stop")
    assert (b.input_tokens, b.output_tokens) == (400, 200)
    assert b.charge == MODEL.price.cost(400, 200) > 0
    assert b.status == "complete"
    assert b.call.output_tokens == 200 and b.call.finish_reason == "stop"


def test_the_upstreams_usage_counts_over_the_estimate() -> None:
    b = _bill(produced=5, usage=Usage(input_tokens=30, output_tokens=7), finish_reason="length")
    assert (b.input_tokens, b.output_tokens) == (30, 7)
    assert b.charge == MODEL.price.cost(30, 7)
    assert b.status == "complete"


def test_status_follows_the_finish_reason() -> None:
    assert _bill(produced=1, finish_reason="cancelled").status == "cancelled"
    assert _bill(produced=1, finish_reason="error").status == "error"
    assert _bill(produced=1, finish_reason="shutdown").status == "interrupted"


def test_endings_the_server_chose_are_told() -> None:
    assert isinstance(told("cancelled"), StreamCancelled)
    assert told("shutdown") is not None and told("shutdown").error_code == "SERVER_SHUTTING_DOWN"  # type: ignore[union-attr]
    assert told("stop") is None and told("error") is None
