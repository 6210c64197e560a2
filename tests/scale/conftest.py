"""Helpers for the scale-out tests: chunking, reference slices, polling, raw requests."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

TOL = 1e-5
LSTM = "tiny-lstm"  # 3 inputs, 2 outputs, 2 layers x 16 units


def chunk_sizes(rng: np.random.Generator, total: int, largest: int = 6) -> list[int]:
    """Random chunk sizes in 1..largest that add up to ``total``."""
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(int(min(rng.integers(1, largest + 1), total - sum(sizes))))
    return sizes


def row_state(ref, finals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's final states without the batch axis (the shape the API exports)."""
    return {
        s["input"]: np.take(finals[s["input"]], 0, axis=s["shape"].index(None))
        for s in ref.card["states"]
    }


def assert_state(ref, exported: dict[str, list], finals: dict[str, np.ndarray]) -> None:
    for name, value in row_state(ref, finals).items():
        np.testing.assert_allclose(np.asarray(exported[name]), value, atol=TOL)


async def eventually(
    probe: Callable[[], Awaitable[bool]], timeout: float = 10.0, every: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


def send_without_reading(
    port: int, path: str, body: dict, headers: dict | None = None
) -> socket.socket:
    """Write a whole HTTP request to 127.0.0.1:port and return the socket, unread.

    What a client does just before its server dies: the request is out, the answer never comes.
    """
    payload = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
        "",
        "",
    ]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall("\r\n".join(lines).encode() + payload)
    return sock


@pytest.fixture
def rng(request) -> np.random.Generator:
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture(params=["redis", "redis-cluster"])
def shared_redis(request) -> Callable[[int], str]:
    """``shared_redis(n)``: the URL of the test Redis's db n (flushed), or of the local
    3-primary Redis Cluster (flushed); tests using it run on both."""
    if request.param == "redis-cluster":
        url = request.getfixturevalue("cluster_url")
        return lambda db: url
    return request.getfixturevalue("redis_db")


@pytest.fixture
def throwaway_redis(tmp_path):
    """A ``redis-server`` of the test's own on a free port, nothing persisted."""
    from benchmarks.redis_servers import ThrowawayRedis

    server = ThrowawayRedis(tmp_path)
    server.start()
    yield server
    server.stop()
