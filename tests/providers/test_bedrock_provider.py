"""BedrockProvider: the real aiobotocore client (through trio-asyncio) against FakeBedrock."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio_asyncio
from aiobotocore.session import get_session
from botocore.exceptions import ClientError, EventStreamError, ReadTimeoutError

from server.providers.base import (
    ChatTurn,
    InvalidRequest,
    ModelEvent,
    ModelRequest,
    ProviderError,
    Started,
    Stop,
    TextDelta,
    Throttled,
    UpstreamFailure,
    UpstreamTimeout,
    Usage,
    estimate_tokens,
)
from server.providers.bedrock import BedrockProvider, _translate
from server.providers.fake_bedrock import FakeBedrock, answer_text

from .conftest import SECRET_KEY, OpenProvider

MODEL = "amazon.nova-micro-v1:0"


def request(text: str = "Tell me about Trio.", max_tokens: int = 100, **kw: Any) -> ModelRequest:
    return ModelRequest(MODEL, (ChatTurn("user", text),), max_tokens, **kw)


async def collect(provider: BedrockProvider, req: ModelRequest) -> list[ModelEvent]:
    async with provider.stream(req) as events:
        return [event async for event in events]


async def collect_until_error(
    provider: BedrockProvider, req: ModelRequest
) -> tuple[list[ModelEvent], ProviderError]:
    got: list[ModelEvent] = []

    async def consume() -> None:
        async with provider.stream(req) as events:
            async for event in events:
                got.append(event)

    with pytest.raises(ProviderError) as info:
        await consume()
    return got, info.value


def text_of(events: list[ModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_normal_stream(provider: BedrockProvider, fake: FakeBedrock) -> None:
    req = ModelRequest(
        MODEL,
        (ChatTurn("user", "first"), ChatTurn("assistant", "reply"), ChatTurn("user", "Hello?")),
        100,
        temperature=0.5,
        system="Be brief.",
    )
    events = await collect(provider, req)
    assert events[0] == Started(retries=0)
    assert events[-1] == Stop("stop")
    assert text_of(events) == answer_text("Hello?", 20)
    assert all(isinstance(e, TextDelta) for e in events[1:-2])
    texts = ["first", "reply", "Hello?", "Be brief."]  # system reached the fake too
    assert events[-2] == Usage(sum(estimate_tokens(t) for t in texts), 20)
    (call,) = fake.requests
    assert (call.model_id, call.max_tokens, call.tokens_sent) == (MODEL, 100, 20)


async def test_max_tokens_gives_length(provider: BedrockProvider) -> None:
    events = await collect(provider, request("short", max_tokens=5))
    assert text_of(events) == answer_text("short", 5)
    assert events[-2:] == [Usage(estimate_tokens("short"), 5), Stop("length")]


async def test_connection_is_reused_after_a_complete_stream(
    provider: BedrockProvider, fake: FakeBedrock
) -> None:
    for _ in range(3):
        await collect(provider, request())
    assert len(fake.connections) == 1
    assert fake.connections[0].requests == 3


async def test_throttled_twice_then_success_counts_retries(
    provider: BedrockProvider, fake: FakeBedrock
) -> None:
    fake.push_fault("throttle", 2)
    events = await collect(provider, request())
    assert events[0] == Started(retries=2)
    assert events[-1] == Stop("stop")
    assert [r.status for r in fake.requests] == [429, 429, 200]


async def test_throttled_always(
    provider: BedrockProvider, fake: FakeBedrock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.push_fault("throttle", None)
    got, error = await collect_until_error(provider, request())
    assert got == []
    assert isinstance(error, Throttled)
    assert error.error_code == "RATE_LIMIT"
    assert error.retries == 2
    assert len(fake.requests) == 3
    assert SECRET_KEY not in caplog.text


@pytest.mark.parametrize("fault", ["server_error", "unavailable"])
async def test_5xx_is_upstream_failure(
    provider: BedrockProvider, fake: FakeBedrock, fault: str
) -> None:
    fake.push_fault(fault, None)
    got, error = await collect_until_error(provider, request())
    assert (got, type(error), error.retries) == ([], UpstreamFailure, 2)


async def test_5xx_retried_then_success(provider: BedrockProvider, fake: FakeBedrock) -> None:
    fake.push_fault("server_error", 1)
    events = await collect(provider, request())
    assert (events[0], events[-1]) == (Started(retries=1), Stop("stop"))


async def test_validation_is_invalid_request_not_retried(
    provider: BedrockProvider, fake: FakeBedrock
) -> None:
    fake.push_fault("invalid", None)
    _, error = await collect_until_error(provider, request())
    assert (type(error), error.retries, error.retryable) == (InvalidRequest, 0, False)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("fault", ["break_midway", "drop_midway"])
async def test_break_midway_is_upstream_failure_after_some_text(
    provider: BedrockProvider, fake: FakeBedrock, fault: str
) -> None:
    fake.settings.break_after_tokens = 3
    fake.settings.tokens_per_s = 200
    fake.push_fault(fault, 1)
    got, error = await collect_until_error(provider, request())
    assert isinstance(error, UpstreamFailure)
    assert got[0] == Started(retries=0)
    expected = answer_text("Tell me about Trio.", 3)
    if fault == "break_midway":
        assert text_of(got) == expected
    else:
        # An abrupt drop may lose what was in flight with it: a non-empty prefix.
        assert text_of(got)
        assert expected.startswith(text_of(got))
    assert not any(isinstance(e, Usage | Stop) for e in got)  # no invented usage


@pytest.mark.parametrize(
    ("fault", "deltas"), [("hang", 0), ("hang_headers", 0), ("hang_midway", 3)]
)
async def test_hang_is_upstream_timeout(
    open_provider: OpenProvider, fake: FakeBedrock, fault: str, deltas: int
) -> None:
    fake.push_fault(fault, None)
    with trio.fail_after(5):
        async with open_provider(read_timeout=0.2, max_attempts=2) as provider:
            got, error = await collect_until_error(provider, request())
    assert isinstance(error, UpstreamTimeout)
    assert len([e for e in got if isinstance(e, TextDelta)]) == deltas
    # A hang before the headers is retried by botocore; once streaming, never.
    assert error.retries == (1 if fault == "hang" else 0)
    with trio.fail_after(1):
        for conn in fake.connections:
            await fake.wait_closed(conn.id)


async def measure_cancel(provider: BedrockProvider, fake: FakeBedrock, after_deltas: int) -> float:
    """Cancel the consumer after ``after_deltas`` deltas; seconds until the fake saw the close."""
    seen = 0
    with trio.CancelScope() as scope:
        async with provider.stream(request()) as events:
            async for event in events:
                seen += isinstance(event, TextDelta)
                if seen >= after_deltas:
                    cancelled_at = trio.current_time()
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    call = fake.requests[-1]
    with trio.fail_after(1):
        record = await fake.wait_closed(call.connection_id)
    assert record.closed_at is not None
    return record.closed_at - cancelled_at


async def test_cancel_mid_stream_closes_upstream_connection(
    provider: BedrockProvider, fake: FakeBedrock
) -> None:
    fake.settings.tokens_per_s = 100  # still streaming when we cancel
    fake.settings.answer_tokens = 200  # 2 s of answer: only an abort ends it early
    latencies = [await measure_cancel(provider, fake, after_deltas=3) for _ in range(5)]
    for call in fake.requests:
        assert 3 <= call.tokens_sent < 200
    print(f"cancel -> upstream closed: {[round(x * 1000, 3) for x in latencies]} ms")
    # The functional bound (issue 4: "within a second"); the speed is benchmarked
    # (scripts/bench_streams.py: p99 2.3 ms), not asserted on a loaded CI machine.
    assert max(latencies) < 1.0


async def test_cancel_while_waiting_for_headers_closes_connection(
    provider: BedrockProvider, fake: FakeBedrock
) -> None:
    fake.push_fault("hang", 1)
    with trio.CancelScope() as scope:
        async with provider.stream(request()) as events, trio.open_nursery() as nursery:
            nursery.start_soon(events.__anext__)  # waits for the response headers
            await fake.wait_until(lambda: len(fake.requests) == 1)
            cancelled_at = trio.current_time()
            scope.cancel()
    with trio.fail_after(1):
        record = await fake.wait_closed(fake.requests[0].connection_id)
    # Closed on the cancel, not at a timeout (the speed is benchmarked, not asserted).
    assert record.closed_at - cancelled_at < 1.0


async def test_leaving_the_block_early_closes_connection(
    provider: BedrockProvider, fake: FakeBedrock
) -> None:
    fake.settings.tokens_per_s = 100
    async with provider.stream(request()) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                break
    with trio.fail_after(1):
        await fake.wait_closed(fake.requests[0].connection_id)


async def test_fake_converse_unary_with_aiobotocore(aio_loop: Any, fake: FakeBedrock) -> None:
    """The non-streaming route, through a plain aiobotocore client."""
    creator = get_session().create_client(
        "bedrock-runtime", region_name="us-east-1", endpoint_url=fake.url
    )
    async with trio_asyncio.aio_as_trio(creator) as client:
        response = await trio_asyncio.aio_as_trio(client.converse)(
            modelId=MODEL,
            messages=[{"role": "user", "content": [{"text": "unary"}]}],
            inferenceConfig={"maxTokens": 4},
        )
    assert response["output"]["message"]["content"][0]["text"] == answer_text("unary", 4)
    assert response["stopReason"] == "max_tokens"
    assert response["usage"]["outputTokens"] == 4


def _client_error(code: str, status: int, retries: int = 0) -> ClientError:
    meta = {"HTTPStatusCode": status, "RetryAttempts": retries}
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": meta}, "Op")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error("ThrottlingException", 429, 2), Throttled),
        (_client_error("ValidationException", 400), InvalidRequest),
        (_client_error("AccessDeniedException", 403), InvalidRequest),
        (_client_error("ResourceNotFoundException", 404), InvalidRequest),
        (_client_error("InternalServerException", 500), UpstreamFailure),
        (_client_error("ServiceUnavailableException", 503), UpstreamFailure),
        (_client_error("ModelTimeoutException", 408), UpstreamTimeout),
        (_client_error("ModelErrorException", 424), UpstreamFailure),
        (EventStreamError({"Error": {"Code": "modelStreamErrorException"}}, "Op"), UpstreamFailure),
        (EventStreamError({"Error": {"Code": "throttlingException"}}, "Op"), Throttled),
        (ReadTimeoutError(endpoint_url="http://x"), UpstreamTimeout),
        (TimeoutError(), UpstreamTimeout),
        (ConnectionResetError(), UpstreamFailure),
    ],
)
def test_error_translation(exc: Exception, expected: type[ProviderError]) -> None:
    mapped = _translate(exc, retries=1)
    assert type(mapped) is expected
    if isinstance(exc, ClientError) and "ResponseMetadata" in exc.response:
        assert mapped.retries == exc.response["ResponseMetadata"]["RetryAttempts"]
    assert _translate(ValueError("not ours"), 0) is None


async def test_connection_refused_is_upstream_failure(aio_loop: Any) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with BedrockProvider.open(f"http://127.0.0.1:{port}", "us-east-1") as provider:
        _, error = await collect_until_error(provider, request())
    assert isinstance(error, UpstreamFailure)
    assert error.retries == 2  # connection errors are retried too
