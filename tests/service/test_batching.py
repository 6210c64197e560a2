"""Dynamic batching: StepBatch (collate/split) and StepBatcher (asyncio gathering), used
directly on a Runner and through the app. Every expectation is the reference run of each
sequence alone."""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.batching import StepBatch, StepBatcher, StepJob
from service.card import ModelCard
from service.config import Settings
from service.errors import ModelNotReady, Overloaded
from service.runtime import Runner

TOL = 1e-5


@pytest.fixture(scope="module")
def runners(model_repo: Path) -> dict[str, Runner]:
    out = {}
    for name in ["tiny-lstm", "nolengths-lstm", "tiny-gru"]:
        folder = model_repo / name / "1"
        out[name] = Runner(folder / "model.onnx", ModelCard.read(folder / "card.json"), Settings())
    return out


@pytest.fixture(scope="module")
def executor():
    pool = ThreadPoolExecutor(max_workers=2)
    yield pool
    pool.shutdown(wait=True)


def _flat(ref, finals: dict) -> np.ndarray:
    """The reference's final states flattened the way the service stores them."""
    return np.concatenate(
        [
            np.take(finals[s["input"]], 0, axis=s["shape"].index(None)).ravel()
            for s in ref.card["states"]
        ]
    )


def _unflat(ref, flat: np.ndarray) -> dict:
    out, offset = {}, 0
    for s in ref.card["states"]:
        row = [d for d in s["shape"] if d is not None]
        size = int(np.prod(row))
        out[s["input"]] = np.expand_dims(
            flat[offset : offset + size].reshape(row), s["shape"].index(None)
        )
        offset += size
    return out


# -- StepBatch ------------------------------------------------------------------------------


def test_stack_and_split_states_round_trip(runners):
    runner = runners["tiny-lstm"]
    rng = np.random.default_rng(0)
    flats = [rng.normal(size=runner.state_size).astype(np.float32) for _ in range(5)]
    batched = runner.stack_states(flats)
    assert [t.shape for t in batched] == [(2, 5, 16), (2, 5, 16)]
    # row i of the batch is sequence i, layer-major as the card says
    np.testing.assert_array_equal(batched[0][:, 3, :].ravel(), flats[3][:32])
    np.testing.assert_array_equal(batched[1][:, 3, :].ravel(), flats[3][32:])
    np.testing.assert_array_equal(runner.split_states(batched), np.stack(flats))


def test_groups_one_call_with_lengths_one_per_length_without(runners):
    lengths = [3, 1, 3, 5, 1]
    jobs = [StepJob(np.zeros((n, 3), np.float32), np.zeros(64, np.float32)) for n in lengths]
    assert [len(g) for g in StepBatch(runners["tiny-lstm"], jobs).groups()] == [5]
    groups = StepBatch(runners["nolengths-lstm"], jobs).groups()
    assert sorted(sorted(j.x.shape[0] for j in g) for g in groups) == [[1, 1], [3, 3], [5]]
    assert all(len({j.x.shape[0] for j in g}) == 1 for g in groups)


@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm", "tiny-gru"])
def test_batch_run_collates_and_splits_per_sequence(runners, reference, name):
    runner, ref = runners[name], reference(name)
    rng = np.random.default_rng(1)
    size = runner.card.input_size
    jobs = []
    for n in [4, 1, 7, 4, 2]:
        x = rng.normal(size=(n, size)).astype(np.float32)
        state = rng.normal(size=runner.state_size).astype(np.float32) * 0.5
        jobs.append(StepJob(x, state))
    StepBatch(runner, jobs).run()
    for job in jobs:
        assert job.error is None
        y, state = job.result
        y_ref, finals = ref.run(job.x, _unflat(ref, job.state))
        assert y.shape == (job.x.shape[0], runner.card.output_size)
        np.testing.assert_allclose(y, y_ref, atol=TOL)
        np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)


@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm", "tiny-gru"])
def test_run_one_equals_the_reference_bound_or_not(runners, reference, name):
    """``Runner.run_one`` (one sequence; through a reused I/O binding up to 8 steps, plainly
    beyond, and plainly for a caller that finds the binding in use) chains states exactly
    as the reference runs the whole sequence, and hands out copies, not its buffers."""
    runner, ref = runners[name], reference(name)
    rng = np.random.default_rng(5)
    chunks = [1, 1, 3, 8, 9, 1, 2, 1]
    x = rng.normal(size=(sum(chunks), runner.card.input_size)).astype(np.float32)
    state, ys, at = runner.zero_state(), [], 0
    for k, n in enumerate(chunks):
        if k == 5:  # another caller holds the binding: the plain path, same numbers
            with runner._one_lock:
                y, state = runner.run_one(x[at : at + n], state)
        else:
            y, state = runner.run_one(x[at : at + n], state)
        ys.append(y)
        at += n
    y_ref, finals = ref.run(x)
    np.testing.assert_allclose(np.concatenate(ys), y_ref, atol=TOL)
    np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)
    first, _ = runner.run_one(x[:1], runner.zero_state())
    kept = first.copy()
    runner.run_one(x[1:2], state)  # a later call must not change an earlier answer
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm"])
def test_a_failing_job_fails_alone(runners, reference, name, split):
    runner, ref = runners[name], reference(name)
    rng = np.random.default_rng(2)
    jobs = [
        StepJob(rng.normal(size=(3, 3)).astype(np.float32), np.zeros(runner.state_size, np.float32))
        for _ in range(4)
    ]
    jobs[1].state = np.zeros(runner.state_size - 5, np.float32)  # a corrupt state
    jobs[2].x = jobs[2].x[:, :2]  # a wrong feature count that slipped through
    if split:  # as the batcher's pooled calls run: gather here, compute on a thread, split here
        batch = StepBatch(runner, jobs)
        batch.prepare()
        thread = threading.Thread(target=batch.compute)
        thread.start()
        thread.join()
        batch.finish()
    else:
        StepBatch(runner, jobs).run()
    assert jobs[1].error is not None and jobs[1].result is None
    assert jobs[2].error is not None and jobs[2].result is None
    for job in (jobs[0], jobs[3]):
        assert job.error is None
        y_ref, finals = ref.run(job.x)
        np.testing.assert_allclose(job.result[0], y_ref, atol=TOL)
        np.testing.assert_allclose(job.result[1], _flat(ref, finals), atol=TOL)


def test_a_call_onnxruntime_refuses_fails_each_job_alone(runners):
    """Inputs that gather into one call but that onnxruntime refuses (every row has the
    wrong feature count): the call's rows run again one by one, each failing alone."""
    runner = runners["tiny-lstm"]
    jobs = [StepJob(np.zeros((2, 2), np.float32), runner.zero_state()) for _ in range(3)]
    batch = StepBatch(runner, jobs)
    batch.prepare()
    batch.compute()
    batch.finish()
    assert all(job.error is not None and job.result is None for job in jobs)


# -- StepBatcher -----------------------------------------------------------------------------


async def _drive(batcher: StepBatcher, plans, yields) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each plan is (x, chunk bounds); sessions run concurrently, chunks in order."""

    async def session(k: int, x: np.ndarray, bounds: list[int]):
        state = batcher.runner.zero_state()
        outs = []
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            for _ in range(yields[(k + i) % len(yields)]):
                await asyncio.sleep(0)
            y, state = await batcher.submit(x[a:b], state)
            assert y.shape == (b - a, batcher.runner.card.output_size)
            outs.append(y)
        return np.concatenate(outs), state

    return await asyncio.gather(*(session(k, x, b) for k, (x, b) in enumerate(plans)))


session_plan = st.tuples(
    st.integers(1, 30),  # length
    st.lists(st.integers(1, 12), min_size=0, max_size=6),  # chunk sizes (the rest is one chunk)
)


@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm"])
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    plans=st.lists(session_plan, min_size=1, max_size=12),
    max_size=st.integers(1, 64),
    max_delay=st.sampled_from([0.0, 0.0, 0.002]),
    yields=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_property_concurrent_sessions_equal_each_alone(
    runners, executor, reference, name, plans, max_size, max_delay, yields, seed
):
    runner, ref = runners[name], reference(name)
    rng = np.random.default_rng(seed)
    concrete = []
    for length, chunks in plans:
        x = rng.normal(size=(length, 3)).astype(np.float32)
        bounds = [0]
        for c in chunks:
            if bounds[-1] + c >= length:
                break
            bounds.append(bounds[-1] + c)
        bounds.append(length)
        concrete.append((x, bounds))
    sizes: list[int] = []

    async def main():
        batcher = StepBatcher(
            runner,
            executor,
            max_size=max_size,
            max_delay_s=max_delay,
            observe=lambda stats: sizes.append(stats.size),
        )
        try:
            return await _drive(batcher, concrete, yields)
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert max(sizes) <= max_size
    for (x, _), (y, state) in zip(concrete, results):
        y_ref, finals = ref.run(x)
        np.testing.assert_allclose(y, y_ref, atol=TOL)
        np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)


async def test_batcher_really_batches_and_stays_exact(runners, executor, reference):
    runner, ref = runners["tiny-lstm"], reference("tiny-lstm")
    rng = np.random.default_rng(3)
    plans = [(rng.normal(size=(12, 3)).astype(np.float32), [0, 1, 5, 12]) for _ in range(20)]
    sizes: list[int] = []
    batcher = StepBatcher(runner, executor, max_size=64, observe=lambda s: sizes.append(s.size))
    try:
        results = await _drive(batcher, plans, [0])
    finally:
        await batcher.close()
    assert max(sizes) > 1  # calls were shared
    assert sum(sizes) == 60
    for (x, _), (y, state) in zip(plans, results):
        y_ref, finals = ref.run(x)
        np.testing.assert_allclose(y, y_ref, atol=TOL)
        np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)


async def test_a_call_holds_at_most_max_values_outputs(runners, executor, reference):
    """RNNSERVE_MAX_OUTPUT_VALUES bounds a batched call too, not only each request: jobs of
    6 steps of tiny-lstm (2 outputs) answer 12 values each, so a cap of 36 lets at most 3
    share a call, and every result stays exact."""
    runner, ref = runners["tiny-lstm"], reference("tiny-lstm")
    rng = np.random.default_rng(5)
    plans = [(rng.normal(size=(12, 3)).astype(np.float32), [0, 6, 12]) for _ in range(20)]
    sizes: list[int] = []
    batcher = StepBatcher(
        runner, executor, max_size=64, max_values=36, observe=lambda s: sizes.append(s.size)
    )
    try:
        results = await _drive(batcher, plans, [0])
    finally:
        await batcher.close()
    assert 1 < max(sizes) <= 3 and sum(sizes) == 40, sizes
    for (x, _), (y, state) in zip(plans, results):
        y_ref, finals = ref.run(x)
        np.testing.assert_allclose(y, y_ref, atol=TOL)
        np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)


async def test_lone_small_steps_run_inline_and_crowds_still_share_calls(
    runners, executor, reference
):
    """A lone stream's small steps run in the caller (no pool thread, no dispatch hop);
    small steps arriving in the same loop iteration still queue and share a call."""
    runner, ref = runners["tiny-lstm"], reference("tiny-lstm")
    rng = np.random.default_rng(11)
    sizes: list[int] = []
    threads: set[int] = set()

    class Watched:
        def __getattr__(self, name):
            return getattr(runner, name)

        def run(self, x, states, lengths):
            threads.add(threading.get_ident())
            return runner.run(x, states, lengths)

        def run_one(self, x, flat):
            threads.add(threading.get_ident())
            return runner.run_one(x, flat)

    batcher = StepBatcher(
        Watched(), executor, max_size=64, inline_steps=4, observe=lambda s: sizes.append(s.size)
    )
    try:
        x = rng.normal(size=(6, 3)).astype(np.float32)
        state = runner.zero_state()
        for t in range(6):  # one stream, one step per message, the loop turning in between
            turned: list[int] = []
            asyncio.get_running_loop().call_soon(turned.append, 1)
            y, state = await batcher.submit(x[t : t + 1], state)
            assert not turned  # answered without handing the loop a turn
            await asyncio.sleep(0)
        y_ref, finals = ref.run(x)
        np.testing.assert_allclose(y, y_ref[-1:], atol=TOL)
        np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)
        assert threads == {threading.get_ident()} and sizes == [1] * 6
        sizes.clear()
        crowd = [rng.normal(size=(1, 3)).astype(np.float32) for _ in range(16)]
        results = await asyncio.gather(*(batcher.submit(c, runner.zero_state()) for c in crowd))
        assert sum(sizes) == 16 and max(sizes) > 1 and len(sizes) <= 3
        for c, (y, _) in zip(crowd, results):
            np.testing.assert_allclose(y, ref.run(c)[0], atol=TOL)
    finally:
        await batcher.close()


class _GatedRunner:
    """A Runner whose calls wait for a gate: lets a test hold the batcher busy."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self.gate = threading.Event()
        self.card = runner.card
        self.has_lengths = runner.has_lengths
        self.state_size = runner.state_size

    def zero_state(self):
        return self._runner.zero_state()

    def stack_states(self, flats):
        return self._runner.stack_states(flats)

    def split_states(self, batched):
        return self._runner.split_states(batched)

    def run(self, x, states, lengths):
        assert self.gate.wait(10)
        return self._runner.run(x, states, lengths)


async def test_calls_that_cannot_grow_start_while_another_runs(runners, reference):
    """With one call in flight, a lone job waits to gather company; a multiplexed block or
    a full batch starts at once on the pool's second thread. A further block goes to the
    pool's queue at once as well, and starts as soon as a thread is free."""
    ref = reference("tiny-lstm")
    gated = _GatedRunner(runners["tiny-lstm"])
    started: list[int] = []
    run = gated.run

    def counting(x, states, lengths):
        started.append(x.shape[0])
        return run(x, states, lengths)

    gated.run = counting  # type: ignore[method-assign]
    pool = ThreadPoolExecutor(max_workers=2)
    batcher = StepBatcher(gated, pool, max_size=4, max_overlap=2)  # type: ignore[arg-type]
    rng = np.random.default_rng(8)
    zero = gated.zero_state()

    async def until(condition) -> None:
        for _ in range(2000):
            if condition():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("timed out")

    try:
        xs = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(4)]
        first = asyncio.ensure_future(batcher.submit(xs[0], zero))
        await until(lambda: started == [1])
        lone = asyncio.ensure_future(batcher.submit(xs[1], zero))
        await asyncio.sleep(0.02)
        assert started == [1] and batcher.queued == 1  # waits: it could still grow
        gated.gate.set()
        await asyncio.gather(first, lone)
        gated.gate.clear()
        started.clear()
        first = asyncio.ensure_future(batcher.submit(xs[0], zero))
        await until(lambda: started == [1])
        block_x = np.stack(xs[:3])
        block = asyncio.ensure_future(batcher.submit_block(block_x, np.stack([zero] * 3)))
        await until(lambda: started == [1, 3])  # at once, beside the running call
        third = asyncio.ensure_future(batcher.submit_block(block_x, np.stack([zero] * 3)))
        await asyncio.sleep(0.02)
        # handed to the pool, whose two threads are both busy: it waits in the pool's queue
        assert started == [1, 3] and batcher.queued == 0
        gated.gate.set()
        await asyncio.gather(first, third)
        assert started == [1, 3, 3]
        ys, states = await block
        for row, x in enumerate(xs[:3]):
            y_ref, finals = ref.run(x)
            np.testing.assert_allclose(ys[row], y_ref, atol=TOL)
            np.testing.assert_allclose(states[row], _flat(ref, finals), atol=TOL)
        gated.gate.clear()
        started.clear()
        first = asyncio.ensure_future(batcher.submit(xs[0], zero))
        await until(lambda: started == [1])
        crowd = [asyncio.ensure_future(batcher.submit(x, zero)) for x in xs]
        await until(lambda: started == [1, 4])  # a full batch does not wait either
        gated.gate.set()
        await first
        for x, (y, _) in zip(xs, await asyncio.gather(*crowd)):
            np.testing.assert_allclose(y, ref.run(x)[0], atol=TOL)
    finally:
        gated.gate.set()
        await batcher.close()
        pool.shutdown(wait=True)


@pytest.mark.parametrize(("limit_s", "more"), [(1.0, False), (1.0, True), (1e-9, False), (0.0, False)])
async def test_a_block_beside_a_running_call_runs_on_the_loop_when_quick(
    runners, reference, limit_s, more
):
    """While one call runs on the pool and nothing else waits, a multiplexed message's
    last block runs on the event loop's thread if this model's recent calls say it takes
    at most ``inline_block_s``; past that (or with 0), or with ``more`` blocks of its
    message to follow, it goes to the pool's second thread. Either way its results are
    the reference's."""
    ref = reference("tiny-lstm")
    gated = _GatedRunner(runners["tiny-lstm"])
    loop_thread = threading.get_ident()
    threads: list[tuple[int, bool]] = []  # (rows, on the loop's thread) per call
    run = gated.run

    def watched(x, states, lengths):
        here = threading.get_ident() == loop_thread
        threads.append((x.shape[0], here))
        if here:  # the gate holds pool calls only
            return gated._runner.run(x, states, lengths)
        return run(x, states, lengths)

    gated.run = watched  # type: ignore[method-assign]
    pool = ThreadPoolExecutor(max_workers=2)
    batcher = StepBatcher(
        gated, pool, max_size=8, max_overlap=2, inline_block_s=limit_s  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(12)
    zero = gated.zero_state()
    try:
        xs = rng.normal(size=(4, 2, 3)).astype(np.float32)
        gated.gate.set()
        await batcher.submit_block(xs, np.stack([zero] * 4))  # teaches the batcher its cost
        assert threads == [(4, False)]  # nothing else ran: the pool, as ever
        gated.gate.clear()
        threads.clear()
        first = asyncio.ensure_future(batcher.submit(xs[0], zero))
        for _ in range(2000):
            if threads:
                break
            await asyncio.sleep(0.001)
        block = asyncio.ensure_future(
            batcher.submit_block(xs[1:], np.stack([zero] * 3), more=more)
        )
        if limit_s >= 1.0 and not more:
            ys, states = await block  # while the pool's call is still held
            assert not first.done() and threads == [(1, False), (3, True)]
        else:
            for _ in range(2000):
                if len(threads) == 2:
                    break
                await asyncio.sleep(0.001)
            assert threads == [(1, False), (3, False)] and not block.done()
            gated.gate.set()
            ys, states = await block
        gated.gate.set()
        y, _ = await first
        np.testing.assert_allclose(y, ref.run(xs[0])[0], atol=TOL)
        for row, x in enumerate(xs[1:]):
            y_ref, finals = ref.run(x)
            np.testing.assert_allclose(ys[row], y_ref, atol=TOL)
            np.testing.assert_allclose(states[row], _flat(ref, finals), atol=TOL)
    finally:
        gated.gate.set()
        await batcher.close()
        pool.shutdown(wait=True)


async def test_a_last_block_beside_two_running_calls_goes_to_the_pool(runners, reference):
    """With two calls already running (both cores busy), even a message's last block,
    quick as it is, goes to the pool rather than run on the event loop's thread."""
    ref = reference("tiny-lstm")
    gated = _GatedRunner(runners["tiny-lstm"])
    loop_thread = threading.get_ident()
    threads: list[tuple[int, bool]] = []
    run = gated.run

    def watched(x, states, lengths):
        threads.append((x.shape[0], threading.get_ident() == loop_thread))
        return run(x, states, lengths)

    gated.run = watched  # type: ignore[method-assign]
    pool = ThreadPoolExecutor(max_workers=2)
    batcher = StepBatcher(
        gated, pool, max_size=8, max_overlap=2, inline_block_s=1.0  # type: ignore[arg-type]
    )
    zero = gated.zero_state()
    xs = np.random.default_rng(13).normal(size=(6, 2, 3)).astype(np.float32)
    try:
        gated.gate.set()
        await batcher.submit_block(xs[:2], np.stack([zero] * 2))  # teaches the batcher its cost
        gated.gate.clear()
        threads.clear()
        held = []
        for k in (0, 2):  # two calls, each started before the next is submitted
            block = batcher.submit_block(xs[k : k + 2], np.stack([zero] * 2), more=True)
            held.append(asyncio.ensure_future(block))
            for _ in range(2000):
                if len(threads) == len(held):
                    break
                await asyncio.sleep(0.001)
        last = asyncio.ensure_future(batcher.submit_block(xs[4:], np.stack([zero] * 2)))
        await asyncio.sleep(0.02)
        assert not last.done() and threads == [(2, False), (2, False)]
        gated.gate.set()
        ys, _ = await last
        await asyncio.gather(*held)
        assert threads == [(2, False), (2, False), (2, False)]
        for row, x in enumerate(xs[4:]):
            np.testing.assert_allclose(ys[row], ref.run(x)[0], atol=TOL)
    finally:
        gated.gate.set()
        await batcher.close()
        pool.shutdown(wait=True)


async def test_blocks_handed_to_the_pool_count_against_the_queue(runners, reference):
    """Blocks go to the pool's queue at once, and the calls beyond the one that may run
    count as waiting: past ``max_queue`` a further block is refused (429 ``overloaded``),
    and the accepted ones are exact."""
    ref = reference("tiny-lstm")
    gated = _GatedRunner(runners["tiny-lstm"])
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = StepBatcher(gated, pool, max_size=8, max_queue=3)  # type: ignore[arg-type]
    xs = np.random.default_rng(6).normal(size=(5, 2, 2, 3)).astype(np.float32)
    zero = gated.zero_state()
    try:
        accepted = []
        for x in xs[:4]:  # one runs (held), three wait in the pool's queue
            accepted.append(asyncio.ensure_future(batcher.submit_block(x, np.stack([zero] * 2))))
            await asyncio.sleep(0.01)
        assert batcher.queued == 0 and len(batcher._inflight) == 4
        with pytest.raises(Overloaded) as info:
            await batcher.submit_block(xs[4], np.stack([zero] * 2))
        assert info.value.code == "overloaded"
        gated.gate.set()
        for x, (ys, _) in zip(xs[:4], await asyncio.gather(*accepted)):
            for row in range(2):
                np.testing.assert_allclose(ys[row], ref.run(x[row])[0], atol=TOL)
    finally:
        gated.gate.set()
        await batcher.close()
        pool.shutdown(wait=True)


async def test_overloaded_when_the_queue_is_full(runners, reference):
    ref = reference("tiny-lstm")
    gated = _GatedRunner(runners["tiny-lstm"])
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = StepBatcher(gated, pool, max_size=8, max_queue=3)  # type: ignore[arg-type]
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(5)]
    zero = gated.zero_state()
    try:
        running = asyncio.ensure_future(batcher.submit(xs[0], zero))
        while gated.gate.is_set() or batcher.queued:  # wait for the first call to start
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(x, zero)) for x in xs[1:4]]
        await asyncio.sleep(0.01)
        assert batcher.queued == 3
        with pytest.raises(Overloaded) as info:
            await batcher.submit(xs[4], zero)
        assert info.value.status == 429 and info.value.code == "overloaded"
        with pytest.raises(Overloaded):
            await batcher.submit_many([(xs[4], zero), (xs[4], zero)])
        gated.gate.set()
        results = await asyncio.gather(running, *queued)
        # the refused request changed nothing, the accepted ones are exact
        for x, (y, state) in zip(xs[:4], results):
            y_ref, finals = ref.run(x)
            np.testing.assert_allclose(y, y_ref, atol=TOL)
            np.testing.assert_allclose(state, _flat(ref, finals), atol=TOL)
        # and once drained, the batcher takes work again
        y, _ = await batcher.submit(xs[4], zero)
        np.testing.assert_allclose(y, ref.run(xs[4])[0], atol=TOL)
    finally:
        gated.gate.set()
        await batcher.close()
        pool.shutdown(wait=True)


async def test_cancelled_waiter_is_skipped_and_close_drains_admitted_work(runners, reference):
    ref = reference("tiny-lstm")
    gated = _GatedRunner(runners["tiny-lstm"])
    pool = ThreadPoolExecutor(max_workers=1)
    batcher = StepBatcher(gated, pool, max_size=8)  # type: ignore[arg-type]
    x = np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)
    zero = gated.zero_state()
    try:
        first = asyncio.ensure_future(batcher.submit(x, zero))
        await asyncio.sleep(0.02)
        gone = asyncio.ensure_future(batcher.submit(x, zero))
        kept = asyncio.ensure_future(batcher.submit(x, zero))
        await asyncio.sleep(0.01)
        gone.cancel()
        gated.gate.set()
        (y1, _), (y2, _) = await asyncio.gather(first, kept)
        y_ref, _ = ref.run(x)
        np.testing.assert_allclose(y1, y_ref, atol=TOL)
        np.testing.assert_allclose(y2, y_ref, atol=TOL)
        assert gone.cancelled()
        # close: in-flight and queued work finish, later work is refused
        gated.gate.clear()
        inflight = asyncio.ensure_future(batcher.submit(x, zero))
        await asyncio.sleep(0.02)
        queued = asyncio.ensure_future(batcher.submit(x, zero))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        gated.gate.set()
        await closing
        y3, _ = await inflight
        y4, _ = await queued
        np.testing.assert_allclose(y3, y_ref, atol=TOL)
        np.testing.assert_allclose(y4, y_ref, atol=TOL)
        with pytest.raises(ModelNotReady):
            await batcher.submit(x, zero)
    finally:
        gated.gate.set()
        await batcher.close()
        pool.shutdown(wait=True)


# -- through the app ---------------------------------------------------------------------------


async def _concurrent_sessions(client, name: str, xs: list[np.ndarray], bounds: list[int]):
    sids = []
    for _ in xs:
        r = await client.post(f"/v1/models/{name}/sessions")
        assert r.status_code == 201
        sids.append(r.json()["session_id"])

    async def run(sid, x):
        outs = []
        for a, b in itertools.pairwise(bounds):
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[a:b].tolist()})
            assert r.status_code == 200, r.text
            outs.extend(r.json()["outputs"])
        state = (await client.get(f"/v1/sessions/{sid}/state")).json()
        return np.asarray(outs), state

    return await asyncio.gather(*(run(s, x) for s, x in zip(sids, xs)))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"batch_max_size": 1},
        {"batch_max_delay_ms": 5.0},
        {"batch_max_size": 3, "batch_max_inflight": 2},
    ],
    ids=["adaptive", "no-batching", "delay", "small-batches-2-inflight"],
)
@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm"])
async def test_app_batching_settings_never_change_results(
    make_client, model_repo, reference, name, overrides
):
    ref = reference(name)
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=(int(rng.integers(9, 16)), 3)).astype(np.float32) for _ in range(10)]
    async with make_client(model_repo=model_repo, **overrides) as client:
        results = await _concurrent_sessions(client, name, xs, [0, 1, 4, 9])
        registry = client.app.state.engine.metrics.registry
        calls = registry.get_sample_value("rnnserve_batch_size_count", {"model": name})
        rows = registry.get_sample_value("rnnserve_batch_size_sum", {"model": name})
    for x, (y, state) in zip(xs, results):
        y_ref, finals = ref.run(x[:9])
        np.testing.assert_allclose(y, y_ref, atol=TOL)
        assert state["step_count"] == 9
        for s in ref.card["states"]:
            np.testing.assert_allclose(
                np.asarray(state["state"][s["input"]]),
                np.take(finals[s["input"]], 0, axis=1),
                atol=TOL,
            )
    assert rows == 30
    if overrides.get("batch_max_size") == 1:
        assert calls == rows
    elif overrides.get("batch_max_delay_ms"):
        assert calls < rows  # the window gathered requests into shared calls


async def test_app_overloaded_is_429_and_leaves_sessions_intact(make_client, model_repo, reference):
    """A tiny queue under a burst: refused steps are 429 overloaded and never applied."""
    ref = reference("tiny-lstm")
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(300, 3)).astype(np.float32) for _ in range(24)]  # slow calls
    async with make_client(model_repo=model_repo, max_queue=2, batch_max_size=2) as client:
        sids = []
        for _ in xs:
            sids.append((await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"])
        responses = await asyncio.gather(
            *(
                client.post(f"/v1/sessions/{s}/steps", json={"inputs": x.tolist()})
                for s, x in zip(sids, xs)
            )
        )
        infos = [(await client.get(f"/v1/sessions/{s}/state")).json() for s in sids]
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 429}  # the burst overflowed the queue of 2
    y_ref = {i: ref.run(x) for i, x in enumerate(xs)}
    for i, (r, info) in enumerate(zip(responses, infos)):
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "overloaded"
            assert r.headers.get("retry-after")
            assert info["step_count"] == 0
            assert not np.any(np.asarray(info["state"]["h0"]))
        else:
            assert info["step_count"] == 300
            np.testing.assert_allclose(np.asarray(r.json()["outputs"]), y_ref[i][0], atol=TOL)


async def test_a_cancelled_commit_hook_leaves_no_job_of_its_call_waiting(runners, executor):
    """The commit hook of a call is cancelled (the server stops while a commit is in
    flight): the jobs whose commit it was making are cancelled, and the call's other jobs
    (here one that made no commit) still get their results instead of waiting for ever."""
    runner = runners["tiny-lstm"]
    entered, never = asyncio.Event(), asyncio.Event()

    async def hook(jobs: list[StepJob]) -> None:
        entered.set()
        await never.wait()

    batcher = StepBatcher(runner, executor, max_size=8, inline_steps=0, commit=hook)
    x = np.ones((1, 3), np.float32)
    durable = asyncio.ensure_future(batcher.submit(x, runner.zero_state(), commit="record"))
    plain = asyncio.ensure_future(batcher.submit(x, runner.zero_state()))
    await asyncio.wait_for(entered.wait(), 10)
    for task in list(batcher._tasks):
        task.cancel()
    y, _ = await asyncio.wait_for(plain, 10)
    np.testing.assert_allclose(y, runner.run_one(x, runner.zero_state())[0], atol=TOL)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(durable, 10)
    await batcher.close()


async def test_a_crowd_hears_its_call_in_the_turn_that_settles_it(runners, executor, reference):
    """``StepJob.settled`` runs as the batcher settles the job, before any done-callback
    of its future (those wait for the next loop turn), with the result already set; the
    crowd's exact outputs come through it."""
    runner, ref = runners["tiny-lstm"], reference("tiny-lstm")
    x = np.random.default_rng(5).normal(size=(3, 1, 3)).astype(np.float32)
    order: list[str] = []
    heard: list[np.ndarray] = []

    def settled(future: asyncio.Future) -> None:
        assert future.done()
        order.append("settled")
        heard.append(future.result()[0])

    batcher = StepBatcher(runner, executor, max_size=8, inline_steps=0)
    try:
        job = batcher.submit_crowd(x, np.stack([runner.zero_state()] * 3))
        job.settled = settled
        job.future.add_done_callback(lambda _: order.append("callback"))
        await asyncio.wait_for(asyncio.shield(job.future), 10)
        await asyncio.sleep(0)
    finally:
        await batcher.close()
    assert order == ["settled", "callback"]
    for row in range(3):
        y_ref, _ = ref.run(x[row])
        np.testing.assert_allclose(heard[0][row], y_ref, atol=TOL)
