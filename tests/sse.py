"""A small, strict SSE reader over an httpx streaming response, for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import trio


@dataclass
class Msg:
    """One SSE block: an event (``event`` set) or a comment (``comment`` set)."""

    event: str | None = None
    id: int | None = None
    data: Any = None
    comment: str | None = None
    at: float = 0.0  # trio.current_time() when received

    @property
    def raw_data(self) -> str:
        return json.dumps(self.data)


class messages:
    """Parse an httpx streaming response into :class:`Msg` blocks, as they arrive.

    A class, not an async generator, so a test may stop reading at any point
    (that is how disconnects are tested) without leaving a generator behind.
    """

    def __init__(self, response: Any) -> None:
        self._chunks = response.aiter_text()
        self._buf = ""
        self._ready: list[Msg] = []

    def __aiter__(self) -> messages:
        return self

    async def __anext__(self) -> Msg:
        while not self._ready:
            text = await self._chunks.__anext__()  # StopAsyncIteration ends us too
            self._buf += text
            while "\n\n" in self._buf:
                block, self._buf = self._buf.split("\n\n", 1)
                self._ready.append(_parse(block))
        return self._ready.pop(0)


def _parse(block: str) -> Msg:
    msg = Msg(at=trio.current_time())
    for line in block.split("\n"):
        if line.startswith(":"):
            msg.comment = line[1:].strip()
        elif line.startswith("id: "):
            msg.id = int(line[4:])
        elif line.startswith("event: "):
            msg.event = line[7:]
        elif line.startswith("data: "):
            msg.data = json.loads(line[6:])
        elif line:
            raise AssertionError(f"unexpected SSE line {line!r}")
    return msg


async def collect(response: Any, *, until: str = "done") -> list[Msg]:
    out = []
    async for msg in messages(response):
        out.append(msg)
        if msg.event == until:
            break
    return out


def events(msgs: list[Msg]) -> list[Msg]:
    return [m for m in msgs if m.event is not None]


def text_of(msgs: list[Msg]) -> str:
    return "".join(m.data["text"] for m in msgs if m.event == "chunk")
