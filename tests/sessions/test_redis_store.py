"""RedisSessionStore specifics: key expiry, stored size, replicas racing, outages."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.errors import (
    SessionConflict,
    SessionExpired,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from service.sessions import make_store
from service.sessions.base import SessionRecord
from service.sessions.redis import (
    BUCKETS,
    RedisSessionStore,
    _exchange,
    _Poll,
    bucket_of,
    decode,
    encode,
    resp_arguments,
)

REDIS_DB, REPLICA_DB = 12, 13
LSTM_FLOATS = 2 * 2 * 128  # (h, c) x 2 layers x 128 units


def record(
    session_id: str | None = None, floats: int = LSTM_FLOATS, **changes: object
) -> SessionRecord:
    now = time.time()
    rec = SessionRecord(
        session_id=session_id or uuid.uuid4().hex,
        model="lstm-demo",
        version=1,
        state=np.random.default_rng(0).standard_normal(floats).astype(np.float32),
        created_at=now,
        last_used=now,
    )
    for name, value in changes.items():
        setattr(rec, name, value)
    return rec


@pytest.fixture
def raw(db_url: Callable[[int], str]) -> redis.Redis:
    client = redis.Redis.from_url(db_url(REDIS_DB))
    yield client
    client.close()


@given(
    state=st.lists(st.floats(width=32, allow_nan=False), max_size=64),
    owner=st.none() | st.text(max_size=70),
    model=st.text(min_size=1, max_size=40),
    last_seq=st.none() | st.integers(0, 2**40),
    outputs=st.none() | st.binary(max_size=64),
    shape=st.lists(st.integers(0, 2**31), max_size=4).map(tuple),
    fingerprint=st.text(max_size=80),
    version=st.integers(-(2**40), 2**40),
    step_count=st.integers(0, 2**50),
)
@settings(max_examples=200, deadline=None)
def test_encoding_roundtrip(
    state, owner, model, last_seq, outputs, shape, fingerprint, version, step_count
) -> None:
    rec = SessionRecord(
        session_id="s",
        model=model,
        version=version,
        state=np.array(state, dtype=np.float32),
        created_at=1.25,
        last_used=2.5,
        step_count=step_count,
        revision=step_count // 3,
        owner=owner,
        last_seq=last_seq,
        last_outputs=outputs,
        last_outputs_shape=shape,
        fingerprint=fingerprint,
    )
    back = decode("s", encode(rec))
    assert back.state.tobytes() == rec.state.tobytes()
    assert back.state.flags.writeable
    back.state = rec.state
    assert back == rec


async def test_key_expiry_is_set_and_refreshed(
    redis_store, raw: redis.Redis, key_prefix: str
) -> None:
    store = redis_store(ttl_s=60)
    rec = record("s", owner="alice")
    await store.create(rec)
    tag = f"{key_prefix}{{{bucket_of('s'):02x}}}"
    key, marker = f"{tag}s:s", f"{tag}t:s"
    assert 59_000 < raw.pttl(key) <= 60_000
    assert raw.pttl(marker) >= 86_000_000
    assert raw.get(marker) == b"alice"  # an expired session still says whose it was
    owner_set = f"{key_prefix}{{o:alice}}"  # steps never refresh it: it has no TTL
    assert raw.pttl(owner_set) == -1 and raw.zrange(owner_set, 0, -1) == [b"s"]

    raw.pexpire(key, 5_000)
    await store.commit(rec)
    assert 59_000 < raw.pttl(key) <= 60_000

    raw.pexpire(key, 5_000)
    await store.touch("s", time.time() + 3)
    assert 59_000 < raw.pttl(key) <= 60_000
    got = await store.get("s")
    assert got.last_used == pytest.approx(time.time() + 3, abs=1)
    assert got.revision == 1


async def test_stored_size_per_session(redis_store, raw: redis.Redis, key_prefix: str) -> None:
    """A 2-layer 128-unit LSTM state is 512 float32 = 2 KiB; the session should cost about that."""
    store = redis_store()
    sessions = 200
    for _ in range(sessions):
        await store.create(
            record(
                owner="ab" * 32,  # a sha256 hex digest, like the API-key owner
                last_seq=3,
                last_outputs=np.zeros((1, 1, 8), np.float32).tobytes(),
                last_outputs_shape=(1, 1, 8),
            )
        )
    sample = raw.scan_iter(match=f"{key_prefix}{{*}}s:*", count=1000).__next__().decode()
    tag, _, session_id = sample.partition("}s:")
    session = raw.memory_usage(sample, samples=0)
    marker = raw.memory_usage(f"{tag}}}t:{session_id}", samples=0)
    sets = sum(
        raw.memory_usage(k, samples=0) or 0
        for k in [f"{key_prefix}{{o:{'ab' * 32}}}"]
        + [f"{key_prefix}{{{b:02x}}}live" for b in range(BUCKETS)]
    )
    total = session + marker + sets / sessions
    print(
        f"\nbytes per session: session key {session}, marker {marker}, "
        f"count sets {sets / sessions:.0f}, total {total:.0f} (state {LSTM_FLOATS * 4})"
    )
    assert LSTM_FLOATS * 4 < session < 3 * 1024
    assert total < 3.5 * 1024


async def test_replicas_racing_on_one_revision(redis_store) -> None:
    """Two stores (two replicas) commit on the same revision: exactly one wins each round."""
    one, two = redis_store(REPLICA_DB), redis_store(REPLICA_DB)
    await one.create(record("s"))
    for round_ in range(50):
        a, b = await asyncio.gather(one.get("s"), two.get("s"))
        assert a.revision == b.revision == round_
        a.step_count, b.step_count = 2 * round_ + 1, 2 * round_ + 2
        results = await asyncio.gather(one.commit(a), two.commit(b), return_exceptions=True)
        wins = [r for r in results if r is None]
        losses = [r for r in results if isinstance(r, SessionConflict)]
        assert len(wins) == 1 and len(losses) == 1, results
        winner = a if results[0] is None else b
        assert losses[0].details["step_count"] == winner.step_count
        assert (await two.get("s")).step_count == winner.step_count
    assert (await one.get("s")).revision == 50


async def test_limits_hold_across_replicas(redis_store) -> None:
    stores = [redis_store(REPLICA_DB, max_sessions=10, max_sessions_per_owner=4) for _ in range(3)]
    creates = [stores[n % 3].create(record(owner=f"key{n % 2}")) for n in range(30)]
    results = await asyncio.gather(*creates, return_exceptions=True)
    assert sum(r is None for r in results) == 8  # two owners x 4
    assert await stores[0].count() == 8


async def test_outage_raises_store_unavailable_quickly() -> None:
    store = RedisSessionStore(
        "redis://127.0.0.1:1/0", ttl_s=60, max_sessions=10, max_sessions_per_owner=10
    )
    try:
        for call in (
            store.ping,
            lambda: store.get("s"),
            lambda: store.create(record("s")),
            lambda: store.commit(record("s")),
            lambda: store.touch("s", time.time()),
            lambda: store.delete("s"),
            store.count,
            lambda: store.sweep(time.time()),
        ):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="session store unavailable"):
                await call()
            assert time.monotonic() - started < 3
    finally:
        await store.close()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers: a hung Redis."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _get_fails_within(port: int, seconds: float) -> None:
    """A read from a store (0.3 s timeout) on ``port`` is StoreUnavailable within ``seconds``."""
    store = RedisSessionStore(
        f"redis://127.0.0.1:{port}/0", ttl_s=60, max_sessions=10, max_sessions_per_owner=10,
        timeout_s=0.3,
    )  # fmt: skip
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("s")
        assert time.monotonic() - started < seconds
    finally:
        await store.close()


async def test_hung_redis_times_out(silent_server: int) -> None:
    await _get_fails_within(silent_server, 2)


@pytest.fixture
async def mute_server() -> AsyncIterator[int]:
    """A TCP server that answers the connection's handshake (``+OK`` to each command) and
    then never answers a GET: a Redis that hangs on reads."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if b"GET" not in data:
                writer.write(b"+OK\r\n" * max(1, data.count(b"*")))

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_a_caller_cancelled_while_redis_is_silent_is_cancelled_not_timed_out(
    mute_server: int,
) -> None:
    """The exchange's own timer (``_Expiry``) tells its expiry from a cancellation from
    outside: a caller cancelled mid-exchange gets CancelledError, at once; one that is not
    gets the exchange's timeout (503), and its task carries no cancellation afterwards."""
    store = RedisSessionStore(
        f"redis://127.0.0.1:{mute_server}/0", ttl_s=60, max_sessions=10,
        max_sessions_per_owner=10, timeout_s=0.3,
    )  # fmt: skip
    try:
        for _ in range(2):
            reading = asyncio.ensure_future(store.get("s", fresh=True))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            assert time.monotonic() - started < 0.2

        async def timed_out() -> int:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no connection and answer from Redis within 0.6 s"):
                await store.get("s", fresh=True)
            assert 0.25 < time.monotonic() - started < 1.0
            task = asyncio.current_task()
            assert task is not None
            await asyncio.sleep(0)  # no cancellation left pending on the task
            return task.cancelling()

        assert await timed_out() == 0
        assert await timed_out() == 0
    finally:
        await store.close()


async def test_only_refusals_are_store_unavailable(redis_store, db_url) -> None:
    """Redis refusing writes for now (NOREPLICAS, BUSY, MISCONF) is 503 store_unavailable;
    any other error reply, such as WRONGTYPE on a key that is not ours, is raised as it
    is: a bug or a misconfiguration, not "try again later"."""
    store = redis_store()
    rec = record()
    await store.create(rec)
    control = redis.Redis.from_url(db_url(REDIS_DB))
    control.config_set("min-replicas-to-write", 1)
    try:
        rec.step_count += 1
        with pytest.raises(StoreUnavailable, match="NOREPLICAS"):
            await store.commit(rec)
    finally:
        control.config_set("min-replicas-to-write", 0)
    key = store._keys(rec.session_id)[0]
    control.delete(key)
    control.lpush(key, "not a session")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE") as raised:
        await store.get(rec.session_id, fresh=True)
    assert not isinstance(raised.value, StoreUnavailable)


async def test_a_connect_that_hangs_counts_against_the_timeout() -> None:
    """Found by the Redis hunt: (re)connecting sat outside the operation's timeout, under
    a connect timeout of at least 5 s, so after a stalled Redis dropped a connection the
    next request took up to 6 s to answer 503. A listener whose backlog is full (it never
    accepts) leaves the connect hanging: the operation still ends within its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue: later SYNs go unanswered
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        await _get_fails_within(port, 1.5)
    finally:
        for sock in (*fillers, listener):
            sock.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    return server


@pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.environ.get("CI"),
    reason="needs the redis-server binary (on CI the test runs, and fails without it)",
)
async def test_recovers_when_redis_comes_back() -> None:
    port = _free_port()
    server = _start_redis(port)
    store = RedisSessionStore(
        f"redis://127.0.0.1:{port}/0", ttl_s=60, max_sessions=10, max_sessions_per_owner=10
    )
    try:
        await store.create(record("s"))
        await asyncio.gather(*(store.get("s", fresh=True) for _ in range(4)))  # pooled connections
        server.terminate()
        server.wait()
        with pytest.raises(StoreUnavailable):
            await store.get("s", fresh=True)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        server = _start_redis(port)  # empty again: no persistence
        await store.ping()
        await store.create(record("t"))
        again = await asyncio.gather(*(store.get("t", fresh=True) for _ in range(4)))
        assert again[0].session_id == "t"
    finally:
        await store.close()
        server.terminate()
        server.wait()


def test_constructed_outside_a_loop(db_url: Callable[[int], str], key_prefix: str) -> None:
    store = RedisSessionStore(
        db_url(REDIS_DB), ttl_s=60, max_sessions=10, max_sessions_per_owner=10, prefix=key_prefix
    )

    async def use() -> int:
        await store.create(record("s"))
        await store.get("s")
        try:
            return await store.count()
        finally:
            await store.close()

    assert asyncio.run(use()) == 1


async def test_make_store_builds_redis(db_url: Callable[[int], str]) -> None:
    store = make_store(Settings(session_store=db_url(REDIS_DB), session_ttl_s=5, max_sessions=7))
    try:
        assert isinstance(store, RedisSessionStore)
        assert (store.ttl_s, store.max_sessions) == (5, 7)
        await store.ping()
    finally:
        await store.close()


class CountingStore(RedisSessionStore):
    """Counts round trips (pipelines sent) and the commands in them."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.round_trips = 0
        self.commands: list[str] = []

    async def _send(self, client, commands, poll=None):
        self.round_trips += 1
        self.commands += [
            (str(c[0]) if isinstance(c, tuple) else resp_arguments(c)[0].decode()) for c in commands
        ]
        return await super()._send(client, commands, poll)


@pytest.fixture
def counting_store(db_url: Callable[[int], str], key_prefix: str):
    def make(**kwargs: object) -> CountingStore:
        limits = {"ttl_s": 60, "max_sessions": 10_000, "max_sessions_per_owner": 10_000}
        return CountingStore(db_url(REDIS_DB), prefix=key_prefix, **{**limits, **kwargs})

    return make


async def test_a_step_is_one_round_trip(counting_store) -> None:
    """After the first read, get() answers from the cache and commit() is one script
    call, the new record one of its arguments: one command, one round trip."""
    store = counting_store()
    try:
        rec = record("s")
        await store.create(rec)
        before = store.round_trips, len(store.commands)
        for n in range(20):
            got = await store.get("s")
            assert got.step_count == n and got.revision == n
            got.step_count += 1
            await store.commit(got)
        assert store.round_trips - before[0] == 20
        assert store.commands[before[1] :] == ["EVALSHA"] * 20
        assert (await store.get("s", fresh=True)).step_count == 20
    finally:
        await store.close()


async def _created_and_read(
    store: RedisSessionStore, n: int
) -> tuple[list[SessionRecord], list[SessionRecord]]:
    """``n`` new sessions, and the copies ``get`` gives of them (from the store's cache)."""
    records = [record(f"s{k}") for k in range(n)]
    for rec in records:
        await store.create(rec)
    return records, [await store.get(r.session_id) for r in records]


async def test_large_records_are_committed_in_script_calls_of_bounded_size(
    counting_store, monkeypatch
) -> None:
    """A pipeline's commits go in one script call only while their new records stay
    within ``_SCRIPT_BYTES`` (Redis holds a command's arguments whole): beyond, in more
    calls of the same round trip, each commit applied exactly once."""
    from service.sessions import redis as module

    store = counting_store()
    try:
        records, got = await _created_and_read(store, 10)
        size = got[0].state.nbytes
        monkeypatch.setattr(module, "_SCRIPT_BYTES", 3 * size)  # three records a call
        for rec in got:
            rec.step_count = 5
        before = store.round_trips, len(store.commands)
        assert await store.commit_many(got) == [None] * 10
        assert store.round_trips - before[0] == 1
        assert store.commands[before[1] :] == ["EVALSHA"] * 4  # 3 + 3 + 3 + 1
        fresh = await store.get_many([r.session_id for r in records], fresh=True)
        assert [(f.step_count, f.revision) for f in fresh] == [(5, 1)] * 10
    finally:
        await store.close()


async def test_concurrent_commits_share_pipelines(counting_store) -> None:
    store = counting_store()
    try:
        records, got = await _created_and_read(store, 64)
        for rec in got:
            rec.step_count = 7
        before = store.round_trips
        await asyncio.gather(*(store.commit(rec) for rec in got))
        assert store.round_trips - before <= 2  # the first alone at once, the rest together
        assert all(r.revision == 1 for r in got)
        before = store.round_trips
        assert await store.commit_many(got) == [None] * 64
        assert store.round_trips - before <= 2
        fresh = await store.get_many([r.session_id for r in records] + ["nope"], fresh=True)
        assert [f.step_count for f in fresh[:-1]] == [7] * 64
        assert [f.revision for f in fresh[:-1]] == [2] * 64
        assert isinstance(fresh[-1], SessionNotFound)
    finally:
        await store.close()


async def test_the_steps_of_one_onnxruntime_call_commit_in_one_round_trip(
    counting_store, model_repo, reference
) -> None:
    """Engine over Redis: the commits of the steps one call carried go out together (the
    batcher's commit hook), so round trips = onnxruntime calls; every answer is exact, and
    a step whose commit conflicts (another replica moved first) is redone on fresh state."""
    from service.engine import Engine

    store = counting_store()
    engine = Engine(Settings(model_repo=model_repo, grpc_port=0), store=store)
    await engine.start()
    registry = engine.metrics.registry
    try:
        entry = engine.model("tiny-lstm")
        ref = reference("tiny-lstm")
        ids = [(await engine.create_session(entry, None)).session_id for _ in range(16)]
        xs = np.random.default_rng(3).normal(size=(16, 2, 3)).astype(np.float32)

        def calls() -> float:
            return registry.get_sample_value("rnnserve_batch_size_count", {"model": "tiny-lstm"}) or 0

        before, trips = calls(), store.round_trips
        results = await asyncio.gather(*(engine.step(i, None, x) for i, x in zip(ids, xs)))
        assert 1 <= calls() - before < 16  # shared calls
        assert store.round_trips - trips == calls() - before
        for x, result in zip(xs, results):
            np.testing.assert_allclose(result.outputs, ref.run(x)[0], atol=1e-5)
        # another replica steps session 0 meanwhile: this one's cached copy is stale
        other = counting_store()
        try:
            moved = await other.get(ids[0], fresh=True)
            moved.step_count += 5
            await other.commit(moved)
        finally:
            await other.close()
        again = await engine.step(ids[0], None, xs[0])
        assert again.record.step_count == 2 + 5 + 2  # redone on the moved record
        stored = await store.get(ids[0], fresh=True)
        assert stored.step_count == 9 and stored.revision == again.record.revision
    finally:
        await engine.stop()


async def test_a_stale_cached_copy_is_caught_and_dropped(redis_store) -> None:
    """Replica one caches revision 0; replica two moves on; one's commit conflicts, and
    its next read (not asked fresh) comes from Redis again."""
    one, two = redis_store(REPLICA_DB), redis_store(REPLICA_DB)
    await one.create(record("s"))
    stale = await one.get("s")
    moved = await two.get("s")
    moved.step_count = 5
    await two.commit(moved)
    assert (await one.get("s")).step_count == 0  # the cached copy, by contract
    stale.step_count = 1
    with pytest.raises(SessionConflict) as conflict:
        await one.commit(stale)
    assert conflict.value.details["step_count"] == 5
    again = await one.get("s")
    assert (again.step_count, again.revision) == (5, 1)
    again.step_count = 6
    await one.commit(again)
    assert (await two.get("s", fresh=True)).step_count == 6


async def test_release_is_part_of_the_compare_and_set(
    redis_store, raw: redis.Redis, key_prefix: str
) -> None:
    store = redis_store(max_sessions_per_owner=1)
    await store.create(record("s", owner="alice"))
    stale = await store.get("s")
    current = await store.get("s", fresh=True)
    current.step_count = 3
    await store.commit(current)
    with pytest.raises(SessionConflict):  # an END on a stale revision ends nothing
        await store.commit(stale, release=True)
    assert (await store.get("s", fresh=True)).step_count == 3
    latest = await store.get("s")
    latest.step_count = 4
    await store.commit(latest, release=True)
    assert latest.revision == 2
    with pytest.raises(SessionNotFound):
        await store.get("s")
    with pytest.raises(SessionNotFound):
        await store.get("s", fresh=True)
    assert raw.keys(f"{key_prefix}*") == []  # session, marker, bucket and owner entries
    await store.create(record("t", owner="alice"))  # the owner's place was given back


async def test_expired_says_whose_session_it_was(redis_store) -> None:
    store = redis_store(ttl_s=0.2)
    await store.create(record("mine", owner="digest-a"))
    await store.create(record("anon"))
    await asyncio.sleep(0.35)
    with pytest.raises(SessionExpired) as expired:
        await store.get("mine")
    assert expired.value.owner == "digest-a"
    with pytest.raises(SessionExpired) as expired:
        await store.get("anon", fresh=True)
    assert expired.value.owner is None


async def test_many_waiters_share_a_small_pool(redis_store) -> None:
    """More concurrent operations than connections wait for a turn instead of failing."""
    store = redis_store(max_connections=2, pool_timeout_s=10)
    await store.create(record("s"))
    results = await asyncio.gather(*(store.get("s", fresh=True) for _ in range(300)))
    assert {r.session_id for r in results} == {"s"}
    created = await asyncio.gather(
        *(store.create(record(f"c{n}")) for n in range(100)), return_exceptions=True
    )
    assert created == [None] * 100


async def test_a_pool_wait_timeout_is_unavailable_logged_and_counted(
    silent_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisSessionStore(
        f"redis://127.0.0.1:{silent_server}/0",
        ttl_s=60,
        max_sessions=10,
        max_sessions_per_owner=10,
        timeout_s=1.0,
        max_connections=1,
        pool_timeout_s=0.1,
    )
    causes: list[str] = []
    store.on_unavailable = lambda cause, answers: causes.extend([cause] * answers)
    try:
        results = await asyncio.gather(
            store.get("s", fresh=True), store.get("t", fresh=True), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert sorted(causes) == ["pool", "timeout"]
        assert "no free Redis connection within 0.1 s" in str(results[1])
        logged = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(logged) == 2 and any("(pool)" in m for m in logged)
    finally:
        await store.close()


@pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.environ.get("CI"),
    reason="needs the redis-server binary (on CI the test runs, and fails without it)",
)
async def test_a_cached_record_never_resurrects_a_session_after_an_empty_restart() -> None:
    port = _free_port()
    server = _start_redis(port)
    store = RedisSessionStore(
        f"redis://127.0.0.1:{port}/0", ttl_s=60, max_sessions=10, max_sessions_per_owner=10
    )
    try:
        await store.create(record("s", owner="alice"))
        cached = await store.get("s")
        server.terminate()
        server.wait()
        server = _start_redis(port)  # empty: no persistence
        await asyncio.sleep(0.05)  # the loop sees the old connections closed, as in a server
        cached.step_count = 1
        with pytest.raises(SessionNotFound):
            await store.commit(cached)
        assert redis.Redis(port=port).dbsize() == 0  # nothing was written
        with pytest.raises(SessionNotFound):
            await store.get("s")
    finally:
        await store.close()
        server.terminate()
        server.wait()


async def test_a_burst_of_creations_shares_one_count(counting_store) -> None:
    """Creations arriving together wait for one sum of the bucket counts, not one each
    (a herd of 256-command pipelines is what made session opens time out under load)."""
    store = counting_store()
    try:
        results = await asyncio.gather(*(store.create(record(f"c{n}")) for n in range(200)))
        assert results == [None] * 200
        # 200 create scripts, plus a few count pipelines of 256 commands each (one a
        # second at most), not one per creation
        assert store.commands.count("EVALSHA") <= 200 + 4 * BUCKETS
        assert await store.count() == 200
    finally:
        await store.close()


async def test_owner_limit_counts_a_session_kept_alive_past_its_first_ttl(redis_store) -> None:
    """The owner's set learns a session's expiry only at creation; a session kept alive by
    its steps beyond that still holds its place, and an expired one frees it."""
    store = redis_store(ttl_s=1.0, max_sessions_per_owner=1)
    await store.create(record("a", owner="alice"))
    for _ in range(12):  # 1.2 s of use: past the expiry the owner's set recorded
        await asyncio.sleep(0.1)
        rec = await store.get("a")
        rec.step_count += 1
        await store.commit(rec)
    with pytest.raises(TooManySessions):
        await store.create(record("b", owner="alice"))
    with pytest.raises(TooManySessions):  # re-scored on the first refusal, still counted
        await store.create(record("b", owner="alice"))
    await asyncio.sleep(1.2)  # now "a" expires
    await store.create(record("b", owner="alice"))


async def test_a_copy_of_an_earlier_incarnation_never_commits(redis_store) -> None:
    """Replica one caches a session at revision 2; replica two deletes it and creates a new
    one under the same id (Triton START), which reaches revision 2 too. One's stale copy
    must conflict, not overwrite the new session with the old one's state."""
    one, two = redis_store(REPLICA_DB), redis_store(REPLICA_DB)
    await one.create(record("seq-7"))
    for n in (1, 2):
        rec = await one.get("seq-7")
        rec.step_count = n
        await one.commit(rec)
    stale = await one.get("seq-7")
    assert stale.revision == 2
    await two.delete("seq-7")
    await asyncio.sleep(0.002)  # another creation instant
    await two.create(record("seq-7"))
    for n in (1, 2):
        rec = await two.get("seq-7", fresh=True)
        rec.step_count = 100 + n
        await two.commit(rec)
    stale.step_count = 3
    with pytest.raises(SessionConflict):
        await one.commit(stale)
    current = await one.get("seq-7")
    assert (current.step_count, current.revision) == (102, 2)


async def test_live_set_and_marker_are_refreshed_lazily(
    redis_store, raw: redis.Redis, key_prefix: str
) -> None:
    """A step re-writes the live-set entry only when this process last did more than a
    tenth of the TTL ago, and the marker more than a tenth of its window ago; in between,
    the entry still records an expiry no earlier than the session's own."""
    clock = [1_000.0]
    store = redis_store(ttl_s=100, refresh_clock=lambda: clock[0])
    await store.create(record("s", owner="alice"))
    tag = f"{key_prefix}{{{bucket_of('s'):02x}}}"
    live, key, marker = f"{tag}live", f"{tag}s:s", f"{tag}t:s"
    window_ms = 86_400_000  # the marker's window: 24 h (more than 10 x the TTL)

    def redis_now_ms() -> int:
        seconds, micros = raw.time()
        return seconds * 1000 + micros // 1000

    async def step() -> None:
        rec = await store.get("s")
        rec.step_count += 1
        await store.commit(rec)

    created = raw.zscore(live, "s")
    assert created >= redis_now_ms() + 100_000  # now + TTL + TTL / 10
    assert raw.pttl(marker) > 100_000 + window_ms
    raw.pexpire(marker, 500_000)
    for _ in range(3):  # 9 s of this process's time: within a tenth of the TTL
        clock[0] += 3
        await step()
        assert raw.zscore(live, "s") == created
        assert raw.pttl(key) > 99_000 and raw.pttl(marker) <= 500_000
        assert raw.zscore(live, "s") >= redis_now_ms() + raw.pttl(key)
    clock[0] += 2  # 11 s since the live-set entry was written: re-written
    await step()
    assert raw.zscore(live, "s") > created
    assert raw.pttl(marker) <= 500_000
    clock[0] += window_ms / 10_000  # a tenth of the marker's window: re-written too
    await step()
    assert raw.pttl(marker) > 100_000 + window_ms
    assert raw.get(marker) == b"alice"
    assert await store.count() == 1


async def test_a_stepped_session_still_says_expired_and_stops_counting(redis_store) -> None:
    """Steps leave the marker alone (lazy), yet an expired session is told apart from an
    unknown one, and it stops counting within a tenth of the TTL."""
    store = redis_store(ttl_s=0.2)
    await store.create(record("mine", owner="digest-a"))
    for n in range(3):
        rec = await store.get("mine")
        rec.step_count = n + 1
        await store.commit(rec)
    assert await store.count() == 1
    await asyncio.sleep(0.35)  # the TTL and its tenth have passed
    assert await store.count() == 0
    with pytest.raises(SessionExpired) as expired:
        await store.get("mine", fresh=True)
    assert expired.value.owner == "digest-a"
    with pytest.raises(SessionNotFound):
        await store.get("never", fresh=True)


async def test_commits_leave_no_key_but_the_sessions_own(
    redis_store, raw: redis.Redis, key_prefix: str
) -> None:
    """Applied, conflicting and refused commits in one pipeline write nothing but the
    session keys (record, marker, the bucket's live set): the new record goes in the
    compare-and-set script itself, with its TTL."""
    one, two = redis_store(), redis_store()
    for name in ("a", "b"):
        await one.create(record(name))
    stale = await two.get("a")
    moved = await one.get("a")
    moved.step_count = 1
    gone = await one.get("b")
    await one.delete("b")
    results = await one.commit_many([moved, gone])
    assert results[0] is None and isinstance(results[1], SessionNotFound)
    stale.step_count = 9
    with pytest.raises(SessionConflict):
        await two.commit(stale)
    a, b = (one._keys(name) for name in ("a", "b"))
    owners = {k for k in raw.keys(f"{key_prefix}*") if b"{o:" in k}
    kept = set(a) | ({b[2]} if raw.exists(b[2]) else set())  # b's bucket set, if not empty
    assert {k.decode() for k in raw.keys(f"{key_prefix}*")} - {k.decode() for k in owners} == kept
    assert 0 < raw.pttl(a[0]) <= 60_000
    assert (await two.get("a", fresh=True)).step_count == 1


@pytest.mark.parametrize("chunk", [1, 3, 1 << 16])
async def test_replies_are_parsed_across_reads(chunk: int) -> None:
    """Every RESP2/RESP3 reply type, however the bytes arrive."""
    replies = (
        b"+OK\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n_\r\n#t\r\n,1.5\r\n"
        b"%1\r\n+k\r\n:7\r\n>2\r\n+push\r\n:0\r\n-NOSCRIPT No matching script\r\n"
        b"-ERR boom\r\n"
    )
    reader = asyncio.StreamReader()
    connection = _FakeConnection(reader)

    async def feed() -> None:
        for start in range(0, len(replies), chunk):
            reader.feed_data(replies[start : start + chunk])
            await asyncio.sleep(0)

    feeding = asyncio.ensure_future(feed())
    got = await _exchange(connection, [], 11)
    await feeding
    assert got[:9] == [b"OK", 42, b"abc", None, [1, [b""]], None, True, 1.5, {b"k": 7}]
    assert isinstance(got[9], redis.exceptions.NoScriptError)
    assert isinstance(got[10], redis.exceptions.ResponseError) and "boom" in str(got[10])


class _FakeConnection:
    """What _exchange uses of a redis-py connection: a stream reader and a writer (whose
    transport has nothing left to send)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._writer = self
        self.transport = self

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    async def drain(self) -> None:
        pass


async def test_commits_failed_together_each_raise_their_own_error(silent_server: int) -> None:
    """A pipeline that fails fails all its commits; each caller gets an exception object of
    its own, so that raising it does not grow one traceback with every caller's frames."""
    store = RedisSessionStore(
        f"redis://127.0.0.1:{silent_server}/0", ttl_s=60, max_sessions=10,
        max_sessions_per_owner=10, timeout_s=0.3,
    )  # fmt: skip
    try:
        outcomes = await asyncio.gather(
            *(store.commit(record(f"s{k}")) for k in range(50)), return_exceptions=True
        )
    finally:
        await store.close()
    assert all(isinstance(e, StoreUnavailable) for e in outcomes)
    assert len({id(e) for e in outcomes}) == len(outcomes)
    frames = max(len(traceback.extract_tb(e.__traceback__)) for e in outcomes)
    assert frames < 40, frames


async def test_commit_many_of_nothing_returns_at_once(redis_store) -> None:
    store = redis_store()
    assert await asyncio.wait_for(store.commit_many([]), 1) == []


def _hold_pipelines(store: RedisSessionStore) -> asyncio.Event:
    """Make the store's pipelines wait for the returned event before they leave."""
    gate = asyncio.Event()
    real = store._pipeline

    async def held(*args, **kwargs):
        await gate.wait()
        return await real(*args, **kwargs)

    store._pipeline = held  # type: ignore[method-assign]
    return gate


async def test_a_cancelled_writer_leaves_no_commit_waiting(redis_store) -> None:
    """Commits queued behind a pipeline in flight are cancelled with the writer (the server
    stopping), not left waiting for ever. (The first is a release, which always goes
    through the writer task; a step's commit with nothing in flight is sent by its caller,
    see the next test.)"""
    store = redis_store()
    first, second = record("first"), record("second")
    await store.create(first)
    await store.create(second)
    a, b = await store.get("first"), await store.get("second")
    _hold_pipelines(store)
    one = asyncio.ensure_future(store.commit(a, release=True))
    for _ in range(3):
        await asyncio.sleep(0)  # the writer takes the first commit and waits on the gate
    two = asyncio.ensure_future(store.commit(b))
    await asyncio.sleep(0)
    assert store._writer is not None
    store._writer.cancel()
    done, _ = await asyncio.wait({one, two}, timeout=2)
    assert done == {one, two}
    assert one.cancelled() and two.cancelled()


async def test_a_lone_commit_is_sent_by_its_caller_and_strands_no_other_if_cancelled(
    counting_store,
) -> None:
    """With no pipeline in flight, a step's commit goes out from its caller at once (no
    writer task, no hop back); commits made meanwhile wait, then go out together through
    a writer. A caller cancelled mid-pipeline leaves its own commit in doubt (its cached
    copy dropped: the next read asks Redis) and every commit queued behind it still goes
    out and applies."""
    store = counting_store()
    try:
        for name in ("a", "b", "c"):
            await store.create(record(name))
        a, b, c = [await store.get(name) for name in ("a", "b", "c")]
        gate = _hold_pipelines(store)
        for rec in (a, b, c):
            rec.step_count = 1
        one = asyncio.ensure_future(store.commit(a))
        await asyncio.sleep(0)
        assert store._writing and store._writer is None  # sent by its caller
        two, three = asyncio.ensure_future(store.commit(b)), asyncio.ensure_future(store.commit(c))
        await asyncio.sleep(0)
        assert len(store._pending) == 2  # waiting for the pipeline in flight
        one.cancel()
        with pytest.raises(asyncio.CancelledError):
            await one
        assert "a" not in store._cache and store._writer is not None
        trips = store.round_trips
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(two, three), 3) == [None, None]
        assert store.round_trips - trips == 1  # the two queued commits together
        assert (await store.get("b", fresh=True)).step_count == 1
        assert (await store.get("c", fresh=True)).step_count == 1
        again = await store.get("a")  # from Redis: the cancelled commit never left
        assert (again.step_count, again.revision) == (0, 0)
        again.step_count = 1
        await store.commit(again)
        assert (await store.get("a", fresh=True)).revision == 1
        assert not store._writing and not store._pending
    finally:
        await store.close()


@pytest.mark.parametrize("direct", [True, False])
async def test_a_pipeline_that_fails_before_deciding_fails_its_commits(
    redis_store, direct: bool, caplog
) -> None:
    """Should a pipeline's handling fail before its commits are decided (a bug), their
    callers hear of it rather than wait for ever, whether the caller sent the pipeline or
    the writer task did, and their cached copies go."""
    store = redis_store()
    await store.create(record("a"))
    a = await store.get("a")

    async def broken(batch, poll=None):
        raise RuntimeError("a bug before the outcomes")

    store._write_batch = broken
    with pytest.raises(RuntimeError, match="a bug before the outcomes"):
        await asyncio.wait_for(store.commit(a, release=not direct), 3)
    assert "a" not in store._cache and not store._writing
    assert "the Redis commit writer failed" in caplog.text


async def test_close_during_a_pipeline_leaves_no_connection_open(redis_store) -> None:
    """A pipeline still in flight when the store closes finishes, and its connection is
    closed after it rather than kept for a store that will not use it again."""
    store = redis_store()
    await store.create(record("a"))
    a = await store.get("a")
    a.step_count = 1
    gate = _hold_pipelines(store)
    one = asyncio.ensure_future(store.commit(a))
    await asyncio.sleep(0.01)
    await store.close()
    gate.set()
    assert await asyncio.wait_for(one, 3) is None
    assert store._idle == [] or not any(c.is_connected for c in store._idle)


async def test_a_failing_writer_still_sends_the_commits_queued_behind(redis_store, caplog) -> None:
    """Should the writer fail after deciding a pipeline (a bug), it is logged and the commits
    that queued meanwhile still go out, through a new writer."""
    store = redis_store()
    first, second = record("first"), record("second")
    await store.create(first)
    await store.create(second)
    real = store._write_batch
    calls = 0

    async def flaky(batch, poll=None):
        nonlocal calls
        calls += 1
        await real(batch, poll)
        if calls == 1:
            raise RuntimeError("a bug after the outcomes")

    store._write_batch = flaky
    a = await store.get("first")
    a.step_count = 1
    one = asyncio.ensure_future(store.commit(a))
    for _ in range(3):
        await asyncio.sleep(0)  # the writer has taken the first commit
    b = await store.get("second")
    b.step_count = 1
    two = asyncio.ensure_future(store.commit(b))
    await asyncio.wait_for(asyncio.gather(one, two), 3)
    assert (await store.get("second", fresh=True)).step_count == 1
    assert (await store.get("first", fresh=True)).step_count == 1
    assert "the Redis commit writer failed" in caplog.text


class _PollSpy:
    """Counts ``_Poll.read`` calls and the ones that found the answer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = self.found = 0
        read = _Poll.read

        def spied(poll: _Poll, fd: int, since: float) -> bytes | None:
            self.calls += 1
            data = read(poll, fd, since)
            self.found += data is not None
            return data

        monkeypatch.setattr(_Poll, "read", spied)


async def test_a_lone_commit_polls_for_its_answer(redis_store, monkeypatch) -> None:
    """A commit whose session is the only one with a request in progress (``busy``)
    polls the socket for Redis's answer (``_Poll``) and applies exactly as an awaited
    one does; any other commit is not polled for, nor one from a caller that did not say
    (``busy`` 0), nor a pipeline of more commits than Redis answers in microseconds."""
    spy = _PollSpy(monkeypatch)
    store = redis_store(poll_s=0.05)
    busy = [1, 2, 0]
    rec = record("s")
    await store.create(rec)
    expected = rec.state
    for n in range(20):
        expected = expected + 1
        got = await store.get("s")
        assert got.step_count == n
        got.step_count += 1
        got.state = got.state + 1
        store.busy = busy[n % 3].__int__
        assert await store.commit_many([got]) == [None]
    assert spy.calls == 7
    assert spy.found >= 1  # within 50 ms, however loaded the machine is
    fresh = await store.get("s", fresh=True)
    assert fresh.step_count == 20 and fresh.revision == 20
    np.testing.assert_array_equal(fresh.state, expected)
    assert 0 < store._poll.rtt_s < 0.1
    _, many = await _created_and_read(store, 9)  # more than a polled pipeline carries
    store.busy = lambda: 9
    assert await store.commit_many(many) == [None] * 9
    assert spy.calls == 7


class _Scripted:
    """``scripted_redis.py`` in a process of its own, and its script (see there)."""

    def __init__(self, tmp_path: Path) -> None:
        self.control = tmp_path / "script.json"
        self.set()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("scripted_redis.py")), str(self.control)],
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def set(self, **script: float) -> None:
        self.control.write_text(json.dumps(script))

    def store(self, **kwargs: Any) -> RedisSessionStore:
        store = RedisSessionStore(
            f"redis://127.0.0.1:{self.port}/0", ttl_s=60, max_sessions=10,
            max_sessions_per_owner=10, timeout_s=2, **kwargs,
        )  # fmt: skip
        store.busy = lambda: 1  # every commit is the only one in progress
        return store


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[_Scripted]:
    server = _Scripted(tmp_path)
    yield server
    server.process.kill()
    server.process.wait()


_LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
"""Polling reads the socket beneath the event loop's transport: both loops the server may
run on (uvicorn takes uvloop when it is installed)."""


@pytest.mark.parametrize("loop", list(_LOOPS))
def test_a_polled_answer_may_come_in_pieces_or_late(scripted, monkeypatch, loop) -> None:
    """An answer whose first bytes the poll finds and the rest come later is read to its
    end the usual way; one that comes after the budget is awaited; once answers come
    later than the budget on average, commits stop polling, and start again once they
    come in time again."""
    spy = _PollSpy(monkeypatch)

    async def run() -> None:
        store = scripted.store(poll_s=0.05)
        try:
            scripted.set(rest=0.15)  # the first byte at once, the rest after the budget
            assert await store.commit_many([record("a")]) == [None]
            assert (spy.calls, spy.found) == (1, 1)
            scripted.set(first=0.15)  # all of it after the budget
            for n in range(20):
                assert await store.commit_many([record(f"b{n}")]) == [None]
                if not store._poll.worth_it():
                    break
            assert not store._poll.worth_it()
            assert spy.found == 1 and spy.calls == n + 2
            assert await store.commit_many([record("c")]) == [None]
            assert spy.calls == n + 2  # not polled for any more, but timed
            scripted.set()
            for m in range(40):
                assert await store.commit_many([record(f"d{m}")]) == [None]
                if store._poll.worth_it():
                    break
            assert store._poll.worth_it()
            assert await store.commit_many([record("e")]) == [None]
            assert spy.calls == n + 3 and spy.found == 2
        finally:
            await store.close()

    _LOOPS[loop](run())


@pytest.mark.parametrize("loop", list(_LOOPS))
def test_a_connection_that_dies_is_replaced_polled_or_not(scripted, loop) -> None:
    """A connection that Redis closes while an answer is polled for fails that commit with
    503 (its fate is unknown); one reset while idle is replaced before its next use, never
    written to (it would raise, a 500), and so is one holding bytes nobody asked for (they
    would be read as the next reply): the next commit applies, polled for or not."""

    async def run() -> None:
        for poll_s in (0.05, 0.0):
            store = scripted.store(poll_s=poll_s)
            try:
                scripted.set(close=1)
                with pytest.raises(StoreUnavailable, match="closed by the server"):
                    await store.commit(record("a"))
                scripted.set(reset_after=0.05)
                await store.commit(record("b"))
                await asyncio.sleep(0.3)  # reset meanwhile, while idle
                scripted.set(stray_after=0.05)
                await store.commit(record("c"))
                await asyncio.sleep(0.3)  # a stray reply meanwhile
                scripted.set()
                await store.commit(record("d"))
            finally:
                await store.close()

    _LOOPS[loop](run())
