"""Redis session store: shared by replicas, with native key expiry as the idle TTL.

Each session is one Redis string ``{prefix}s:{id}``: a fixed binary header followed by the
owner, model, output shape, last outputs and the raw little-endian float32 state, so a
session costs about its state size. The revision sits in the first 8 bytes, which lets the
commit script compare-and-set with a plain byte comparison and no decoding in Lua.

Beside it:
- ``{prefix}t:{id}``: a marker that outlives the session, so a vanished key can be told
  apart as expired (marker present) or unknown (no marker);
- ``{prefix}live`` and ``{prefix}o:{owner}``: sorted sets of id -> expiry (Redis clock, ms),
  which give the session counts for the limits without scanning keys.
Every write goes through one Lua script, so limits and revisions hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from redis import exceptions as rx
from redis.asyncio import ConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from service.errors import (
    SessionConflict,
    SessionExpired,
    SessionNotFound,
    StoreUnavailable,
    TooManySessions,
)
from service.sessions.base import SessionRecord, SessionStore

# revision, step_count, last_used, created_at, version, last_seq, state floats,
# outputs bytes, owner bytes, model bytes, output ndim, flags.
_HEADER = struct.Struct("<QQddqqIIHHBB")
_REVISION = struct.Struct("<Q")
_LAST_USED = struct.Struct("<d")  # at byte 16, overwritten in place by touch
_HAS_OWNER, _HAS_SEQ, _HAS_OUTPUTS = 1, 2, 4

_UNAVAILABLE = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ReadOnlyError,
    rx.OutOfMemoryError,
    rx.BusyLoadingError,
    OSError,
    asyncio.TimeoutError,
)

# Codes returned by the scripts.
_OK, _CONFLICT, _NOT_FOUND, _EXPIRED, _EXISTS, _FULL, _OWNER_FULL = 1, 0, -1, -2, -3, -4, -5

_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function gone(marker)
  if redis.call('EXISTS', marker) == 1 then return -2 end
  return -1
end

-- The owner zset of a stored session, read from its header (owner_len at byte 56,
-- flags at byte 61, owner from byte 62); nil without an owner.
local function stored_owner_key(key, prefix)
  local h = redis.call('GETRANGE', key, 56, 61)
  if string.byte(h, 6) % 2 == 0 then return nil end
  local len = struct.unpack('<H', h)
  if len == 0 then return prefix .. 'o:' end
  return prefix .. 'o:' .. redis.call('GETRANGE', key, 62, 61 + len)
end

-- Refresh expiry of the session, its marker and its entries in the count zsets.
local function mark_used(key, marker, live, okey, id, ttl, marker_ttl, now)
  redis.call('PEXPIRE', key, ttl)
  redis.call('SET', marker, '1', 'PX', marker_ttl)
  redis.call('ZADD', live, now + ttl, id)
  if okey then
    redis.call('ZADD', okey, now + ttl, id)
    -- the owner zset lives as long as its longest-lived member
    if redis.call('PTTL', okey) < ttl then redis.call('PEXPIRE', okey, ttl) end
  end
end
"""

# KEYS: session, marker, live, [owner zset]
# ARGV: id, blob, ttl_ms, marker_ttl_ms, max_sessions, max_per_owner
_CREATE = """
local now = now_ms()
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then return {-3, pruned} end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return {-4, pruned} end
local okey = KEYS[4]
if okey then
  redis.call('ZREMRANGEBYSCORE', okey, '-inf', now)
  if redis.call('ZCARD', okey) >= tonumber(ARGV[6]) then return {-5, pruned} end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
mark_used(KEYS[1], KEYS[2], KEYS[3], okey, ARGV[1], tonumber(ARGV[3]), ARGV[4], now)
return {1, pruned}
"""

# KEYS: session, marker, live
# ARGV: id, blob (already carrying revision + 1), ttl_ms, marker_ttl_ms, expected revision
# (8 bytes), key prefix
_COMMIT = """
local head = redis.call('GETRANGE', KEYS[1], 0, 15)
if head == '' then return {gone(KEYS[2])} end
if string.sub(head, 1, 8) ~= ARGV[5] then return {0, string.sub(head, 9, 16)} end
local okey = stored_owner_key(KEYS[1], ARGV[6])
redis.call('SET', KEYS[1], ARGV[2])
mark_used(KEYS[1], KEYS[2], KEYS[3], okey, ARGV[1], tonumber(ARGV[3]), ARGV[4], now_ms())
return {1}
"""

# KEYS: session, marker, live
# ARGV: id, last_used (8 bytes), ttl_ms, marker_ttl_ms, key prefix
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {gone(KEYS[2])} end
redis.call('SETRANGE', KEYS[1], 16, ARGV[2])
local okey = stored_owner_key(KEYS[1], ARGV[5])
mark_used(KEYS[1], KEYS[2], KEYS[3], okey, ARGV[1], tonumber(ARGV[3]), ARGV[4], now_ms())
return {1}
"""

# KEYS: session, marker, live; ARGV: id, key prefix
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local okey = stored_owner_key(KEYS[1], ARGV[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
if okey then redis.call('ZREM', okey, ARGV[1]) end
return 1
"""

# KEYS: live
_COUNT = "return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')"
_SWEEP = "return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())"


def encode(
    record: SessionRecord, *, revision: int | None = None, last_used: float | None = None
) -> bytes:
    """The stored form of ``record`` (optionally with another revision / last_used)."""
    owner = b"" if record.owner is None else record.owner.encode()
    model = record.model.encode()
    outputs = record.last_outputs or b""
    shape = tuple(int(d) for d in record.last_outputs_shape)
    state = np.ascontiguousarray(record.state, dtype="<f4").reshape(-1)
    flags = (
        (_HAS_OWNER if record.owner is not None else 0)
        | (_HAS_SEQ if record.last_seq is not None else 0)
        | (_HAS_OUTPUTS if record.last_outputs is not None else 0)
    )
    header = _HEADER.pack(
        record.revision if revision is None else revision,
        record.step_count,
        record.last_used if last_used is None else last_used,
        record.created_at,
        record.version,
        record.last_seq if record.last_seq is not None else 0,
        state.size,
        len(outputs),
        len(owner),
        len(model),
        len(shape),
        flags,
    )
    dims = struct.pack(f"<{len(shape)}q", *shape)
    return b"".join((header, owner, model, dims, outputs, state.tobytes()))


def decode(session_id: str, blob: bytes) -> SessionRecord:
    (
        revision, step_count, last_used, created_at, version, last_seq,
        n_state, n_outputs, n_owner, n_model, ndim, flags,
    ) = _HEADER.unpack_from(blob)  # fmt: skip
    pos = _HEADER.size
    owner = blob[pos : pos + n_owner].decode()
    pos += n_owner
    model = blob[pos : pos + n_model].decode()
    pos += n_model
    shape = struct.unpack_from(f"<{ndim}q", blob, pos)
    pos += 8 * ndim
    outputs = blob[pos : pos + n_outputs]
    pos += n_outputs
    state = np.frombuffer(blob, dtype="<f4", count=n_state, offset=pos).astype(np.float32)
    return SessionRecord(
        session_id=session_id,
        model=model,
        version=version,
        state=state,
        created_at=created_at,
        last_used=last_used,
        step_count=step_count,
        revision=revision,
        owner=owner if flags & _HAS_OWNER else None,
        last_seq=last_seq if flags & _HAS_SEQ else None,
        last_outputs=outputs if flags & _HAS_OUTPUTS else None,
        last_outputs_shape=tuple(shape),
    )


@contextlib.contextmanager
def _available() -> Iterator[None]:
    """Turn any failure to reach Redis into StoreUnavailable: never a guessed answer."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(f"session store unavailable: {exc}") from exc


class RedisSessionStore(SessionStore):
    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_sessions: int,
        max_sessions_per_owner: int,
        clock: Callable[[], float] = time.time,
        prefix: str = "rnnserve:",
        timeout_s: float = 1.5,
    ) -> None:
        super().__init__(ttl_s, max_sessions, max_sessions_per_owner)
        self._clock = clock
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._marker_ttl_ms = max(self._ttl_ms * 10, 86_400_000)
        self.expired_total = 0
        # No client-side retries: a re-sent commit could apply twice. Instead the pool checks
        # idle connections before use and reconnects dead ones, so a restarted Redis heals by
        # itself; maintenance notifications are off because with them on (redis-py 8 default
        # on RESP3) the pool skips that check and hands out connections closed by the server.
        self._pool = ConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        self._redis = Redis(connection_pool=self._pool)
        self._scripts = {
            name: self._redis.register_script(_LUA_COMMON + body)
            for name, body in (
                ("create", _CREATE),
                ("commit", _COMMIT),
                ("touch", _TOUCH),
                ("delete", _DELETE),
                ("count", _COUNT),
                ("sweep", _SWEEP),
            )
        }

    def _key(self, session_id: str) -> str:
        return f"{self._prefix}s:{session_id}"

    def _marker(self, session_id: str) -> str:
        return f"{self._prefix}t:{session_id}"

    def _session_keys(self, session_id: str) -> list[str]:
        return [self._key(session_id), self._marker(session_id), f"{self._prefix}live"]

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        with _available():
            return await self._scripts[script](keys=keys, args=args)

    def _gone(self, session_id: str, code: int) -> Exception:
        if code == _EXPIRED:
            return SessionExpired(f"session {session_id} expired after {self.ttl_s:g} s idle")
        return SessionNotFound(f"no session {session_id}")

    async def create(self, record: SessionRecord) -> None:
        keys = self._session_keys(record.session_id)
        if record.owner is not None:
            keys.append(f"{self._prefix}o:{record.owner}")
        args = [
            record.session_id,
            encode(record),
            self._ttl_ms,
            self._marker_ttl_ms,
            self.max_sessions,
            self.max_sessions_per_owner,
        ]
        code, pruned = await self._run("create", keys, args)
        self.expired_total += pruned
        if code == _FULL:
            raise TooManySessions(f"the server holds its maximum of {self.max_sessions} sessions")
        if code == _OWNER_FULL:
            raise TooManySessions(
                f"this API key holds its maximum of {self.max_sessions_per_owner} sessions"
            )
        if code == _EXISTS:
            raise SessionConflict(f"session {record.session_id} already exists")

    async def get(self, session_id: str, *, fresh: bool = False) -> SessionRecord:
        with _available():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._key(session_id))
                pipe.exists(self._marker(session_id))
                blob, marked = await pipe.execute()
        if blob is None:
            raise self._gone(session_id, _EXPIRED if marked else _NOT_FOUND)
        return decode(session_id, blob)

    async def commit(self, record: SessionRecord, *, release: bool = False) -> None:
        if release:  # TODO(scale-out issue): fold into the commit script
            await self.commit(record)
            await self.delete(record.session_id)
            return
        now = self._clock()
        revision = record.revision + 1
        args = [
            record.session_id,
            encode(record, revision=revision, last_used=now),
            self._ttl_ms,
            self._marker_ttl_ms,
            _REVISION.pack(record.revision),
            self._prefix,
        ]
        reply = await self._run("commit", self._session_keys(record.session_id), args)
        code = reply[0]
        if code == _CONFLICT:
            (step_count,) = _REVISION.unpack(reply[1])
            raise SessionConflict(
                "the session was changed by another request", step_count=step_count
            )
        if code != _OK:
            raise self._gone(record.session_id, code)
        record.revision = revision
        record.last_used = now

    async def touch(self, session_id: str, now: float) -> None:
        args = [session_id, _LAST_USED.pack(now), self._ttl_ms, self._marker_ttl_ms, self._prefix]
        (code,) = await self._run("touch", self._session_keys(session_id), args)
        if code != _OK:
            raise self._gone(session_id, code)

    async def delete(self, session_id: str) -> bool:
        deleted = await self._run(
            "delete", self._session_keys(session_id), [session_id, self._prefix]
        )
        return bool(deleted)

    async def count(self) -> int:
        return int(await self._run("count", [f"{self._prefix}live"], []))

    async def sweep(self, now: float) -> int:
        """Prune expired entries from the live set. ``now`` is ignored: expiry runs on the
        Redis clock (the keys' own TTL), which every replica shares."""
        pruned = int(await self._run("sweep", [f"{self._prefix}live"], []))
        self.expired_total += pruned
        return pruned

    async def ping(self) -> None:
        with _available():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()
