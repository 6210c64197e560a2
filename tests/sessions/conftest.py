"""Fixtures for the session stores: a real Redis (skipped locally when absent, never on CI)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis

from service.sessions.redis import RedisSessionStore
from service.sessions.redis_cluster import RedisClusterSessionStore

REDIS_URL = os.environ.get(
    "RNNSERVE_TEST_REDIS", f"redis://127.0.0.1:{os.environ.get('RNNSERVE_TEST_REDIS_PORT', '6379')}"
).rstrip("/")
REDIS_DB = 12


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        message = f"no Redis at {REDIS_URL}: {exc}"
        if _on_ci():
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return REDIS_URL


def _drop(url: str, pattern: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def key_prefix() -> str:
    # A prefix per test rather than FLUSHDB: several test runs may share the Redis.
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def db_url(redis_url: str, key_prefix: str) -> Iterator[Callable[[int], str]]:
    """``db_url(n)``: the URL of Redis db ``n``; this test's keys there are removed before and after."""
    used: set[str] = set()

    def url_of(db: int) -> str:
        url = f"{redis_url}/{db}"
        if url not in used:
            used.add(url)
            _drop(url, f"{key_prefix}*")
        return url

    yield url_of
    for url in used:
        _drop(url, f"{key_prefix}*")


class _Stores:
    """Makes stores of one class with test defaults and closes them after the test."""

    def __init__(self, cls: type, key_prefix: str) -> None:
        self.cls = cls
        self.key_prefix = key_prefix
        self.made: list = []

    def make(
        self,
        url: str,
        ttl_s: float = 60.0,
        max_sessions: int = 1000,
        max_sessions_per_owner: int = 1000,
        **kwargs: object,
    ):
        store = self.cls(
            url,
            ttl_s=ttl_s,
            max_sessions=max_sessions,
            max_sessions_per_owner=max_sessions_per_owner,
            prefix=self.key_prefix,
            **kwargs,
        )
        self.made.append(store)
        return store

    async def close(self) -> None:
        for store in self.made:
            await store.close()


@pytest.fixture
async def redis_store(
    db_url: Callable[[int], str], key_prefix: str
) -> AsyncIterator[Callable[..., RedisSessionStore]]:
    """``redis_store(db=..., ttl_s=..., ...)``: a RedisSessionStore closed after the test."""
    stores = _Stores(RedisSessionStore, key_prefix)
    yield lambda db=REDIS_DB, *args, **kwargs: stores.make(db_url(db), *args, **kwargs)
    await stores.close()


@pytest.fixture
async def cluster_store(
    cluster_url: str, key_prefix: str
) -> AsyncIterator[Callable[..., RedisClusterSessionStore]]:
    """``cluster_store(ttl_s=..., ...)``: a store on the local 3-primary Redis Cluster."""
    stores = _Stores(RedisClusterSessionStore, key_prefix)
    yield lambda *args, **kwargs: stores.make(cluster_url, *args, **kwargs)
    await stores.close()
