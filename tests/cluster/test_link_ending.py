"""A stream's ending past its cleanup deadline, in cluster mode: the session
claim's release and the stream's removal from the live lists, cut short by the
deadline, are queued for housekeeping instead of lost (the claim would have
waited for its lease to expire, the stream stayed listed as live).

No Redis here: the link's two Redis calls are stand-ins that never answer,
then ones that do.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from server.cluster.claims import Admission
from server.clustering import ENDING_STEP_S, ClusterLink


class _Never:
    async def release(self, admission: Admission) -> None:
        await trio.sleep_forever()

    async def finished(self, stream_id: str) -> None:
        await trio.sleep_forever()


class _Answers:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def release(self, admission: Admission) -> None:
        self.sent.append(admission)

    async def finished(self, stream_id: str) -> None:
        self.sent.append(stream_id)


async def test_an_ending_past_its_deadline_leaves_its_redis_steps_to_housekeeping() -> None:
    link = ClusterLink.__new__(ClusterLink)  # only the ending's steps are exercised
    link._unreleased, link._unfinished = [], []
    never = _Never()
    link.cluster = SimpleNamespace(claims=never, registry=never)
    admission = Admission("s1", "u1", "stream-1", "node|stream-1")
    # The run's cleanup deadline, shorter than one step's own bound: as StreamRun._finish.
    with trio.move_on_after(ENDING_STEP_S / 20) as cleanup:
        try:
            await link.release(admission)
        finally:
            await link.finished("stream-1")
    assert cleanup.cancelled_caught
    assert link._unreleased == [admission] and link._unfinished == ["stream-1"]

    answers = _Answers()
    link.cluster = SimpleNamespace(claims=answers, registry=answers)
    await link._retry()  # what housekeeping runs every few seconds
    assert answers.sent == [admission, "stream-1"]
    assert link._unreleased == [] and link._unfinished == []
