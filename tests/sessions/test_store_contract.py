"""The SessionStore contract, run against every implementation so they behave the same."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.errors import SessionConflict, SessionExpired, SessionNotFound, TooManySessions
from service.sessions.base import SessionRecord, SessionStore
from service.sessions.memory import MemorySessionStore

CONTRACT_DB = 11
OWNER = "f" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Builds stores of one kind and moves their time forward."""

    make: Callable[..., SessionStore]
    now: Callable[[], float]
    advance_by: Callable[[float], object]
    stores: list[SessionStore] = field(default_factory=list)

    async def advance(self, seconds: float) -> None:
        result = self.advance_by(seconds)
        if asyncio.iscoroutine(result):
            await result

    def record(self, session_id: str, **changes: object) -> SessionRecord:
        now = self.now()
        record = SessionRecord(
            session_id=session_id,
            model="lstm-demo",
            version=3,
            state=np.arange(512, dtype=np.float32) / 7,
            created_at=now,
            last_used=now,
        )
        for name, value in changes.items():
            setattr(record, name, value)
        return record


@pytest.fixture(params=["memory", "redis", "cluster"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        clock = FakeClock()

        def make_memory(
            ttl_s: float = 60.0, max_sessions: int = 100, max_sessions_per_owner: int = 100
        ):
            return MemorySessionStore(ttl_s, max_sessions, max_sessions_per_owner, clock=clock)

        def forward(seconds: float) -> None:
            clock.now += seconds

        return Harness(make_memory, clock, forward)

    if request.param == "cluster":
        return Harness(request.getfixturevalue("cluster_store"), time.time, asyncio.sleep)
    redis_store = request.getfixturevalue("redis_store")

    def make_redis(ttl_s: float = 60.0, max_sessions: int = 100, max_sessions_per_owner: int = 100):
        return redis_store(CONTRACT_DB, ttl_s, max_sessions, max_sessions_per_owner)

    return Harness(make_redis, time.time, asyncio.sleep)


def assert_same(got: SessionRecord, want: SessionRecord) -> None:
    assert got.state.dtype == np.float32
    assert got.state.tobytes() == want.state.astype("<f4").tobytes()
    for name in (
        "session_id", "model", "version", "created_at", "last_used", "step_count",
        "revision", "owner", "last_seq", "last_outputs", "last_outputs_shape",
    ):  # fmt: skip
        assert getattr(got, name) == getattr(want, name), name


async def test_create_get_roundtrip(harness: Harness) -> None:
    store = harness.make()
    state = np.array([0.0, -0.0, 1.5, -3.25e-8, np.inf, -np.inf, 3.4e38], dtype=np.float32)
    full = harness.record(
        "full",
        state=state,
        step_count=17,
        revision=0,
        owner=OWNER,
        last_seq=17,
        last_outputs=np.linspace(0, 1, 6, dtype=np.float32).tobytes(),
        last_outputs_shape=(1, 2, 3),
        created_at=harness.now() - 12.25,
    )
    bare = harness.record("bare")
    await store.create(full)
    await store.create(bare)
    assert_same(await store.get("full"), full)
    assert_same(await store.get("bare"), bare)
    assert (await store.get("bare")).owner is None
    assert await store.count() == 2


async def test_empty_owner_and_outputs_are_not_none(harness: Harness) -> None:
    store = harness.make()
    record = harness.record("s", owner="", last_outputs=b"", last_seq=0)
    await store.create(record)
    assert_same(await store.get("s"), record)


async def test_get_returns_a_private_copy(harness: Harness) -> None:
    store = harness.make()
    original = harness.record("s", owner=OWNER)
    await store.create(original)
    original.state[:] = -1
    original.step_count = 99

    copy = await store.get("s")
    if copy.state.flags.writeable:  # a private copy (memory) ...
        copy.state[:] = 42
    else:  # ... or the store's own, read-only (the Redis store's cache shares it)
        with pytest.raises(ValueError):
            copy.state[:] = 42
    copy.step_count = 5
    copy.revision = 7

    again = await store.get("s")
    assert np.array_equal(again.state, np.arange(512, dtype=np.float32) / 7)
    assert (again.step_count, again.revision) == (0, 0)


async def test_a_read_record_keeps_its_state_while_the_session_moves_on(
    harness: Harness,
) -> None:
    """A store may share a state between the records it hands out and its own copy (the
    Redis store's cache does, read-only): later commits replace that state, they never
    write it in place, so a record read earlier still holds what it read."""
    store = harness.make()
    await store.create(harness.record("s"))
    earlier = await store.get("s")
    seen = np.array(earlier.state, copy=True)
    for k in range(3):
        moved = await store.get("s")
        moved.state = np.full_like(moved.state, k + 1.0)
        moved.step_count += 1
        await store.commit(moved)
        assert np.array_equal(earlier.state, seen)
    again = await store.get("s")
    assert np.array_equal(again.state, np.full(512, 3.0, np.float32))
    assert again.step_count == 3


async def test_commit_is_compare_and_set(harness: Harness) -> None:
    store = harness.make()
    await store.create(harness.record("s"))
    first, second = await store.get("s"), await store.get("s")

    await harness.advance(0.01)
    first.state = np.ones_like(first.state)  # states are replaced, never written in place
    first.step_count = 4
    await store.commit(first)
    assert first.revision == 1
    assert first.last_used == pytest.approx(harness.now(), abs=1.0)

    second.step_count = 9
    with pytest.raises(SessionConflict) as conflict:
        await store.commit(second)
    assert conflict.value.details["step_count"] == 4

    stored = await store.get("s")
    assert_same(stored, first)
    stored.step_count = 8
    await store.commit(stored)
    assert (await store.get("s")).revision == 2
    with pytest.raises(SessionConflict):
        await store.commit(first)


async def test_a_commit_may_move_the_incarnation_to_another_model(harness: Harness) -> None:
    """A Triton START over a live sequence keeps its incarnation (created_at, for the
    compare-and-set) but restarts it on the model served now: the commit stores the new
    model, version and fingerprint, and every read, cached or fresh, sees them."""
    store = harness.make()
    await store.create(harness.record("seq", owner=OWNER, fingerprint="old-digest"))
    current = await store.get("seq")  # cached by a replica that keeps records
    restarted = harness.record(
        "seq", owner=OWNER, model="gru-demo", version=4, fingerprint="new-digest",
        state=np.full(512, 0.5, np.float32), step_count=1,
    )  # fmt: skip
    restarted.created_at, restarted.revision = current.created_at, current.revision
    await store.commit(restarted)
    for fresh in (False, True):
        stored = await store.get("seq", fresh=fresh)
        assert (stored.model, stored.version, stored.fingerprint, stored.owner) == (
            "gru-demo", 4, "new-digest", OWNER,
        ), fresh  # fmt: skip
        assert stored.step_count == 1 and stored.revision == restarted.revision
        np.testing.assert_array_equal(stored.state, restarted.state)
    stored.step_count = 2  # and it goes on from there
    await store.commit(stored)
    again = await store.get("seq", fresh=True)
    assert (again.model, again.fingerprint, again.step_count) == ("gru-demo", "new-digest", 2)


async def test_ttl_expiry_and_refresh(harness: Harness) -> None:
    store = harness.make(ttl_s=0.4)
    await store.create(harness.record("s"))
    await store.create(harness.record("idle"))
    await harness.advance(0.25)
    await store.touch("s", harness.now())
    await harness.advance(0.25)
    record = await store.get("s")  # 0.5 s after create, 0.25 s after the touch
    await store.commit(record)
    with pytest.raises(SessionExpired):
        await store.get("idle")

    await harness.advance(0.5)
    with pytest.raises(SessionExpired):
        await store.get("s")
    with pytest.raises(SessionExpired):
        await store.commit(record)
    with pytest.raises(SessionExpired):
        await store.touch("s", harness.now())


async def test_an_id_created_again_after_it_expired_is_no_longer_expired(harness: Harness) -> None:
    """Triton sequence ids come back: START after an expiry creates the id again. Once
    that incarnation ends (END, delete), the id is unknown, not "expired" (the memory
    store kept the first incarnation's tombstone and answered session_expired)."""
    store = harness.make(ttl_s=0.3)
    await store.create(harness.record("seq", owner="alice"))
    await harness.advance(0.5)
    with pytest.raises(SessionExpired):
        await store.get("seq")
    await store.create(harness.record("seq", owner="alice"))
    assert (await store.get("seq")).owner == "alice"
    await store.commit(await store.get("seq"), release=True)  # END
    with pytest.raises(SessionNotFound):
        await store.get("seq")
    await store.create(harness.record("seq", owner="alice"))
    assert await store.delete("seq")
    with pytest.raises(SessionNotFound):
        await store.get("seq")


async def test_unknown_session(harness: Harness) -> None:
    store = harness.make()
    with pytest.raises(SessionNotFound):
        await store.get("nope")
    with pytest.raises(SessionNotFound):
        await store.commit(harness.record("nope"))
    with pytest.raises(SessionNotFound):
        await store.touch("nope", harness.now())
    assert await store.delete("nope") is False


async def test_delete_makes_session_not_found(harness: Harness) -> None:
    store = harness.make()
    await store.create(harness.record("s", owner=OWNER))
    await store.create(harness.record("t"))
    assert await store.delete("s") is True
    with pytest.raises(SessionNotFound):
        await store.get("s")
    assert await store.delete("s") is False
    assert await store.count() == 1


async def test_max_sessions(harness: Harness) -> None:
    store = harness.make(max_sessions=2)
    await store.create(harness.record("a"))
    await store.create(harness.record("b", owner=OWNER))
    with pytest.raises(TooManySessions, match="server holds its maximum of 2"):
        await store.create(harness.record("c"))
    await store.delete("a")
    await store.create(harness.record("c"))
    assert await store.count() == 2


async def test_max_sessions_per_owner(harness: Harness) -> None:
    store = harness.make(max_sessions_per_owner=2)
    await store.create(harness.record("a1", owner="alice"))
    await store.create(harness.record("a2", owner="alice"))
    with pytest.raises(TooManySessions, match="API key holds its maximum of 2"):
        await store.create(harness.record("a3", owner="alice"))
    await store.create(harness.record("b1", owner="bob"))
    for n in range(3):  # sessions without an owner only count against max_sessions
        await store.create(harness.record(f"anon{n}"))
    await store.delete("a1")
    await store.create(harness.record("a3", owner="alice"))
    assert await store.count() == 6


async def test_expired_sessions_free_their_slots(harness: Harness) -> None:
    # A TTL long enough that "a" cannot expire before "c" is refused on a slow machine
    # (on a cluster, the exact recount near the limit visits every bucket), and the
    # connections made before the clock matters.
    store = harness.make(ttl_s=1.5, max_sessions=2, max_sessions_per_owner=1)
    await store.count()
    await store.create(harness.record("a", owner="alice"))
    await store.create(harness.record("b"))
    with pytest.raises(TooManySessions):
        await store.create(harness.record("c"))
    await harness.advance(1.8)  # past the live-set entry too (1.1 x TTL on Redis)
    assert await store.sweep(harness.now()) == 2
    assert await store.count() == 0
    await store.create(harness.record("c", owner="alice"))
    await store.create(harness.record("d"))
    assert await store.count() == 2
