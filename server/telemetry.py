"""Telemetry: one ``telemetry_events`` row per model call, and Prometheus metrics.

Counters and histograms live in memory (cheap, sync, O(1) per update) and
are rendered in the Prometheus text format by ``GET /metrics``; gauges are
read at scrape time from the services' ``statistics()``. Nothing here holds
a message body or a secret.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .storage import StoreBackend

#: TTFT buckets, seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.n}")
        return lines


@dataclass(frozen=True, slots=True)
class CallRecord:
    streaming_session_id: str
    user_id: str
    model_id: str
    provider: str
    retries: int
    ttft_ms: float | None
    total_ms: float
    input_tokens: int
    output_tokens: int
    credits_charged: int
    finish_reason: str
    error_code: str | None


class Telemetry:
    """The process's counters for /metrics, and the row each model call leaves."""

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS)
        self.calls: Counter[str] = Counter()  # by finish reason
        self.errors: Counter[str] = Counter()  # by error code
        self.tokens: Counter[str] = Counter()  # input / output
        self.retries = 0
        self.credits_charged = 0

    def count(self, call: CallRecord) -> None:
        """Count the call (once per call, at its end; on the Trio thread)."""
        self.calls[call.finish_reason] += 1
        if call.error_code:
            self.errors[call.error_code] += 1
        if call.ttft_ms is not None:
            self.ttft.observe(call.ttft_ms / 1000)
        self.tokens["input"] += call.input_tokens
        self.tokens["output"] += call.output_tokens
        self.retries += call.retries
        self.credits_charged += call.credits_charged

    @staticmethod
    def row(call: CallRecord) -> str:
        """The call's ``telemetry_events`` payload (pure: safe in the database thread)."""
        payload = {
            "streamingSessionId": call.streaming_session_id,
            "userId": call.user_id,
            "modelId": call.model_id,
            "provider": call.provider,
            "provider_retry_count": call.retries,
            "ttft_ms": None if call.ttft_ms is None else round(call.ttft_ms, 3),
            "total_ms": round(call.total_ms, 3),
            "input_tokens": call.input_tokens,
            "output_tokens": call.output_tokens,
            "credits_charged": call.credits_charged,
            "finish_reason": call.finish_reason,
            "error_code": call.error_code,
        }
        return json.dumps(payload, separators=(",", ":"))

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [f"{name} {value:g}"])
        metric(
            "chinwag_model_calls_total",
            "counter",
            "Model calls by finish reason.",
            [
                f'chinwag_model_calls_total{{finish_reason="{k}"}} {v}'
                for k, v in sorted(self.calls.items())
            ],
        )
        metric(
            "chinwag_stream_errors_total",
            "counter",
            "Failed model calls by error code.",
            [
                f'chinwag_stream_errors_total{{code="{k}"}} {v}'
                for k, v in sorted(self.errors.items())
            ],
        )
        metric(
            "chinwag_tokens_total",
            "counter",
            "Tokens by direction.",
            [
                f'chinwag_tokens_total{{direction="{k}"}} {v}'
                for k, v in sorted(self.tokens.items())
            ],
        )
        metric(
            "chinwag_upstream_retries_total",
            "counter",
            "Upstream retries before the first token.",
            [f"chinwag_upstream_retries_total {self.retries}"],
        )
        metric(
            "chinwag_credits_charged_total",
            "counter",
            "Credits charged.",
            [f"chinwag_credits_charged_total {self.credits_charged}"],
        )
        metric(
            "chinwag_ttft_seconds",
            "histogram",
            "Time to first token.",
            self.ttft.render("chinwag_ttft_seconds"),
        )
        return "\n".join(out) + "\n"


def telemetry_rows(store: StoreBackend, limit: int = 100) -> list[dict[str, Any]]:
    return [{**row, "payload": json.loads(row["payload"])} for row in store.recent_telemetry(limit)]
