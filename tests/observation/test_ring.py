"""The ring on its own: addressing by id, wrapping, slicing, release."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from observation import Event
from observation.ring import Ring


def event(i: int) -> Event:
    return Event(i, "chunk", str(i), str(i).encode())


def test_empty_ring() -> None:
    ring = Ring(4)
    assert (ring.first_id, ring.last_id, len(ring)) == (1, 0, 0)


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ring size"):
        Ring(0)


def test_append_requires_the_next_id() -> None:
    ring = Ring(4)
    ring.append(event(1))
    with pytest.raises(ValueError, match="expected id 2"):
        ring.append(event(3))


def test_slice_outside_the_ring_is_refused() -> None:
    ring = Ring(2)
    for i in range(1, 6):
        ring.append(event(i))
    assert ring.slice(4, 5) == (event(4), event(5))
    with pytest.raises(IndexError):
        ring.slice(3, 5)
    with pytest.raises(IndexError):
        ring.slice(5, 6)


@given(size=st.integers(1, 9), count=st.integers(0, 40), data=st.data())
def test_ring_matches_the_newest_events(size: int, count: int, data: st.DataObject) -> None:
    ring = Ring(size)
    for i in range(1, count + 1):
        ring.append(event(i))
    held = list(range(max(1, count - size + 1), count + 1))
    assert (ring.first_id, ring.last_id, len(ring)) == (count - len(held) + 1, count, len(held))
    if held:
        first = data.draw(st.sampled_from(held))
        last = data.draw(st.sampled_from([i for i in held if i >= first]))
        assert [e.id for e in ring.slice(first, last)] == list(range(first, last + 1))


def test_release_drops_events_and_keeps_counting() -> None:
    ring = Ring(3)
    for i in range(1, 6):
        ring.append(event(i))
    ring.release()
    assert (ring.first_id, ring.last_id, len(ring)) == (6, 5, 0)
    for i in range(6, 11):
        ring.append(event(i))
    assert [e.id for e in ring.slice(8, 10)] == [8, 9, 10]


def test_release_can_keep_the_newest_events() -> None:
    ring = Ring(3)
    for i in range(1, 6):  # wrapped: 3, 4, 5 held
        ring.append(event(i))
    ring.release(keep=2)
    assert (ring.first_id, ring.last_id, len(ring)) == (4, 5, 2)
    assert [e.id for e in ring.slice(4, 5)] == [4, 5]
    ring.append(event(6))
    assert [e.id for e in ring.slice(4, 6)] == [4, 5, 6]
    ring.release(keep=10)  # no more than it holds
    assert (ring.first_id, len(ring)) == (4, 3)
    Ring(3).release(keep=1)  # an empty ring keeps nothing


def test_the_ring_keeps_no_object_the_garbage_collector_must_walk() -> None:
    """Events live as long as their stream: the ring holds their fields in a
    list per field, so the collector tracks those few lists and nothing per
    event (an Event instance stays tracked for good, and made every
    old-generation pass walk every buffered event; a tuple per event was
    tracked until its first collection)."""
    import gc

    ring = Ring(8)
    for i in range(1, 11):
        ring.append(event(i))
    tracked = [o for o in gc.get_referents(ring) if gc.is_tracked(o) and o is not Ring]
    assert len(tracked) == 3 and all(isinstance(o, list) for o in tracked)
    assert all(len(fields) == 8 for fields in tracked)
    assert not any(gc.is_tracked(value) for fields in tracked for value in fields)
    assert ring.slice(3, 10) == tuple(event(i) for i in range(3, 11))


def test_with_a_decode_the_ring_keeps_no_data_and_gives_it_back() -> None:
    """The data of an event is in its wire bytes: given the decoder, the ring
    keeps only those, and a slice reads the data back from them."""

    def decode(event_id: int, name: str, wire: bytes) -> str:
        assert wire == event(event_id).wire and name == event(event_id).name
        return event(event_id).data

    ring = Ring(4, decode)
    for i in range(1, 7):
        ring.append(event(i))
    assert ring._datas is None  # names and wire bytes only
    assert ring.slice(3, 6) == tuple(event(i) for i in range(3, 7))
