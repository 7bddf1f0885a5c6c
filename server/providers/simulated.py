"""The simulated model: in-process, deterministic, with real timing (SPEC §7).

The answer is derived from the prompt (same prompt → same text), is
``answer_tokens`` tokens long (capped by ``max_tokens``), and arrives after
``ttft_ms`` at ``tokens_per_s`` (0 = no delay: as fast as the reader takes
it); a request's ``Pace`` overrides both. Fault scenarios (SPEC §8,
``X-Test-Scenario``) make it misbehave on purpose so clients can test their
error, heartbeat and disconnect handling.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..timers import Timers
from .base import (
    ModelEvent,
    ModelRequest,
    Started,
    Stop,
    TextDelta,
    Throttled,
    UpstreamFailure,
    UpstreamTimeout,
    Usage,
    estimate_tokens,
)

#: Faults the model itself acts out. ``reset_midway`` is the client connection's
#: own (see :mod:`server.routes.stream`): the model answers normally.
SCENARIOS = frozenset(
    {"timeout", "rate_limit", "server_error", "slow", "hang", "drop_midway", "reset_midway"}
)

_WORDS = [
    "the",
    "stream",
    "of",
    "tokens",
    "arrives",
    "in",
    "order",
    "and",
    "every",
    "chunk",
    "carries",
    "a",
    "small",
    "piece",
    "of",
    "the",
    "answer",
    "while",
    "the",
    "server",
    "keeps",
    "the",
    "connection",
    "alive",
    "with",
    "heartbeats",
    "so",
    "that",
    "proxies",
    "and",
    "clients",
    "know",
    "it",
    "is",
    "still",
    "working",
    "on",
    "a",
    "careful",
    "reply",
    "about",
    "systems",
    "design",
    "cancellation",
    "structured",
    "concurrency",
    "ledgers",
    "credits",
    "observers",
    "history",
    "replay",
    "latency",
    "throughput",
]


def simulated_text(prompt: str, n_tokens: int) -> list[str]:
    """The deterministic answer to ``prompt``: ``n_tokens`` word tokens."""
    seed = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    state = int.from_bytes(seed, "big")
    out = []
    for i in range(n_tokens):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        word = _WORDS[(state >> 33) % len(_WORDS)]
        out.append(word.capitalize() if i == 0 else " " + word)
    return out


#: Tokens handed over without a checkpoint when the schedule is behind.
CATCH_UP_MAX = 32


class SimulatedProvider:
    name = "simulated"

    def __init__(
        self,
        *,
        ttft_ms: int = 50,
        tokens_per_s: int = 50,
        answer_tokens: int = 200,
        timers: Timers | None = None,
    ):
        self.ttft_s = ttft_ms / 1000
        self.interval_s = 1 / tokens_per_s if tokens_per_s > 0 else 0.0
        self.answer_tokens = answer_tokens
        # Pacing waits on the process's timer service (None: plain trio sleeps).
        self._sleep_until = timers.sleep_until if timers is not None else trio.sleep_until

    @asynccontextmanager
    async def stream(self, request: ModelRequest) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        events = self._events(request)
        try:
            yield events
        finally:
            await events.aclose()

    async def _events(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        scenario = request.scenario
        prompt = "\n".join(t.text for t in request.messages)
        input_tokens = estimate_tokens(prompt) + estimate_tokens(request.system or "")
        n = min(self.answer_tokens, request.max_tokens)
        ttft, interval = self.ttft_s, self.interval_s
        if request.pace is not None:  # this request's own timing (X-Sim-*)
            if request.pace.ttft_ms is not None:
                ttft = request.pace.ttft_ms / 1000
            if request.pace.tokens_per_s is not None:
                rate = request.pace.tokens_per_s
                interval = 1 / rate if rate > 0 else 0.0
        if scenario == "slow":
            ttft, interval = max(ttft, 0.2) * 10, max(interval, 0.02) * 10
        sleep_until = self._sleep_until
        await sleep_until(trio.current_time() + ttft)
        if scenario == "hang":
            await trio.sleep_forever()
        if scenario == "rate_limit":
            raise Throttled("simulated upstream 429")
        if scenario == "server_error":
            raise UpstreamFailure("simulated upstream 500")
        if scenario == "timeout":
            raise UpstreamTimeout("simulated upstream timeout")
        yield Started(retries=0)
        # trio.current_time() in one call instead of three: read twice per token.
        now = trio.lowlevel.current_clock().current_time
        deadline = now()
        behind = 0
        for i, token in enumerate(simulated_text(prompt, n)):
            if scenario == "drop_midway" and i == max(1, n // 2):
                raise UpstreamFailure("simulated stream broken mid-way")
            # Pace on an absolute schedule so lateness does not accumulate.
            # Tokens already due (unpaced: all of them) are handed over in a
            # bounded run without a checkpoint each, as a real upstream's
            # wait in the socket buffer while the loop is busy and are read
            # together; else a busy loop (1,000 observers) would pace the
            # model, and an unpaced stream would cost one write per token.
            deadline += interval
            if behind < CATCH_UP_MAX and deadline <= now():
                behind += 1
            else:
                behind = 0
                await sleep_until(deadline)
            # The next token follows at once if it is due already and the run
            # is not at its bound: the client's write can wait for it.
            more = i < n - 1 and behind < CATCH_UP_MAX and deadline + interval <= now()
            yield TextDelta(token, more)
        yield Usage(input_tokens=input_tokens, output_tokens=n)
        yield Stop("length" if n >= request.max_tokens and n < self.answer_tokens else "stop")
