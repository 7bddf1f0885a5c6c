"""A small, strict SSE reader over an httpx streaming response, for tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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


async def messages(response: Any) -> AsyncIterator[Msg]:
    """Parse ``response.aiter_text()`` into :class:`Msg` blocks, as they arrive."""
    buf = ""
    async for text in response.aiter_text():
        buf += text
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
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
            yield msg


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
