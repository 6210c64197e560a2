"""Crowds: the single steps of many sessions that arrive in one event-loop turn (one
WebSocket stream, REST request or Triton sequence request each) run as one block
(``Engine._join_crowd``): on the memory store gathered from and written back to the state
slab in bulk, on Redis committed in one pipeline with the rest of their call
(``Engine._commit_jobs``). Every session must still get exactly what it would get alone,
checked against onnxruntime run on each whole sequence, retries with ``seq`` included; a
step whose caller gives up is never applied; a crowd whose call fails runs each step
alone, so a bad step fails by itself; a step whose session changed meanwhile is redone on
the fresh state; batching off (one row per call) and ``batch_crowds`` off form no crowd."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batching import StepBatcher
from service.config import Settings
from service.engine import Engine, StepResult, _Crowd
from service.errors import InferenceFailed, ServeError, SessionExpired, SessionNotFound

TOL = 1e-5
WIDTH = 3  # tiny-lstm's input size


class _Calls:
    """The rows of every onnxruntime call of one model, and of every crowd queued. While
    ``gate`` is clear, a pool thread's call of more than one row waits for it, and
    ``started`` tells when one does (a call on the event loop's thread, as small ones
    made while nothing else runs are, is never held: it would hold the loop)."""

    def __init__(self, monkeypatch, engine: Engine, name: str) -> None:
        self.rows: list[int] = []
        self.crowds: list[int] = []
        self.gate, self.started = threading.Event(), threading.Event()
        self.gate.set()
        runner = engine.model(name).runner
        run = runner.run

        def spied_run(x, *args, **kwargs):
            self.rows.append(x.shape[0])
            held = threading.current_thread() is not threading.main_thread()
            if held and x.shape[0] > 1 and not self.gate.is_set():
                self.started.set()
                assert self.gate.wait(10)
            return run(x, *args, **kwargs)

        monkeypatch.setattr(runner, "run", spied_run)
        submit_crowd = StepBatcher.submit_crowd

        def spied_crowd(batcher, x, states, commit=None):
            self.crowds.append(x.shape[0])
            return submit_crowd(batcher, x, states, commit)

        monkeypatch.setattr(StepBatcher, "submit_crowd", spied_crowd)

    async def hold(self) -> None:
        """Hold the next call of several rows until ``release``; return once it runs."""
        self.gate.clear()
        self.started.clear()
        for _ in range(1000):
            if self.started.is_set():
                return
            await asyncio.sleep(0.005)
        pytest.fail("no call of several rows started")

    def release(self) -> None:
        self.gate.set()


CROWDS_REDIS_DB = 4


@pytest.fixture(params=["memory", "redis"])
def store(request) -> str:
    """The session store a test runs on: the memory store, or a real Redis."""
    if request.param == "memory":
        return "memory"
    return request.getfixturevalue("redis_db")(CROWDS_REDIS_DB)


async def _engine(model_repo, store: str = "memory", **overrides) -> Engine:
    engine = Engine(Settings(model_repo=model_repo, grpc_port=0, session_store=store, **overrides))
    await engine.start()
    return engine


async def _sessions(engine: Engine, n: int, name: str = "tiny-lstm") -> list[str]:
    entry = engine.model(name)
    return [(await engine.create_session(entry, None)).session_id for _ in range(n)]


@pytest.mark.parametrize(
    "overrides",
    [{"batch_max_size": 1}, {"batch_max_size": 3}, {}, {"batch_crowds": False}],
    ids=["batching-off", "3-rows", "default", "crowds-off"],
)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(  # per session, its chunk lengths (1 or 2 steps: two crowds a turn)
        st.lists(st.integers(1, 2), min_size=1, max_size=4), min_size=2, max_size=24
    ),
    seq=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_crowded_steps_equal_each_session_alone(
    model_repo, reference, monkeypatch, store, overrides, chunks, seq, seed
):
    """Sessions stepping at once, in chunks of mixed lengths, over several turns: each
    session's outputs, step count and state (read through its later outputs) are those of
    its whole sequence run alone. With ``seq``, some chunks are sent twice (a client's
    retry) and the second answer is the first's, replayed, never applied again. No call
    exceeds ``batch_max_size`` rows, and with batching or crowds off no crowd forms (that
    several sessions share one: below)."""
    max_size = overrides.get("batch_max_size", 256)
    rng = np.random.default_rng(seed)
    retried = rng.random(sum(map(len, chunks))) < 0.3 if seq else np.zeros(0, bool)
    xs = [rng.normal(size=(sum(c), WIDTH)).astype(np.float32) for c in chunks]

    async def main() -> None:
        engine = await _engine(model_repo, store, **overrides)
        with monkeypatch.context() as patch:
            calls = _Calls(patch, engine, "tiny-lstm")
            try:
                ids = await _sessions(engine, len(chunks))

                turns = iter(range(len(retried)))

                async def stream(sid: str, x: np.ndarray, lengths: list[int]) -> list:
                    out, at = [], 0
                    for n in lengths:
                        chunk, count = x[at : at + n], at + n
                        first = await engine.step(sid, None, chunk, count if seq else None)
                        if seq and retried[next(turns)]:
                            await asyncio.sleep(0)  # the retry comes in a later turn
                            again = await engine.step(sid, None, chunk, count)
                            assert again.replayed and again.step_count == count
                            np.testing.assert_array_equal(again.outputs, first.outputs)
                        out.append(first)
                        at = count
                    return out

                results = await asyncio.gather(*map(stream, ids, xs, chunks))
                for x, lengths, got in zip(xs, chunks, results):
                    assert [r.step_count for r in got] == list(np.cumsum(lengths))
                    y = np.concatenate([r.outputs for r in got])
                    np.testing.assert_allclose(y, reference("tiny-lstm").run(x)[0], atol=TOL)
            finally:
                await engine.stop()
        assert max(calls.rows) <= max_size
        if max_size == 1 or not overrides.get("batch_crowds", True):
            assert calls.crowds == []
        else:  # the first step ran alone (the runtime was idle), the next found it busy
            assert calls.crowds

    asyncio.run(main())


async def test_a_step_whose_caller_gives_up_is_never_applied(
    model_repo, reference, monkeypatch, store
):
    """Cancelled before its crowd is queued, or while the crowd's call runs: that step is
    left out of the write-back (its session stays as it was, and steps on from there),
    while the others of its crowd are applied."""
    engine = await _engine(model_repo, store)
    ref = reference("tiny-lstm")
    x = np.random.default_rng(1).normal(size=(12, 2, WIDTH)).astype(np.float32)
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")
        for when in ("before", "during"):
            ids = await _sessions(engine, 12)
            tasks = [asyncio.ensure_future(engine.step(s, None, x[k, :1])) for k, s in enumerate(ids)]
            if when == "before":
                await asyncio.sleep(0)  # every step has joined the crowd; it is not queued yet
            else:
                await calls.hold()
            tasks[3].cancel()
            calls.release()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(done[3], asyncio.CancelledError)
            assert all(isinstance(r, StepResult) for k, r in enumerate(done) if k != 3)
            # the first step ran alone (the runtime was idle), the other 11 joined a crowd:
            # step 3 gave up before it was queued, or while it ran
            assert calls.crowds[-1] == (10 if when == "before" else 11)
            for k, sid in enumerate(ids):
                last = await engine.step(sid, None, x[k, 1:])
                whole = x[k, 1:] if k == 3 else x[k]  # session 3 steps on from step 0
                assert last.step_count == len(whole)
                np.testing.assert_allclose(last.outputs, ref.run(whole)[0][-1:], atol=TOL)
    finally:
        calls.release()
        await engine.stop()


async def test_a_crowd_whose_call_fails_runs_each_step_alone(
    model_repo, reference, monkeypatch, store
):
    """onnxruntime fails on one session's inputs: its step fails alone (inference_failed,
    its session unchanged) and every other step of the crowd is applied exactly."""
    engine = await _engine(model_repo, store)
    ref = reference("tiny-lstm")
    x = np.random.default_rng(2).normal(size=(8, 1, WIDTH)).astype(np.float32)
    x[5, 0, 0] = 999.0  # the runner below refuses any call that carries this row
    try:
        runner = engine.model("tiny-lstm").runner
        run = runner.run

        def fussy(xb, *args, **kwargs):
            if np.any(xb[..., 0] == 999.0):
                raise RuntimeError("refused")
            return run(xb, *args, **kwargs)

        monkeypatch.setattr(runner, "run", fussy)
        ids = await _sessions(engine, 8)
        results = await asyncio.gather(
            *(engine.step(s, None, x[k]) for k, s in enumerate(ids)), return_exceptions=True
        )
        assert isinstance(results[5], InferenceFailed)
        for k, result in enumerate(results):
            if k != 5:
                assert isinstance(result, StepResult) and result.step_count == 1
                np.testing.assert_allclose(result.outputs, ref.run(x[k])[0], atol=TOL)
        assert (await engine.store.get(ids[5])).step_count == 0
    finally:
        await engine.stop()


async def test_a_session_gone_during_its_crowds_call_is_answered_as_gone(
    model_repo, reference, monkeypatch, store
):
    """A session deleted (by another replica's sweep, say: straight from the store) while
    its crowd's call runs: its step answers session_not_found and writes nothing; the
    other steps of the crowd are applied."""
    engine = await _engine(model_repo, store)
    ref = reference("tiny-lstm")
    x = np.random.default_rng(3).normal(size=(8, 1, WIDTH)).astype(np.float32)
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")
        ids = await _sessions(engine, 8)
        tasks = [asyncio.ensure_future(engine.step(s, None, x[k])) for k, s in enumerate(ids)]
        await calls.hold()
        await engine.store.delete(ids[2])
        calls.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], (SessionNotFound, SessionExpired))
        for k, result in enumerate(results):
            if k != 2:
                assert isinstance(result, StepResult) and result.step_count == 1
                np.testing.assert_allclose(result.outputs, ref.run(x[k])[0], atol=TOL)
    finally:
        await engine.stop()


async def test_triton_sequence_steps_form_crowds_and_equal_each_sequence_alone(
    model_repo, reference, monkeypatch, store
):
    """The plain requests of Triton sequences (``Engine.sequence_step``, what HTTP v2 and
    gRPC streams send) crowd like single-session steps on either store: sequences STARTed,
    then stepped at once over several turns with ``seq`` (one request sent twice, a
    client's retry, answered by replay), then ENDed. Each sequence's outputs and step
    counts are those of its whole sequence run alone, and an ENDed sequence is gone."""
    engine = await _engine(model_repo, store)
    ref = reference("tiny-lstm")
    n, rounds = 10, 3
    x = np.random.default_rng(7).normal(size=(n, rounds + 2, 1, WIDTH)).astype(np.float32)
    entry = engine.model("tiny-lstm")
    ids = [Engine.sequence_session_id(None, "tiny-lstm", 100 + k) for k in range(n)]
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")

        def step(k: int, t: int, **flags) -> object:
            return engine.sequence_step(
                entry if flags.get("start") else None, None, ids[k], x[k, t],
                start=flags.get("start", False), end=flags.get("end", False), seq=t + 1,
            )  # fmt: skip

        got: list[list] = [[] for _ in range(n)]
        for k in range(n):
            got[k].append(await step(k, 0, start=True))
        for t in range(1, rounds + 1):
            for k, result in enumerate(await asyncio.gather(*(step(k, t) for k in range(n)))):
                got[k].append(result)
        again = await step(4, rounds)  # the retry of an applied request: a replay
        assert again.replayed and again.step_count == rounds + 1
        np.testing.assert_array_equal(again.outputs, got[4][-1].outputs)
        for k, result in enumerate(
            await asyncio.gather(*(step(k, rounds + 1, end=True) for k in range(n)))
        ):
            got[k].append(result)
        for k in range(n):
            assert [r.step_count for r in got[k]] == list(range(1, rounds + 3))
            y = np.concatenate([r.outputs for r in got[k]])
            np.testing.assert_allclose(y, ref.run(x[k, :, 0])[0], atol=TOL)
            with pytest.raises(SessionNotFound):
                await engine.sequence_step(None, None, ids[k], x[k, 0], start=False, end=False)
        assert calls.crowds, "the concurrent sequence steps formed no crowd"
    finally:
        await engine.stop()


async def test_a_crowd_stays_within_the_output_values_of_one_call(model_repo, monkeypatch):
    """``max_output_values`` bounds one call's outputs: a crowd that would exceed it is
    queued in parts that do not."""
    engine = await _engine(model_repo, max_output_values=40)  # tiny-lstm: 2 outputs a step
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")
        ids = await _sessions(engine, 12)
        x = np.ones((5, WIDTH), np.float32)  # 10 values a step: 4 rows a call at most
        results = await asyncio.gather(*(engine.step(s, None, x) for s in ids))
        assert [r.step_count for r in results] == [5] * 12
        assert calls.crowds and max(calls.crowds) <= 4 and max(calls.rows) <= 4
    finally:
        await engine.stop()


async def test_a_step_whose_session_changed_meanwhile_is_redone_fresh(
    model_repo, reference, monkeypatch, store
):
    """While a crowd's call runs, one of its sessions is committed anew (by a request that
    did not wait for its turn: here, straight through the store). That step's lease is
    broken: it is redone on the session's new state, and the rest of the crowd is applied
    as it was."""
    engine = await _engine(model_repo, store)
    ref = reference("tiny-lstm")
    x = np.random.default_rng(4).normal(size=(8, 1, WIDTH)).astype(np.float32)
    elsewhere = np.random.default_rng(5).normal(size=(1, WIDTH)).astype(np.float32)
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")
        ids = await _sessions(engine, 8)
        donor = (await _sessions(engine, 1))[0]  # its state after `elsewhere`, for session 6
        await engine.step(donor, None, elsewhere)
        moved = await engine.store.get(ids[6])
        moved.state = (await engine.store.get(donor)).state
        moved.step_count = 1
        tasks = [asyncio.ensure_future(engine.step(s, None, x[k])) for k, s in enumerate(ids)]
        await calls.hold()
        await engine.store.commit(moved)
        calls.release()
        results = await asyncio.gather(*tasks)
        assert results[6].step_count == 2
        np.testing.assert_allclose(
            results[6].outputs, ref.run(np.concatenate([elsewhere, x[6]]))[0][1:], atol=TOL
        )
        for k, result in enumerate(results):
            if k != 6:
                assert result.step_count == 1
                np.testing.assert_allclose(result.outputs, ref.run(x[k])[0], atol=TOL)
        assert [(await engine.store.get(s)).step_count for s in ids] == [1] * 6 + [2, 1]
    finally:
        calls.release()
        await engine.stop()


async def test_a_full_crowd_does_not_wait_for_the_delay_window(model_repo, reference):
    """``batch_max_delay_ms`` waits for a call to fill: a crowd that fills it by itself
    (``batch_max_size`` rows) goes at once, as that many single steps would."""
    engine = await _engine(model_repo, batch_max_size=4, batch_max_delay_ms=20_000)
    x = np.random.default_rng(6).normal(size=(4, 1, WIDTH)).astype(np.float32)
    try:
        ids = await _sessions(engine, 4)
        results = await asyncio.wait_for(  # no step runs alone with a window: 4 fill a call
            asyncio.gather(*(engine.step(s, None, x[k]) for k, s in enumerate(ids))), 10
        )
        for k, result in enumerate(results):
            np.testing.assert_allclose(result.outputs, reference("tiny-lstm").run(x[k])[0], atol=TOL)
    finally:
        await engine.stop()


async def test_queued_crowds_count_their_steps_against_max_queue(model_repo, monkeypatch):
    """``max_queue`` bounds the queued steps, however they are grouped: with a call held,
    crowds of 4 queue up to 8 steps and the next crowd is refused (429 overloaded) whole;
    the accepted ones are applied once the call ends."""
    engine = await _engine(model_repo, max_queue=8)
    x = np.ones((1, WIDTH), np.float32)
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")
        busy = await _sessions(engine, 6)
        held = [asyncio.ensure_future(engine.step(s, None, x)) for s in busy]
        await calls.hold()  # the first ran alone, the other five hold the runtime
        outcomes = []
        for _ in range(3):
            crowd = await _sessions(engine, 4)
            outcomes.append(
                [asyncio.ensure_future(engine.step(s, None, x)) for s in crowd]
            )
            await asyncio.sleep(0.01)  # joined and queued, behind the held call
        calls.release()
        await asyncio.gather(*held)
        results = [await asyncio.gather(*tasks, return_exceptions=True) for tasks in outcomes]
        assert [type(r).__name__ for r in results[2]] == ["Overloaded"] * 4
        assert len({id(r) for r in results[2]}) == 4  # an error each
        assert all(r.step_count == 1 for r in results[0] + results[1])
    finally:
        calls.release()
        await engine.stop()


async def test_a_step_in_a_crowd_survives_its_model_being_unloaded(model_repo, reference):
    """A version unloaded in the turn a step joined its crowd (before the crowd was
    queued): the step was accepted, so it is queued before the batcher closes, which
    finishes it, as it finishes every step queued."""
    engine = await _engine(model_repo, batch_inline_steps=0)
    x = np.random.default_rng(7).normal(size=(1, WIDTH)).astype(np.float32)
    try:
        (sid,) = await _sessions(engine, 1)
        entry = engine.model("tiny-lstm")
        engine.batcher(entry)
        step = asyncio.ensure_future(engine.step(sid, None, x))
        unload = asyncio.ensure_future(engine._release(entry))  # what a reload does to it
        result, _ = await asyncio.gather(step, unload)
        assert result.step_count == 1
        np.testing.assert_allclose(result.outputs, reference("tiny-lstm").run(x)[0], atol=TOL)
    finally:
        await engine.stop()


async def test_a_failing_write_back_answers_every_step_and_frees_its_session(
    model_repo, reference, monkeypatch
):
    """An error in a crowd's own write-back (a bug: it runs as a loop callback) reaches
    every step still waiting, rather than leaving them, and their sessions' turns, held
    for ever; the sessions take their next step."""
    engine = await _engine(model_repo)
    x = np.random.default_rng(8).normal(size=(4, 1, WIDTH)).astype(np.float32)
    try:
        ids = await _sessions(engine, 4)
        advance = engine.store.advance
        failures = iter([True])

        def broken(*args, **kwargs):
            if next(failures, False):
                raise RuntimeError("a bug")
            return advance(*args, **kwargs)

        monkeypatch.setattr(engine.store, "advance", broken)
        results = await asyncio.wait_for(
            asyncio.gather(
                *(engine.step(s, None, x[k]) for k, s in enumerate(ids)), return_exceptions=True
            ),
            10,
        )
        assert isinstance(results[0], StepResult)  # ran alone, before the crowd
        assert all(isinstance(r, RuntimeError) for r in results[1:])
        again = await asyncio.wait_for(engine.step(ids[1], None, x[1]), 10)
        assert again.step_count == 1  # nothing was written: its first step, again
    finally:
        await engine.stop()


async def test_on_redis_a_crowds_steps_are_committed_in_one_pipeline(
    model_repo, reference, monkeypatch, redis_db
):
    """On Redis, a crowd's steps are committed together: one ``commit_many`` (one
    pipeline) for the whole call, not one per step, and each session reads back, fresh
    from Redis, exactly its own new state."""
    engine = await _engine(model_repo, redis_db(CROWDS_REDIS_DB))
    ref = reference("tiny-lstm")
    x = np.random.default_rng(9).normal(size=(12, 2, WIDTH)).astype(np.float32)
    try:
        calls = _Calls(monkeypatch, engine, "tiny-lstm")
        commits: list[int] = []
        commit_many = engine.store.commit_many

        async def spied(records, release=None):
            commits.append(len(records))
            return await commit_many(records, release)

        monkeypatch.setattr(engine.store, "commit_many", spied)
        ids = await _sessions(engine, 12)
        for t in range(2):
            results = await asyncio.gather(
                *(engine.step(s, None, x[k, t : t + 1]) for k, s in enumerate(ids))
            )
            assert [r.step_count for r in results] == [t + 1] * 12
        # the first turn's first step ran alone (the runtime was idle) and the other 11
        # joined a crowd; the second turn's 12 all did (the last call was a crowd's): each
        # crowd committed at once
        assert calls.crowds == [11, 12] and commits == [1, 11, 12]
        for k, sid in enumerate(ids):
            record = await engine.store.get(sid, fresh=True)
            assert record.step_count == 2
            last = await engine.step(sid, None, np.zeros((1, WIDTH), np.float32))
            whole = np.concatenate([x[k], np.zeros((1, WIDTH), np.float32)])
            np.testing.assert_allclose(last.outputs, ref.run(whole)[0][-1:], atol=TOL)
    finally:
        await engine.stop()


async def test_on_redis_a_crowd_whose_commit_fails_answers_each_step_and_changes_nothing(
    model_repo, monkeypatch, redis_db
):
    """The commit of a crowd's steps fails as a whole (a bug, or the store gone mid-way):
    every step of the crowd hears an error of its own, none of them is run again alone
    (its fate is unknown to the server; a client retries with ``seq``), and the sessions,
    read fresh, are as before; their next steps apply."""
    engine = await _engine(model_repo, redis_db(CROWDS_REDIS_DB))
    x = np.ones((1, WIDTH), np.float32)
    try:
        ids = await _sessions(engine, 6)
        commit_many = engine.store.commit_many
        failures = iter([False, True])  # the lone first step's commit, then the crowd's

        async def failing(records, release=None):
            if next(failures, False):
                raise RuntimeError("the commit broke")
            return await commit_many(records, release)

        monkeypatch.setattr(engine.store, "commit_many", failing)
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.step(s, None, x) for s in ids), return_exceptions=True), 10
        )
        assert isinstance(results[0], StepResult)
        errors = results[1:]
        assert all(isinstance(r, RuntimeError) for r in errors)
        assert len({id(r) for r in errors}) == len(errors)
        for sid in ids[1:]:
            assert (await engine.store.get(sid, fresh=True)).step_count == 0
        again = await asyncio.wait_for(
            asyncio.gather(*(engine.step(s, None, x) for s in ids[1:])), 10
        )
        assert [r.step_count for r in again] == [1] * 5
    finally:
        await engine.stop()


@pytest.mark.parametrize("seed", [5, 6])
async def test_on_redis_two_replicas_racing_cancelled_and_retried_steps_apply_each_once(
    model_repo, reference, monkeypatch, redis_db, seed
):
    """Two engines (replicas) on one Redis, crowds on. Each client sends its session's
    steps in chunks of 1-2 with ``seq``; some requests go to both replicas at once, some
    are cancelled a few loop turns in, and every one that got no answer is retried with
    the same ``seq`` until one comes. Every answer (first or replayed, on either replica)
    is the session's own, and each session ends at exactly its whole sequence: no step
    applied twice, skipped or mixed with another session's, whatever the crowds,
    conflicts and cancellations in between."""
    import random

    url = redis_db(CROWDS_REDIS_DB)
    crowded = []
    committed = _Crowd._committed

    def spied(crowd, call):
        crowded.append(len(crowd.futures))
        return committed(crowd, call)

    monkeypatch.setattr(_Crowd, "_committed", spied)
    a, b = await _engine(model_repo, url), await _engine(model_repo, url)
    ref = reference("tiny-lstm")
    rng = random.Random(seed)
    n, chunks = 16, 8
    try:
        ids = await _sessions(a, n)
        xs = [
            np.random.default_rng(seed * 100 + k).normal(size=(2 * chunks, WIDTH)).astype(np.float32)
            for k in range(n)
        ]
        done = [0] * n

        async def client(k: int) -> None:
            expected = ref.run(xs[k])[0]
            for _ in range(chunks):
                start = done[k]
                count = start + rng.choice([1, 1, 2])
                chunk = xs[k][start:count]
                while True:
                    engines = [a] if rng.random() < 0.6 else [a, b]
                    tasks = [asyncio.ensure_future(e.step(ids[k], None, chunk, count)) for e in engines]
                    if rng.random() < 0.3:
                        for _ in range(rng.randrange(6)):
                            await asyncio.sleep(0)
                        tasks[0].cancel()
                    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                    answers = [r for r in outcomes if isinstance(r, StepResult)]
                    for r in outcomes:  # refusals (a conflict, a seq still in flight) are 4xx
                        assert isinstance(r, (StepResult, ServeError, asyncio.CancelledError)), r
                    for r in answers:
                        assert r.step_count == count
                        np.testing.assert_allclose(r.outputs, expected[start:count], atol=TOL)
                    if answers:
                        break
                done[k] = count

        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(n))), 60)
        assert crowded  # the steps did meet in crowds
        for k, sid in enumerate(ids):
            assert (await a.store.get(sid, fresh=True)).step_count == done[k]
            last = await b.step(sid, None, np.zeros((1, WIDTH), np.float32))
            whole = np.concatenate([xs[k][: done[k]], np.zeros((1, WIDTH), np.float32)])
            np.testing.assert_allclose(last.outputs, ref.run(whole)[0][-1:], atol=TOL)
    finally:
        await a.stop()
        await b.stop()


async def test_only_a_step_with_no_other_request_in_progress_polls_for_its_commit(
    model_repo, reference, monkeypatch, redis_db
):
    """The engine tells the store how many sessions have requests in progress, and
    stateless predictions: a step's commit is polled for (holding the event loop for
    Redis's answer) only when nothing else is; either way the step's result is the
    session's own."""
    from service.sessions.redis import _Poll

    polls: list[int] = []
    read = _Poll.read
    monkeypatch.setattr(_Poll, "read", lambda *args: polls.append(1) or read(*args))
    engine = await _engine(model_repo, redis_db(CROWDS_REDIS_DB))
    try:
        a, b = await _sessions(engine, 2)
        xs = np.random.default_rng(3).standard_normal((4, 1, WIDTH)).astype(np.float32)
        ys = [(await engine.step(a, None, xs[0])).outputs]
        assert len(polls) == 1
        busy = engine._turns.enter(b)  # another session's request, in progress
        assert busy is None
        ys.append((await engine.step(a, None, xs[1])).outputs)
        assert len(polls) == 1
        engine._turns.leave(b)
        ys.append((await engine.step(a, None, xs[2])).outputs)
        assert len(polls) == 2
        entry = engine.model("tiny-lstm")  # a stateless prediction in progress
        held = asyncio.Event()
        submit_many = StepBatcher.submit_many

        async def held_back(batcher, items):
            await held.wait()
            return await submit_many(batcher, items)

        monkeypatch.setattr(StepBatcher, "submit_many", held_back)
        predicting = asyncio.ensure_future(engine.predict(entry, [xs[0]]))
        await asyncio.sleep(0)
        ys.append((await engine.step(a, None, xs[3])).outputs)
        assert len(polls) == 2
        held.set()
        np.testing.assert_allclose((await predicting)[0][0], ys[0], atol=TOL)
        want = reference("tiny-lstm").run(xs[:, 0])[0]
        np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL)
    finally:
        await engine.stop()
