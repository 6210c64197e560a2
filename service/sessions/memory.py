"""In-process session store: an insertion-ordered dict kept in last-use order, states in slabs.

Because every session has the same idle TTL, last-use order is also expiry order, so
expired sessions are always at the front and a sweep stops at the first live one.

The states of one model version's sessions are rows of one contiguous float32 array (a
slab, grown by doubling, freed rows reused, dropped when its last session goes); a stored
record holds its row. ``get``/``commit`` copy a row out and in, as the store contract
says; the engine's multiplexed path leases the stored records, gathers a batch's states
with one indexing operation and writes the new ones back with one (``lease``, ``gather``,
``advance``).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from operator import attrgetter, is_

import numpy as np

from service.errors import SessionConflict, SessionExpired, SessionNotFound, TooManySessions
from service.sessions.base import SessionRecord, SessionStore, copy_state, write_state

_TOMBSTONES = 100_000
_FIRST_ROWS = 16
_NO_STATE = np.zeros(0, np.float32)
_NO_STATE.flags.writeable = False


class _Slab:
    """One model version's states: rows of a float32 array, free rows reused."""

    __slots__ = ("free", "rows", "used")

    def __init__(self, width: int) -> None:
        self.rows = np.zeros((_FIRST_ROWS, width), np.float32)
        self.free = list(range(_FIRST_ROWS - 1, -1, -1))  # pop() hands out low rows first
        self.used = 0

    def take(self) -> int:
        if not self.free:
            n = len(self.rows)
            grown = np.zeros((2 * n, self.rows.shape[1]), np.float32)
            grown[:n] = self.rows
            self.rows = grown
            self.free = list(range(2 * n - 1, n - 1, -1))
        self.used += 1
        return self.free.pop()

    def give_back(self, row: int) -> None:
        self.rows[row] = 0.0  # a freed row keeps nothing of its session
        self.free.append(row)
        self.used -= 1


@dataclass(slots=True)
class _Held(SessionRecord):
    """A stored record: its state is row ``row`` of ``slab`` (``state`` is empty)."""

    slab: _Slab | None = None
    row: int = -1
    key: tuple = ()


_SESSION_ID = attrgetter("session_id")
_LAST_USED = attrgetter("last_used")
_ROW = attrgetter("row")
_SLAB = attrgetter("slab")


def _key(record: SessionRecord) -> tuple:
    return (record.model, record.version, record.fingerprint, record.state.size)


class MemorySessionStore(SessionStore):
    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        max_sessions_per_owner: int,
        clock=time.time,
    ) -> None:
        super().__init__(ttl_s, max_sessions, max_sessions_per_owner)
        self._clock = clock
        self._records: OrderedDict[str, _Held] = OrderedDict()
        self._slabs: dict[tuple, _Slab] = {}
        self._expired: OrderedDict[str, str | None] = OrderedDict()
        """Tombstones of expired sessions: id -> owner (for the engine's privacy check)."""
        self._per_owner: Counter[str | None] = Counter()
        self.expired_total = 0

    # -- slabs ------------------------------------------------------------------------

    def _hold(self, record: SessionRecord, slab: _Slab, row: int, key: tuple) -> _Held:
        slab.rows[row] = record.state
        return _Held(
            record.session_id,
            record.model,
            record.version,
            _NO_STATE,
            record.created_at,
            record.last_used,
            record.step_count,
            record.revision,
            record.owner,
            record.last_seq,
            record.last_outputs,
            record.last_outputs_shape,
            record.fingerprint,
            slab,
            row,
            key,
        )

    def _place(self, key: tuple) -> tuple[_Slab, int]:
        slab = self._slabs.get(key)
        if slab is None:
            slab = self._slabs[key] = _Slab(key[3])
        return slab, slab.take()

    def _free(self, held: _Held) -> None:
        slab = held.slab
        assert slab is not None
        slab.give_back(held.row)
        if slab.used == 0 and self._slabs.get(held.key) is slab:
            del self._slabs[held.key]

    @staticmethod
    def _copy(held: _Held) -> SessionRecord:
        record = held.shallow()
        record.state = copy_state(held.slab.rows[held.row])  # type: ignore[union-attr]
        return record

    def rows_allocated(self) -> int:
        """Rows held by every slab (live sessions plus free rows kept for reuse)."""
        return sum(len(slab.rows) for slab in self._slabs.values())

    # -- the store contract -------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        await self.sweep(self._clock())
        if record.session_id in self._records:
            raise SessionConflict(f"session {record.session_id} already exists")
        if len(self._records) >= self.max_sessions:
            raise TooManySessions(f"the server holds its maximum of {self.max_sessions} sessions")
        if record.owner is not None and self._per_owner[record.owner] >= self.max_sessions_per_owner:
            raise TooManySessions(
                f"this API key holds its maximum of {self.max_sessions_per_owner} sessions"
            )
        key = _key(record)
        slab, row = self._place(key)
        self._records[record.session_id] = self._hold(record, slab, row, key)
        self._per_owner[record.owner] += 1
        # An id created again (a Triton sequence restarted after it expired) is live, and
        # once it ends, unknown: its earlier expiry says nothing about it any more.
        self._expired.pop(record.session_id, None)

    def _live(self, session_id: str) -> _Held:
        record = self._records.get(session_id)
        if record is not None and record.expires_at(self.ttl_s) <= self._clock():
            self._expire(session_id)
            record = None
        if record is None:
            if session_id in self._expired:
                expired = SessionExpired(f"session {session_id} expired after {self.ttl_s:g} s idle")
                expired.owner = self._expired[session_id]  # type: ignore[attr-defined]
                raise expired
            raise SessionNotFound(f"no session {session_id}")
        return record

    async def get(self, session_id: str, *, fresh: bool = False) -> SessionRecord:
        return self._copy(self._live(session_id))

    async def get_many(
        self, session_ids: list[str], *, fresh: bool = False
    ) -> list[SessionRecord | BaseException]:
        out: list[SessionRecord | BaseException] = []
        for session_id in session_ids:
            try:
                out.append(self._copy(self._live(session_id)))
            except (SessionNotFound, SessionExpired) as exc:
                out.append(exc)
        return out

    async def commit_many(
        self, records: list[SessionRecord], release: list[bool] | None = None
    ) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for k, record in enumerate(records):
            try:
                self._commit(record, bool(release and release[k]))
                out.append(None)
            except (SessionConflict, SessionNotFound, SessionExpired) as exc:
                out.append(exc)
        return out

    async def commit(self, record: SessionRecord, *, release: bool = False) -> None:
        self._commit(record, release)

    def _commit(self, record: SessionRecord, release: bool) -> None:
        stored = self._live(record.session_id)
        if stored.revision != record.revision:
            raise SessionConflict(
                "the session was changed by another request", step_count=stored.step_count
            )
        if release:
            self._drop(record.session_id)
            record.revision += 1
            return
        key = _key(record)
        if key == stored.key:
            slab, row = stored.slab, stored.row
        else:  # the sequence restarted on another model: move to that model's slab
            self._free(stored)
            slab, row = self._place(key)
        assert slab is not None
        record.revision += 1
        record.last_used = self._clock()
        self._records[record.session_id] = self._hold(record, slab, row, key)
        self._records.move_to_end(record.session_id)

    async def touch(self, session_id: str, now: float) -> None:
        self._live(session_id).last_used = now
        self._records.move_to_end(session_id)

    async def delete(self, session_id: str) -> bool:
        return self._drop(session_id)

    def _drop(self, session_id: str) -> bool:
        record = self._records.pop(session_id, None)
        if record is None:
            return False
        self._free(record)
        self._forget_owner(record.owner)
        return True

    async def count(self) -> int:
        return len(self._records)

    async def sweep(self, now: float) -> int:
        dropped = 0
        while self._records:
            session_id, record = next(iter(self._records.items()))
            if record.expires_at(self.ttl_s) > now:
                break
            self._expire(session_id)
            dropped += 1
        return dropped

    def _expire(self, session_id: str) -> None:
        record = self._records.pop(session_id)
        self._free(record)
        self._forget_owner(record.owner)
        self.expired_total += 1
        self._expired[session_id] = record.owner
        if len(self._expired) > _TOMBSTONES:
            self._expired.popitem(last=False)

    def _forget_owner(self, owner: str | None) -> None:
        self._per_owner[owner] -= 1
        if self._per_owner[owner] <= 0:
            del self._per_owner[owner]

    # -- the engine's bulk path ---------------------------------------------------------

    def lease(self, session_ids: list[str]) -> list[SessionRecord | BaseException]:
        """The stored records themselves (no copies; ``state`` empty), or the error ``get``
        would raise. For the engine's multiplexed path, which holds every session's turn,
        reads states with ``gather`` and changes a record only through ``advance``."""
        records, now, ttl = self._records, self._clock(), self.ttl_s
        got = list(map(records.get, session_ids))
        if got and all(got) and min(map(_LAST_USED, got)) + ttl > now:
            return got  # every one live: checked without Python per session
        out: list[SessionRecord | BaseException] = []
        for session_id in session_ids:
            record = records.get(session_id)
            if record is not None and record.last_used + ttl > now:
                out.append(record)
                continue
            try:
                out.append(self._live(session_id))
            except (SessionNotFound, SessionExpired) as exc:
                out.append(exc)
        return out

    @staticmethod
    def gather(leased: list) -> np.ndarray:
        """The states of leased records of one slab, stacked: one indexing operation."""
        if len(set(map(_SLAB, leased))) != 1:
            raise ValueError("leased records of different slabs")  # the caller's bug
        return leased[0].slab.rows[list(map(_ROW, leased))]

    def advance(
        self,
        leased: list,
        states: np.ndarray,
        steps: int,
        outputs: np.ndarray,
        seqs: list[int | None],
    ) -> list[BaseException | None]:
        """Commit ``steps`` applied steps to leased records of one slab: row k of
        ``states`` is record k's new state and ``outputs[k]`` its outputs. A record that
        changed or went since its lease is left alone (its error answered instead), so
        the new states are written only where the lease still holds, in one operation."""
        now, ttl = self._clock(), self.ttl_s
        records = self._records
        errors: list[BaseException | None] = [None] * len(leased)
        ids = list(map(_SESSION_ID, leased))
        if (
            leased
            and all(map(is_, map(records.get, ids), leased))
            and min(map(_LAST_USED, leased)) + ttl > now
        ):
            # Every lease still holds (the common case), checked without Python per session.
            leased[0].slab.rows[list(map(_ROW, leased))] = states
            self._account_all(leased, ids, steps, outputs, seqs, now)
            return errors
        keep: list[int] = []
        for k, record in enumerate(leased):
            if records.get(record.session_id) is record and record.last_used + ttl > now:
                keep.append(k)
                continue
            try:
                self._live(record.session_id)
                errors[k] = SessionConflict("the session was changed by another request")
            except (SessionNotFound, SessionExpired) as exc:
                errors[k] = exc
        if not keep:
            return errors
        slab = leased[0].slab
        if len(keep) == len(leased):
            slab.rows[[record.row for record in leased]] = states
        else:
            slab.rows[[leased[k].row for k in keep]] = states[keep]
        for k in keep:
            self._account(leased[k], steps, outputs[k], seqs[k], now)
        return errors

    def _account_all(
        self,
        leased: list,
        ids: list[str],
        steps: int,
        outputs: np.ndarray,
        seqs: list[int | None],
        now: float,
    ) -> None:
        """``_account`` for every leased record of a call, the per-record work cut to
        attribute updates (the outputs kept are sliced and copied in one operation each)."""
        if seqs.count(None) != len(seqs):  # a retry may need each whole answer
            for record, y, seq in zip(leased, outputs, seqs):
                self._account(record, steps, y, seq, now)
            return
        last = outputs[:, -1]  # keep only each last row: generation continues from it
        shape = (1, last.shape[-1])
        for record, kept in zip(leased, map(bytes, last)):
            record.revision += 1
            record.last_used = now
            record.step_count += steps
            record.last_seq = None
            record.last_outputs = kept
            record.last_outputs_shape = shape
        deque(map(self._records.move_to_end, ids), 0)

    def lease_one(self, session_id: str) -> SessionRecord:
        """``lease`` for one session: the stored record, or the error ``get`` raises."""
        record = self._records.get(session_id)
        if record is not None and record.last_used + self.ttl_s > self._clock():
            return record
        return self._live(session_id)

    @staticmethod
    def state_row(leased: SessionRecord) -> np.ndarray:
        """A leased record's state: a view of its slab row (read it before ``advance_one``)."""
        assert isinstance(leased, _Held) and leased.slab is not None
        return leased.slab.rows[leased.row]

    def advance_one(
        self, leased: SessionRecord, state: np.ndarray, steps: int, outputs: np.ndarray, seq: int | None
    ) -> None:
        """``advance`` for one leased record; raises what ``commit`` would (SessionConflict
        when it changed since its lease, SessionNotFound/SessionExpired when it went)."""
        now = self._clock()
        if self._records.get(leased.session_id) is not leased or leased.last_used + self.ttl_s <= now:
            self._live(leased.session_id)  # raises when it went
            raise SessionConflict("the session was changed by another request")
        assert isinstance(leased, _Held) and leased.slab is not None
        write_state(leased.slab.rows[leased.row], state)
        self._account(leased, steps, outputs, seq, now)

    def _account(
        self, record: _Held, steps: int, outputs: np.ndarray, seq: int | None, now: float
    ) -> None:
        """A stored record after ``steps`` applied steps with ``outputs`` [steps, out]."""
        record.revision += 1
        record.last_used = now
        record.step_count += steps
        record.last_seq = seq
        if seq is not None:  # keep the whole answer: a retry may need it
            record.last_outputs = outputs.tobytes()
            record.last_outputs_shape = outputs.shape
        else:  # keep only the last row: generation continues from it
            record.last_outputs = outputs[-1].tobytes()
            record.last_outputs_shape = (1, outputs.shape[-1])
        self._records.move_to_end(record.session_id)
