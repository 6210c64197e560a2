"""In-process session store: an insertion-ordered dict kept in last-use order.

Because every session has the same idle TTL, last-use order is also expiry order, so
expired sessions are always at the front and a sweep stops at the first live one.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict

from service.errors import SessionConflict, SessionExpired, SessionNotFound, TooManySessions
from service.sessions.base import SessionRecord, SessionStore

_TOMBSTONES = 100_000


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
        self._records: OrderedDict[str, SessionRecord] = OrderedDict()
        self._expired: OrderedDict[str, str | None] = OrderedDict()
        """Tombstones of expired sessions: id -> owner (for the engine's privacy check)."""
        self._per_owner: Counter[str | None] = Counter()
        self.expired_total = 0

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
        self._records[record.session_id] = record.clone()
        self._per_owner[record.owner] += 1

    def _live(self, session_id: str) -> SessionRecord:
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
        return self._live(session_id).clone()

    async def get_many(
        self, session_ids: list[str], *, fresh: bool = False
    ) -> list[SessionRecord | BaseException]:
        out: list[SessionRecord | BaseException] = []
        for session_id in session_ids:
            try:
                out.append(self._live(session_id).shallow())
            except (SessionNotFound, SessionExpired) as exc:
                out.append(exc)
        return out

    async def commit_many(
        self, records: list[SessionRecord], release: list[bool] | None = None
    ) -> list[BaseException | None]:
        out: list[BaseException | None] = []
        for k, record in enumerate(records):
            try:
                self._commit(record, bool(release and release[k]), adopt=True)
                out.append(None)
            except (SessionConflict, SessionNotFound, SessionExpired) as exc:
                out.append(exc)
        return out

    async def commit(self, record: SessionRecord, *, release: bool = False) -> None:
        self._commit(record, release)

    def _commit(self, record: SessionRecord, release: bool, adopt: bool = False) -> None:
        """``adopt``: keep ``record`` itself (the bulk path's caller hands it over)."""
        stored = self._live(record.session_id)
        if stored.revision != record.revision:
            raise SessionConflict(
                "the session was changed by another request", step_count=stored.step_count
            )
        if release:
            self._drop(record.session_id)
            record.revision += 1
            return
        if adopt:
            if record.state.base is not None:  # a row of a batch: keep only the row
                record.state = record.state.copy()
            fresh = record
        else:
            fresh = record.clone()
        fresh.revision += 1
        fresh.last_used = self._clock()
        record.revision = fresh.revision
        record.last_used = fresh.last_used
        self._records[record.session_id] = fresh
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
        self._forget_owner(record.owner)
        self.expired_total += 1
        self._expired[session_id] = record.owner
        if len(self._expired) > _TOMBSTONES:
            self._expired.popitem(last=False)

    def _forget_owner(self, owner: str | None) -> None:
        self._per_owner[owner] -= 1
        if self._per_owner[owner] <= 0:
            del self._per_owner[owner]
