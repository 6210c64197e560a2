"""The Redis store on a real local Redis Cluster of 3 primaries (started by the tests):
every key of a session in one slot, sessions spread over the primaries, limits exact
across replicas without a global key, one script call per step."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis

from service.config import Settings
from service.errors import SessionConflict, SessionNotFound, StoreUnavailable, TooManySessions
from service.sessions import make_store
from service.sessions.base import SessionRecord
from service.sessions.redis_cluster import RedisClusterSessionStore, parse_nodes


def record(session_id: str, owner: str | None = None) -> SessionRecord:
    now = time.time()
    state = np.arange(512, dtype=np.float32)
    return SessionRecord(session_id, "lstm", 1, state, now, now, owner=owner, fingerprint="f" * 16)


def test_parse_nodes() -> None:
    assert parse_nodes("redis-cluster://a:1,b:2, [::1]:3") == [("a", 1), ("b", 2), ("::1", 3)]
    for bad in ("redis://a:1", "redis-cluster://a", "redis-cluster://a:x"):
        with pytest.raises(ValueError):
            parse_nodes(bad)


async def test_sessions_spread_over_the_primaries_one_slot_each(
    cluster_store, redis_cluster, key_prefix: str
) -> None:
    store = cluster_store()
    for n in range(120):
        await store.create(record(f"s{n}", owner=f"key{n % 3}"))
    per_node = redis_cluster.keys_per_node(f"{key_prefix}*s:*")
    assert sum(per_node) == 120 and min(per_node) >= 15, per_node
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    try:
        for n in range(0, 120, 7):
            keys = store._keys(f"s{n}")
            slots = {client.keyslot(k) for k in keys}
            assert len(slots) == 1, keys
    finally:
        client.close()
    assert await store.count() == 120
    got = await store.get("s5", fresh=True)
    assert got.fingerprint == "f" * 16 and got.owner == "key2"


async def test_a_step_is_one_script_call_on_the_cluster(cluster_store, redis_cluster) -> None:
    store = cluster_store()
    sessions = [record(f"s{n}") for n in range(30)]
    for rec in sessions:
        await store.create(rec)

    def evalsha_calls() -> int:
        total = 0
        for port in redis_cluster.ports:
            stats = redis_cluster.node(port).info("commandstats")
            total += stats.get("cmdstat_evalsha", {}).get("calls", 0)
        return total

    before = evalsha_calls()
    for _ in range(5):
        got = [await store.get(r.session_id) for r in sessions]
        for rec in got:
            rec.step_count += 1
        assert await store.commit_many(got) == [None] * 30
    assert evalsha_calls() - before == 5 * 30
    fresh = await store.get_many([r.session_id for r in sessions], fresh=True)
    assert [f.step_count for f in fresh] == [5] * 30


async def test_one_refusing_primary_fails_only_its_own_commits(cluster_store, redis_cluster) -> None:
    """Found by the Redis hunt: one primary failing turned every commit of the pipeline
    into a 503, the commits applied on the healthy primaries included (in doubt for a
    client without ``seq``). Each commit is now decided by its own reply: a primary that
    refuses writes (NOREPLICAS) fails only its sessions' commits, as store_unavailable."""
    store = cluster_store()
    sessions = [record(f"s{n}") for n in range(30)]
    for rec in sessions:
        await store.create(rec)
    refusing = redis_cluster.node(redis_cluster.ports[0])
    def held(session_id: str) -> bool:
        try:
            return bool(refusing.exists(store._keys(session_id)[0]))
        except redis.exceptions.ResponseError:  # MOVED: another primary holds its slot
            return False

    on_it = {r.session_id for r in sessions if held(r.session_id)}
    assert 0 < len(on_it) < 30
    got = [await store.get(r.session_id) for r in sessions]
    for rec in got:
        rec.step_count += 1
    refusing.config_set("min-replicas-to-write", 1)
    try:
        outcomes = await store.commit_many(got)
    finally:
        refusing.config_set("min-replicas-to-write", 0)
    for rec, outcome in zip(got, outcomes):
        if rec.session_id in on_it:
            assert isinstance(outcome, StoreUnavailable), (rec.session_id, outcome)
        else:
            assert outcome is None, (rec.session_id, outcome)
    fresh = await store.get_many([r.session_id for r in sessions], fresh=True)
    assert [f.step_count for f in fresh] == [0 if r.session_id in on_it else 1 for r in sessions]


async def test_a_dead_primary_fails_only_its_own_commits(tmp_path, key_prefix: str) -> None:
    """Found by review: with one primary killed, the first pipeline got its error in
    place, but the next one, whose reconnect to the dead primary was refused, raised out
    of redis-py's cluster pipeline and answered 503 for every commit, those applied on
    the healthy primaries included. Each primary's commands now go as a pipeline of
    their own. (A cluster of this test's own: the shared one stays whole.)"""
    from benchmarks.redis_servers import LocalCluster

    cluster = LocalCluster(tmp_path / "cluster")
    cluster.start()
    store = RedisClusterSessionStore(
        cluster.url, ttl_s=60, max_sessions=1000, max_sessions_per_owner=1000, prefix=key_prefix
    )
    try:
        sessions = [record(f"s{n}") for n in range(30)]
        for rec in sessions:
            await store.create(rec)
        dead = cluster.node(cluster.ports[0])
        on_it = set()
        for rec in sessions:
            try:
                if dead.exists(store._keys(rec.session_id)[0]):
                    on_it.add(rec.session_id)
            except redis.exceptions.ResponseError:  # MOVED: another primary's slot
                pass
        dead.close()
        assert 0 < len(on_it) < 30
        got = [await store.get(r.session_id) for r in sessions]
        cluster.procs[0].kill()
        cluster.procs[0].wait(10)
        for _ in range(2):  # the broken connection, then a refused reconnect
            for rec in got:
                rec.step_count += 1
            outcomes = await store.commit_many(got)
            for rec, outcome in zip(got, outcomes):
                if rec.session_id in on_it:
                    assert isinstance(outcome, StoreUnavailable), (rec.session_id, outcome)
                else:
                    assert outcome is None, (rec.session_id, outcome)
        healthy = [r.session_id for r in sessions if r.session_id not in on_it]
        fresh = await store.get_many(healthy, fresh=True)
        assert [f.step_count for f in fresh] == [2] * len(healthy)
    finally:
        await store.close()
        cluster.stop()


async def test_limits_hold_across_replicas_on_the_cluster(cluster_store) -> None:
    stores = [cluster_store(max_sessions=10, max_sessions_per_owner=4) for _ in range(3)]
    creates = [stores[n % 3].create(record(f"s{n}", owner=f"key{n % 2}")) for n in range(30)]
    results = await asyncio.gather(*creates, return_exceptions=True)
    assert sum(r is None for r in results) == 8  # two owners x 4, exactly
    assert all(r is None or isinstance(r, TooManySessions) for r in results)
    assert await stores[0].count() == 8

    one = stores[1]
    for n in range(30):  # a global limit, one replica creating at a time: never over
        try:
            await one.create(record(f"anon{n}"))
        except TooManySessions:
            break
    assert await one.count() == 10


async def test_compare_and_set_and_release_on_the_cluster(cluster_store) -> None:
    one, two = cluster_store(), cluster_store()
    await one.create(record("s", owner="k"))
    a, b = await one.get("s"), await two.get("s")
    a.step_count, b.step_count = 1, 2
    results = await asyncio.gather(one.commit(a), two.commit(b), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["NoneType", "SessionConflict"]
    winner = a if results[0] is None else b
    loser = two if results[0] is None else one
    with pytest.raises(SessionConflict):
        await loser.commit(b if winner is a else a, release=True)
    current = await loser.get("s")
    assert current.step_count == winner.step_count
    await loser.commit(current, release=True)
    with pytest.raises(SessionNotFound):
        await one.get("s", fresh=True)


def test_make_store_builds_the_cluster_store(cluster_url: str) -> None:
    store = make_store(Settings(session_store=cluster_url, redis_max_connections=7))
    assert isinstance(store, RedisClusterSessionStore)
    assert store._max_connections == 7
