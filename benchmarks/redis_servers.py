"""Throwaway Redis servers that tests and benchmarks start themselves: a single server
(optionally with append-only persistence) and a local Redis Cluster of 3 primaries.

A missing ``redis-server`` raises (tests then fail, on CI and off it: they need Redis).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return path


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, with_bus: bool = False) -> int:
    """A free port; ``with_bus`` also wants port + 10000 free (a cluster node's bus)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not with_bus or (port + 10000 < 65536 and _free(port + 10000)):
            return port


def major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True).stdout
    match = re.search(r"v=(\d+)\.", out)
    return int(match.group(1)) if match else 0


def _wait_ping(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
    finally:
        client.close()


class ThrowawayRedis:
    """One ``redis-server`` on a free port, in its own directory.

    ``appendonly=True`` turns on AOF persistence with ``appendfsync always``: every write
    is on disk before Redis answers, so a SIGKILL (or power loss) loses nothing answered.
    """

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = _binary("redis-server")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--daemonize", "no", "--dir", str(self.workdir)]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if major_version(binary) >= 7:  # DEBUG is off by default since Redis 7
            args += ["--enable-debug-command", "local"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ping(self.port, self.proc)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def pause(self, mode: str, ms: int = 3000) -> None:
        self.client().execute_command("CLIENT", "PAUSE", ms, mode)

    def wait_unpaused(self) -> None:
        """Blocks until a pause is over (a paused Redis holds the command until then)."""
        self.client().set("probe", "1")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class LocalCluster:
    """A Redis Cluster of ``primaries`` nodes without replicas, on free ports (or on
    ``RNNSERVE_TEST_CLUSTER_PORT`` and the ports after it)."""

    def __init__(self, workdir: Path, primaries: int = 3, base_port: int | None = None) -> None:
        base = base_port or os.environ.get("RNNSERVE_TEST_CLUSTER_PORT")
        if base:
            self.ports = [int(base) + k for k in range(primaries)]
        else:
            self.ports = []
            while len(self.ports) < primaries:
                port = free_port(with_bus=True)
                if port not in self.ports:
                    self.ports.append(port)
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.url = "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        binary = _binary("redis-server")
        cli = _binary("redis-cli")
        for port in self.ports:
            folder = self.workdir / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--cluster-enabled", "yes",
                    "--cluster-config-file", str(folder / "nodes.conf"),
                    "--cluster-node-timeout", "2000", "--dir", str(folder)]  # fmt: skip
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            _wait_ping(port, proc)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while not all(self._ok(p) for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the local Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            info = client.execute_command("CLUSTER", "INFO")
        finally:
            client.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port)

    def flush(self) -> None:
        for port in self.ports:
            client = self.node(port)
            try:
                client.flushall()
            finally:
                client.close()

    def keys_per_node(self, pattern: str = "*") -> list[int]:
        counts = []
        for port in self.ports:
            client = self.node(port)
            try:
                counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
            finally:
                client.close()
        return counts

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
