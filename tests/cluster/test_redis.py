"""The Redis connection: prefixes, the one error type, a masked URL, cleanup by prefix."""

from __future__ import annotations

import pytest

from server.cluster.redis import ClusterRedis, ClusterUnavailable, open_redis, split_url
from server.settings import Settings, SettingsError

from .conftest import REDIS_URL, free_port, new_prefix


def test_prefix_from_the_url():
    assert split_url("redis://h:6379/0") == ("redis://h:6379/0", "chinwag:")
    assert split_url("redis://h:6379/2?prefix=blue&db=3") == (
        "redis://h:6379/2?db=3",
        "chinwag:blue:",
    )


def test_settings_read_redis_url_and_lease():
    s = Settings.from_env(
        {"CHINWAG_REDIS_URL": "redis://:pw@h:1/0", "CHINWAG_NODE_LEASE_MS": "500"}
    )
    assert s.redis_url == "redis://:pw@h:1/0"
    assert s.node_lease_ms == 500
    assert "pw" not in repr(s) and "pw" not in str(s.describe())
    assert Settings.from_env({}).redis_url is None
    assert Settings.from_env({}).node_lease_ms == 10_000
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"CHINWAG_REDIS_URL": "http://:secret@h"})
    assert "secret" not in str(err.value)


async def test_unreachable_is_one_clear_error_without_the_password():
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    with pytest.raises(ClusterUnavailable) as err:
        async with open_redis(url, connect_timeout=1):
            pass
    message = str(err.value)
    assert "s3cret-pw" not in message
    assert f"redis://:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/0" in message
    assert err.value.retry_after >= 1


async def test_errors_in_the_body_come_out_as_themselves(redis: ClusterRedis):
    with pytest.raises(KeyError):
        async with open_redis(REDIS_URL, prefix=new_prefix()):
            raise KeyError("mine")


async def test_delete_prefix_touches_only_its_own_keys(redis: ClusterRedis):
    other = new_prefix()
    async with open_redis(REDIS_URL, prefix=other) as neighbour:
        try:
            await redis.client.set(redis.keys("a"), "1")
            await redis.client.set(redis.keys("b", "c"), "1")
            await neighbour.client.set(neighbour.keys("a"), "1")
            assert await redis.delete_prefix() == 2
            assert await neighbour.client.get(neighbour.keys("a")) == b"1"
        finally:
            await neighbour.delete_prefix()


async def test_a_failure_inside_guard_is_cluster_unavailable(redis: ClusterRedis):
    await redis.client.incr(redis.keys("x"))

    async def wrong_type() -> None:
        with redis.guard("bad command"):
            await redis.client.lpush(redis.keys("x"), ["wrong type"])

    with pytest.raises(ClusterUnavailable):
        await wrong_type()
