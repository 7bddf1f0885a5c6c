"""One stream per chat session, the per-user cap and the rate limits, cluster-wide."""

from __future__ import annotations

import json
import sys
import time

import pytest
import trio

from server.cluster.claims import Admission, Claims, RateLimiter, SessionBusy, UserAtCap
from server.cluster.nodes import Identity
from server.cluster.redis import ClusterRedis

from .conftest import REDIS_URL


def claims(
    redis: ClusterRedis, node: str = "n", *, lease_ms: int = 10_000, cap: int = 20
) -> Claims:
    return Claims(redis, Identity(node), lease_ms=lease_ms, max_per_user=cap)


async def test_many_tasks_racing_for_one_session_one_wins(redis: ClusterRedis):
    nodes = [claims(redis, f"node{i}") for i in range(8)]
    won: list[Admission] = []
    busy = 0

    async def attempt(c: Claims, i: int) -> None:
        nonlocal busy
        try:
            won.append(await c.admit("s1", f"user{i}", f"stream-{i}"))
        except SessionBusy:
            busy += 1

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(attempt, nodes[i % 8], i)
    assert len(won) == 1 and busy == 39
    winner = won[0]
    holder = await nodes[0].holder("s1")
    assert holder == winner.owner and holder.endswith(f"|{winner.stream_id}")
    # Released on end: the session is free again, and only its owner could free it.
    loser = next(c for c in nodes if c.identity.incarnation != winner.owner.split("|")[0])
    assert await loser.release(Admission("s1", "user0", "stream-x", "someone|stream-x")) is False
    assert await nodes[0].holder("s1") == winner.owner
    owner_claims = next(c for c in nodes if c.identity.incarnation == winner.owner.split("|")[0])
    assert await owner_claims.release(winner) is True
    assert await nodes[0].holder("s1") is None
    await nodes[1].admit("s1", "user1", "stream-again")


async def test_several_processes_racing_for_one_session_one_wins(redis: ClusterRedis):
    start_at = time.time() + 1.5
    args = {
        "url": REDIS_URL,
        "prefix": redis.keys.prefix,
        "cap": 100,
        "user": "u",
        "sessions": [f"s{i}" for i in range(10)],
        "start_at": start_at,
    }
    results: list[dict[str, list[str]]] = []

    async def run(node: str) -> None:
        command = [
            sys.executable,
            "-m",
            "tests.cluster._proc",
            "admit",
            json.dumps({**args, "node": node}),
        ]
        done = await trio.run_process(command, capture_stdout=True)
        results.append(json.loads(done.stdout))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(run, f"p{i}")
    won = [s for r in results for s in r["won"]]
    assert sorted(won) == sorted(args["sessions"])  # each session exactly once
    assert sum(len(r["refused"]) for r in results) == 30


async def test_an_expired_lease_frees_the_session_and_the_old_owner_cannot_release_it(
    redis: ClusterRedis,
):
    # A lease long enough for the refusal below to come within it on a loaded machine.
    old = claims(redis, "old", lease_ms=1000)
    new = claims(redis, "new")
    first = await old.admit("s1", "u", "stream-1")
    with pytest.raises(SessionBusy):
        await new.admit("s1", "u", "stream-2")
    await trio.sleep(1.15)  # the lease runs out in Redis (nobody renews it)
    second = await new.admit("s1", "u", "stream-2")
    assert await old.release(first) is False  # compare-and-delete
    assert await new.holder("s1") == second.owner
    assert await old.renew_all() == []  # released: not held any more


async def test_renewal_keeps_claims_and_reports_lost_ones(redis: ClusterRedis):
    mine = claims(redis, "mine", lease_ms=300)
    kept = await mine.admit("s1", "u", "stream-1")
    lost = await mine.admit("s2", "u", "stream-2")
    # As if it had expired and another stream had taken the session meanwhile.
    await redis.client.set(redis.keys("session", "s2", "claim"), "other|stream-9")
    reported: list[Admission] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(mine.run, reported.append)
        await trio.sleep(0.8)  # several leases long
        nursery.cancel_scope.cancel()
    assert reported == [lost]
    assert await mine.holder("s1") == kept.owner
    assert await mine.holder("s2") == "other|stream-9"  # never taken from its new holder
    assert [a.stream_id for a in mine.held()] == ["stream-1"]
    members = await redis.client.zrange(redis.keys("user", "u", "streams"), 0, -1)
    assert sorted(members) == [b"stream-1"]


async def test_a_lapsed_claim_nobody_took_is_taken_again(redis: ClusterRedis):
    """Renewals late (a saturated loop, Redis away past a lease): the session stays
    the running stream's instead of admitting a second one."""
    mine = claims(redis, "mine", lease_ms=300)
    other = claims(redis, "other")
    held = await mine.admit("s1", "u", "stream-1")
    await redis.client.delete([redis.keys("session", "s1", "claim")])  # it lapsed
    assert await mine.renew_all() == []
    assert await mine.holder("s1") == held.owner
    with pytest.raises(SessionBusy):
        await other.admit("s1", "u", "stream-2")
    assert mine.held() == [held]
    assert await mine.release(held) is True


async def test_a_claim_released_while_its_renewal_retook_it_is_given_back(
    redis: ClusterRedis,
):
    mine = claims(redis, "mine", lease_ms=300)
    held = await mine.admit("s1", "u", "stream-1")
    # The release reached Redis first (the claim is gone there) and is forgotten
    # locally while the renewal, which still listed it, is in flight.
    await redis.client.delete([redis.keys("session", "s1", "claim")])
    renew = mine._renew

    def renew_then_release(*args: object, **kwargs: object) -> object:
        mine._held.pop(held.stream_id, None)
        return renew(*args, **kwargs)

    mine._renew = renew_then_release  # type: ignore[method-assign]
    assert await mine.renew_all() == []
    assert await mine.holder("s1") is None  # free for the session's next stream
    assert not await redis.client.zrange(redis.keys("user", "u", "streams"), 0, -1)


async def test_the_user_cap_holds_under_a_race(redis: ClusterRedis):
    nodes = [claims(redis, f"node{i}", cap=3) for i in range(4)]
    won: list[Admission] = []
    at_cap = 0

    async def attempt(i: int) -> None:
        nonlocal at_cap
        try:
            won.append(await nodes[i % 4].admit(f"s{i}", "alice", f"stream-{i}"))
        except UserAtCap:
            at_cap += 1

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(attempt, i)
    assert len(won) == 3 and at_cap == 17
    assert await nodes[0].admit("s-bob", "bob", "stream-bob")  # another user is not affected
    # A refused admission claimed nothing: its session is free.
    refused = next(f"s{i}" for i in range(20) if f"s{i}" not in {a.session_id for a in won})
    assert await nodes[0].holder(refused) is None
    # Releasing one frees one place.
    owner = next(c for c in nodes if won[0].owner.startswith(c.identity.incarnation + "|"))
    await owner.release(won[0])
    await nodes[1].admit("s-new", "alice", "stream-new")
    with pytest.raises(UserAtCap):
        await nodes[2].admit("s-newer", "alice", "stream-newer")


async def test_a_dead_nodes_cap_places_age_out(redis: ClusterRedis):
    dead = claims(redis, "dead", lease_ms=1000, cap=2)
    await dead.admit("s1", "alice", "a")
    await dead.admit("s2", "alice", "b")
    alive = claims(redis, "alive", cap=2)
    with pytest.raises(UserAtCap):
        await alive.admit("s3", "alice", "c")
    await trio.sleep(1.15)
    await alive.admit("s3", "alice", "c")
    await alive.admit("s4", "alice", "d")


async def test_rate_limit_is_atomic_and_answers_like_the_local_one(redis: ClusterRedis):
    limiter = RateLimiter(redis, per_minute=10)
    waits: list[float] = []

    async def take() -> None:
        waits.append(await limiter.take("alice"))

    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(take)
    allowed = [w for w in waits if w == 0.0]
    refused = [w for w in waits if w > 0.0]
    assert len(allowed) == 10  # a full bucket: bursts up to per_minute
    # A token comes back every 6 s; the first refusal waits for nearly all of it.
    assert all(0 < w <= 6.0 for w in refused) and max(refused) > 5.5
    assert await RateLimiter(redis, per_minute=10).take("bob") == 0.0  # per key


async def test_rate_limit_refills(redis: ClusterRedis):
    limiter = RateLimiter(redis, per_minute=600)  # one token every 0.1 s
    for _ in range(700):
        wait = await limiter.take("k")
        if wait:
            break
    assert 0 < wait <= 0.1
    await trio.sleep(wait + 0.02)
    assert await limiter.take("k") == 0.0
