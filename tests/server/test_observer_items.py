"""What an observer is told, driven directly against a real ObservationManager.

The route tests (tests/e2e/test_observe.py) cover the wire; this pins the
late-join ordering against a producer that outruns the observer.
"""

from __future__ import annotations

from contextlib import aclosing

from observation import Batch, ObservationManager
from server.routes.observe import observer_items
from server.sse import encode_event

RING = 8


def _ids(group: list) -> list[int]:
    return [e.id for item in group if isinstance(item, Batch) for e in item.events]


def _names(group: list) -> list[str]:
    return [item[0] for item in group if isinstance(item, tuple)]


async def test_late_join_history_is_taken_with_the_head() -> None:
    """A full ring overwritten right after the head was written loses nothing announced."""
    manager = ObservationManager(ring_size=RING, linger=1, encode=encode_event)
    stream = manager.open_stream("st-1", group="s-1")
    for i in range(RING):
        stream.publish_nowait("token", f'{{"n":{i}}}')

    items = observer_items(manager, "s-1", stream, None, interval=60)
    async with aclosing(items) as groups:
        head = await groups.__anext__()
        assert _names(head) == ["observer", "history-start", "history-end"]
        assert head[1] == ("history-start", {"count": RING, "fromId": 1})
        assert head[-1] == ("history-end", {"lastId": RING})
        assert _ids(head) == list(range(1, RING + 1))

        # The producer fills the whole ring again before the observer looks.
        for i in range(RING):
            stream.publish_nowait("token", f'{{"n":{RING + i}}}')
        tail = await groups.__anext__()
        assert "lagged" not in _names(tail)
        assert _ids(tail) == list(range(RING + 1, 2 * RING + 1))

        stream.close()
        rest = [group async for group in groups]
        assert [i for g in rest for i in _ids(g)] == []


async def test_join_before_any_event_says_history_end_zero() -> None:
    manager = ObservationManager(ring_size=RING, linger=1, encode=encode_event)
    stream = manager.open_stream("st-2", group="s-2")
    items = observer_items(manager, "s-2", stream, None, interval=60)
    async with aclosing(items) as groups:
        head = await groups.__anext__()
        assert head[1:] == [
            ("history-start", {"count": 0, "fromId": 1}),
            ("history-end", {"lastId": 0}),
        ]
        stream.publish_nowait("token", '{"n":0}')
        assert _ids(await groups.__anext__()) == [1]
