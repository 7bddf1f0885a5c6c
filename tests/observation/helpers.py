"""Helpers shared by the observation tests."""

from __future__ import annotations

import json

import trio

from observation import Batch, Reader, Stream


def sse(event_id: int, name: str, data: str) -> bytes:
    """The wire format the server uses (good enough to compare bytes)."""
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()


class CountingEncoder:
    """An ``encode`` callable that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, str]] = []

    def __call__(self, event_id: int, name: str, data: str) -> bytes:
        self.calls.append((event_id, name, data))
        return sse(event_id, name, data)


def chunk(n: int) -> str:
    return json.dumps({"text": f"t{n}"})


def publish_many(stream: Stream, count: int) -> None:
    for _ in range(count):
        stream.publish_nowait("chunk", chunk(stream.last_id + 1))


def ids(batches: list[Batch]) -> list[int]:
    return [event.id for batch in batches for event in batch.events]


async def read_all(
    stream: Stream,
    into: list[Batch],
    after_id: int = 0,
    *,
    primary: bool = False,
    task_status: trio.TaskStatus[Reader] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Attach, report started (with the reader), then collect every batch."""
    with stream.reader(after_id, primary=primary) as reader:
        task_status.started(reader)
        async for batch in reader:
            into.append(batch)
