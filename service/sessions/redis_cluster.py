"""Redis Cluster session store: the Redis store's keys and scripts on a sharded deployment.

Every key of a session carries its bucket as a hash tag and every key a script touches is
passed in KEYS, so each script runs on one slot; counts are summed over the buckets with
one pipeline per primary. The client follows MOVED/ASK redirections itself but retries
nothing else (a re-sent commit could apply twice).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry

from service.sessions.redis import Command, RedisSessionStore, resp_arguments

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
    _script_per_tag = True  # a script's keys must all live in one slot

    def _connect(self, url: str) -> Any:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in parse_nodes(url)],
            max_connections=self._max_connections + 1,
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )

    async def _send(self, client: Any, commands: Sequence[Command], poll: Any = None) -> list[Any]:
        """One pipeline per primary (sent together), replies in order, errors in place:
        a primary that cannot be reached (its reconnect refused) fails only its own
        commands, not the others' (whose commits did apply). Commands already in RESP
        form are turned back into arguments. (``poll`` is not used: redis-py's cluster
        pipeline reads the answers.)"""
        calls = [
            command if isinstance(command, tuple) else _arguments(command) for command in commands
        ]
        groups: dict[str, list[int]] = {}
        try:
            for i, call in enumerate(calls):
                groups.setdefault(client.get_node_from_key(_first_key(call)).name, []).append(i)
        except Exception:  # noqa: BLE001 - no slot map yet: one pipeline, which makes it
            groups = {"": list(range(len(calls)))}
        outcomes = await asyncio.gather(
            *(_pipeline(client, [calls[i] for i in members]) for members in groups.values()),
            return_exceptions=True,
        )
        results: list[Any] = [None] * len(calls)
        for members, outcome in zip(groups.values(), outcomes):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome
            for k, i in enumerate(members):
                results[i] = outcome if isinstance(outcome, Exception) else outcome[k]
        return results



def _arguments(command: bytes | list) -> tuple:
    name, *args = resp_arguments(command)
    return (name.decode(), *args)


def _first_key(call: tuple) -> Any:
    """The first key of a command (EVALSHA sha numkeys key ...; or NAME key ...)."""
    name = call[0].upper() if isinstance(call[0], str) else call[0].decode().upper()
    if name in ("EVALSHA", "EVAL"):
        if int(call[2]) < 1:
            raise ValueError("a script without keys")
        return call[3]
    return call[1]


async def _pipeline(client: Any, calls: list[tuple]) -> list[Any]:
    pipe = client.pipeline()
    for call in calls:
        pipe.execute_command(*call)
    return list(await pipe.execute(raise_on_error=False))
