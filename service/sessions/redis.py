"""Redis session store: shared by replicas, one round trip per step, ready for Redis Cluster.

Keys. A session lives in a *bucket* (``crc32(id) % 256``) and every key of a session carries
the bucket as its hash tag, so one script touches one slot and a cluster spreads sessions
over its primaries by bucket:

- ``{prefix}{b}s:{id}``: the record, a fixed binary header followed by the owner, model,
  fingerprint, output shape, last outputs and raw little-endian float32 state. The revision
  sits in the first 8 bytes, so the commit script compares and sets with a byte comparison.
- ``{prefix}{b}t:{id}``: a marker holding the owner digest that outlives the session, so a
  vanished key is told apart as expired (marker present, and whose it was) or unknown.
- ``{prefix}{b}live``: the bucket's sorted set of id -> expiry (Redis clock, ms; up to a
  tenth of the TTL late, see "Lazy refreshes"). Counting sessions sums the 256 buckets
  (lazily: see ``_Limits``); there is no global key.
- ``{prefix}{o:<owner>}``: the owner's sorted set of id -> last known expiry, written only
  when a session is created or deleted and verified against the session keys when the
  owner is at its limit (so steps never touch it).

One round trip per step. ``get`` answers from a bounded per-process cache of the record
this process last read or committed (``fresh=True`` always reads Redis); ``commit`` is a
compare-and-set script that writes the new record, given as an argument, with its TTL
or, with ``release=True``, deletes the session instead. (The new record used to go in a
SET of its own under a staging name, renamed over the record by the script: Redis spent
about 2 us less per commit, 9.5 against 11.8 us in one script call for 32, but the
server built and parsed a command more per commit.) Concurrent commits are coalesced:
whatever commits wait while a pipeline is in flight go out together as the next
pipeline, with one script call for all of them (one per hash tag on a cluster); a step's
commit made while none is in flight goes out at once, from its caller. Replies are
parsed here, not by redis-py's per-reply parser.
The cache's states are read-only and replaced, never written in place: a read shares its
record's state rather than copying it, and an applied commit keeps a view of the bytes it
sent; one future per ``commit_many`` call, not per commit.

Lazy refreshes. A step rewrites only the record. The live-set entry records an expiry of
now + TTL + TTL/10, and a process re-writes it only when it last did more than TTL/10
ago, so the entry never expires before the session does, and outlives it by at most
TTL/10: counts include sessions that expired less than TTL/10 ago. The marker's TTL is set
to TTL + W + W/10 (W = 24 h, or 10 x TTL if that is longer), re-written when this process
last did more than W/10 ago: an expired session is told apart from an unknown one for at
least W (at most 1.1 W). A process that does not know when an entry was last written (it
has not cached the session, or lost it to a conflict) re-writes it with the commit.

Connections. At most ``max_connections`` operations run at once (one connection each per
node); the others wait up to ``pool_timeout_s`` for a turn, then answer 503
``store_unavailable``. Every such answer is logged with its cause and reported through
``on_unavailable`` (a metric). Nothing is retried by the client: a re-sent commit could
apply twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis import exceptions as rx
from redis._parsers.base import BaseParser
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
    own_copy,
)
from service.sessions.base import SessionRecord, SessionStore, frozen_state

log = logging.getLogger("service.sessions.redis")

BUCKETS = 256
# revision, step_count, last_used, created_at, version, last_seq, state floats,
# outputs bytes, owner bytes, model bytes, fingerprint bytes, output ndim, flags.
_HEADER = struct.Struct("<QQddqqIIHHHBB")
_REVISION = struct.Struct("<Q")
_EXPECTED = struct.Struct("<Qd")  # revision and created_at, as the commit script compares them
_EXPECTED_BULK = struct.Struct("<5sQdB2s")
"""A commit's argument without an owner, in RESP: ``$17``, the expected revision and
created_at, the digit of its flags."""
_LAST_USED = struct.Struct("<d")  # at byte 16, overwritten in place by touch
_HAS_OWNER, _HAS_SEQ, _HAS_OUTPUTS = 1, 2, 4

_CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (rx.MaxConnectionsError, "pool"),
    (rx.TimeoutError, "timeout"),
    (asyncio.TimeoutError, "timeout"),
    (rx.ReadOnlyError, "read_only"),
    (rx.OutOfMemoryError, "out_of_memory"),
    (rx.BusyLoadingError, "loading"),
    (rx.ClusterDownError, "cluster_down"),
    (rx.TryAgainError, "cluster_down"),
    (rx.SlotNotCoveredError, "cluster_down"),
    (rx.ClusterError, "cluster_down"),
    (rx.RedisClusterException, "cluster_down"),
    (rx.ConnectionError, "connection"),
    (rx.InvalidResponse, "connection"),  # a reply stream that does not parse
    (OSError, "connection"),
)
_UNAVAILABLE = tuple(kind for kind, _ in _CAUSES)
_REFUSALS = ("BUSY ", "NOREPLICAS ", "MISCONF ")
"""Error replies redis-py has no class for that mean Redis refuses writes for now: a
script running past its time limit, fewer replicas than ``min-replicas-to-write``, a
failed snapshot with ``stop-writes-on-bgsave-error``. Any other error reply (WRONGTYPE on
a foreign key, an error in one of our scripts, NOPERM) is a bug or a misconfiguration,
not "try again later": it is raised as it is (a 500 and a logged traceback)."""


def _refused(exc: object) -> bool:
    return type(exc) is rx.ResponseError and str(exc).startswith(_REFUSALS)


def _is_unavailable(exc: object) -> bool:
    """Whether ``exc`` (raised, or a reply in place) is a failure to reach the store."""
    return isinstance(exc, _UNAVAILABLE) or _refused(exc)


def _cause(exc: BaseException) -> str:
    """The ``cause`` label of a failure to reach the store."""
    if _refused(exc):
        return "refused"
    return next((c for kind, c in _CAUSES if isinstance(exc, kind)), "connection")



# Codes returned by the scripts.
_OK, _CONFLICT, _NOT_FOUND, _EXPIRED, _EXISTS, _FULL = 1, 0, -1, -2, -3, -4

_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- {-2, owner} when the marker says the session expired, {-1} when it never existed.
local function gone(marker)
  local owner = redis.call('GET', marker)
  if owner then return {-2, owner} end
  return {-1}
end
"""

# KEYS: session, marker, bucket live set.
# ARGV: id, blob, ttl_ms, marker_ttl_ms, owner, live_ms
_CREATE = """
local now = now_ms()
local pruned = redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then return {-3, pruned} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[1])
return {1, pruned}
"""

# KEYS: three per commit: session, marker, bucket live set.
# ARGV: marker_ttl_ms, live_ms (the expiry recorded in the live set, minus now), the
# position of the id in a session key's name, ttl_ms, then two per commit: first the
# expected revision and created_at (16 bytes: header bytes 0-7 and 24-31), a digit of
# flags (1 release: delete instead of writing, 2 refresh the marker, 4 refresh the
# live-set entry) and, with flag 2, the owner; then the new record (empty for a release).
# The created_at tells incarnations of one id apart: a session deleted and re-created
# under the same id (Triton START) restarts at revision 0, and a copy cached from the old
# one must not pass the compare-and-set when the new one reaches the same revision.
# Returns 1 when every commit applied, else one reply per commit.
_COMMIT = """
local at, ttl = tonumber(ARGV[3]), ARGV[4]
local out, failed, now = {}, false, nil
for i = 1, #KEYS / 3 do
  local key, marker, live = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = ARGV[3 + 2 * i]
  local flags = string.byte(a, 17) - 48
  local head = redis.call('GETRANGE', key, 0, 31)
  local reply = {1}
  if head == '' then
    reply = gone(marker)
  elseif string.sub(head, 1, 8) .. string.sub(head, 25, 32) ~= string.sub(a, 1, 16) then
    reply = {0, string.sub(head, 9, 16)}
  elseif flags % 2 == 1 then
    redis.call('DEL', key, marker)
    redis.call('ZREM', live, string.sub(key, at))
  else
    redis.call('SET', key, ARGV[4 + 2 * i], 'PX', ttl)
    if flags % 4 >= 2 then redis.call('SET', marker, string.sub(a, 18), 'PX', ARGV[1]) end
    if flags >= 4 then
      now = now or now_ms()
      redis.call('ZADD', live, now + tonumber(ARGV[2]), string.sub(key, at))
    end
  end
  if reply[1] ~= 1 then failed = true end
  out[i] = reply
end
if failed then return out end
return 1
"""

# KEYS: session, marker, bucket live set.
# ARGV: id, last_used (8 bytes), ttl_ms, marker_ttl_ms, live_ms
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return gone(KEYS[2]) end
redis.call('SETRANGE', KEYS[1], 16, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[5]), ARGV[1])
return {1}
"""

# KEYS: session, marker, bucket live set.  ARGV: id.  Returns {deleted, owner}.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local owner = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, owner}
"""

# KEYS: bucket live set
_COUNT = "return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms(), '+inf')"
_SWEEP = "return redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms())"

# KEYS: owner set.  ARGV: id, max, ttl_ms.  Reserves a place for id, or returns
# {-4, ids whose last known expiry has passed} for the caller to verify. The set has no
# TTL of its own (steps do not refresh it): one per API key, at most the key's limit of
# members, emptied by deletes and by the verification.
_RESERVE = """
local now = now_ms()
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  return {1}
end
return {-4, redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)}
"""

_SCRIPTS = {
    "create": _CREATE,
    "commit": _COMMIT,
    "touch": _TOUCH,
    "delete": _DELETE,
    "count": _COUNT,
    "sweep": _SWEEP,
    "reserve": _RESERVE,
}


def encode(
    record: SessionRecord, *, revision: int | None = None, last_used: float | None = None
) -> bytes:
    """The stored form of ``record`` (optionally with another revision / last_used)."""
    head, blob = _encode_parts(record, revision, last_used)
    return head + blob


def _identity(record: SessionRecord) -> tuple[bytes, int, int, int]:
    """The fields of a record that a cache entry keeps encoded (owner, model, fingerprint),
    as stored, with their lengths: the same for every commit through one entry
    (``_same_identity``)."""
    owner = b"" if record.owner is None else record.owner.encode()
    model = record.model.encode()
    fingerprint = record.fingerprint.encode()
    return owner + model + fingerprint, len(owner), len(model), len(fingerprint)


def _same_identity(cached: SessionRecord, record: SessionRecord) -> bool:
    """Whether ``record`` is of the incarnation ``cached`` is, with the same identity: what
    a cache entry keeps encoded (``_identity``) and does not copy on a commit. A Triton
    START over a live sequence keeps its incarnation (``created_at``, which the
    compare-and-set checks) but restarts it on the model served now, which may be
    another one: that commit needs a new entry."""
    return (
        cached.created_at == record.created_at
        and cached.fingerprint == record.fingerprint
        and cached.model == record.model
        and cached.version == record.version
        and cached.owner == record.owner
    )


_DIMS = [struct.Struct(f"<{n}q") for n in range(8)]
_F4 = np.dtype("<f4")


def _encode_parts(
    record: SessionRecord,
    revision: int | None,
    last_used: float | None,
    identity: tuple[bytes, int, int, int] | None = None,
) -> tuple[bytes, bytes]:
    """The stored form as two pieces: everything before the state, and the state's bytes
    (little-endian float32, flat). ``identity`` is ``_identity(record)`` when the caller
    keeps it. (Every step's commit runs this: it is written for few Python operations.)"""
    ids, n_owner, n_model, n_fingerprint = identity or _identity(record)
    state = record.state
    blob = (state if state.dtype == _F4 else state.astype(_F4)).tobytes()  # C order, flat
    outputs, shape, last_seq = record.last_outputs, record.last_outputs_shape, record.last_seq
    dims = (_DIMS[len(shape)] if len(shape) < 8 else struct.Struct(f"<{len(shape)}q")).pack(*shape)
    header = _HEADER.pack(
        record.revision if revision is None else revision,
        record.step_count,
        record.last_used if last_used is None else last_used,
        record.created_at,
        record.version,
        0 if last_seq is None else last_seq,
        len(blob) >> 2,
        0 if outputs is None else len(outputs),
        n_owner,
        n_model,
        n_fingerprint,
        len(shape),
        (0 if record.owner is None else _HAS_OWNER)
        | (0 if last_seq is None else _HAS_SEQ)
        | (0 if outputs is None else _HAS_OUTPUTS),
    )
    return b"%b%b%b%b" % (header, ids, dims, outputs or b""), blob


def decode(session_id: str, blob: bytes) -> SessionRecord:
    (
        revision, step_count, last_used, created_at, version, last_seq,
        n_state, n_outputs, n_owner, n_model, n_fingerprint, ndim, flags,
    ) = _HEADER.unpack_from(blob)  # fmt: skip
    pos = _HEADER.size
    owner = blob[pos : pos + n_owner].decode()
    pos += n_owner
    model = blob[pos : pos + n_model].decode()
    pos += n_model
    fingerprint = blob[pos : pos + n_fingerprint].decode()
    pos += n_fingerprint
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
        fingerprint=fingerprint,
    )


Command = tuple | list | bytes
"""A command: a tuple of str / bytes / int arguments, or its RESP form already (bytes, or a
list of bytes to write one after the other): the commit pipeline's commands, built
without a pass per argument."""


def _pack(commands: Sequence[Command]) -> list[Any]:
    """RESP for the commands, in pieces (joined into one buffer by ``_exchange``): several
    times cheaper than redis-py's general encoder on a 2 KiB record."""
    out: list[Any] = []
    for command in commands:
        if isinstance(command, bytes):
            out.append(command)
            continue
        if isinstance(command, list):
            out += command
            continue
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return out


def resp_arguments(command: bytes | list) -> list[bytes]:
    """The arguments of a command given in RESP form."""
    arguments, _ = _parse(command if isinstance(command, bytes) else b"".join(command), 0)
    return arguments


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(data), data)


class _Incomplete(Exception):
    """The buffer ends inside a reply: read more. (Raised as a new instance each time: a
    raised instance keeps its traceback, and one raised again grows it.)"""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP2/RESP3 value at ``buf[pos:]`` and the position after it; an error reply is
    returned (not raised) as redis-py's exception for it. Raises _Incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 58 or kind == 40:  # : integer, ( big number
        return int(buf[pos + 1 : end]), end + 2
    if kind == 36 or kind == 61 or kind == 33:  # $ bulk, = verbatim, ! bulk error
        n = int(buf[pos + 1 : end])
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if len(buf) < stop + 2:
            raise _Incomplete
        data = buf[end + 2 : stop]
        if kind == 33:
            return BaseParser.parse_error(data.decode(errors="replace")), stop + 2
        return (data[4:] if kind == 61 else data), stop + 2
    if kind == 42 or kind == 126 or kind == 62:  # * array, ~ set, > push
        n = int(buf[pos + 1 : end])
        if n < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 37:  # % map
        n = int(buf[pos + 1 : end])
        pairs: dict[Any, Any] = {}
        pos = end + 2
        for _ in range(n):
            key, pos = _parse(buf, pos)
            pairs[key], pos = _parse(buf, pos)
        return pairs, pos
    if kind == 95:  # _ null
        return None, end + 2
    if kind == 35:  # # boolean
        return buf[pos + 1 : end] == b"t", end + 2
    if kind == 44:  # , double
        return float(buf[pos + 1 : end]), end + 2
    if kind == 45:  # - error
        return BaseParser.parse_error(buf[pos + 1 : end].decode(errors="replace")), end + 2
    raise rx.InvalidResponse(f"unexpected RESP type {chr(kind)!r}")


class _Poll:
    """A lone commit's wait for Redis's answer, by polling its socket for up to
    ``budget_s`` rather than sleeping until the answer arrives: a thread that sleeps
    takes 40-300 us more to wake on a VM, as long as Redis takes to answer on loopback
    or longer (one PING: 58 us with a blocking read and 21 us polling on one 2-core VM,
    355 and 30 us on another, where a step's answer came 300-400 us after its write).
    Only for a step whose session is the only one with a request in progress, and no
    stateless prediction either (``busy``: what arrives meanwhile waits at most the
    budget), and only while answers come in time: ``rtt_s``, an average of how long the
    first bytes of an answer took, turns it off against a Redis farther away than the
    budget (and back on if it comes closer: lone commits are timed while not polled)."""

    __slots__ = ("_buffer", "budget_s", "rtt_s")

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.rtt_s = 0.0
        self._buffer = bytearray(1 << 16)
        """Read into: ``os.read`` would allocate its size on every empty try."""

    def worth_it(self) -> bool:
        return self.budget_s > 0 and self.rtt_s < self.budget_s

    def read(self, fd: int, since: float) -> bytes | None:
        """What the socket ``fd`` holds once some arrives within the budget (from ``since``),
        or None. Raises on end of stream, as a read would."""
        deadline = since + self.budget_s
        buffer = self._buffer
        while True:
            try:
                n = os.readv(fd, (buffer,))
            except BlockingIOError:
                if time.perf_counter() < deadline:
                    continue
                return None
            if not n:
                raise rx.ConnectionError("connection closed by the server")
            self.took(time.perf_counter() - since)
            return bytes(buffer[:n])

    def took(self, seconds: float) -> None:
        """Count one answer's time in (at most twice the budget: one stall must not turn
        polling off for long)."""
        self.rtt_s += (min(seconds, 2 * self.budget_s) - self.rtt_s) / 8


_POLL_COMMITS = 8
"""The most commits a polled pipeline carries: Redis runs the script about 12 us per
commit, so a multiplexed message's commits would outlast the budget (and, timed, turn
polling off for the lone steps it is for)."""


async def _exchange(
    connection: Any, payload: list[Any], count: int, poll: _Poll | None = None
) -> list[Any]:
    """Write ``payload`` on a connected redis-py connection and read ``count`` replies,
    parsed here from its stream reader in as few reads as the data arrives in (redis-py's
    parser costs an awaited call and a timeout per reply). The pieces go out joined: one
    buffer costs uvloop less than a thousand (a commit pipeline has four per step);
    measured at 256 streams, 4 % more steps per second. With ``poll``, the answer is
    timed and, while ``poll.worth_it()``, first polled for on the socket itself (plain
    TCP or Unix socket, nothing buffered yet: the reader then sees only what comes
    after)."""
    reader, writer = connection._reader, connection._writer
    writer.write(b"".join(payload))
    if writer.transport.get_write_buffer_size():  # not all sent at once: wait for it
        await writer.drain()
    replies: list[Any] = []
    buf, pos = b"", 0
    if poll is not None:
        since = time.perf_counter()
        transport = writer.transport
        if (
            poll.worth_it()
            and not _dead(connection)
            and transport.get_extra_info("sslcontext") is None
        ):
            buf = poll.read(transport.get_extra_info("socket").fileno(), since) or b""
        if not buf:  # timed the slow way: its first chunk, below
            chunk = await reader.read(1 << 18)
            if not chunk:
                raise rx.ConnectionError("connection closed by the server") from None
            poll.took(time.perf_counter() - since)
            buf = chunk
    while len(replies) < count:
        if pos < len(buf):  # (not before the first read: an _Incomplete raised for nothing)
            try:
                reply, end = _parse(buf, pos)
            except _Incomplete:
                pass
            else:
                if buf[pos] != 62:  # a RESP3 push is out of band: not a reply
                    replies.append(reply)
                pos = end
                continue
        chunk = await reader.read(1 << 18)
        if not chunk:
            raise rx.ConnectionError("connection closed by the server") from None
        buf, pos = buf[pos:] + chunk, 0
    if pos != len(buf):
        raise rx.InvalidResponse("more data than replies")
    return replies


_SCRIPT_BYTES = 4 << 20
"""The most new-record bytes one commit script call carries (more go in another call of
the same pipeline): Redis holds a command's arguments, and copies them into Lua, whole."""


def _within_bytes(items: list[_Commit], limit: int) -> list[list[_Commit]]:
    """``items`` in consecutive runs of at most ``limit`` bytes of new records (one item
    at least each)."""
    if sum(len(item.blob) for item in items) <= limit:  # the common case
        return [items]
    runs: list[list[_Commit]] = [[]]
    size = 0
    for item in items:
        if runs[-1] and size + len(item.blob) > limit:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += len(item.blob)
    return runs


def _write_over(cached: SessionRecord, record: SessionRecord, state: np.ndarray) -> None:
    """What a commit can change, from ``record`` onto the cache's own copy (the rest is
    fixed for a cache entry: ``_same_identity``). The state is replaced, never written in
    place: ``_cached`` hands out records that share it (read-only, so that no caller can
    write it either)."""
    cached.state = state
    cached.last_used = record.last_used
    cached.step_count = record.step_count
    cached.revision = record.revision
    cached.last_seq = record.last_seq
    cached.last_outputs = record.last_outputs
    cached.last_outputs_shape = record.last_outputs_shape


def _dead(connection: Any) -> bool:
    """Whether an idle, connected redis-py connection can no longer be used: the server
    closed it, the transport failed (a reset while idle; writing would raise), or it holds
    bytes nobody asked for (they would be read as the next command's reply)."""
    reader = connection._reader
    return (
        bool(reader._buffer)
        or reader._eof
        or reader.exception() is not None
        or connection._writer.transport.is_closing()
    )


def bucket_of(session_id: str) -> int:
    return zlib.crc32(session_id.encode()) % BUCKETS


class _Waiter:
    """The commits of one ``commit`` / ``commit_many`` call: one future for all of them,
    done when the last one's outcome is known (a future per commit cost more than the
    rest of its bookkeeping)."""

    __slots__ = ("errors", "future", "left")

    def __init__(self, future: asyncio.Future, count: int) -> None:
        self.future = future
        self.left = count
        self.errors: list[BaseException | None] = [None] * count

    def decided(self, index: int, error: BaseException | None) -> None:
        self.errors[index] = error
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.errors)


@dataclass(slots=True)
class _Commit:
    record: SessionRecord
    release: bool
    waiter: _Waiter
    index: int
    """Its place in its waiter's ``errors``."""
    revision: int = 0
    entry: _Cached | None = None
    flags: int = 0
    expected: bytes = b""
    blob: bytes = b""
    """The new state's bytes, as sent: once applied, the cache keeps a view of them."""
    head: bytes = b""
    """The new record's RESP before the state: its length, the rest of the record."""
    script_reply: int = 0
    """Where its reply is: the index of its script's, and its place in that script."""
    position: int = 0


@dataclass(slots=True)
class _Cached:
    """The local cache's entry for one session: the record this process last read or
    committed, its keys' names in RESP, and when this process last refreshed the marker's
    TTL and the live-set entry (``refresh_clock``; -inf when unknown: refresh next time).
    One entry per incarnation of a session (its ``created_at``)."""

    record: SessionRecord
    tag: bytes
    keys: bytes
    marker_at: float = -math.inf
    live_at: float = -math.inf
    private: bool = False
    """``record`` is the cache's own copy (not yet, in a new entry: the caller's)."""
    identity: tuple[bytes, int, int, int] | None = None
    """``_identity(record)``, the same for every commit through this entry."""


class _Expiry:
    """What ``asyncio.timeout`` does for one exchange, for a third of its cost (a timer
    handle, none of the context manager's machinery: 10 -> 3 us on the 2-core VM, paid on
    every round trip): when ``seconds`` pass, the task is cancelled; ``expired()``, asked
    on a CancelledError, tells that cancellation from any other (as ``asyncio.timeout``
    does, with ``Task.uncancel``)."""

    __slots__ = ("_cancelling", "_fired", "_handle", "_task")

    def __init__(self, seconds: float) -> None:
        self._task = task = asyncio.current_task()
        assert task is not None
        self._cancelling = task.cancelling()
        self._fired = False
        self._handle = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """Whether the CancelledError being handled is this expiry's (and not also an
        outside cancellation: that one propagates)."""
        if not self._fired:
            return False
        self._fired = False  # uncancelled once
        return self._task.uncancel() <= self._cancelling

    def cancel(self) -> None:
        self._handle.cancel()
        if self._fired:  # fired as the exchange ended: its cancellation is withdrawn
            self._fired = False
            self._task.uncancel()


class _Turn:
    """``RedisSessionStore._turn``: a plain class rather than @asynccontextmanager, which
    cost a generator and its machinery on every round trip."""

    __slots__ = ("answers", "store", "what")

    def __init__(self, store: RedisSessionStore, what: str, answers: int) -> None:
        self.store, self.what, self.answers = store, what, answers

    async def __aenter__(self) -> Any:
        store = self.store
        gate = store._gate
        if gate.locked():
            try:
                await asyncio.wait_for(gate.acquire(), store._pool_timeout_s)
            except TimeoutError:
                raise store._unavailable(
                    rx.MaxConnectionsError(
                        f"no free Redis connection within {store._pool_timeout_s:g} s "
                        f"({store._max_connections} in use)"
                    ),
                    self.what,
                    self.answers,
                ) from None
        else:
            await gate.acquire()
        return store._client

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.store._gate.release()
        if isinstance(exc, Exception) and _is_unavailable(exc):
            raise self.store._unavailable(exc, self.what, self.answers) from exc


class RedisSessionStore(SessionStore):
    _script_per_tag = False
    """Whether a pipeline's commits go in one commit script call per hash tag (a cluster:
    a script's keys must live in one slot) rather than one for all of them (one Redis
    holds every key)."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_sessions: int,
        max_sessions_per_owner: int,
        clock: Callable[[], float] = time.time,
        refresh_clock: Callable[[], float] = time.monotonic,
        prefix: str = "rnnserve:",
        timeout_s: float = 1.5,
        max_connections: int = 64,
        pool_timeout_s: float = 30.0,
        cache_sessions: int = 10_000,
        max_pipeline: int = 512,
        poll_s: float = 0.0,
    ) -> None:
        super().__init__(ttl_s, max_sessions, max_sessions_per_owner)
        self._clock = clock
        self._refresh_clock = refresh_clock
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        # Lazy refreshes (see "Lazy refreshes" in the module docstring). The live-set entry
        # records an expiry up to ``live_slack_ms`` late, and is re-written only when this
        # process last wrote it more than that long ago; the marker is kept for at least
        # ``marker_window_ms`` after the session expires, and re-written at most every
        # tenth of that.
        self._live_slack_ms = max(1, self._ttl_ms // 10)
        self._live_ms = self._ttl_ms + self._live_slack_ms
        marker_window_ms = max(self._ttl_ms * 10, 86_400_000)
        self._marker_slack_ms = marker_window_ms // 10
        self._marker_ttl_ms = self._ttl_ms + marker_window_ms + self._marker_slack_ms
        self._commit_args = b"".join(
            _bulk(b"%d" % n)
            for n in (self._marker_ttl_ms, self._live_ms, len(prefix.encode()) + 7, self._ttl_ms)
        )
        self._timeout_s = timeout_s
        # Connections are opened in bursts (a wave of stream opens), when the event loop is
        # busiest: an operation that connects first gets twice the timeout, its connect
        # included (``_send``); the cluster client connects on its own, within this.
        self._connect_timeout_s = max(timeout_s, 5.0)
        self._max_connections = max_connections
        self._pool_timeout_s = pool_timeout_s
        self._gate = asyncio.Semaphore(max_connections)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_size = cache_sessions
        self._max_pipeline = max_pipeline
        self._poll = _Poll(poll_s)
        self._pending: list[_Commit] = []
        self._writing = False
        self._writer: asyncio.Task | None = None
        self._idle: list[Any] = []
        """Connections not in use (at most ``max_connections``, the gate's size)."""
        self._closed = False
        self._limits = _Limits(self)
        self._shas = {
            name: hashlib.sha1((_LUA_COMMON + body).encode()).hexdigest()
            for name, body in _SCRIPTS.items()
        }
        self._commit_sha = self._shas["commit"].encode()
        self.expired_total = 0
        self._client = self._connect(url)

    def _connect(self, url: str) -> Any:
        # No client-side retries: a re-sent commit could apply twice. The pool checks idle
        # connections before use and reconnects dead ones, so a restarted Redis heals by
        # itself; maintenance notifications are off because with them on (redis-py 8 default
        # on RESP3) the pool skips that check and hands out connections closed by the server.
        # The gate (``max_connections`` operations at once) keeps the pool below its size.
        pool = ConnectionPool.from_url(
            url,
            max_connections=self._max_connections + 1,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        return Redis(connection_pool=pool)

    # -- keys ----------------------------------------------------------------------

    def _tag(self, session_id: str) -> str:
        return f"{self._prefix}{{{bucket_of(session_id):02x}}}"

    def _keys(self, session_id: str) -> list[str]:
        tag = self._tag(session_id)
        return [f"{tag}s:{session_id}", f"{tag}t:{session_id}", f"{tag}live"]

    def _bucket_sets(self) -> list[str]:
        return [f"{self._prefix}{{{b:02x}}}live" for b in range(BUCKETS)]

    def _owner_set(self, owner: str) -> str:
        return f"{self._prefix}{{o:{owner}}}"

    # -- plumbing ------------------------------------------------------------------

    def _unavailable(self, exc: BaseException, what: str, answers: int = 1) -> StoreUnavailable:
        """Log and count a failure to reach Redis; ``answers`` is how many requests it
        fails (the commits of one pipeline fail together)."""
        cause = _cause(exc)
        log.warning(
            "session store unavailable (%s) during %s, %d answer(s) 503: %s: %s",
            cause, what, answers, type(exc).__name__, exc,
        )  # fmt: skip
        if self.on_unavailable is not None:
            self.on_unavailable(cause, answers)
        return StoreUnavailable(f"session store unavailable: {exc}")

    def _turn(self, what: str, answers: int = 1) -> _Turn:
        """``async with``: one operation's turn on the connections (waits up to
        ``pool_timeout_s``); a failure to reach Redis inside it is StoreUnavailable."""
        return _Turn(self, what, answers)

    async def _load_scripts(self, client: Any) -> None:
        for body in _SCRIPTS.values():
            await client.script_load(_LUA_COMMON + body)

    async def _pipeline(
        self,
        commands: Sequence[Command],
        what: str,
        answers: int = 1,
        *,
        each: bool = False,
        poll: _Poll | None = None,
    ) -> list[Any]:
        """Run raw commands as one pipeline; errors come back in place. EVALSHA of a
        script Redis does not know (after a restart) loads the scripts and runs again:
        NOSCRIPT means nothing ran. A reply that is a failure to reach the store fails the
        whole pipeline (StoreUnavailable), unless ``each``: then the caller decides each
        command from its own reply (on a cluster, one failing node fails only its own
        sessions' commands), and ``_unavailable_each`` turns those into 503s. ``poll``:
        the answer is polled for (``_Poll``)."""
        async with self._turn(what, answers) as client:
            results = await self._send(client, commands, poll)
            missing = [i for i, r in enumerate(results) if isinstance(r, rx.NoScriptError)]
            if missing:
                try:
                    await self._load_scripts(client)
                    again = await self._send(client, [commands[i] for i in missing])
                except Exception as exc:  # only the re-sent commands failed
                    if not each or not _is_unavailable(exc):
                        raise
                    again = [exc] * len(missing)
                for i, result in zip(missing, again):
                    results[i] = result
        if not each:
            for result in results:
                if _is_unavailable(result):
                    raise self._unavailable(result, what, answers)
        return results

    def _unavailable_each(self, outcomes: list[Any], what: str) -> None:
        """Replace, in place, each outcome that is a failure to reach the store with its own
        StoreUnavailable; logged and counted once per cause for all the answers it fails."""
        by_cause: dict[str, list[int]] = {}
        for i, outcome in enumerate(outcomes):
            if _is_unavailable(outcome):
                by_cause.setdefault(_cause(outcome), []).append(i)
        for indices in by_cause.values():
            first = self._unavailable(outcomes[indices[0]], what, len(indices))
            for i in indices:
                outcomes[i] = StoreUnavailable(first.message)

    async def _send(
        self, client: Any, commands: Sequence[Command], poll: _Poll | None = None
    ) -> list[Any]:
        """The commands as one write on one connection, their raw replies in order (an
        error reply in place), within ``timeout_s``. Beneath redis-py's Pipeline, its
        per-reply parser and its pool (the gate already bounds the connections in use),
        which cost several times more per round trip; a connection that failed mid-way
        is closed, and opened again before its next use, as is one the server closed."""
        connection = self._idle.pop() if self._idle else client.connection_pool.make_connection()
        try:
            if connection.is_connected and _dead(connection):
                await connection.disconnect()
            # (Re)connecting counts against the operation's time (twice the timeout then):
            # after a timeout the connection is dropped, and a stalled Redis must not hold
            # the next operation for a connect timeout on top.
            connecting = not connection.is_connected
            seconds = self._timeout_s * (2 if connecting else 1)
            expiry = _Expiry(seconds)
            try:
                if connecting:
                    await connection.connect()
                return await _exchange(connection, _pack(commands), len(commands), poll)
            except asyncio.CancelledError:
                if expiry.expired():
                    what = "connection and answer" if connecting else "answer"
                    raise rx.TimeoutError(
                        f"no {what} from Redis within {seconds:g} s"
                    ) from None
                raise
            finally:
                expiry.cancel()
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            if self._closed:  # closed meanwhile: close() has already closed the idle ones
                await connection.disconnect()
            else:
                self._idle.append(connection)

    def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple:
        return ("EVALSHA", self._shas[name], len(keys), *keys, *args)

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        (result,) = await self._pipeline([self._script(name, keys, args)], name)
        if isinstance(result, Exception):
            raise result
        return result

    def _gone(self, session_id: str, reply: list) -> Exception:
        self._cache.pop(session_id, None)
        if reply[0] == _EXPIRED:
            exc = SessionExpired(f"session {session_id} expired after {self.ttl_s:g} s idle")
            exc.owner = reply[1].decode() if len(reply) > 1 and reply[1] else None  # type: ignore[attr-defined]
            return exc
        return SessionNotFound(f"no session {session_id}")

    # -- local cache ---------------------------------------------------------------

    def _entry(self, record: SessionRecord) -> _Cached:
        """The cache entry of ``record``'s session (a new one, not yet cached, when there
        is none or it belongs to another incarnation of the id or another identity:
        ``_same_identity``)."""
        entry = self._cache.get(record.session_id)
        if entry is not None and _same_identity(entry.record, record):
            return entry
        session_id = record.session_id
        tag = self._tag(session_id)
        keys = (f"{tag}s:{session_id}", f"{tag}t:{session_id}", f"{tag}live")
        return _Cached(
            record,
            tag.encode(),
            b"".join(_bulk(k.encode()) for k in keys),
            identity=_identity(record),
        )

    def _remember(self, entry: _Cached, record: SessionRecord, *, frozen: bool = False) -> None:
        """Cache a private copy of ``record`` in ``entry``: written over the entry's own
        copy when it has one (a new record object per step would outlive a few garbage
        collections, and every one promoted makes a full collection come sooner).
        ``frozen``: its state is a read-only view of bytes of its own, kept as it is."""
        cached = entry.record
        state = record.state if frozen else frozen_state(record.state)
        if entry.private:
            _write_over(cached, record, state)
        else:
            entry.record = cached = record.shallow()
            cached.state = state
            entry.private = True
        cache = self._cache
        cache[record.session_id] = entry
        cache.move_to_end(record.session_id)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _cached(self, session_id: str) -> SessionRecord | None:
        """A copy of the cached record, unless it may have expired. It shares the state
        array, read-only, which the cache replaces and never writes in place (``_remember``):
        a step's state is copied once, into the batch, not also here."""
        entry = self._cache.get(session_id)
        if entry is None:
            return None
        record = entry.record
        if record.last_used + self.ttl_s <= self._clock():  # may have expired: ask Redis
            del self._cache[session_id]
            return None
        self._cache.move_to_end(session_id)
        return record.shallow()

    # -- the store -------------------------------------------------------------------

    async def create(self, record: SessionRecord) -> None:
        await self._limits.admit(record)

    async def _insert(self, record: SessionRecord) -> None:
        """The create script itself, after the limits admitted ``record``."""
        owner = record.owner
        at = self._refresh_clock()
        args = [
            record.session_id, encode(record), self._ttl_ms, self._marker_ttl_ms, owner or "",
            self._live_ms,
        ]  # fmt: skip
        code, pruned = await self._eval("create", self._keys(record.session_id), args)
        self.expired_total += pruned
        if code == _EXISTS:
            raise SessionConflict(f"session {record.session_id} already exists")
        entry = self._entry(record)
        entry.marker_at = entry.live_at = at
        self._remember(entry, record)

    async def get(self, session_id: str, *, fresh: bool = False) -> SessionRecord:
        if not fresh:
            cached = self._cached(session_id)
            if cached is not None:
                return cached
        (result,) = await self.get_many([session_id], fresh=True)
        if isinstance(result, BaseException):
            raise result
        return result

    async def get_many(
        self, session_ids: list[str], *, fresh: bool = False
    ) -> list[SessionRecord | BaseException]:
        out: list[SessionRecord | BaseException | None] = [None] * len(session_ids)
        wanted: list[int] = []
        for i, session_id in enumerate(session_ids):
            cached = None if fresh else self._cached(session_id)
            if cached is None:
                wanted.append(i)
            else:
                out[i] = cached
        if wanted:
            commands: list[Command] = []
            for i in wanted:
                key, marker, _ = self._keys(session_ids[i])
                commands += [("GET", key), ("GET", marker)]
            try:
                replies = await self._pipeline(commands, "get", len(wanted), each=True)
            except StoreUnavailable as exc:
                for i in wanted:
                    out[i] = exc
                return out  # type: ignore[return-value]
            failed: list[Any] = []
            for k, i in enumerate(wanted):
                session_id = session_ids[i]
                blob, marker = replies[2 * k], replies[2 * k + 1]
                if isinstance(blob, Exception) or isinstance(marker, Exception):
                    out[i] = blob if isinstance(blob, Exception) else marker
                    failed.append(i)
                elif blob is None:
                    out[i] = self._gone(
                        session_id, [_EXPIRED, marker] if marker is not None else [_NOT_FOUND]
                    )
                else:
                    record = decode(session_id, blob)
                    self._remember(self._entry(record), record)
                    out[i] = record
            if failed:
                errors = [out[i] for i in failed]
                self._unavailable_each(errors, "get")
                for i, error in zip(failed, errors):
                    out[i] = error
        return out  # type: ignore[return-value]

    async def commit(self, record: SessionRecord, *, release: bool = False) -> None:
        (error,) = await self.commit_many([record], [release])
        if error is not None:
            raise error

    async def commit_many(
        self, records: list[SessionRecord], release: list[bool] | None = None
    ) -> list[BaseException | None]:
        """Queue the commits for the next pipeline and wait for all of their outcomes. A
        writer task sends the pipelines, one at a time, while commits wait; it starts on
        the next turn of the event loop, so every commit made in this turn (say, by the
        steps one batch of onnxruntime work just released) goes out together.

        When no pipeline is in flight and none of the commits is a release, the caller
        sends its own pipeline at once instead (``_write_now``): a lone stream's step then
        spares the writer task's turn and the hop back to the caller; when its requests
        are the only ones in progress (``busy``), it polls for the answer (``_Poll``, up
        to ``poll_s``)."""
        if not records:
            return []
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), len(records))
        commits = [
            _Commit(r, bool(release and release[k]), waiter, k) for k, r in enumerate(records)
        ]
        if not self._writing and len(commits) <= self._max_pipeline and not any(release or ()):
            # nothing else in progress, and an answer Redis gives in microseconds (not a
            # multiplexed message's hundreds of commits): timed, polled for
            lone = 0 < self.busy() <= len(commits) <= _POLL_COMMITS and self._poll.budget_s
            await self._write_now(commits, self._poll if lone else None)
            return await waiter.future  # decided by now: no suspension
        self._pending += commits
        if not self._writing:
            self._start_writer()
        return await waiter.future

    def _start_writer(self) -> None:
        """A writer task for the waiting commits (it owns ``_writing`` until none wait)."""
        self._writing = True
        self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write_now(self, batch: list[_Commit], poll: _Poll | None = None) -> None:
        """``batch`` as the next pipeline, sent by its caller; commits made meanwhile wait
        for it, then go out through a writer task. A caller cancelled meanwhile leaves its
        commits in doubt, as a failed pipeline does (their cache entries dropped: the next
        read asks Redis, and the compare-and-set keeps any later commit exact), and
        strands no one else's."""
        self._writing = True
        try:
            await self._write_batch(batch, poll)
        except Exception as exc:  # a bug
            log.exception("the Redis commit writer failed")
            self._fail_undecided(batch, exc)
        finally:
            self._writing = False
            if self._pending:
                self._start_writer()

    async def _write(self) -> None:
        """Send the waiting commits as pipelines, one at a time, until none wait. A writer
        stopped by anything else than its pipelines' outcomes leaves no commit waiting for
        ever: the ones not sent yet are cancelled with it (a cancelled writer: the server
        stops), or go out through a new writer."""
        batch: list[_Commit] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_pipeline]
                del self._pending[: len(batch)]
                await self._write_batch(batch)
        except Exception as exc:  # a bug: the others wait for the next writer
            log.exception("the Redis commit writer failed")
            self._fail_undecided(batch, exc)
            if self._pending:
                self._start_writer()
                return  # the new writer owns ``_writing``
        except BaseException:  # cancelled (the server stops): so are the waiting commits
            stranded, self._pending = self._pending, []
            for item in stranded:
                item.waiter.future.cancel()
            self._writing = False
            raise
        self._writing = False

    def _fail_undecided(self, batch: list[_Commit], exc: BaseException) -> None:
        """After a bug in a pipeline's handling: the callers of its commits that still
        wait hear of it rather than wait for ever, and their sessions' cache entries go
        (the commits' fate is unknown: the next read asks Redis)."""
        for item in batch:
            self._cache.pop(item.record.session_id, None)
            if not item.waiter.future.done():
                item.waiter.future.set_exception(own_copy(exc))

    def _commit_commands(self, batch: list[_Commit], now: float, at: float) -> list[Command]:
        """The pipeline for ``batch``: the commit script call(s), each new record an argument;
        each item learns where its reply will be."""
        marker_due, live_due = at - self._marker_slack_ms / 1000, at - self._live_slack_ms / 1000
        commands: list[Command] = []
        groups: dict[bytes, list[_Commit]] = {}
        by_tag = self._script_per_tag
        for item in batch:
            record = item.record
            item.entry = entry = self._entry(record)
            item.revision = revision = record.revision + 1
            if item.release:
                flags = 1
            else:
                head, item.blob = _encode_parts(record, revision, now, entry.identity)
                item.head = b"$%d\r\n%b" % (len(head) + len(item.blob), head)
                flags = (2 if entry.marker_at < marker_due else 0) | (
                    4 if entry.live_at < live_due else 0
                )
            item.flags = flags
            if flags & 2:
                item.expected = _bulk(
                    _EXPECTED.pack(record.revision, record.created_at)
                    + b"%d%b" % (flags, (record.owner or "").encode())
                )
            else:
                item.expected = _EXPECTED_BULK.pack(
                    b"$17\r\n", record.revision, record.created_at, 48 + flags, b"\r\n"
                )
            if by_tag:
                members = groups.get(entry.tag)
                if members is None:
                    groups[entry.tag] = [item]
                else:
                    members.append(item)
        if not by_tag:
            groups[b""] = batch
        for group in groups.values():
            for members in _within_bytes(group, _SCRIPT_BYTES):
                self._script_call(members, commands)
        return commands

    def _script_call(self, members: list[_Commit], commands: list[Command]) -> None:
        """One commit script call for ``members`` (of one hash tag), appended to ``commands``."""
        n = len(members)
        command = [
            b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b"
            % (7 + 5 * n, self._commit_sha, _bulk(b"%d" % (3 * n)))
        ]
        command += [item.entry.keys for item in members]  # type: ignore[union-attr]
        command.append(self._commit_args)
        script_reply = len(commands)
        for position, item in enumerate(members):
            if item.release:
                command += (item.expected, b"$0\r\n\r\n")
            else:
                command += (item.expected, item.head, item.blob, b"\r\n")
            item.script_reply, item.position = script_reply, position
        commands.append(command)

    async def _write_batch(self, batch: list[_Commit], poll: _Poll | None = None) -> None:
        """One pipeline of commits; each item's outcome goes to its waiter."""
        errors: list[BaseException | None]
        now, at = self._clock(), self._refresh_clock()
        try:
            commands = self._commit_commands(batch, now, at)
            replies = await self._pipeline(commands, "commit", len(batch), each=True, poll=poll)
            errors = self._outcomes(batch, replies, now, at)
        except BaseException as exc:
            for item in batch:
                self._cache.pop(item.record.session_id, None)  # in doubt: read Redis next
            if not isinstance(exc, Exception):
                for item in batch:
                    item.waiter.future.cancel()
                raise
            errors = [exc] * len(batch)
        waiter = batch[0].waiter
        if (
            waiter.left == len(batch)
            and errors.count(None) == len(batch)
            and all(item.waiter is waiter for item in batch)
        ):  # the common case: all of one caller's commits (one onnxruntime call's), applied
            waiter.left = 0
            if not waiter.future.done():
                waiter.future.set_result(waiter.errors)
        else:
            given: set[int] = set()
            for item, error in zip(batch, errors):
                if error is not None:
                    if id(error) in given:  # one failure of many commits: each its own
                        error = own_copy(error)
                    given.add(id(error))
                item.waiter.decided(item.index, error)
        released = [
            (i.record.owner, i.record.session_id)
            for i, e in zip(batch, errors)
            if e is None and i.release and i.record.owner is not None
        ]
        if released:
            await self._forget_owners(released)

    def _outcomes(
        self, batch: list[_Commit], replies: list[Any], now: float, at: float
    ) -> list[BaseException | None]:
        """Each commit's outcome from the pipeline's replies (the cache follows them)."""
        errors: list[BaseException | None] = []
        failed = False
        for item in batch:
            reply = replies[item.script_reply]
            error: Exception | None = None
            if reply == 1:  # the whole script applied
                if item.release:
                    self._applied_release(item)
                else:
                    self._applied(item, now, at)
            else:
                if not isinstance(reply, Exception):
                    reply = reply[item.position]
                error = self._commit_outcome(item, reply, now, at)
                failed = failed or error is not None
            errors.append(error)
        if failed:
            self._unavailable_each(errors, "commit")
        return errors

    def _applied(self, item: _Commit, now: float, at: float) -> None:
        """A step's commit was applied: the cache takes the new record."""
        record = item.record
        record.revision = item.revision
        record.last_used = now
        entry = item.entry
        assert entry is not None
        if item.flags & 2:
            entry.marker_at = at
        if item.flags & 4:
            entry.live_at = at
        record.state = state = np.frombuffer(item.blob, _F4)  # as encoded: little-endian
        cache = self._cache
        if entry.private and cache.get(record.session_id) is entry:
            # _remember's common case, inline: a step of a session this process serves
            _write_over(entry.record, record, state)
            cache.move_to_end(record.session_id)
        else:
            self._remember(entry, record, frozen=True)

    def _applied_release(self, item: _Commit) -> None:
        item.record.revision = item.revision
        self._cache.pop(item.record.session_id, None)

    def _commit_outcome(
        self, item: _Commit, reply: Any, now: float, at: float
    ) -> Exception | None:
        record = item.record
        session_id = record.session_id
        if isinstance(reply, Exception):
            self._cache.pop(session_id, None)
            return reply
        code = reply[0]
        if code == _OK:
            if item.release:
                self._applied_release(item)
            else:
                self._applied(item, now, at)
            return None
        self._cache.pop(session_id, None)
        if code == _CONFLICT:
            (step_count,) = _REVISION.unpack(reply[1])
            return SessionConflict(
                "the session was changed by another request", step_count=step_count
            )
        return self._gone(session_id, reply)

    async def _forget_owners(self, entries: list[tuple[str | None, str]]) -> None:
        """Drop deleted sessions from their owners' sets (best effort: a leftover entry is
        verified against the session keys when its owner reaches the limit)."""
        commands = [("ZREM", self._owner_set(o), sid) for o, sid in entries if o is not None]
        if commands:
            try:
                await self._pipeline(commands, "delete")
            except StoreUnavailable:
                pass
            except Exception:  # best effort: the commits were answered
                log.exception("dropping %d deleted session(s) from their owners' sets", len(commands))

    async def touch(self, session_id: str, now: float) -> None:
        at = self._refresh_clock()
        args = [session_id, _LAST_USED.pack(now), self._ttl_ms, self._marker_ttl_ms, self._live_ms]
        reply = await self._eval("touch", self._keys(session_id), args)
        if reply[0] != _OK:
            raise self._gone(session_id, reply)
        entry = self._cache.get(session_id)
        if entry is not None:
            entry.record.last_used = now
            entry.marker_at = entry.live_at = at

    async def delete(self, session_id: str) -> bool:
        self._cache.pop(session_id, None)
        reply = await self._eval("delete", self._keys(session_id), [session_id])
        if reply[0] and len(reply) > 1 and reply[1]:
            await self._forget_owners([(reply[1].decode(), session_id)])
        return bool(reply[0])

    async def _per_bucket(self, script: str) -> int:
        commands = [self._script(script, [key], []) for key in self._bucket_sets()]
        replies = await self._pipeline(commands, script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return sum(int(r) for r in replies)

    async def count(self) -> int:
        """Live sessions: the sum of the 256 bucket counts (one pipeline per node)."""
        total = await self._per_bucket("count")
        self._limits.observed(total)
        return total

    async def sweep(self, now: float) -> int:
        """Prune expired entries from the bucket sets. ``now`` is ignored: expiry runs on
        the Redis clock (the keys' own TTL), which every replica shares."""
        pruned = await self._per_bucket("sweep")
        self.expired_total += pruned
        return pruned

    async def ping(self) -> None:
        async with self._turn("ping") as client:
            await client.ping()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()
        await self._client.aclose()


class _Limits:
    """Session limits without a global key.

    The total is the sum of the bucket counts, which costs one pipeline of 256 small scripts.
    Far from ``max_sessions`` a replica reuses a total summed less than ``_MAX_AGE_S`` ago plus
    what it created since; within ``margin`` of the limit it re-sums before every create,
    under a lock, so one replica never goes over, and R replicas creating at the same instant
    go over by at most R - 1 (each may count before another's create lands).

    The per-owner limit is exact: the owner's set is updated by a script that checks and adds
    in one step. Its members' expiries are those known at creation, so when an owner is at
    its limit the stale members are checked against the session keys (re-scored if alive,
    dropped if gone) and the reservation is tried once more.
    """

    _MAX_AGE_S = 1.0

    def __init__(self, store: RedisSessionStore) -> None:
        self.store = store
        self.margin = max(64, store.max_sessions // 20)
        self.total = 0
        self.since = 0
        self.at = -1e9
        self.lock = asyncio.Lock()
        self.summing: asyncio.Future | None = None

    def observed(self, total: int) -> None:
        self.total, self.since, self.at = total, 0, time.monotonic()

    async def _refresh(self) -> None:
        """Re-sum the buckets; creations arriving meanwhile share the one sum in flight.

        Far from the limit a failed sum keeps the previous total (the failure is logged
        and counted; the create itself still needs Redis): one slow sum under a burst
        must not refuse every creation waiting on it."""
        if self.summing is None:
            self.summing = asyncio.ensure_future(self.store.count())
            self.summing.add_done_callback(self._summed)
        with contextlib.suppress(StoreUnavailable):
            await asyncio.shield(self.summing)

    def _summed(self, future: asyncio.Future) -> None:
        self.summing = None
        if not future.cancelled():
            future.exception()  # retrieved here; each waiter gets it through the shield

    async def admit(self, record: SessionRecord) -> None:
        store = self.store
        near = self.total + self.since >= store.max_sessions - self.margin
        if near or time.monotonic() - self.at > self._MAX_AGE_S:
            if near:
                async with self.lock:
                    await store.count()
                    self._check_total()
                    await self._admit_owner(record)
                    return
            await self._refresh()
        self._check_total()
        await self._admit_owner(record)

    def _check_total(self) -> None:
        if self.total + self.since >= self.store.max_sessions:
            raise TooManySessions(
                f"the server holds its maximum of {self.store.max_sessions} sessions"
            )

    async def _admit_owner(self, record: SessionRecord) -> None:
        store = self.store
        owner = record.owner
        if owner is not None:
            await self._reserve(owner, record.session_id)
        try:
            await store._insert(record)
        except BaseException:
            if owner is not None:
                await store._forget_owners([(owner, record.session_id)])
            raise
        self.since += 1

    async def _reserve(self, owner: str, session_id: str) -> None:
        store = self.store
        key = store._owner_set(owner)
        args = [session_id, store.max_sessions_per_owner, store._ttl_ms]
        for attempt in range(2):
            reply = await store._eval("reserve", [key], args)
            if reply[0] == _OK:
                return
            stale = [m.decode() for m in reply[1]]
            if attempt or not stale:
                break
            await self._verify(key, stale)
        raise TooManySessions(
            f"this API key holds its maximum of {store.max_sessions_per_owner} sessions"
        )

    async def _verify(self, key: str, stale: list[str]) -> None:
        """Re-score the owner's stale members that are still alive; drop the others."""
        store = self.store
        ttls = await store._pipeline([("PTTL", store._keys(s)[0]) for s in stale], "create")
        now_ms = int(store._clock() * 1000)
        fixes: list[tuple] = []
        for session_id, ttl in zip(stale, ttls):
            if isinstance(ttl, int) and ttl > 0:
                fixes.append(("ZADD", key, "XX", now_ms + ttl, session_id))
            else:
                fixes.append(("ZREM", key, session_id))
        await store._pipeline(fixes, "create")
