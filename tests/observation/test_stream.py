"""Publishing and closing a stream; the encoder runs once per event."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from observation import Batch, Event, ObservationManager

from .helpers import CountingEncoder, publish_many, read_all, sse


async def test_ids_start_at_one_and_events_carry_their_wire(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    assert stream.last_id == 0
    first = stream.publish_nowait("chunk", '{"text":"Hello"}')
    second = await stream.publish("done", "{}")
    assert first == Event(1, "chunk", '{"text":"Hello"}', sse(1, "chunk", '{"text":"Hello"}'))
    assert second.id == 2
    assert stream.last_id == 2


async def test_encode_runs_once_per_event_whatever_the_reader_count(
    manager: ObservationManager, encode: CountingEncoder
) -> None:
    stream = manager.open_stream("s1", group="g")
    got: list[list[Batch]] = [[] for _ in range(50)]
    async with trio.open_nursery() as nursery:
        for into in got:
            await nursery.start(read_all, stream, into)
        for i in range(5):
            stream.publish_nowait("chunk", str(i))
            await trio.testing.wait_all_tasks_blocked()
        publish_many(stream, 3)  # a burst, no reader running in between
        stream.close()
    assert encode.calls == [(i + 1, "chunk", str(i)) for i in range(5)] + [
        (6, "chunk", '{"text": "t6"}'),
        (7, "chunk", '{"text": "t7"}'),
        (8, "chunk", '{"text": "t8"}'),
    ]
    assert all(
        b"".join(b.wire for b in into) == b"".join(sse(*c) for c in encode.calls) for into in got
    )


async def test_failing_encode_appends_nothing() -> None:
    def encode(event_id: int, name: str, data: str) -> bytes:
        if name == "bad":
            raise ValueError("cannot encode")
        return b"x"

    stream = ObservationManager(encode=encode).open_stream("s", group="g")
    stream.publish_nowait("chunk", "")
    with pytest.raises(ValueError, match="cannot encode"):
        stream.publish_nowait("bad", "")
    assert stream.last_id == 1
    assert stream.publish_nowait("chunk", "").id == 2


async def test_close_is_idempotent_and_publish_after_close_raises(
    manager: ObservationManager, autojump_clock: trio.testing.MockClock
) -> None:
    stream = manager.open_stream("s1", group="g")
    assert (stream.ended, stream.ended_at) == (False, None)
    await trio.sleep(5)
    stream.close()
    await trio.sleep(1)
    stream.close()
    assert (stream.ended, stream.ended_at) == (True, 5.0)
    with pytest.raises(trio.ClosedResourceError):
        stream.publish_nowait("chunk", "{}")
    with pytest.raises(trio.ClosedResourceError):
        await stream.publish("chunk", "{}")
    assert stream.last_id == 0


async def test_stream_as_context_manager_closes(manager: ObservationManager) -> None:
    with manager.open_stream("s1", group="g") as stream:
        stream.publish_nowait("chunk", "{}")
    assert stream.ended


async def test_publish_is_a_checkpoint(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await stream.publish("chunk", "{}")
    assert stream.last_id == 0  # cancelled before appending: nothing appended


async def test_repr_names_the_stream(manager: ObservationManager) -> None:
    stream = manager.open_stream("s1", group="g")
    assert "s1" in repr(stream)
    assert "live" in repr(stream)
    with stream.reader() as reader:
        assert "observer" in repr(reader)
