"""The test controls a chat request may carry (SPEC §8): ``X-Test-Scenario``
and the simulated model's pacing, ``X-Sim-Tokens-Per-S`` and ``X-Sim-Ttft-Ms``.

Read by every route that starts a model call (the stream, the whole answer of
``POST …/messages``, ``/api/v1/chat``), the same way on each.
"""

from __future__ import annotations

from dataclasses import dataclass

from quart import request

from ..context import services
from ..errors import ValidationError
from ..providers.base import Pace
from ..providers.simulated import SCENARIOS
from ..validate import Param

SCENARIO = Param(
    "X-Test-Scenario",
    # No enum: with scenarios off any value is ignored (SPEC §8), so any is valid.
    {"type": "string"},
    where="header",
    description="Force a fault: one of " + ", ".join(sorted(SCENARIOS)) + " (simulated "
    "model, CHINWAG_TEST_SCENARIOS on, where another value is a 400; otherwise "
    "ignored, whatever it says). reset_midway cuts the connection after half the "
    "answer, without done.",
)
MAX_SIM_RATE = 100_000
MAX_SIM_TTFT_MS = 600_000
SIM_RATE = Param(
    "X-Sim-Tokens-Per-S",
    {"type": "string", "pattern": "^[0-9]{1,6}$"},
    where="header",
    description=f"The simulated model's token rate for this request, 0-{MAX_SIM_RATE} "
    "(0 = as fast as possible); CHINWAG_TEST_SCENARIOS on, otherwise checked and ignored.",
)
SIM_TTFT = Param(
    "X-Sim-Ttft-Ms",
    {"type": "string", "pattern": "^[0-9]{1,6}$"},
    where="header",
    description=f"The simulated model's time to first token for this request, 0-{MAX_SIM_TTFT_MS}"
    " ms; CHINWAG_TEST_SCENARIOS on, otherwise checked and ignored.",
)
#: The test controls a stream request may carry (SPEC §8).
TEST_CONTROLS = (SCENARIO, SIM_RATE, SIM_TTFT)


@dataclass(frozen=True, slots=True)
class Controls:
    """What a request's test headers ask for, once checked (None/None when off)."""

    scenario: str | None
    pace: Pace | None


def _header_int(name: str, maximum: int) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 7 or int(raw) > maximum:
        raise ValidationError(
            f"{name} must be an integer from 0 to {maximum}.", details=[{"field": name}]
        )
    return int(raw)


def read_controls() -> Controls:
    """``X-Sim-*``: checked always, acted on only with ``CHINWAG_TEST_SCENARIOS``
    on; ``X-Test-Scenario``: ignored when off, an unknown one refused when on
    (SPEC §8)."""
    rate = _header_int("X-Sim-Tokens-Per-S", MAX_SIM_RATE)
    ttft = _header_int("X-Sim-Ttft-Ms", MAX_SIM_TTFT_MS)
    if not services().settings.test_scenarios:
        return Controls(None, None)
    scenario = request.headers.get("X-Test-Scenario")
    if scenario is not None and scenario not in SCENARIOS:
        raise ValidationError(
            f"Unknown X-Test-Scenario; use one of {', '.join(sorted(SCENARIOS))}.",
            details=[{"field": "X-Test-Scenario"}],
        )
    pace = None if rate is None and ttft is None else Pace(tokens_per_s=rate, ttft_ms=ttft)
    return Controls(scenario, pace)
