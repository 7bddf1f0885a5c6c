"""What an observer is told, driven directly against a real ObservationManager.

The route tests (tests/e2e/test_observe.py) cover the wire; this pins the
late-join ordering against a producer that outruns the observer.
"""

from __future__ import annotations

import trio
import trio.testing

from observation import Batch, ObservationManager
from server.routes.observe import Item, observe_feed
from server.sse import encode_event

RING = 8


def _items(group: list[Item] | Batch) -> list[Item]:
    return [group] if isinstance(group, Batch) else group


def _ids(group: list[Item] | Batch) -> list[int]:
    return [e.id for item in _items(group) if isinstance(item, Batch) for e in item.events]


def _names(group: list[Item] | Batch) -> list[str]:
    return [item[0] for item in _items(group) if isinstance(item, tuple)]


async def test_late_join_history_is_taken_with_the_head() -> None:
    """A full ring overwritten right after the head was written loses nothing announced."""
    manager = ObservationManager(ring_size=RING, linger=1, encode=encode_event)
    stream = manager.open_stream("st-1", group="s-1")
    for i in range(RING):
        stream.publish_nowait("token", f'{{"n":{i}}}')
    told: list[list[Item] | Batch] = []

    async def tell(group: list[Item] | Batch) -> None:
        told.append(group)
        if len(told) == 1:
            # The producer fills the whole ring again while the head is written.
            for i in range(RING):
                stream.publish_nowait("token", f'{{"n":{RING + i}}}')
        elif len(told) == 2:
            stream.close()

    await observe_feed(tell, manager, "s-1", stream, None, interval=60)

    head, tail, *rest = told
    assert _names(head) == ["observer", "history-start", "history-end"]
    assert isinstance(head, list)
    assert head[1] == ("history-start", {"count": RING, "fromId": 1})
    assert head[-1] == ("history-end", {"lastId": RING})
    assert _ids(head) == list(range(1, RING + 1))
    assert "lagged" not in _names(tail)
    assert _ids(tail) == list(range(RING + 1, 2 * RING + 1))
    assert [i for g in rest for i in _ids(g)] == []
    assert stream.observers == 0  # the feed ended and detached


async def test_join_before_any_event_says_history_end_zero() -> None:
    manager = ObservationManager(ring_size=RING, linger=1, encode=encode_event)
    stream = manager.open_stream("st-2", group="s-2")
    told: list[list[Item] | Batch] = []

    async def tell(group: list[Item] | Batch) -> None:
        told.append(group)
        if len(told) == 1:
            stream.publish_nowait("token", '{"n":0}')
        else:
            stream.close()

    await observe_feed(tell, manager, "s-2", stream, None, interval=60)
    head, first = told[:2]
    assert isinstance(head, list)
    assert head[1:] == [
        ("history-start", {"count": 0, "fromId": 1}),
        ("history-end", {"lastId": 0}),
    ]
    assert isinstance(first, Batch)  # the live tail's usual group: a bare batch
    assert _ids(first) == [1]


async def test_a_feed_that_attaches_after_the_linger_still_ends_with_the_ending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The route found the stream, but its ring expired before the feed attached
    (a loaded server, 1,000 joins): the observer still learns how it ended."""
    manager = ObservationManager(ring_size=RING, linger=1, encode=encode_event)
    stream = manager.open_stream("st-3", group="s-3")
    for i in range(5):
        stream.publish_nowait("chunk", f'{{"n":{i}}}')
    stream.publish_nowait("error", '{"errorCode":"STREAM_CANCELLED"}')
    stream.publish_nowait("done", '{"finishReason":"cancelled"}')
    stream.close(ending=2)
    await trio.sleep(1.5)
    assert manager.get("st-3") is None  # expired: the ring is released
    told: list[list[Item] | Batch] = []

    async def tell(group: list[Item] | Batch) -> None:
        told.append(group)

    await observe_feed(tell, manager, "s-3", stream, None, interval=60)

    (head,) = told
    assert isinstance(head, list)
    assert head[1] == ("history-start", {"count": 2, "fromId": 6})
    assert head[-1] == ("history-end", {"lastId": 7})
    events = [e for item in head if isinstance(item, Batch) for e in item.events]
    assert [(e.id, e.name) for e in events] == [(6, "error"), (7, "done")]
