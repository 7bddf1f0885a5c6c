"""Micro-benchmark of the ObservationManager (plain trio, no HTTP).

    .venv/bin/python scripts/bench_observation.py [--readers 1000] [--events 10000] [--burst 16]

1. Fan-out: one stream, ``--readers`` observers, ``--events`` events. The
   producer publishes ``--burst`` events with ``publish_nowait`` and then
   yields (``trio.lowlevel.checkpoint()``), like an upstream read that
   returns a few tokens at a time. Each reader "writes" every batch
   (counts its bytes). Prints the publish rate (producer and readers share
   one thread, so it includes the readers' work), the per-reader delivery
   rate, and how many events each wake-up coalesced.
2. The same load over per-subscriber memory channels (``send_nowait`` to
   each reader's channel), the alternative DESIGN.md §2 asks us to weigh.
3. The producer's own cost: ``publish_nowait`` with every reader parked.
4. Replay: a late reader attaching to a full ring of 4,096 events and
   taking the whole history in one batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import trio
import trio.testing

from observation import ObservationManager, Stream


def encode(event_id: int, name: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()


DATA = json.dumps({"text": "token "})


async def fan_out(readers: int, events: int, burst: int) -> None:
    manager = ObservationManager(ring_size=4096, encode=encode)
    stream = manager.open_stream("bench", group="g")
    written = [0] * readers
    batches = [0] * readers
    done_at = [0.0] * readers

    async def reader(index: int, task_status: trio.TaskStatus[None]) -> None:
        with stream.reader() as cursor:
            task_status.started()
            async for batch in cursor:
                written[index] += len(batch.wire)  # one write per wake-up
                batches[index] += 1
        done_at[index] = time.perf_counter()

    async with trio.open_nursery() as nursery:
        for index in range(readers):
            await nursery.start(reader, index)
        start = time.perf_counter()
        for sent in range(events):
            stream.publish_nowait("chunk", DATA)
            if sent % burst == burst - 1:
                await trio.lowlevel.checkpoint()
        published = time.perf_counter()
        stream.close()
    end = max(done_at)

    stats = manager.statistics()
    assert len(set(written)) == 1, "every reader got the same bytes"
    assert stats.lagged_total == 0
    deliveries = readers * events
    print(f"ring fan-out: {readers} readers x {events} events, burst {burst}")
    print(f"  publish:   {events / (published - start):>12,.0f} events/s published")
    print(f"  delivery:  {end - start:>12.3f} s until every reader drained")
    print(f"             {events / (end - start):>12,.0f} events/s per reader")
    print(f"             {deliveries / (end - start):>12,.0f} event-deliveries/s in total")
    print(f"  coalesce:  {deliveries / sum(batches):>12.1f} events per wake-up (one write each)")
    print(f"  bytes:     {written[0]:>12,} per reader")


async def channels(readers: int, events: int, burst: int) -> None:
    pairs = [trio.open_memory_channel[bytes](4096) for _ in range(readers)]
    written = [0] * readers
    done_at = [0.0] * readers
    batches = [0] * readers

    async def reader(index: int, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        async with receive:
            async for first in receive:
                chunk = [first]
                while True:  # coalesce what is pending, as a fair comparison
                    try:
                        chunk.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                written[index] += len(b"".join(chunk))
                batches[index] += 1
        done_at[index] = time.perf_counter()

    async with trio.open_nursery() as nursery:
        for index, (_, receive) in enumerate(pairs):
            nursery.start_soon(reader, index, receive)
        await trio.testing.wait_all_tasks_blocked()
        start = time.perf_counter()
        for sent in range(events):
            wire = encode(sent + 1, "chunk", DATA)
            for send, _ in pairs:
                send.send_nowait(wire)
            if sent % burst == burst - 1:
                await trio.lowlevel.checkpoint()
        published = time.perf_counter()
        for send, _ in pairs:
            send.close()
    end = max(done_at)
    deliveries = readers * events
    print(f"per-subscriber channels (send_nowait): {readers} readers x {events} events")
    print(f"  publish:   {events / (published - start):>12,.0f} events/s published")
    print(f"  delivery:  {end - start:>12.3f} s until every reader drained")
    print(f"             {events / (end - start):>12,.0f} events/s per reader")
    print(f"  coalesce:  {deliveries / sum(batches):>12.1f} events per wake-up")


async def publish_cost(readers: int, events: int = 4096) -> None:
    """The producer's own cost: publish_nowait with every reader parked, no yield."""
    manager = ObservationManager(ring_size=events, encode=encode)
    stream = manager.open_stream("bench", group="g")

    async def reader(task_status: trio.TaskStatus[None]) -> None:
        with stream.reader() as cursor:
            task_status.started()
            async for _ in cursor:
                pass

    async with trio.open_nursery() as nursery:
        for _ in range(readers):
            await nursery.start(reader)
        await trio.testing.wait_all_tasks_blocked()
        start = time.perf_counter()
        stream.publish_nowait("chunk", DATA)  # wakes all parked readers
        first = time.perf_counter()
        for _ in range(events - 1):
            stream.publish_nowait("chunk", DATA)  # nobody parked: no wake-up cost
        end = time.perf_counter()
        stream.close()
    print(f"publish_nowait alone ({readers} readers attached, {events} events, no yield):")
    print(f"  first publish (wakes {readers} readers): {(first - start) * 1e3:.3f} ms")
    print(f"  then {(events - 1) / (end - first):,.0f} events/s (encode + append)")


async def replay(history: int = 4096, runs: int = 50) -> None:
    manager = ObservationManager(ring_size=history, encode=encode)
    stream: Stream = manager.open_stream("bench", group="g")
    for _ in range(history):
        stream.publish_nowait("chunk", DATA)
    times = []
    for _ in range(runs):
        stream.publish_nowait("chunk", DATA)  # moves the window: no batch cached for it
        start = time.perf_counter()
        with stream.reader(0) as late:
            count, _ = late.backlog()
            batch = await late.next_batch()
        times.append(time.perf_counter() - start)
        assert len(batch.events) == count == history
    print(f"replay: late reader takes {history} buffered events ({len(batch.wire):,} bytes)")
    print(
        f"  one batch: median {statistics.median(times) * 1e3:.3f} ms,"
        f" best {min(times) * 1e3:.3f} ms over {runs} runs"
    )


async def main(args: argparse.Namespace) -> None:
    await fan_out(args.readers, args.events, args.burst)
    print()
    if not args.no_compare:
        await channels(args.readers, args.events, args.burst)
        print()
    await publish_cost(args.readers)
    print()
    await replay()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=16, help="events published per yield")
    parser.add_argument("--no-compare", action="store_true", help="skip the channels comparison")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (CI: it must keep working)"
    )
    args = parser.parse_args()
    if args.quick:
        args.readers, args.events, args.no_compare = 20, 200, True
    trio.run(main, args)
