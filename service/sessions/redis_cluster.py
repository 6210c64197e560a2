"""Redis Cluster session store: the Redis store's keys and scripts on a sharded deployment.

Every key of a session carries its bucket as a hash tag and every key a script touches is
passed in KEYS, so each script runs on one slot; counts are summed over the buckets with
one pipeline per primary. The client follows MOVED/ASK redirections itself but retries
nothing else (a re-sent commit could apply twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from service.sessions.redis import Command, RedisSessionStore, _Cached, resp_arguments

SCHEME = "redis-cluster://"


def parse_nodes(url: str) -> list[tuple[str, int]]:
    """``redis-cluster://host:port[,host:port...]`` -> [(host, port), ...]."""
    if not url.startswith(SCHEME):
        raise ValueError(f"a cluster URL starts with {SCHEME}: {url!r}")
    nodes = []
    for part in url[len(SCHEME) :].rstrip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"cluster node {part!r} is not host:port in {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


class RedisClusterSessionStore(RedisSessionStore):
    def _connect(self, url: str) -> Any:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parse_nodes(url)],
            max_connections=self._max_connections + 1,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )

    async def _send(self, client: Any, commands: Sequence[Command]) -> list[Any]:
        """One pipeline per node (sent in parallel), replies in order, errors in place.
        Commands already in RESP form are turned back into arguments."""
        pipe = client.pipeline()
        for command in commands:
            if not isinstance(command, tuple):
                name, *args = resp_arguments(command)
                command = (name.decode(), *args)
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    def _script_group(self, entry: _Cached) -> bytes:
        """One script per hash tag: a script's keys must all live in one slot."""
        return entry.tag
