"""The protocol-neutral data plane: models, predict, sessions, generation.

REST, WebSocket and the Open Inference Protocol only translate to and from these calls.
A step crosses: the API layer -> Engine (ordering, exactly-once, commit) -> StepBatcher
(shared onnxruntime calls) -> the session store.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter

import numpy as np

from service.batching import BatchStats, StepBatcher, StepJob
from service.card import ModelCard
from service.config import Settings
from service.errors import (
    InvalidInput,
    ModelChanged,
    ModelNotReady,
    NotSupported,
    PayloadTooLarge,
    SequenceMismatch,
    ServeError,
    SessionConflict,
    SessionExpired,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
    own_copy,
)
from service.inputs import check_batch, max_steps, sequence_array
from service.metrics import Metrics, note_served_model
from service.repository import ModelRepository, ModelVersion, ReloadReport
from service.sessions import MemorySessionStore, SessionRecord, SessionStore, make_store
from service.sessions.base import copy_state

log = logging.getLogger("service.engine")
_UNKNOWN_OWNER = object()
_COMMIT_ATTEMPTS = 3
_MIN_SPLIT_SLICE = 64
"""A multiplexed round is split into one slice per pool thread only down to slices of
this many items: smaller ones cost more per row than the overlap saves (4 connections of
64 items, bench-lstm: 31.6k -> 37.4k steps/s JSON, 35.2k -> 38.5k binary; one connection
of 64 items: 26.0k -> 27.9k). ``mux_slice_items`` still caps every slice."""
_SESSION_OF = attrgetter("session_id")
_SEQ_OF = attrgetter("seq")
_INPUTS_OF = attrgetter("inputs")
_OWNER_OF = attrgetter("owner")
_MODEL_OF = attrgetter("model", "version", "fingerprint")
_DTYPE_OF = attrgetter("dtype")
_SHAPE_OF = attrgetter("shape")
_F32 = np.dtype(np.float32)


@dataclass(slots=True)
class StepResult:
    outputs: np.ndarray
    record: SessionRecord
    """From ``step_many`` on the memory store, the store's own record, which later steps
    change: read ``step_count`` here, not from it."""
    card: ModelCard | None
    """The card of the model the step ran on (its output names, vocabulary): an answer is
    rendered with it, never with a fresh lookup, which a reload that lands after the
    commit would turn into an error for an applied step."""
    replayed: bool = False
    step_count: int = field(init=False)
    """The session's step count right after this step."""

    def __post_init__(self) -> None:
        self.step_count = self.record.step_count


@dataclass(slots=True)
class StepItem:
    """One session's steps in a multiplexed message."""

    session_id: str
    inputs: object
    """A list of steps (as on the single-session routes) or an array."""
    seq: int | None = None


@dataclass(slots=True)
class _Block:
    """One onnxruntime job of a multiplexed round: items of one model and step count."""

    entry: ModelVersion
    steps: int
    indices: list[int]
    """The items' positions in the message."""
    records: list
    """Their sessions' records (on the memory store, the leased records themselves)."""
    x: np.ndarray
    """Their inputs, stacked: [items, steps, ...]."""
    more: bool = False
    """More slices of its message follow (``StepBatcher.submit_block``)."""


_CONFLICT = object()
"""A crowd's verdict for a step whose session changed since its lease: redo it fresh."""
_ALONE = object()
"""A crowd's verdict when its call failed: run the step alone."""


@dataclass(slots=True)
class _Crowd:
    """Single steps of one model version and length, gathered in one loop turn
    (``Engine._join_crowd``): their records, inputs, ``seq``s and the futures their
    callers wait on. On the memory store (``bulk``) the records are the leased ones, and
    the crowd writes their new states back to the slab itself; on another store they are
    the callers' copies, committed by the batcher's commit hook with the other steps of
    the same call (``Engine._commit_jobs``: one ``commit_many``, on Redis one pipeline)."""

    bulk: MemorySessionStore | None
    entry: ModelVersion
    batcher: StepBatcher
    steps: int
    records: list = field(default_factory=list)
    xs: list = field(default_factory=list)
    seqs: list = field(default_factory=list)
    futures: list = field(default_factory=list)
    counter: object = None
    ys: np.ndarray | None = None
    """Another store's: the outputs of the steps sent to the commit hook (set as it starts:
    from then on the records hold their new states, and the crowd can no longer run
    alone), and ``errors`` their commits' verdicts."""
    errors: list | None = None
    over: bool = False
    """``done`` has run."""

    def part(self, a: int, b: int) -> _Crowd:
        return _Crowd(
            self.bulk, self.entry, self.batcher, self.steps, self.records[a:b],
            self.xs[a:b], self.seqs[a:b], self.futures[a:b], self.counter,
        )  # fmt: skip

    def keep_waited(self) -> list[int] | None:
        """Leave out the steps whose callers gave up (their turns are gone): the positions
        kept, or None when every caller still waits."""
        if not any(map(asyncio.Future.done, self.futures)):
            return None
        keep = [k for k, future in enumerate(self.futures) if not future.done()]
        self.records = [self.records[k] for k in keep]
        self.xs = [self.xs[k] for k in keep]
        self.seqs = [self.seqs[k] for k in keep]
        self.futures = [self.futures[k] for k in keep]
        return keep

    def settle(self, outcomes: list) -> None:
        for future, outcome in zip(self.futures, outcomes):
            if not future.done():
                future.set_result(outcome)

    def done(self, call: asyncio.Future) -> None:
        """The call is over: the steps still waited for are written back to the slab in
        one indexing operation and hear their outputs (or ``_CONFLICT``, ``_ALONE``, their
        error). The batcher calls it as it settles the call (``StepJob.settled``), in the
        same loop turn; the call future's done-callback calls it too, for the ways a call
        ends without being settled (cancelled), and the second call does nothing. An
        error of its own (a bug) goes to every step still waiting, which would otherwise
        wait for ever holding its session's turn."""
        if self.over:
            return
        self.over = True
        try:
            self._done(call)
        except Exception as exc:
            log.exception("a crowd's write-back failed")
            self.settle([own_copy(exc) for _ in self.futures])

    def _done(self, call: asyncio.Future) -> None:
        if self.bulk is None:
            self._committed(call)
            return
        if call.cancelled() or call.exception() is not None:
            self.settle([_ALONE] * len(self.futures))
            return
        ys, states = call.result()
        keep = self.keep_waited()
        if keep is not None:  # callers that gave up meanwhile
            ys, states = ys[keep], states[keep]
        if not self.futures:
            return
        self._answer(ys, self.bulk.advance(self.records, states, self.steps, ys, self.seqs))

    def _answer(self, ys: np.ndarray, errors: list) -> None:
        """Each step's outputs, or ``_CONFLICT`` (its session changed since it was read:
        redo it fresh) or its error, from the write-back's verdicts; the applied steps
        are counted."""
        done = errors.count(None)
        self.settle(
            list(ys)  # the common case: every step applied
            if done == len(errors)
            else [
                y if error is None else _CONFLICT if isinstance(error, SessionConflict) else error
                for y, error in zip(ys, errors)
            ]
        )
        if done:
            self.counter.inc(done * self.steps)  # type: ignore[attr-defined]

    def _committed(self, call: asyncio.Future) -> None:
        """Another store's crowd, once the commit hook has run: each step hears its
        outputs, or ``_CONFLICT`` (another request or replica moved its session first:
        redo it fresh) or its commit's error. A call that failed before the hook runs each
        step alone; after it started, the commits' fate is unknown, so each hears that."""
        if self.ys is None:  # nothing was written
            self.settle([_ALONE] * len(self.futures))
            return
        if self.errors is None:  # the hook failed, or was cancelled, as a whole
            error = None if call.cancelled() else call.exception()
            if error is None:
                error = StoreUnavailable("the step's commit was interrupted; retry it with its seq")
            self.settle([own_copy(error) for _ in self.futures])
            return
        self._answer(self.ys, self.errors)


@dataclass(slots=True)
class GenerateResult:
    generated: list
    """Symbols (symbol mode) or output vectors (value mode), one per generated step."""
    outputs: np.ndarray
    record: SessionRecord
    card: ModelCard | None
    """The card of the model that generated (see ``StepResult.card``)."""
    drawn_from: np.ndarray | None = None
    """[generated, output_size]: the output each generated step was drawn from."""


OnReady = Callable[[list[int], list], None]
"""``step_many``'s listener: (indices of items whose result is now final, the results)."""


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings)
        self.store = store if store is not None else make_store(settings)
        self.metrics = metrics if metrics is not None else Metrics()
        self._workers = max(2, settings.batch_max_inflight)
        """onnxruntime calls that may run at once (all models): the pool's threads."""
        self.executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="ort")
        self._turns = _Turns()
        self._predicting = 0
        """Stateless predictions in progress (they take no session's turn)."""
        self.store.busy = self._busy
        self._bulk = self.store if isinstance(self.store, MemorySessionStore) else None
        """The memory store's slab path for multiplexed steps (other stores: get/commit_many)."""
        self._crowds: dict[tuple[int, int, int], _Crowd] = {}
        """The single steps gathering in this loop turn, by (batcher, steps, slab)."""
        self._crowds_on = settings.batch_crowds and settings.batch_max_size > 1
        """Crowds form: crowds on, and batching on (one row a call: off)."""
        self._tasks: list[asyncio.Task] = []
        self._reload_lock = asyncio.Lock()
        self.started_at = time.time()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        await self.reload()
        self.metrics.bind_sessions(self.store)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sweep_forever()))
        if self.settings.reload_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll_repository()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in self.repository.versions():
            await self._release(entry)
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.repository.loaded_once

    async def reload(self) -> ReloadReport:
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            report, removed = await loop.run_in_executor(self.executor, self.repository.sync)
            for name in report.failed:
                self.metrics.model_load_failures.labels(model=name.split("/")[0]).inc()
            for entry in removed:
                await self._release(entry)
            return report

    async def _release(self, entry: ModelVersion) -> None:
        batcher = entry.extras.pop("batcher", None)
        if batcher is not None:
            # steps that joined a crowd in this turn were accepted: queued before the close,
            # which finishes whatever was queued
            for key in [key for key in self._crowds if key[0] == id(batcher)]:
                self._flush_crowd(key)
            await batcher.close()

    async def _sweep_forever(self) -> None:
        interval = min(max(self.settings.session_ttl_s / 10, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            try:
                expired = await self.store.sweep(time.time())
                if expired:
                    self.metrics.session_expiries.inc(expired)
            except Exception:
                log.warning("session sweep failed", exc_info=True)

    async def _poll_repository(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                await self.reload()
            except Exception:
                log.exception("repository poll failed")

    # -- models ----------------------------------------------------------------------

    def model(self, name: str, version: int | None = None) -> ModelVersion:
        return self.repository.get(name, version)

    def batcher(self, entry: ModelVersion) -> StepBatcher:
        batcher = entry.extras.get("batcher")
        if batcher is None:
            s = self.settings
            assert entry.runner is not None
            batcher = StepBatcher(
                entry.runner,
                self.executor,
                max_size=s.batch_max_size,
                max_delay_s=s.batch_max_delay_ms / 1000.0,
                max_inflight=s.batch_max_inflight,
                max_overlap=self._workers,
                inline_steps=s.batch_inline_steps,
                inline_block_s=s.batch_inline_block_ms / 1000.0,
                max_queue=s.max_queue,
                max_values=s.max_output_values,
                observe=self._observe_batch(entry.name),
                commit=self._commit_jobs,
            )
            entry.extras["batcher"] = batcher
        return batcher

    def _steps_counter(self, entry: ModelVersion):
        counter = entry.extras.get("steps_counter")
        if counter is None:  # labels() costs a lock and a dict lookup: do it once
            counter = entry.extras["steps_counter"] = self.metrics.steps.labels(model=entry.name)
        return counter

    def _observe_batch(self, model: str):
        size = self.metrics.batch_size.labels(model=model)
        wait = self.metrics.queue_wait.labels(model=model)

        def observe(stats: BatchStats) -> None:
            size.observe(stats.size)
            for seconds in stats.queue_wait_s:
                wait.observe(seconds)

        return observe

    # -- batch predict -----------------------------------------------------------

    async def predict(
        self,
        entry: ModelVersion,
        sequences: list[np.ndarray],
        initial_states: list[np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each sequence run from its initial state (zeros by default), as if alone."""
        s = self.settings
        if not sequences:
            raise InvalidInput("inputs is empty: send at least one sequence")
        assert entry.card is not None
        check_batch(s, len(sequences), sum(x.shape[0] for x in sequences), entry.card.output_size)
        assert entry.runner is not None
        if initial_states is None:
            zero = entry.runner.zero_state()
            initial_states = [zero] * len(sequences)
        elif len(initial_states) != len(sequences):
            raise InvalidInput(
                f"{len(initial_states)} initial states for {len(sequences)} sequences"
            )
        self._predicting += 1
        try:
            return await self.batcher(entry).submit_many(list(zip(sequences, initial_states)))
        finally:
            self._predicting -= 1

    # -- sessions ----------------------------------------------------------------

    def _busy(self) -> int:
        """Sessions with a request in progress or waiting (their turns), plus stateless
        predictions in progress: what the store is told (``SessionStore.busy``)."""
        return self._turns.held() + self._predicting

    def _session_lock(self, session_id: str) -> _SessionLock:
        """Requests to one session run one at a time, in arrival order (asyncio.Lock is FIFO)."""
        return _SessionLock(self._turns, session_id)

    async def _owned(
        self, session_id: str, owner: str | None, *, fresh: bool = False
    ) -> SessionRecord:
        """The caller's session; anything not the caller's answers as an unknown id does."""
        try:
            record = await self.store.get(session_id, fresh=fresh)
        except SessionExpired as exc:
            raise _as_seen_by(exc, owner, session_id) from None
        return _claimed(record, owner)

    async def create_session(
        self, entry: ModelVersion, owner: str | None, state: np.ndarray | None = None
    ) -> SessionRecord:
        assert entry.runner is not None
        now = time.time()
        record = SessionRecord(
            session_id=secrets.token_urlsafe(16),
            model=entry.name,
            version=entry.version,
            state=entry.runner.zero_state() if state is None else state,
            created_at=now,
            last_used=now,
            owner=owner,
            fingerprint=entry.digest,
        )
        try:
            await self.store.create(record)
        except TooManySessions:
            self.metrics.session_refusals.inc()
            raise
        self.metrics.sessions_created.labels(model=entry.name).inc()
        return record

    @staticmethod
    def sequence_session_id(owner: str | None, model: str, sequence_id: int | str) -> str:
        """The session behind a Triton sequence (API key, model, sequence id): the same on
        every replica and every protocol (HTTP v2 and gRPC share sequences)."""
        kind = "u" if isinstance(sequence_id, int) else "s"
        key = f"{owner or ''}\x00{model}\x00{kind}:{sequence_id}".encode()
        return "seq-" + hashlib.sha256(key).hexdigest()[:32]

    async def sequence_step(
        self,
        entry: ModelVersion | None,
        owner: str | None,
        session_id: str,
        inputs: object,
        *,
        start: bool,
        end: bool,
        seq: int | None = None,
        parse=None,
    ) -> StepResult:
        """One request of a Triton sequence, as ONE operation under the session's lock and
        ONE store commit.

        - ``start``: validate everything (inputs, ``seq`` against a zero-state start), run
          the steps from the zero state on ``entry``, then create the session or replace a
          live one of that id with a fresh record (compare-and-set over its revision).
        - ``end``: the steps and the release of the session are one commit.
        - neither: a plain step on the session's own model (``entry`` is only used by
          START and may be None otherwise); an unknown id raises SessionNotFound, so a
          request queued behind an END is refused like any request without START.

        A rejected request of any kind changes nothing.
        """
        async with self._session_lock(session_id):
            if start:
                assert entry is not None
                return await self._restart(entry, owner, session_id, inputs, end, seq, parse)
            if not end:
                return await self._plain_step(session_id, owner, inputs, seq, parse)
            return await self._advance(session_id, owner, inputs, seq, parse, release=True)

    async def _restart(
        self,
        entry: ModelVersion,
        owner: str | None,
        session_id: str,
        inputs: object,
        release: bool,
        seq: int | None,
        parse,
    ) -> StepResult:
        assert entry.runner is not None
        x = (parse or self._parse)(entry.card, inputs)
        steps = x.shape[0]
        if seq is not None and seq != steps:
            raise SequenceMismatch(
                f"seq {seq} does not follow a START: the sequence restarts at step_count 0, "
                f"so {steps} steps need seq {steps}",
                step_count=0,
            )
        y, state = await self.batcher(entry).submit(x, entry.runner.zero_state())
        fresh = False
        for _ in range(_COMMIT_ATTEMPTS):
            try:
                current: SessionRecord | None = await self.store.get(session_id, fresh=fresh)
            except (SessionNotFound, SessionExpired):
                current = None
            if current is not None and current.owner != owner:
                raise SessionConflict("this sequence id is in use; retry it")
            now = time.time()
            record = SessionRecord(
                session_id=session_id,
                model=entry.name,
                version=entry.version,
                state=state,
                created_at=now,
                last_used=now,
                owner=owner,
                fingerprint=entry.digest,
            )
            _remember(record, steps, y, seq)
            try:
                if current is None:
                    if release:  # START+END on an unknown id: nothing to store
                        record.revision = 1
                    else:
                        await self.store.create(record)
                else:  # a compare-and-set over the live one's revision and incarnation
                    record.revision = current.revision
                    record.created_at = current.created_at
                    await self.store.commit(record, release=release)
            except SessionConflict:
                fresh = True  # created or moved by another request: re-read and retry
                continue
            except TooManySessions:
                self.metrics.session_refusals.inc()
                raise
            except (SessionNotFound, SessionExpired):
                fresh = True  # vanished between our read and commit: create it instead
                continue
            self.metrics.sessions_created.labels(model=entry.name).inc()
            self._steps_counter(entry).inc(steps)
            return StepResult(y, record, entry.card)
        raise SessionConflict("the session kept being re-created by other requests; retry it")

    async def check_session(self, session_id: str, owner: str | None) -> None:
        """Raise what a request on the session would meet first (unknown, expired, another
        owner's), changing nothing: not even its last use."""
        await self._owned(session_id, owner)

    async def session(self, session_id: str, owner: str | None) -> SessionRecord:
        # fresh: what a client reads back must not come from this replica's cached copy
        record = await self._owned(session_id, owner, fresh=True)
        now = time.time()
        await self.store.touch(session_id, now)
        record.last_used = now
        return record

    def session_model(self, record: SessionRecord) -> ModelVersion:
        """The exact model the session was created on (sessions never switch models)."""
        return self.repository.for_session(record.model, record.version, record.fingerprint)

    async def step(
        self,
        session_id: str,
        owner: str | None,
        inputs: object,
        seq: int | None = None,
        parse=None,
    ) -> StepResult:
        """Advance the session by exactly the given steps, or replay a retried ``seq``.

        ``parse(card, inputs) -> np.ndarray`` validates the inputs against the session's
        model before anything changes; by default ``service.inputs.sequence_array`` does,
        for lists of steps (numbers or symbols) and arrays alike.
        """
        turns = self._turns  # the session's turn, as _session_lock takes it, minus two awaits
        future = turns.enter(session_id)
        if future is not None:
            await turns.wait(session_id, future)
        try:
            return await self._plain_step(session_id, owner, inputs, seq, parse)
        finally:
            turns.leave(session_id)

    def _plain_step(
        self, session_id: str, owner: str | None, inputs: object, seq: int | None, parse
    ) -> Awaitable[StepResult]:
        """A step that neither starts nor ends its session, its turn held (``step``, and a
        Triton sequence's plain request): on the memory store the leased record, its slab
        row read in place, concurrent steps run as one crowd; else ``_advance``. Returns
        the coroutine itself, so the hot path awaits no extra frame."""
        if self._bulk is not None:
            return self._advance_leased(self._bulk, session_id, owner, inputs, seq, parse)
        return self._advance(session_id, owner, inputs, seq, parse, release=False)

    async def _advance_leased(
        self,
        bulk: MemorySessionStore,
        session_id: str,
        owner: str | None,
        inputs: object,
        seq: int | None,
        parse,
    ) -> StepResult:
        """``_advance`` on the memory store, under the session's lock, without copies: the
        stored record is leased, its slab row read in place (run inline when the runtime
        is idle) and the new state written back with one assignment. A ``seq`` that is
        not the next one (a replay or a mismatch) and a lease broken meanwhile (the
        session expired during a queued call) go through ``_advance``, which decides
        them exactly as on any store."""
        try:
            record = _claimed(bulk.lease_one(session_id), owner)
        except SessionExpired as exc:
            raise _as_seen_by(exc, owner, session_id) from None
        try:
            entry = self.session_model(record)
        except (ModelChanged, ModelNotReady):
            if seq is None:
                raise
            # perhaps the retry of a step applied before the reload: decided by _advance
            return await self._advance(session_id, owner, inputs, seq, parse, release=False)
        x = (parse or self._parse)(entry.card, inputs)
        steps = x.shape[0]
        if seq is not None and seq != record.step_count + steps:
            return await self._advance(session_id, owner, inputs, seq, parse, release=False)
        batcher = self.batcher(entry)
        if batcher.can_run_inline(steps):
            y, state = batcher.run_inline(x, bulk.state_row(record))
        else:
            if self._crowds_on:
                outcome = await self._join_crowd(bulk, batcher, entry, record, x, seq)
                if type(outcome) is np.ndarray:
                    return StepResult(outcome, record, entry.card)
                if outcome is _CONFLICT:
                    return await self._advance(session_id, owner, inputs, seq, parse, release=False)
                if isinstance(outcome, BaseException):
                    raise outcome
                # _ALONE: the crowd's call failed; alone, a bad step fails by itself
            y, state = await batcher.submit(x, copy_state(bulk.state_row(record)))
        try:
            bulk.advance_one(record, state, steps, y, seq)
        except SessionConflict:
            return await self._advance(session_id, owner, inputs, seq, parse, release=False)
        self._steps_counter(entry).inc(steps)
        return StepResult(y, record, entry.card)

    def _join_crowd(
        self,
        bulk: MemorySessionStore | None,
        batcher: StepBatcher,
        entry: ModelVersion,
        record,
        x: np.ndarray,
        seq: int | None,
    ) -> asyncio.Future:
        """A leased step's place in this loop turn's crowd of its model and length
        (``RNNSERVE_BATCH_CROWDS``). The single steps of many sessions (one per connection,
        say) that arrive together run as one block: their states gathered from the slab
        and written back with one indexing operation each, their records accounted in
        bulk, where each would otherwise be a job of its own through the batcher and the
        store (256 WebSocket streams of LSTM 2x256, in turns: 9,700 -> 13,100 steps/s
        with binary frames, 8,600 -> 12,000 with JSON). The caller holds the session's
        turn and has checked its ``seq``. The future's outcome: the step's outputs once
        applied, ``_CONFLICT`` (the session changed since its lease), ``_ALONE`` (the
        crowd's call failed: run it alone) or the error to raise."""
        key = (id(batcher), x.shape[0], id(record.slab) if bulk is not None else 0)
        crowd = self._crowds.get(key)
        loop = asyncio.get_running_loop()
        if crowd is None:
            crowd = self._crowds[key] = _Crowd(bulk, entry, batcher, x.shape[0])
            loop.call_soon(self._flush_crowd, key)
        future = loop.create_future()
        crowd.records.append(record)
        crowd.xs.append(x)
        crowd.seqs.append(seq)
        crowd.futures.append(future)
        return future

    def _flush_crowd(self, key: tuple[int, int, int]) -> None:
        """The crowd's blocks to the batcher, at the end of the loop turn it gathered in
        (or before its batcher closes: then the turn's call finds it gone)."""
        crowd = self._crowds.pop(key, None)
        if crowd is None:
            return
        try:
            self._queue_crowd(crowd)
        except Exception:  # a bug: nothing was written yet, so each step may run alone
            log.exception("a crowd of steps could not be queued")
            crowd.settle([_ALONE] * len(crowd.futures))

    def _queue_crowd(self, crowd: _Crowd) -> None:
        crowd.keep_waited()
        crowd.counter = self._steps_counter(crowd.entry)
        batcher, n = crowd.batcher, len(crowd.futures)
        size = batcher.rows_per_call(crowd.steps)
        for a in range(0, n, size):
            part = crowd if a == 0 and n <= size else crowd.part(a, a + size)
            try:
                if part.bulk is not None:
                    job = batcher.submit_crowd(_stack(part.xs), part.bulk.gather(part.records))
                else:  # committed by the commit hook, with the rest of its call
                    states = _stack([record.state for record in part.records])
                    job = batcher.submit_crowd(_stack(part.xs), states, commit=part)
            except ServeError as exc:  # refused (overloaded, unloaded): each step hears it
                part.settle([own_copy(exc) for _ in part.futures])
                continue
            # Settled in the batcher's own turn: a done-callback waits for the next turn,
            # behind a whole cohort's answers at 256 streams (a call_soon waited 0.3-0.6 ms
            # at p50, 3-4 ms at p90), probably with the slab rows and outputs out of the
            # cache by then. In turns, 256 WS streams on the memory store: mem-lstm binary
            # +7.5 %, bench-lstm JSON +15 % steps/s.
            job.settled = part.done
            job.future.add_done_callback(part.done)  # type: ignore[union-attr]

    async def _advance(
        self,
        session_id: str,
        owner: str | None,
        inputs: object,
        seq: int | None,
        parse,
        *,
        release: bool,
    ) -> StepResult:
        """The body of a step, under the session's lock; ``release`` ends the session in
        the same commit. A possibly cached record is re-read fresh before any decision a
        stale copy could get wrong (a replay, a seq_mismatch, a retry after a conflict)."""
        fresh = False
        for _ in range(_COMMIT_ATTEMPTS + 1):
            record = await self._owned(session_id, owner, fresh=fresh)
            try:
                entry = self.session_model(record)
            except (ModelChanged, ModelNotReady) as exc:
                if seq is None:
                    raise
                if not fresh:
                    fresh = True
                    continue
                return await self._replay_without_model(record, inputs, seq, parse, release, exc)
            x = (parse or self._parse)(entry.card, inputs)
            try:
                replay = self._check_seq(record, seq, x.shape[0])
            except SequenceMismatch:
                if fresh:
                    raise
                fresh = True
                continue
            if replay is not None:
                if not fresh:
                    fresh = True
                    continue
                if release:  # END retried after its steps were applied: end it now
                    await self.store.commit(record, release=True)
                return StepResult(replay, record, entry.card, replayed=True)
            batcher = self.batcher(entry)
            try:
                if (
                    self._crowds_on
                    and self._bulk is None
                    and not release
                    and not batcher.can_run_inline(x.shape[0])
                ):
                    outcome = await self._join_crowd(None, batcher, entry, record, x, seq)
                    if type(outcome) is np.ndarray:
                        return StepResult(outcome, record, entry.card)
                    if outcome is _CONFLICT:
                        fresh = True
                        continue
                    if isinstance(outcome, BaseException):
                        raise outcome
                    # _ALONE: the crowd's call failed; alone, a bad step fails by itself
                y, _ = await batcher.submit(x, record.state, commit=(record, seq, release))
            except SessionConflict:
                fresh = True  # another replica moved first: re-read and re-check seq
                continue
            self._steps_counter(entry).inc(x.shape[0])
            return StepResult(y, record, entry.card)
        raise SessionConflict("the session kept changing under this request; retry it")

    async def _replay_without_model(
        self,
        record: SessionRecord,
        inputs: object,
        seq: int,
        parse,
        release: bool,
        error: ServeError,
    ) -> StepResult:
        """The retry of a session's last applied request after its model was replaced or
        removed (``error``, from ``session_model``): the stored answer, parsed against the
        card the session was created on, so exactly-once holds across a reload. Anything
        else raises ``error``: such a session cannot take a new step."""
        try:
            card = self.repository.card_for_session(record.model, record.version, record.fingerprint)
            replay = self._check_seq(record, seq, (parse or self._parse)(card, inputs).shape[0])
        except ServeError:
            raise error from None
        if replay is None:
            raise error
        if release:  # END retried after its steps were applied: end it now
            await self.store.commit(record, release=True)
        return StepResult(replay, record, card, replayed=True)

    async def _commit_jobs(self, jobs: list[StepJob]) -> None:
        """The batcher's commit hook: the records of one onnxruntime call's steps, each
        advanced by its result, committed with one ``commit_many`` (on Redis, one
        pipeline: one round trip per call, not per session). A crowd's steps are among
        them, each with its own verdict (``_Crowd.errors``), less those whose callers
        gave up meanwhile: nothing is written for them."""
        records: list[SessionRecord] = []
        release: list[bool] = []
        for job in jobs:
            if job.crowd:
                crowd: _Crowd = job.commit  # type: ignore[assignment]
                ys, states = job.result  # type: ignore[misc]
                keep = crowd.keep_waited()
                if keep is not None:
                    ys, states = ys[keep], states[keep]
                crowd.ys = ys
                for record, y, state, seq in zip(crowd.records, ys, states, crowd.seqs):
                    record.state = state
                    _remember(record, crowd.steps, y, seq)
                    records.append(record)
                    release.append(False)
                continue
            record, seq, end = job.commit  # type: ignore[misc]
            y, record.state = job.result  # type: ignore[misc]
            _remember(record, y.shape[0], y, seq)
            records.append(record)
            release.append(end)
        errors = await self.store.commit_many(records, release)
        at = 0
        for job in jobs:
            if not job.crowd:
                job.commit_error = errors[at]
                at += 1
                continue
            crowd = job.commit  # type: ignore[assignment]
            crowd.errors = errors[at : at + len(crowd.records)]
            at += len(crowd.records)

    # -- multiplexed steps --------------------------------------------------------------

    async def step_many(
        self, owner: str | None, items: list[StepItem], on_ready: OnReady | None = None
    ) -> list[StepResult | ServeError]:
        """Steps for many sessions (of any models) at once, each exactly as ``step`` would
        apply it alone: exactly-once ``seq``, ownership and limits per item, and items of
        one session applied in message order. One bad item fails only itself (its error is
        its result). The work per batch is a few bulk operations: one store read and one
        store commit per round, one onnxruntime job per (model, length) block.

        ``on_ready(indices, results)`` hears of items whose result is final as soon as
        their block is done (while later blocks still run), so an answer can be prepared
        piece by piece; items it does not hear of are final when this returns.
        """
        s = self.settings
        if not items:
            return []
        if len(items) > s.max_multiplex_items:
            raise PayloadTooLarge(
                f"{len(items)} items exceed the limit of {s.max_multiplex_items} per message",
                limit=s.max_multiplex_items,
            )
        ids = list(map(_SESSION_OF, items))
        keys = list(dict.fromkeys(ids))  # each session once, in message order
        # The k-th item of each session runs in round k: rounds keep per-session order.
        rounds: list[list[int]] = [list(range(len(items)))]
        if len(keys) < len(ids):
            rounds = [[]]
            seen: dict[str, int] = {}
            for i, session_id in enumerate(ids):
                k = seen.get(session_id, 0)
                seen[session_id] = k + 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append(i)
        turns = self._turns
        waiting = turns.enter_many(keys)
        results: list = [None] * len(items)
        budget = _Budget(s.max_output_values)
        try:
            for _, future in waiting:
                await future
            for indices in rounds:
                await self._step_round(owner, items, indices, results, on_ready, budget)
        except BaseException:
            pending = dict(waiting)
            for key in keys:
                turns.abandon(key, pending.get(key))
            raise
        turns.leave_many(keys)
        return results

    async def _step_round(
        self,
        owner: str | None,
        items: list[StepItem],
        indices: list[int],
        results: list,
        on_ready: OnReady | None,
        budget: _Budget,
    ) -> None:
        """At most one item per session, every session's turn held."""
        slow: list[int] = []  # through the single-session path (fresh reads, retries)
        bulk = self._bulk
        if bulk is not None:
            await self._pipeline(bulk, owner, items, indices, results, slow, on_ready, budget)
        else:
            ids = [items[i].session_id for i in indices]
            records = await self.store.get_many(ids)
            jobs = self._plan(owner, items, indices, records, results, slow, budget)
            outcomes = await asyncio.gather(
                *(self._run_block(block) for block in jobs), return_exceptions=True
            )
            await self._commit_round(items, jobs, outcomes, results, slow, on_ready)
        for i in sorted(slow):
            item = items[i]
            if item.session_id in budget.refused:  # an earlier item of it was refused
                results[i] = budget.error(i)
                continue
            try:
                result = await self._advance(
                    item.session_id, owner, item.inputs, item.seq, None, release=False
                )
            except ServeError as exc:
                results[i] = exc
                continue
            # A replay not counted yet (planned without a parse) changed nothing: over the
            # budget, it may be answered with the error instead.
            if result.replayed and not budget.take(i, item.session_id, result.outputs.size):
                results[i] = budget.error(i)
            else:
                results[i] = result

    async def _pipeline(
        self,
        bulk: MemorySessionStore,
        owner: str | None,
        items: list[StepItem],
        indices: list[int],
        results: list,
        slow: list,
        on_ready: OnReady | None,
        budget: _Budget,
    ) -> None:
        """The memory store's round as a pipeline of slices of at most ``mux_slice_items``
        (and at least one per pool thread, of ``_MIN_SPLIT_SLICE`` items or more): each
        slice's blocks go to the runtime as soon as they are planned, so the next slice is
        planned, and the answers of a finished call written back, while calls run (the
        event loop's Python overlaps onnxruntime's calls on their threads, and the calls
        of one message overlap each other)."""
        size = min(
            self.settings.mux_slice_items,
            max(_MIN_SPLIT_SLICE, -(-len(indices) // self._workers)),
        )
        running: list[asyncio.Future] = []
        try:
            for k, a in enumerate(range(0, len(indices), size)):
                part = indices[a : a + size]
                leased = bulk.lease([items[i].session_id for i in part])
                more = a + size < len(indices)
                for job in self._plan(owner, items, part, leased, results, slow, budget):
                    job.more = more
                    running.append(
                        asyncio.ensure_future(
                            self._run_leased(bulk, job, items, results, slow, on_ready)
                        )
                    )
                if a + size < len(indices) and k < self._workers:
                    # The dispatcher takes the slice's blocks: each pool thread starts its
                    # first call at once. The later slices are planned back to back and
                    # queue for the pool (yielding after each let the write-backs of
                    # finished slices run first, and the pool went short of work).
                    await asyncio.sleep(0)
            await asyncio.gather(*running)
        except BaseException:
            for task in running:
                task.cancel()
            raise

    def _plan(
        self,
        owner: str | None,
        items: list[StepItem],
        indices: list[int],
        records: list,
        results: list,
        slow: list,
        budget: _Budget,
    ) -> list[_Block]:
        """The onnxruntime jobs of a round's items, one per (model, length) block of at
        most ``batch_max_size``; an item that fails gets its error in ``results``, one that
        needs a fresh read goes to ``slow``."""
        uniform = self._plan_uniform(owner, items, indices, records, budget)
        if uniform is not None:
            return uniform
        by_entry: dict[int, tuple[ModelVersion, list]] = {}
        models: dict[tuple, ModelVersion] = {}
        last_key: tuple | None = None  # most messages are of one model: its group, at hand
        members: list = []
        for i, record in zip(indices, records):
            if isinstance(record, BaseException):
                results[i] = (
                    SessionNotFound(f"no session {items[i].session_id}")
                    if _hides(record, owner)
                    else _as_error(record)
                )
                continue
            if record.owner != owner:
                results[i] = SessionNotFound(f"no session {record.session_id}")
                continue
            key = (record.model, record.version, record.fingerprint)
            if key != last_key:
                entry = models.get(key)
                if entry is None:
                    try:
                        entry = models[key] = self.session_model(record)
                    except ServeError as exc:
                        if items[i].seq is None:
                            results[i] = exc
                        else:  # perhaps the retry of a step applied before the reload
                            slow.append(i)
                        continue
                group = by_entry.get(id(entry))
                if group is None:
                    group = by_entry[id(entry)] = (entry, [])
                last_key, members = key, group[1]
            members.append((i, record))
        jobs = []
        size = self.settings.batch_max_size
        for entry, members in by_entry.values():
            xs = self._parse_many(entry, [items[i].inputs for i, _ in members], results, members)
            width = entry.card.output_size if entry.card is not None else 1
            blocks: dict[int, list] = {}
            for (i, record), x in zip(members, xs):
                if x is None:
                    continue
                if not budget.take(i, items[i].session_id, x.shape[0] * width):  # replays too
                    results[i] = budget.error(i)
                    continue
                seq = items[i].seq
                if seq is not None and seq != record.step_count + x.shape[0]:
                    slow.append(i)  # a replay or a mismatch: decided on a fresh read
                    continue
                blocks.setdefault(x.shape[0], []).append((i, record, x))
            for steps, block in blocks.items():
                for a in range(0, len(block), size):
                    part = block[a : a + size]
                    jobs.append(
                        _Block(
                            entry,
                            steps,
                            [i for i, _, _ in part],
                            [record for _, record, _ in part],
                            _stack([x for _, _, x in part]),
                        )
                    )
        return jobs

    def _plan_uniform(
        self,
        owner: str | None,
        items: list[StepItem],
        indices: list[int],
        records: list,
        budget: _Budget,
    ) -> list[_Block] | None:
        """``_plan`` for a round whose items are all alike, the common multiplexed message:
        every session found and the caller's, all of one model, no ``seq``, inputs of one
        shape, all within the budget. Checked and planned in a few bulk operations, without
        Python per item; None, having changed nothing, when any item is not so (``_plan``
        then decides item by item, and words each item's error)."""
        if not records or any(issubclass(t, BaseException) for t in set(map(type, records))):
            return None
        if set(map(_OWNER_OF, records)) != {owner} or len(set(map(_MODEL_OF, records))) != 1:
            return None
        chosen = list(map(items.__getitem__, indices))
        if list(map(_SEQ_OF, chosen)).count(None) != len(chosen):
            return None
        try:
            entry = self.session_model(records[0])
        except ServeError:
            return None
        card = entry.card
        if card is None or card.token_inputs:
            return None
        x = self._stack_uniform(card, list(map(_INPUTS_OF, chosen)))
        if x is None:
            return None
        steps = x.shape[1]
        values = len(indices) * steps * card.output_size
        if budget.refused or values > budget.left or not budget.counted.isdisjoint(indices):
            return None
        budget.left -= values
        budget.counted.update(indices)
        size = self.settings.batch_max_size
        return [
            _Block(entry, steps, indices[a : a + size], records[a : a + size], x[a : a + size])
            for a in range(0, len(indices), size)
        ]

    def _stack_uniform(self, card: ModelCard, inputs: list) -> np.ndarray | None:
        """Inputs of one shape (float32 arrays from binary frames, or lists of lists of
        numbers from JSON) as one float32 [items, steps, input_size] array, when every one
        is valid; None when any is not, or when they differ in shape."""
        width, limit = card.input_size, max_steps(card, self.settings)
        kinds = set(map(type, inputs))
        if kinds == {np.ndarray}:
            if set(map(_DTYPE_OF, inputs)) != {_F32}:
                return None
            shapes = set(map(_SHAPE_OF, inputs))
            if len(shapes) != 1:
                return None
            shape = shapes.pop()
            if len(shape) != 2 or shape[1] != width or not 0 < shape[0] <= limit:
                return None
            x = _stack(inputs)
        elif kinds == {list}:
            try:
                if set(map(type, chain.from_iterable(inputs))) != {list}:
                    return None
                if not set(map(type, chain.from_iterable(chain.from_iterable(inputs)))) <= _NUMBER_TYPES:
                    return None
                with np.errstate(over="ignore"):
                    x = np.array(inputs, np.float32)
            except (TypeError, ValueError, OverflowError):
                return None
            if x.ndim != 3 or x.shape[2] != width or not 0 < x.shape[1] <= limit:
                return None
        else:
            return None
        return x if np.isfinite(x).all() else None

    async def _run_leased(
        self,
        bulk,
        block: _Block,
        items: list[StepItem],
        results: list,
        slow: list,
        on_ready: OnReady | None,
    ) -> None:
        """The memory store's path for one block: its states gathered with one indexing
        operation, run, and written back with one as soon as its call returns (while the
        next block's call runs)."""
        entry, steps, indices, leased = block.entry, block.steps, block.indices, block.records
        try:
            states = bulk.gather(leased)
            ys, states = await self.batcher(entry).submit_block(block.x, states, more=block.more)
        except Exception:  # noqa: BLE001 - isolate the failing item, if any
            slow.extend(indices)
            return
        seqs = list(map(_SEQ_OF, map(items.__getitem__, indices)))
        errors = bulk.advance(leased, states, steps, ys, seqs)
        done, final = self._settle_leased(block, ys, errors, results, slow)
        if done:
            self._steps_counter(entry).inc(done * steps)
        if on_ready is not None and final:
            on_ready(final, results)

    @staticmethod
    def _settle_leased(
        block: _Block, ys: np.ndarray, errors: list, results: list, slow: list
    ) -> tuple[int, list[int]]:
        """A block's results after its write-back: (items done, items final)."""
        card = block.entry.card
        if errors.count(None) == len(errors):  # the common case: every lease held
            for i, y, record in zip(block.indices, ys, block.records):
                results[i] = StepResult(y, record, card)
            return len(block.indices), block.indices
        done = 0
        final: list[int] = []
        for i, record, y, error in zip(block.indices, block.records, ys, errors):
            if error is None:
                results[i] = StepResult(y, record, card)
                done += 1
            elif isinstance(error, SessionConflict):
                slow.append(i)  # changed since its lease: re-read and redo
                continue
            else:
                results[i] = _as_error(error)
            final.append(i)
        return done, final

    async def _commit_round(
        self,
        items: list[StepItem],
        jobs: list,
        outcomes: list,
        results: list,
        slow: list,
        on_ready: OnReady | None,
    ) -> None:
        """Any store: the round's records committed with one ``commit_many``."""
        committed: list[SessionRecord] = []
        placed: list[tuple[int, np.ndarray, ModelVersion]] = []
        for block, outcome in zip(jobs, outcomes):
            if isinstance(outcome, BaseException):
                slow.extend(block.indices)  # isolate the failing item, if any
                continue
            ys, states = outcome
            for i, record, y, state in zip(block.indices, block.records, ys, states):
                record.state = state
                _remember(record, block.steps, y, items[i].seq)
                committed.append(record)
                placed.append((i, y, block.entry))
        if committed:
            errors = await self.store.commit_many(committed)
            counted: dict[int, list] = {}
            final: list[int] = []
            for (i, y, entry), record, error in zip(placed, committed, errors):
                if error is None:
                    results[i] = StepResult(y, record, entry.card)
                    tally = counted.setdefault(id(entry), [entry, 0])
                    tally[1] += y.shape[0]
                elif isinstance(error, SessionConflict):
                    slow.append(i)  # another replica moved first: re-read and redo
                    continue
                else:
                    results[i] = _as_error(error)
                final.append(i)
            for entry, n in counted.values():
                self._steps_counter(entry).inc(n)
            if on_ready is not None and final:
                on_ready(final, results)

    async def _run_block(self, block: _Block) -> tuple[np.ndarray, np.ndarray]:
        states = _stack([record.state for record in block.records])
        return await self.batcher(block.entry).submit_block(block.x, states)

    def _parse_many(
        self, entry: ModelVersion, inputs: list, results: list, members: list
    ) -> list[np.ndarray | None]:
        """Validated arrays for many items of one model, None where the item failed (its
        error stored in ``results``). Plain numeric lists are converted in one numpy call
        after a C-speed type check; anything else goes through the item-by-item parser, so
        errors read the same as on the single-session routes."""
        card = entry.card
        out: list[np.ndarray | None] = [None] * len(inputs)
        pending = list(range(len(inputs)))
        if card is not None and not card.token_inputs:
            if type(inputs[0]) is np.ndarray:
                pending = self._parse_arrays(card, inputs, out)
            else:
                pending = self._parse_plain(card, inputs, out)
        for k in pending:
            try:
                out[k] = self._parse(card, inputs[k])
            except ServeError as exc:
                results[members[k][0]] = exc
        return out

    def _parse_arrays(self, card, inputs: list, out: list) -> list[int]:
        """float32 [steps, input_size] arrays (binary frames): checked in one pass."""
        width, limit = card.input_size, max_steps(card, self.settings)
        good: list[int] = []
        rest: list[int] = []
        for k, x in enumerate(inputs):
            if (
                type(x) is np.ndarray
                and x.dtype == np.float32
                and x.ndim == 2
                and x.shape[1] == width
                and 0 < x.shape[0] <= limit
            ):
                good.append(k)
            else:
                rest.append(k)
        if good:
            finite = np.isfinite(np.concatenate([inputs[k] for k in good])).all(axis=1)
            if finite.all():
                for k in good:
                    out[k] = inputs[k]
            else:
                row = 0
                for k in good:
                    n = inputs[k].shape[0]
                    if finite[row : row + n].all():
                        out[k] = inputs[k]
                    else:
                        rest.append(k)  # the item parser words the error
                    row += n
        return rest

    def _parse_plain(self, card, inputs: list, out: list) -> list[int]:
        width = card.input_size
        limit = max_steps(card, self.settings)
        plain: list[int] = []
        rest: list[int] = []
        rows: list = []
        for k, steps in enumerate(inputs):
            if type(steps) is list and (
                # one step, the multiplexed common case, without a generator per item
                (len(steps) == 1 and type(steps[0]) is list and len(steps[0]) == width)
                or (
                    1 < len(steps) <= limit
                    and all(type(step) is list and len(step) == width for step in steps)
                )
            ):
                plain.append(k)
                rows.extend(steps)
            else:
                rest.append(k)
        if not plain:
            return rest
        if not set(map(type, chain.from_iterable(rows))) <= _NUMBER_TYPES:
            return sorted(rest + plain)
        try:
            with np.errstate(over="ignore"):
                flat = np.array(rows, np.float32)
        except (OverflowError, ValueError):
            return sorted(rest + plain)
        finite = np.isfinite(flat).all(axis=1)
        row = 0
        bad = not finite.all()
        for k in plain:
            n = len(inputs[k])
            if bad and not finite[row : row + n].all():
                rest.append(k)  # the item parser words the error
            else:
                out[k] = flat[row : row + n]
            row += n
        return rest

    def _parse(self, card, steps: object) -> np.ndarray:
        return sequence_array(card, steps, self.settings)

    @staticmethod
    def _check_seq(record: SessionRecord, seq: int | None, steps: int) -> np.ndarray | None:
        if seq is None:
            return None
        if (
            seq == record.step_count
            and record.last_seq == seq
            and record.last_outputs
            and record.last_outputs_shape[:1] == (steps,)
        ):
            # A retry of the request just applied: its answer was lost, not its steps.
            return np.frombuffer(record.last_outputs, np.float32).reshape(record.last_outputs_shape)
        if seq != record.step_count + steps:
            raise SequenceMismatch(
                f"seq {seq} does not follow the session's step_count {record.step_count} "
                f"plus {steps} steps, nor repeat the last applied request",
                step_count=record.step_count,
            )
        return None

    async def reset(self, session_id: str, owner: str | None) -> SessionRecord:
        async with self._session_lock(session_id):
            for _ in range(_COMMIT_ATTEMPTS):
                record = await self._owned(session_id, owner)
                entry = self.session_model(record)
                assert entry.runner is not None
                record.state = entry.runner.zero_state()
                record.step_count = 0
                record.last_seq, record.last_outputs, record.last_outputs_shape = None, None, ()
                try:
                    await self.store.commit(record)
                except SessionConflict:
                    continue
                return record
        raise SessionConflict("the session kept changing under this request; retry it")

    async def delete(self, session_id: str, owner: str | None) -> None:
        async with self._session_lock(session_id):
            await self._owned(session_id, owner)
            await self.store.delete(session_id)

    async def generate(
        self,
        session_id: str,
        owner: str | None,
        steps: int,
        temperature: float = 1.0,
        seed: int | None = None,
        prime: object = None,
        parse=None,
    ) -> GenerateResult:
        """Run the model on its own outputs for ``steps`` steps, advancing the session.

        The state ends having consumed the prime and every generated step, so a later
        request continues right after the last generated value.
        """
        if not 1 <= steps <= self.settings.max_generate_steps:
            raise InvalidInput(f"steps must be between 1 and {self.settings.max_generate_steps}")
        if temperature < 0 or not np.isfinite(temperature):
            raise InvalidInput("temperature must be a finite number >= 0")
        if seed is not None and seed < 0:
            raise InvalidInput("seed must be an integer >= 0")
        rng = np.random.default_rng(seed)
        async with self._session_lock(session_id):
            # fresh: generation commits once without a retry, so start from the stored state
            record = await self._owned(session_id, owner, fresh=True)
            entry = self.session_model(record)
            card = entry.card
            assert card is not None and entry.runner is not None
            if card.generation is None:
                raise NotSupported(
                    f"model {card.name!r} cannot feed its output back (its card has no generation)"
                )
            if steps * card.output_size > self.settings.max_output_values:
                raise InvalidInput(
                    f"steps must be at most {self.settings.max_output_values // card.output_size} "
                    f"for this model: {steps} steps answer {steps * card.output_size} values "
                    f"({card.output_size} per step), over RNNSERVE_MAX_OUTPUT_VALUES"
                )
            x: np.ndarray | None = None
            last: np.ndarray | None = None
            if prime is not None:
                x = (parse or self._parse)(card, prime)
            elif record.step_count > 0 and record.last_outputs:
                # Continue from the model's last answer: its prediction of the next step.
                last = np.frombuffer(record.last_outputs, np.float32)[-card.output_size :]
            elif card.generation.mode == "symbol" and card.generation.start_symbol is not None:
                x = _symbol_input(card, card.vocabulary.index(card.generation.start_symbol))
            else:
                raise InvalidInput(
                    "send a prime sequence: this session has no previous output to continue from"
                )
            batcher = self.batcher(entry)
            state, fed = record.state, 0
            stop = _EndSymbol(card, x)
            if x is not None:
                y, state = await batcher.submit(x, state)
                fed, last = x.shape[0], y[-1]
            generated: list = []
            outputs: list[np.ndarray] = []
            drawn_from = [last]
            for _ in range(steps):
                if card.generation.mode == "symbol":
                    index = _sample(last, temperature, rng)
                    generated.append(card.vocabulary[index])
                    x = _symbol_input(card, index)  # the id itself for a token model
                else:
                    generated.append(last.tolist())
                    x = last.reshape(1, -1).astype(np.float32)
                y, state = await batcher.submit(x, state)
                fed += 1
                outputs.append(y[-1])
                last = y[-1]
                if card.generation.mode == "symbol" and stop.reached(generated[-1]):
                    break
            record.state = state
            record.step_count += fed
            record.last_seq = None
            record.last_outputs = np.ascontiguousarray(last, np.float32).tobytes()
            record.last_outputs_shape = (1, card.output_size)
            await self.store.commit(record)
            self._steps_counter(entry).inc(fed)
            drawn_from.extend(outputs[: len(generated) - 1])
            return GenerateResult(
                generated,
                np.asarray(outputs, np.float32),
                record,
                card,
                np.asarray(drawn_from, np.float32),
            )


_NUMBER_TYPES = frozenset({int, float})


class _Budget:
    """The output values one multiplexed message may still answer (``max_output_values``
    for the whole message, not per item: 8,192 small items of a wide model would answer
    gigabytes). Items are counted once each, round by round (a session's k-th item in
    round k); one past the budget fails alone, and so do the later items of its session,
    so that a session never has a step applied after one that was refused."""

    __slots__ = ("counted", "left", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit
        self.counted: set[int] = set()
        self.refused: set[str] = set()

    def take(self, item: int, session_id: str, values: int) -> bool:
        if session_id in self.refused:
            return False
        if item in self.counted:
            return True
        if values > self.left:
            self.refused.add(session_id)
            return False
        self.left -= values
        self.counted.add(item)
        return True

    def error(self, item: int) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"item {item}: the answers of this message would exceed {self.limit} output "
            "values (RNNSERVE_MAX_OUTPUT_VALUES, steps x the model's output size summed over "
            "its items); send the rest in another message",
            limit=self.limit,
        )


def _hides(exc: BaseException, owner: str | None) -> bool:
    """True when an expired session must answer as an unknown id: stores set ``owner`` on
    SessionExpired when they know it. Without API keys (owner None) every caller is the
    same owner; with keys an unknown owner could be anyone's, so it is not revealed."""
    return (
        isinstance(exc, SessionExpired)
        and owner is not None
        and getattr(exc, "owner", _UNKNOWN_OWNER) != owner
    )


def _as_seen_by(exc: SessionExpired, owner: str | None, session_id: str) -> ServeError:
    """What the caller may learn of an expired session: that it expired, or (another key's)
    nothing more than of an unknown id."""
    return SessionNotFound(f"no session {session_id}") if _hides(exc, owner) else exc


def _claimed(record: SessionRecord, owner: str | None) -> SessionRecord:
    """The caller's own session; another key's answers exactly as an unknown id would."""
    if record.owner != owner:
        raise SessionNotFound(f"no session {record.session_id}")
    note_served_model(record.model)  # the request's metrics carry the session's model
    return record


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.stack`` of arrays of one shape as one concatenate (no Python per array)."""
    return np.concatenate(arrays).reshape(len(arrays), *arrays[0].shape)


def _as_error(exc: BaseException) -> ServeError:
    if isinstance(exc, ServeError):
        return exc
    raise exc


def _remember(record: SessionRecord, steps: int, y: np.ndarray, seq: int | None) -> None:
    """Account ``steps`` applied steps with outputs ``y`` on ``record`` (state already set)."""
    record.step_count += steps
    if seq is not None:  # keep the whole answer: a retry may need it
        record.last_seq = seq
        record.last_outputs = y.tobytes()
        record.last_outputs_shape = y.shape
    else:  # keep only the last row: generation continues from it
        record.last_seq = None
        record.last_outputs = y[-1].tobytes()
        record.last_outputs_shape = (1, y.shape[1])


class _EndSymbol:
    """When symbol generation stops: at the first end symbol, or, with the card's
    ``generation.stop == "balanced"``, at the end symbol that closes every start symbol so
    far (nested grammars such as embedded Reber, ``B T B...E T E``), counting the prime's."""

    def __init__(self, card, prime: np.ndarray | None) -> None:
        generation = card.generation
        self.end = generation.end_symbol
        self.start = generation.start_symbol
        self.balanced = generation.stop == "balanced"
        self.open = 0
        if self.balanced and prime is not None and self.start is not None:
            start = _symbol_input(card, card.vocabulary.index(self.start))
            same = prime == start if card.token_inputs else np.all(prime == start[0], axis=1)
            self.open = int(same.sum())

    def reached(self, symbol: str) -> bool:
        if symbol == self.start:
            self.open += 1
        if symbol != self.end:
            return False
        self.open -= 1
        return not self.balanced or self.open <= 0


class _Turns:
    """Per-session FIFO turns: requests to one session run one at a time, in arrival order.

    ``_users[key]`` counts who holds or waits for ``key``'s turn (no entry: nobody);
    ``_waiters[key]`` holds the waiters' futures in arrival order (no entry: none). Taking
    a free turn needs no await, so a batch of many sessions takes all its turns in one
    synchronous pass; that pass is atomic on the event loop, so two batches always queue
    in the same order on every session they share and cannot deadlock. ``enter_many`` and
    ``leave_many`` do a multiplexed message's sessions in bulk, without Python per session
    when none of them is contended (the common case).
    """

    __slots__ = ("_users", "_waiters")

    def __init__(self) -> None:
        self._users: dict[str, int] = {}
        self._waiters: dict[str, deque] = {}

    def enter(self, key: str) -> asyncio.Future | None:
        """Take ``key``'s turn: None when it is ours now, else a future that resolves when it is."""
        users = self._users
        n = users.get(key, 0)
        users[key] = n + 1
        if n == 0:
            return None
        future = asyncio.get_running_loop().create_future()
        waiters = self._waiters.get(key)
        if waiters is None:
            waiters = self._waiters[key] = deque()
        waiters.append(future)
        return future

    def enter_many(self, keys: list[str]) -> list[tuple[str, asyncio.Future]]:
        """``enter`` for distinct keys: the (key, future) of those whose turn we wait for."""
        users = self._users
        if users.keys().isdisjoint(keys):
            users.update(dict.fromkeys(keys, 1))
            return []
        waiting = []
        for key in keys:
            future = self.enter(key)
            if future is not None:
                waiting.append((key, future))
        return waiting

    def held(self) -> int:
        """How many sessions have a request in progress (or waiting)."""
        return len(self._users)

    def leave(self, key: str) -> None:
        """Give up the turn we hold: the next live waiter gets it."""
        users = self._users
        n = users[key] - 1
        if n == 0:
            del users[key]
            return
        users[key] = n
        self._pass_on(key)

    def leave_many(self, keys: list[str]) -> None:
        """``leave`` for distinct keys whose turns we hold."""
        counts = list(map(self._users.pop, keys))
        if counts.count(1) == len(counts):
            return  # nobody waits for any of them
        for key, n in zip(keys, counts):
            if n > 1:
                self._users[key] = n - 1
                self._pass_on(key)

    def _pass_on(self, key: str) -> None:
        """The turn goes to the first waiter still waiting. One whose future is already
        cancelled (its task was, and has not run ``abandon`` yet) is counted out here: else
        a turn nobody holds would stay counted, and every later request would wait behind it."""
        waiters = self._waiters[key]
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                break
            n = self._users[key] - 1
            if n == 0:
                del self._users[key]
                break
            self._users[key] = n
        if not waiters:
            del self._waiters[key]

    def abandon(self, key: str, future: asyncio.Future | None) -> None:
        """Undo ``enter`` for a caller that stops (cancelled) before or after its turn came."""
        if future is None or (future.done() and not future.cancelled()):
            self.leave(key)  # the turn was ours: pass it on
            return
        future.cancel()
        waiters = self._waiters.get(key)
        if waiters is not None and future in waiters:  # still queued: counted out here
            waiters.remove(future)
            if not waiters:
                del self._waiters[key]
            self._users[key] -= 1  # the holder is still a user, so the entry stays
        # else ``_pass_on`` met it cancelled and counted it out already

    async def wait(self, key: str, future: asyncio.Future | None) -> None:
        if future is None:
            return
        try:
            await future
        except asyncio.CancelledError:
            self.abandon(key, future)
            raise


class _SessionLock:
    """``async with``: hold one session's turn. A plain class rather than
    @asynccontextmanager: this runs on every step."""

    __slots__ = ("_key", "_turns")

    def __init__(self, turns: _Turns, key: str) -> None:
        self._turns = turns
        self._key = key

    async def __aenter__(self) -> None:
        future = self._turns.enter(self._key)
        if future is not None:
            await self._turns.wait(self._key, future)

    async def __aexit__(self, *exc_info: object) -> None:
        self._turns.leave(self._key)


def _symbol_input(card, index: int) -> np.ndarray:
    """One step holding symbol ``index``: the id for a token model, else a one-hot row."""
    if card.token_inputs:
        return np.array([index], np.int64)
    x = np.zeros((1, card.input_size), np.float32)
    x[0, index] = 1.0
    return x


def _sample(probabilities: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """A symbol drawn from ``probabilities`` sharpened by ``temperature`` (0: greedy).

    Numerically stable for every finite temperature >= 0: float64 log-probabilities with
    the maximum subtracted (so the largest weight is exactly 1 and the sum is >= 1), and a
    temperature whose inverse does not fit a float64 is greedy.
    """
    p = np.asarray(probabilities, np.float64)
    if temperature == 0 or not np.isfinite(1.0 / temperature) or not np.all(np.isfinite(p)):
        return int(np.argmax(p))
    logits = np.log(np.clip(p, np.finfo(np.float64).tiny, None))
    logits -= logits.max()
    with np.errstate(over="ignore", under="ignore"):
        weights = np.exp(logits * (1.0 / temperature))
    return int(rng.choice(len(weights), p=weights / weights.sum()))
