"""The key cache against the test PostgreSQL: it serves keys only while it LISTENs, forgets a
key when its change is announced (by the trigger on api_keys, or `*` for all), refuses to store
a check that raced with an announcement, and lets entries expire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.auth.cache import NOTIFY_CHANNEL, KeyCache
from app.auth.service import Principal
from app.models import Scope


def plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def cache(database_url: str) -> AsyncIterator[KeyCache]:
    instance = KeyCache(ttl_seconds=60)
    await instance.start(plain(database_url))
    assert instance.listening
    yield instance
    await instance.close()


async def announce(database_url: str, payload: str) -> None:
    connection = await asyncpg.connect(plain(database_url))
    try:
        await connection.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)
    finally:
        await connection.close()


def principal(key_id: str) -> Principal:
    return Principal(key_id=key_id, project_id="proj_1", scope=Scope.read, prefix="abc")


async def until(check, what: str) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_keys_are_served_until_a_change_is_announced(cache, database_url) -> None:
    cache.put("hash-a", principal("key_a"), cache.generation)
    cache.put("hash-b", principal("key_b"), cache.generation)
    assert cache.get("hash-a") == principal("key_a")
    await announce(database_url, "key_a")
    await until(lambda: cache.get("hash-a") is None, "key_a to be forgotten")
    assert cache.get("hash-b") == principal("key_b")
    await announce(database_url, "*")  # the table was truncated
    await until(lambda: cache.get("hash-b") is None, "every key to be forgotten")


async def test_a_check_that_raced_with_an_announcement_is_not_stored(cache, database_url) -> None:
    generation = cache.generation  # read before the database query
    await announce(database_url, "key_c")  # the key changes meanwhile
    await until(lambda: cache.generation != generation, "the announcement")
    cache.put("hash-c", principal("key_c"), generation)
    assert cache.get("hash-c") is None


async def test_nothing_is_served_without_a_listener_or_after_the_ttl(database_url) -> None:
    idle = KeyCache(ttl_seconds=60)  # never started: no LISTEN, no cache
    idle.put("hash-d", principal("key_d"), idle.generation)
    assert idle.get("hash-d") is None
    short = KeyCache(ttl_seconds=0.05)
    await short.start(plain(database_url))
    short.put("hash-e", principal("key_e"), short.generation)
    assert short.get("hash-e") is not None
    await asyncio.sleep(0.1)
    assert short.get("hash-e") is None
    await short.close()
    assert not short.listening


async def test_a_lost_listener_empties_the_cache(cache) -> None:
    cache.put("hash-f", principal("key_f"), cache.generation)
    listener = cache._listener
    await listener.close()  # as if the database restarted
    await until(lambda: not cache.listening, "the listener to be gone")
    assert cache.get("hash-f") is None
