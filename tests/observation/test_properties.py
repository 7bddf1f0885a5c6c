"""Random interleavings of publishes, joins and slow readers (hypothesis).

Every reader, whenever it joins and however slowly it reads, sees ids in
order with no duplicate, and every gap is announced exactly by ``skipped``;
with a ring big enough for the whole stream there are no gaps at all, so
each reader sees exactly ``start+1 .. last_id``. The primary reader is never
skipped and sees everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import trio
import trio.testing
from hypothesis import event, given, settings
from hypothesis import strategies as st

from observation import Batch, ObservationManager, Stream

from .helpers import CountingEncoder, chunk

Op = tuple[str, int, tuple[int, ...]]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 6), st.just(())),
        st.tuples(
            st.just("join"), st.integers(0, 40), st.lists(st.integers(0, 3), max_size=4).map(tuple)
        ),
        st.tuples(st.just("pause"), st.integers(0, 3), st.just(())),
    ),
    max_size=30,
)


@dataclass
class Seen:
    after_id: int
    first_at_attach: int
    last_at_attach: int
    start: int = -1
    backlog: tuple[int, int] = (0, 0)
    batches: list[Batch] = field(default_factory=list)


async def follow(
    stream: Stream,
    seen: Seen,
    delays: tuple[int, ...],
    *,
    primary: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with stream.reader(seen.after_id, primary=primary) as reader:
        seen.start = reader.position
        seen.backlog = reader.backlog()
        task_status.started()
        async for batch in reader:
            seen.batches.append(batch)
            if delays:
                await trio.sleep(delays[len(seen.batches) % len(delays)])


def check(seen: Seen, last_id: int, *, gapless: bool) -> int:
    """Assert the delivery guarantees for one reader; return its total skipped."""
    expected_start = min(max(seen.after_id, seen.first_at_attach - 1), seen.last_at_attach)
    assert seen.start == expected_start
    assert seen.backlog == (seen.last_at_attach - seen.start, seen.start + 1)
    position = seen.start
    skipped = 0
    for index, batch in enumerate(seen.batches):
        assert batch.events, "an empty batch happens only after the ring is released"
        assert batch.events[0].id == position + batch.skipped + 1
        assert [e.id for e in batch.events] == list(
            range(batch.events[0].id, batch.events[-1].id + 1)
        )
        assert batch.wire == b"".join(e.wire for e in batch.events)
        if index == 0 and not batch.skipped and seen.backlog[0]:
            assert batch.events[-1].id == seen.last_at_attach  # the history, exactly
        position = batch.events[-1].id
        skipped += batch.skipped
    assert position == last_id
    if gapless:
        assert skipped == 0
        got = [e.id for b in seen.batches for e in b.events]
        assert got == list(range(seen.start + 1, last_id + 1))
    return skipped


async def scenario(
    ring_size: int, schedule: list[Op], primary_delays: tuple[int, ...] | None
) -> None:
    manager = ObservationManager(ring_size=ring_size, encode=CountingEncoder())
    stream = manager.open_stream("s", group="g")
    readers: list[Seen] = []
    primary = Seen(0, 1, 0)
    async with trio.open_nursery() as nursery:
        if primary_delays is not None:
            await nursery.start(partial(follow, primary=True), stream, primary, primary_delays)
        for kind, number, delays in schedule:
            if kind == "publish":
                for _ in range(number):
                    if primary_delays is None:
                        stream.publish_nowait("chunk", chunk(stream.last_id + 1))
                    else:
                        await stream.publish("chunk", chunk(stream.last_id + 1))
            elif kind == "join":
                seen = Seen(number, stream.first_id, stream.last_id)
                readers.append(seen)
                await nursery.start(follow, stream, seen, delays)
            else:
                await trio.sleep(number)
        stream.close()
        late = Seen(0, stream.first_id, stream.last_id)  # joins after the end: replay, then end
        readers.append(late)
        await nursery.start(follow, stream, late, ())
    last = stream.last_id
    gapless = ring_size >= last
    total_skipped = sum(check(seen, last, gapless=gapless) for seen in readers)
    if primary_delays is not None:
        assert check(primary, last, gapless=True) == 0
    stats = manager.statistics()
    event(f"lagged: {total_skipped > 0}, several readers: {len(readers) > 1}")
    assert stats.lagged_total == total_skipped
    assert (stats.readers, stats.observers) == (0, 0)


@settings(max_examples=150, deadline=None)
@given(schedule=ops)
def test_big_ring_every_reader_sees_exactly_its_range(schedule: list[Op]) -> None:
    trio.run(scenario, 4096, schedule, None, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(max_examples=150, deadline=None)
@given(ring_size=st.integers(1, 6), schedule=ops)
def test_small_ring_gaps_are_exactly_the_skips(ring_size: int, schedule: list[Op]) -> None:
    trio.run(
        scenario, ring_size, schedule, None, clock=trio.testing.MockClock(autojump_threshold=0)
    )


@settings(max_examples=150, deadline=None)
@given(
    ring_size=st.integers(1, 6),
    schedule=ops,
    primary_delays=st.lists(st.integers(0, 3), max_size=4).map(tuple),
)
def test_primary_is_never_skipped(
    ring_size: int, schedule: list[Op], primary_delays: tuple[int, ...]
) -> None:
    trio.run(
        scenario,
        ring_size,
        schedule,
        primary_delays,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )
