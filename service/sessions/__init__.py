"""Session state stores."""

from __future__ import annotations

from service.config import Settings
from service.sessions.base import SessionRecord, SessionStore
from service.sessions.memory import MemorySessionStore

__all__ = ["MemorySessionStore", "SessionRecord", "SessionStore", "make_store"]


def make_store(settings: Settings) -> SessionStore:
    limits = {
        "ttl_s": settings.session_ttl_s,
        "max_sessions": settings.max_sessions,
        "max_sessions_per_owner": settings.max_sessions_per_key,
    }
    redis = {
        "max_connections": settings.redis_max_connections,
        "pool_timeout_s": settings.redis_pool_timeout_s,
        "timeout_s": settings.redis_timeout_s,
        "cache_sessions": settings.redis_cache_sessions,
        "poll_s": settings.redis_poll_us / 1e6,
    }
    if settings.session_store == "memory":
        return MemorySessionStore(**limits)
    if settings.session_store.startswith(("redis://", "rediss://", "unix://")):
        from service.sessions.redis import RedisSessionStore

        return RedisSessionStore(settings.session_store, **limits, **redis)
    if settings.session_store.startswith("redis-cluster://"):
        from service.sessions.redis_cluster import RedisClusterSessionStore

        return RedisClusterSessionStore(settings.session_store, **limits, **redis)
    raise ValueError(
        f"unknown session store {settings.session_store!r}: "
        "use memory, redis://... or redis-cluster://host:port[,host:port...]"
    )
