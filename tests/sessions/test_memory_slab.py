"""The memory store's state slabs: rows reused and freed, leases that lapse never write."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import SessionConflict, SessionExpired, SessionNotFound
from service.sessions.base import SessionRecord, copy_state, write_state
from service.sessions.memory import MemorySessionStore

WIDTH = 6


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def record(session_id: str, now: float, model: str = "m", fill: float = 0.0) -> SessionRecord:
    return SessionRecord(
        session_id, model, 1, np.full(WIDTH, fill, np.float32), created_at=now, last_used=now
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemorySessionStore:
    return MemorySessionStore(60.0, 10_000, 10_000, clock=clock)


async def test_rows_are_reused_and_slabs_dropped(store: MemorySessionStore, clock: Clock) -> None:
    for k in range(40):
        await store.create(record(f"s{k}", clock.now, fill=k))
    grown = store.rows_allocated()
    assert 40 <= grown <= 80
    for k in range(40):
        assert (await store.get(f"s{k}")).state.tolist() == [k] * WIDTH
    for k in range(0, 40, 2):
        assert await store.delete(f"s{k}")
    for k in range(20):  # new sessions take the freed rows: the slab does not grow
        await store.create(record(f"t{k}", clock.now, fill=-k))
    assert store.rows_allocated() == grown
    for k in range(1, 40, 2):
        assert (await store.get(f"s{k}")).state.tolist() == [k] * WIDTH
    for k in range(20):
        assert (await store.get(f"t{k}")).state.tolist() == [-k] * WIDTH
    clock.now += 61
    assert await store.sweep(clock.now) == 40
    assert store.rows_allocated() == 0  # the last session gone, the slab is dropped


async def test_lease_gather_advance(store: MemorySessionStore, clock: Clock) -> None:
    for k in range(5):
        await store.create(record(f"s{k}", clock.now, fill=k))
    leased = store.lease(["s3", "s1", "nope"])
    assert isinstance(leased[2], SessionNotFound)
    states = store.gather(leased[:2])
    assert states[:, 0].tolist() == [3, 1]
    clock.now += 1
    y = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    assert store.advance(leased[:2], states + 10, 3, y, [3, None]) == [None, None]
    three, one = await store.get("s3"), await store.get("s1")
    assert three.state.tolist() == [13] * WIDTH and one.state.tolist() == [11] * WIDTH
    assert (three.step_count, three.revision, three.last_seq, three.last_used) == (3, 1, 3, clock.now)
    assert np.frombuffer(three.last_outputs, np.float32).reshape(three.last_outputs_shape).tolist() == y[0].tolist()
    assert one.last_outputs_shape == (1, 2) and one.last_seq is None
    assert np.frombuffer(one.last_outputs, np.float32).tolist() == y[1, -1].tolist()
    assert (await store.get("s0")).state.tolist() == [0] * WIDTH  # untouched rows


async def test_a_lapsed_lease_writes_nothing(store: MemorySessionStore, clock: Clock) -> None:
    """Sessions deleted, expired or changed while a batch ran: their (possibly reused)
    rows are not written, and each answers the error a commit would."""
    for k in range(4):
        await store.create(record(f"s{k}", clock.now, fill=k))
    leased = store.lease(["s0", "s1", "s2", "s3"])
    states = store.gather(leased)
    await store.delete("s0")
    await store.create(record("new", clock.now, fill=99))  # takes s0's row
    changed = await store.get("s1")
    await store.commit(changed)
    y = np.zeros((4, 1, 2), np.float32)
    errors = store.advance(leased, states + 1, 1, y, [None] * 4)
    assert isinstance(errors[0], SessionNotFound)
    assert isinstance(errors[1], SessionConflict)
    assert errors[2:] == [None, None]
    assert (await store.get("new")).state.tolist() == [99] * WIDTH
    assert (await store.get("s1")).state.tolist() == [1] * WIDTH
    assert (await store.get("s2")).state.tolist() == [3] * WIDTH
    leased = store.lease(["s2"])
    clock.now += 61
    errors = store.advance(leased, store.gather(leased), 1, y[:1], [None])
    assert isinstance(errors[0], SessionExpired)
    assert await store.sweep(clock.now) == 3  # the others (s1, s3, new) expire too
    assert store.rows_allocated() == 0


async def test_commit_onto_another_model_moves_slab(store: MemorySessionStore, clock: Clock) -> None:
    await store.create(record("a", clock.now, fill=1))
    await store.create(record("b", clock.now, fill=2))
    moved = record("a", clock.now, model="other", fill=7)
    moved.state = np.full(WIDTH + 2, 7, np.float32)
    await store.commit(moved)
    got = await store.get("a")
    assert (got.model, got.state.tolist()) == ("other", [7] * (WIDTH + 2))
    assert (await store.get("b")).state.tolist() == [2] * WIDTH
    with pytest.raises(ValueError):
        store.gather(store.lease(["a", "b"]))  # two slabs never gathered as one


def test_state_copies_that_keep_the_gil_are_exact_and_independent() -> None:
    """``copy_state`` / ``write_state`` (the per-step copies on the event loop's thread):
    exact, never aliasing, and refusing a state of another size as numpy would."""
    state = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    copy = copy_state(state)
    assert copy.dtype == np.float32 and np.array_equal(copy, state)
    copy[0] += 1.0
    assert copy[0] != state[0] and copy.flags.writeable
    rows = np.zeros((3, 1024), np.float32)
    write_state(rows[1], state)
    assert np.array_equal(rows[1], state) and not rows[0].any() and not rows[2].any()
    write_state(rows[2], state.astype(np.float64))  # converted, as an assignment would be
    assert np.array_equal(rows[2], state)
    assert np.array_equal(copy_state(rows[:, ::2][1]), state[::2])  # a strided view
    with pytest.raises(ValueError):
        write_state(rows[0], state[:-1])
