"""Dynamic batching of step requests across sessions.

``StepBatch`` collates jobs (one sequence chunk + its flat state each) into one
onnxruntime call with the states stacked on each state's batch axis, and splits the
results back; it knows nothing about asyncio. ``StepBatcher`` is the asyncio component
that gathers jobs: it dispatches at once when the runtime is idle and lets jobs
accumulate while a call is in flight, so one lone stream pays no waiting tax and many
streams share calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from service.errors import InferenceFailed, ModelNotReady, Overloaded
from service.runtime import Runner


@dataclass(slots=True)
class StepJob:
    x: np.ndarray
    """One sequence chunk, steps >= 1: [steps, input_size] float32, or [steps] int64 ids
    for token-input models. A block job (``block=True``) carries many sequences of one
    length at once: [rows, steps, ...]."""
    state: np.ndarray
    """Flat float32 state of the sequence before these steps ([rows, state_size] for a block)."""
    future: asyncio.Future | None = None
    enqueued: float = 0.0
    result: tuple[np.ndarray, np.ndarray] | None = None
    """(y [steps, output_size], new flat state), or ([rows, steps, out], [rows, state]) for a block."""
    error: BaseException | None = None
    block: bool = False
    more: bool = False
    """A block after which more of its message's blocks follow (``submit_block``)."""
    crowd: bool = False
    """A block of single steps of many callers, gathered by the engine in one loop turn
    (``submit_crowd``): queued, merged and dispatched as that many single jobs would be."""
    commit: object = None
    """What the batcher's ``commit`` hook needs to make this job's result durable (from
    ``submit(..., commit=...)``); its waiter resumes only once that is done."""
    commit_error: BaseException | None = None
    """The hook's verdict for this job, raised to its waiter as it is."""
    settled: Callable[[asyncio.Future], None] | None = None
    """Called with ``future`` as soon as the batcher has settled it, in the same loop turn
    (a future's done-callbacks wait for the next one). Not called for a future that was
    already done (cancelled): a done-callback must cover that case."""

    @property
    def rows(self) -> int:
        return self.x.shape[0] if self.block else 1

    @property
    def steps(self) -> int:
        return self.x.shape[1] if self.block else self.x.shape[0]


@dataclass(slots=True)
class BatchStats:
    size: int
    queue_wait_s: list[float] = field(default_factory=list)


_LONE = BatchStats(1, [])
"""The stats of every inline call (read only): one sequence, which never queued."""


class StepBatch:
    """Runs jobs as few onnxruntime calls as the model allows and splits results back.

    Three parts, so that a pooled call holds the GIL as little as possible: ``prepare``
    (gather each call's inputs and states) and ``finish`` (split the results back) run on
    the caller's thread, the event loop's; ``compute`` (the onnxruntime calls alone) runs
    on a pool thread. Gathering and splitting copy arrays, and numpy releases the GIL
    around every copy: on the pool thread each copy meant waiting to take the GIL back
    from the busy event loop (up to the interpreter's switch interval), several times per
    call. Now the pool thread takes it twice per call, to start and to end onnxruntime's.
    ``run`` does all three here (the inline path)."""

    def __init__(self, runner: Runner, jobs: list[StepJob]) -> None:
        self.runner = runner
        self.jobs = jobs
        self._calls: list[tuple[list[StepJob], tuple | None]] = []
        """(group, the call's (x, states, lengths) or None when gathering failed)."""
        self._outputs: list[tuple[np.ndarray, list[np.ndarray]] | None] = []
        """Per call its (y, new states), or None when its rows ran one by one instead."""
        self.compute_s = 0.0
        """How long ``compute`` took (its onnxruntime calls)."""

    def groups(self) -> list[list[StepJob]]:
        """One call for everything when the model takes ``lengths``; else one per length."""
        if self.runner.has_lengths or len(self.jobs) == 1:
            return [self.jobs]
        by_length: dict[int, list[StepJob]] = {}
        for job in self.jobs:
            by_length.setdefault(job.steps, []).append(job)
        return list(by_length.values())

    def run(self) -> None:
        """Fill each job's ``result`` (y [steps, out], new flat state) or ``error``."""
        self.prepare()
        self.compute()
        self.finish()

    def prepare(self) -> None:
        """Gather every call's inputs (on the event loop's thread)."""
        for group in self.groups():
            try:
                feed = self._feed(group)
            except Exception:  # noqa: BLE001 - its rows run one by one in compute
                feed = None
            self._calls.append((group, feed))

    def compute(self) -> None:
        """The onnxruntime calls (on a pool thread). A failed call's rows run again one by
        one, so that one bad row fails alone."""
        started = time.perf_counter()
        try:
            self._compute()
        finally:
            self.compute_s = time.perf_counter() - started

    def _compute(self) -> None:
        outputs = self._outputs
        for group, feed in self._calls:
            if feed is not None:
                try:
                    outputs.append(self.runner.run(*feed))
                    continue
                except Exception as exc:  # noqa: BLE001 - isolate the failing row below
                    if len(group) == 1:
                        group[0].error = exc
                        outputs.append(None)
                        continue
            for job in group:
                try:
                    self._split([job], *self.runner.run(*self._feed([job])))
                except Exception as solo_exc:  # noqa: BLE001
                    job.error = solo_exc
            outputs.append(None)

    def finish(self) -> None:
        """Split every call's results back to its jobs (on the event loop's thread)."""
        for (group, _), output in zip(self._calls, self._outputs):
            if output is None:
                continue
            try:
                self._split(group, *output)
            except Exception as exc:  # noqa: BLE001 - every job of the call hears it
                for job in group:
                    job.error = exc

    def _feed(self, group: list[StepJob]) -> tuple:
        runner = self.runner
        if len(group) == 1:
            job = group[0]
            x = job.x if job.block else job.x[np.newaxis]
            states = job.state if job.block else job.state[np.newaxis]
            lengths = np.full(x.shape[0], x.shape[1], np.int32) if runner.has_lengths else None
            return x, runner.stack_states(states), lengths
        blocks = [job.x if job.block else job.x[np.newaxis] for job in group]
        steps = [b.shape[1] for b in blocks]
        longest = max(steps)
        if min(steps) == longest:
            x = np.concatenate(blocks)
        else:  # dtype/shape-generic padding: float32 vectors or int64 token ids
            first = blocks[0]
            x = np.zeros((sum(b.shape[0] for b in blocks), longest, *first.shape[2:]), first.dtype)
            row = 0
            for b in blocks:
                x[row : row + b.shape[0], : b.shape[1]] = b
                row += b.shape[0]
        states = np.concatenate([job.state if job.block else job.state[np.newaxis] for job in group])
        lengths = (
            np.repeat(np.asarray(steps, np.int32), [b.shape[0] for b in blocks])
            if runner.has_lengths
            else None
        )
        return x, runner.stack_states(states), lengths

    def _split(self, group: list[StepJob], y: np.ndarray, new_states: list[np.ndarray]) -> None:
        flat = self.runner.split_states(new_states)
        row = 0
        for job in group:
            if job.block:
                rows, steps_ = job.x.shape[0], job.x.shape[1]
                job.result = (y[row : row + rows, :steps_], flat[row : row + rows])
                row += rows
            else:
                job.result = (y[row, : job.x.shape[0]], flat[row])
                row += 1


class StepBatcher:
    """Gathers step jobs for one model version and runs them in batches off the event loop."""

    def __init__(
        self,
        runner: Runner,
        executor: Executor,
        *,
        max_size: int,
        max_delay_s: float = 0.0,
        max_inflight: int = 1,
        max_overlap: int | None = None,
        inline_steps: int = 0,
        inline_block_s: float = 0.0,
        max_queue: int = 4096,
        max_values: int | None = None,
        observe: Callable[[BatchStats], None] | None = None,
        commit: Callable[[list[StepJob]], Awaitable[None]] | None = None,
    ) -> None:
        self.runner = runner
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_values = max_values
        """Output values (rows x longest steps x output size) one call may produce: jobs
        join a call only while it stays within them (a job alone always runs)."""
        card = getattr(runner, "card", None)
        self._output_size = card.output_size if card is not None else 1
        self._executor = executor
        self._observe = observe
        self._commit = commit
        self._queue: deque[StepJob] = deque()
        self._queued_rows = 0
        self._slots = max_inflight
        self._overlap = max(max_inflight, max_overlap or max_inflight)
        self.inline_steps = inline_steps
        self.inline_block_s = inline_block_s
        """A multiplexed block expected to take at most this long may run on the event
        loop's thread while another call runs on the pool (``_runs_here``); 0 never."""
        self._row_step_s: float | None = None
        """Seconds per row-step of this model's recent calls (a moving average)."""
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        """The tasks of the calls running now."""
        self._tasks: set[asyncio.Task] = set()
        """Every task still finishing a call: running it, committing or settling."""
        self._closed = False
        self._lone = True
        """The last call carried one single-sequence job (a lone stream, not a crowd)."""
        self._hot = False
        """A step ran inline in this loop iteration: the next ones queue."""

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(
        self, x: np.ndarray, state: np.ndarray, commit: object = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run ``x`` from ``state``; returns (y [steps, output_size], new flat state).

        With ``commit``, the batcher's ``commit`` hook makes the result durable before this
        returns, together with the other jobs of the same call (one store round trip per
        call, not per job); its error for this job is raised here as it is."""
        if self.can_run_inline(x.shape[0]):
            result = self.run_inline(x, state)
            if commit is not None and self._commit is not None:
                job = StepJob(x, state, result=result, commit=commit)
                await self._commit([job])
                if job.commit_error is not None:
                    raise job.commit_error
            return result
        return await self._wait(self._enqueue([(x, state)], commit=commit)[0])

    @staticmethod
    async def _wait(job: StepJob) -> tuple[np.ndarray, np.ndarray]:
        """A job's result; a caller that gives up cancels its job (the batch skips it)."""
        try:
            return await job.future  # type: ignore[misc]
        except asyncio.CancelledError:
            job.future.cancel()  # type: ignore[union-attr]
            raise

    def can_run_inline(self, steps: int) -> bool:
        """Whether a lone stream's small step may run here and now (``run_inline``), as the
        dispatch loop would inline it, without the loop's wake-up and future hops: only
        while the runtime is idle, calls carry one job each, and once per loop iteration,
        so steps arriving together still queue and share a call."""
        return (
            steps <= self.inline_steps
            and self._lone
            and not self._hot
            and not self._queue
            and not self._inflight
            and self.max_delay_s == 0
            and not self._closed
        )

    def run_inline(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One sequence's steps on the caller's thread (only after ``can_run_inline``)."""
        self._hot = True
        asyncio.get_running_loop().call_soon(self._cool)
        try:
            result = self.runner.run_one(x, np.ascontiguousarray(state))
        except Exception as exc:  # onnxruntime's errors have no common base
            raise InferenceFailed(f"inference failed: {type(exc).__name__}: {exc}") from exc
        if self._observe is not None:
            self._observe(_LONE)
        return result

    def _cool(self) -> None:
        self._hot = False

    async def submit_many(
        self, items: list[tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Run several independent sequences; they may share calls with other requests."""
        jobs = self._enqueue(items)
        try:
            await asyncio.gather(*(job.future for job in jobs))
        except asyncio.CancelledError:
            for job in jobs:
                job.future.cancel()
            raise
        return [job.future.result() for job in jobs]

    async def submit_block(
        self, x: np.ndarray, states: np.ndarray, *, more: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run ``x`` [rows, steps, ...] (sequences of one length) from ``states``
        [rows, state_size] as one job; returns (y [rows, steps, out], new states [rows, S]).
        ``more``: the sender has more blocks of the same message to plan and submit after
        this one, so this one does not run on the event loop's thread beside a pool call
        (``_runs_here``)."""
        job = self._enqueue([(x, states)], block=True)[0]
        job.more = more
        return await self._wait(job)

    def submit_crowd(self, x: np.ndarray, states: np.ndarray, commit: object = None) -> StepJob:
        """Queue the steps of many callers, ``x`` [rows, steps, ...] from ``states``
        [rows, state_size], as one block job; its future gets (y [rows, steps, out], new
        states [rows, S]). Unlike ``submit_block``'s, it is batched exactly as ``rows``
        single jobs would be: it waits for a free slot (and merges with what else waits),
        and it never runs on the event loop's thread beside a pool call. Cancelling the
        future skips the job if it has not started. ``commit``: what the ``commit`` hook
        needs to make its rows durable (see ``submit``)."""
        return self._enqueue([(x, states)], block=True, crowd=True, commit=commit)[0]

    def rows_per_call(self, steps: int) -> int:
        """The most sequences of ``steps`` steps one call takes: ``max_size``, and no more
        than ``max_values`` outputs (one at least)."""
        if self.max_values is None:
            return self.max_size
        return max(1, min(self.max_size, self.max_values // (steps * self._output_size)))

    def _enqueue(
        self,
        items: list[tuple[np.ndarray, np.ndarray]],
        block: bool = False,
        commit: object = None,
        crowd: bool = False,
    ) -> list[StepJob]:
        if self._closed:
            raise ModelNotReady("this model version was unloaded; retry to use the current one")
        # Blocks go to the pool's queue at once (``_may_dispatch``): the calls handed to
        # the pool beyond those that may run count as waiting too, so a flood of
        # multiplexed work is still refused.
        waiting = self._queued_rows + max(0, len(self._inflight) - self._overlap)
        adding = items[0][0].shape[0] if crowd else len(items)  # a crowd: as its single jobs
        if waiting + adding > self.max_queue and waiting:
            raise Overloaded(f"{self._queued_rows} sequences are already queued for this model")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = loop.create_task(self._dispatch_loop())
        now = time.perf_counter()
        jobs = [
            StepJob(x, state, loop.create_future(), now, block=block, commit=commit, crowd=crowd)
            for x, state in items
        ]
        self._queue.extend(jobs)
        self._queued_rows += sum(job.rows for job in jobs) if block else len(jobs)
        if self._may_dispatch():  # else a finishing call wakes the loop: no wasted turn
            self._wakeup.set()
        return jobs

    def _may_dispatch(self) -> bool:
        """Whether a call may start now: while fewer than ``max_inflight`` run, or, up to
        ``max_overlap``, when waiting could not make it any bigger (the queue already holds
        a full call, ``max_size`` rows). A lone stream's calls still gather while one runs.

        A block (a multiplexed message's slice, batched by its sender) goes to the pool at
        once, however many calls run: the pool's own queue holds it until a thread is
        free, and a thread that ends a call starts the next one there and then, without
        waiting for the event loop to notice (which, busy writing back the slices already
        done, took 1.5-3 ms per call at 4,096 sessions: 56.5k -> 64.7k steps/s)."""
        running = len(self._inflight)
        head = self._queue[0]
        if running < self._slots or (head.block and not head.crowd):
            return True
        return running < self._overlap and self._queued_rows >= self.max_size

    async def _dispatch_loop(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or not self._may_dispatch():
                wakeup.clear()  # set again by a new job and by every finished call
                await wakeup.wait()
                continue
            if self.max_delay_s > 0 and self._queued_rows < self.max_size:
                await self._fill_window()
            jobs = self._take()
            if not jobs:
                continue
            if self._runs_here(jobs):
                started = time.perf_counter()
                batch = StepBatch(self.runner, jobs)
                batch.run()
                self._learn(batch)
                if self._commit is not None and any(job.commit is not None for job in jobs):
                    self._track(loop.create_task(self._complete(jobs, started)))
                else:
                    self._settle(jobs, started)
                continue
            # Handed to the pool right here, not by a task's first step: the call starts
            # before the callers of the previous one resume (their Python overlaps it).
            started = time.perf_counter()
            batch = StepBatch(self.runner, jobs)
            batch.prepare()
            try:
                call = loop.run_in_executor(self._executor, batch.compute)
            except RuntimeError as exc:  # the pool was shut down: every waiter hears it
                call = loop.create_future()
                call.set_exception(exc)
            task = loop.create_task(self._execute(call, batch, started))
            self._inflight.add(task)
            task.add_done_callback(self._finished)
            self._track(task)

    def _runs_here(self, jobs: list[StepJob]) -> bool:
        """Whether a call runs on the event loop's own thread rather than the pool's:

        - a small call while nothing else runs (a lone stream), up to ``inline_steps``: it
          saves the pool's two thread hand-offs, most of a lone step's latency;
        - a multiplexed message's last block while one other call runs on the pool and
          nothing else waits, when this model's recent calls say it takes at most
          ``inline_block_s``. The loop would otherwise sit idle until both calls are done,
          and the hand-off to a second pool thread, and back, cost more than that thread's
          compute saves (measured on two cores: a 256-session message in two 128-row
          slices ran 12-20 % faster so). While the call runs, the loop serves nothing
          else: hence the bound. A block with ``more`` to follow goes to the pool: the
          loop has their planning to do meanwhile (4,096 sessions in 16 slices, each run
          here as it found the pool busy, left a core idle: 50.0k against 55.7k steps/s).
        """
        if not self._inflight:
            return sum(j.rows * j.steps for j in jobs) <= self.inline_steps
        if self._queue or len(jobs) != 1 or not jobs[0].block or jobs[0].more or jobs[0].crowd:
            return False
        if len(self._inflight) > 1 or self._row_step_s is None:  # both cores busy already
            return False
        return jobs[0].rows * jobs[0].steps * self._row_step_s <= self.inline_block_s

    def _learn(self, batch: StepBatch) -> None:
        """Fold a finished call's time per row-step into the moving average."""
        work = sum(job.rows * job.steps for job in batch.jobs)
        if work and batch.compute_s > 0:
            cost = batch.compute_s / work
            last = self._row_step_s
            self._row_step_s = cost if last is None else 0.8 * last + 0.2 * cost

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finished(self, task: asyncio.Task | None) -> None:
        """A call is over (or its task was cancelled before it started): its slot frees."""
        if task in self._inflight:
            self._inflight.discard(task)  # type: ignore[arg-type]
            if self._wakeup is not None:
                self._wakeup.set()

    async def _fill_window(self) -> None:
        deadline = self._queue[0].enqueued + self.max_delay_s
        while self._queued_rows < self.max_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[StepJob]:
        """Jobs for one call, up to ``max_size`` sequences (a larger block runs alone) and
        ``max_values`` output values, padding to the longest included."""
        jobs: list[StepJob] = []
        rows = longest = 0
        queue = self._queue
        cap, width = self.max_values, self._output_size
        while queue and rows < self.max_size:
            head = queue[0]
            if jobs and (
                rows + head.rows > self.max_size
                or (
                    cap is not None
                    and (rows + head.rows) * max(longest, head.steps) * width > cap
                )
            ):
                break
            job = queue.popleft()
            longest = max(longest, job.steps)
            self._queued_rows -= job.rows
            if not job.future.done():  # skip callers that gave up
                jobs.append(job)
                rows += job.rows
        return jobs

    async def _execute(self, call: asyncio.Future, batch: StepBatch, started: float) -> None:
        jobs = batch.jobs
        try:
            await call
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            for job in jobs:
                job.error = job.error or exc
        else:
            batch.finish()
            self._learn(batch)
        finally:
            # The dispatch loop wakes before the waiters below: the next call starts
            # before they resume, so their Python overlaps it.
            self._finished(asyncio.current_task())
        await self._complete(jobs, started)

    async def _complete(self, jobs: list[StepJob], started: float) -> None:
        """Commit the results that asked for it (one hook call for the whole call), then
        hand every waiter its result or error."""
        if self._commit is not None:
            durable = [
                job
                for job in jobs
                if job.commit is not None and job.error is None and not job.future.done()
            ]
            if durable:
                try:
                    await self._commit(durable)
                except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
                    for job in durable:
                        job.commit_error = job.commit_error or exc
                except BaseException:  # cancelled: so are the commits' waiters ...
                    for job in durable:
                        job.future.cancel()
                    self._settle(jobs, started)  # ... and the call's other jobs hear theirs
                    raise
        self._settle(jobs, started)

    def _settle(self, jobs: list[StepJob], started: float) -> None:
        """Hand each waiter its result or error, and report the batch."""
        # a crowd of one step is a lone stream's step that found the runtime busy
        self._lone = len(jobs) == 1 and (not jobs[0].block or (jobs[0].crowd and jobs[0].rows == 1))
        for job in jobs:
            if job.future.done():
                continue
            if job.commit_error is not None:
                job.future.set_exception(job.commit_error)
            elif job.error is not None:
                job.future.set_exception(
                    InferenceFailed(f"inference failed: {type(job.error).__name__}: {job.error}")
                )
            else:
                job.future.set_result(job.result)
            if job.settled is not None:
                job.settled(job.future)
        if self._observe is not None:
            waits = [started - job.enqueued for job in jobs]
            if any(job.crowd for job in jobs):  # a crowd's steps waited as its single jobs
                waits = [
                    w for job, w in zip(jobs, waits) for _ in range(job.rows if job.crowd else 1)
                ]
            self._observe(BatchStats(sum(job.rows for job in jobs), waits))

    async def close(self) -> None:
        """Refuse new work, finish everything already admitted (queued or in flight), stop.

        A reload swaps a version out this way without failing requests it had accepted.
        """
        self._closed = True
        while self._queue or self._tasks:
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0.001)  # let the dispatch loop pick up the queue
            if self._task is None or self._task.done():
                break
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:  # only if the loop never started or died
            job = self._queue.popleft()
            self._queued_rows -= job.rows
            if not job.future.done():
                job.future.set_exception(ModelNotReady("this model version was unloaded"))
