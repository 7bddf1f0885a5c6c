"""Telemetry: one ``telemetry_events`` row per model call, and Prometheus metrics.

The metrics are prometheus-client objects in this ``Telemetry``'s own
``CollectorRegistry`` (a test process creates many apps: nothing goes in the
library's global registry), rendered by ``GET /metrics``. Counters and the
TTFT histogram are updated once per model call (sync, O(1), on the Trio
thread). The process-local gauges (streams, observers, readers, …) are set
from the services' ``statistics()`` when scraped; the database-wide ones
(the ledger's open reservations) are read from the database by the process
that answers the scrape. Nothing here holds a message body or a secret.

**Several processes** (``chinwag serve --workers N`` sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory for its workers):
prometheus-client's multiprocess mode. Every process writes its counters,
histogram and local gauges to its own files in that directory, and a scrape
through any worker renders a ``MultiProcessCollector`` over all of them:
counters and the histogram are summed over every worker that ever ran in the
set; the local gauges are ``livesum`` (summed over the live workers; the
parent calls ``mark_process_dead`` for a worker that exits). Each worker keeps
its local gauges current (``keep_current``: every ``GAUGE_REFRESH_S``, and at
each scrape it answers), so a scrape never shows a value another worker left
long ago. The database-wide gauges are not written to the directory: they
are read once by the scraping worker, never multiplied by N.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from .storage import StoreBackend

#: Where prometheus-client's multiprocess mode keeps each process's metrics.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: TTFT buckets, seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Gauges of this process's own state (name: help), summed over live workers.
LOCAL_GAUGES = {
    "chinwag_streams_open": "Streams (model calls) in progress.",
    "chinwag_observers": "Observers attached to streams.",
    "chinwag_readers": "Ring readers attached (clients + observers).",
    "chinwag_streams_lingering": "Ended streams still replayable.",
    "chinwag_observer_lagged_events_total": "Events observers were skipped past.",
}

#: Gauges of the shared database (name: help), read by the process that is scraped.
DATABASE_GAUGES = {
    "chinwag_ledger_reservations_open": "Open credit reservations.",
    "chinwag_ledger_reserved_credits": "Credits held by open reservations.",
}

#: How often a worker of a multiprocess set writes its local gauges (seconds).
GAUGE_REFRESH_S = 1.0

# No ``*_created`` series: the multiprocess mode has none, and the exposition
# stays what it was before prometheus-client (process-wide; chinwag is the app).
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


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


def multiprocess_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR``, if set (then metrics are written there)."""
    path = os.environ.get(MULTIPROC_ENV) or None
    if path and prometheus_values.ValueClass is prometheus_values.MutexValue:
        # prometheus-client picks its storage when first imported: set after that,
        # the counters would stay in memory and a scrape of the directory miss them.
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is imported")
    return path


class _DatabaseGauges:
    """A collector for the database-wide gauges: the values ``render`` was given."""

    def __init__(self) -> None:
        self.values: dict[str, float] = dict.fromkeys(DATABASE_GAUGES, 0.0)

    def describe(self) -> Iterator[Metric]:
        for name, help_ in DATABASE_GAUGES.items():
            yield GaugeMetricFamily(name, help_)

    def collect(self) -> Iterator[Metric]:
        for name, help_ in DATABASE_GAUGES.items():
            yield GaugeMetricFamily(name, help_, value=self.values[name])


class Telemetry:
    """The process's metrics for /metrics, and the row each model call leaves.

    Multiprocess mode follows ``PROMETHEUS_MULTIPROC_DIR`` (see the module's
    docstring); one ``Telemetry`` per process then, as in ``chinwag serve``.
    """

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry()
        if self.multiprocess_dir:
            # The metrics write to the directory; the registry reads every process's back.
            MultiProcessCollector(self.registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            own: CollectorRegistry | None = None
        else:
            own = self.registry
        self.local = {
            name: Gauge(name, help_, registry=own, multiprocess_mode="livesum")
            for name, help_ in LOCAL_GAUGES.items()
        }
        self._database = _DatabaseGauges()
        self.registry.register(self._database)
        self.calls = Counter(
            "chinwag_model_calls_total",
            "Model calls by finish reason.",
            ["finish_reason"],
            registry=own,
        )
        self.errors = Counter(
            "chinwag_stream_errors_total",
            "Failed model calls by error code.",
            ["code"],
            registry=own,
        )
        self.tokens = Counter(
            "chinwag_tokens_total", "Tokens by direction.", ["direction"], registry=own
        )
        self.retries = Counter(
            "chinwag_upstream_retries_total",
            "Upstream retries before the first token.",
            registry=own,
        )
        self.credits_charged = Counter(
            "chinwag_credits_charged_total", "Credits charged.", registry=own
        )
        self.ttft = Histogram(
            "chinwag_ttft_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=own
        )
        self._refreshing = trio.CancelScope()

    def count(self, call: CallRecord) -> None:
        """Count the call (once per call, at its end; on the Trio thread)."""
        self.calls.labels(finish_reason=call.finish_reason).inc()
        if call.error_code:
            self.errors.labels(code=call.error_code).inc()
        if call.ttft_ms is not None:
            self.ttft.observe(call.ttft_ms / 1000)
        # A counter only goes up (prometheus-client refuses a negative step).
        self.tokens.labels(direction="input").inc(max(0, call.input_tokens))
        self.tokens.labels(direction="output").inc(max(0, call.output_tokens))
        self.retries.inc(max(0, call.retries))
        self.credits_charged.inc(max(0, call.credits_charged))

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

    def set_local(self, gauges: Mapping[str, float]) -> None:
        """This process's own gauges (``LOCAL_GAUGES`` names), now."""
        for name, value in gauges.items():
            self.local[name].set(value)

    async def keep_current(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Write ``read()`` to the local gauges every ``GAUGE_REFRESH_S`` until ``stop``.

        For multiprocess mode: a scrape through another worker sees these values.
        """
        with self._refreshing:
            while True:
                self.set_local(read())
                await trio.sleep(GAUGE_REFRESH_S)

    def stop(self) -> None:
        """End ``keep_current`` (at shutdown)."""
        self._refreshing.cancel()

    def render(self, database: Mapping[str, float]) -> bytes:
        """The Prometheus text exposition (version 0.0.4).

        ``database``: the ``DATABASE_GAUGES`` values, read by the caller.
        """
        self._database.values.update(database)
        return generate_latest(self.registry)


def telemetry_rows(store: StoreBackend, limit: int = 100) -> list[dict[str, Any]]:
    return [{**row, "payload": json.loads(row["payload"])} for row in store.recent_telemetry(limit)]
