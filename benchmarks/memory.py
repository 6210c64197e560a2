"""Resident memory of idle sessions, and start-up time to ready."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadgen import ServerProcess, drive


def idle_sessions(
    repo: Path,
    model: str,
    sessions: int,
    *,
    log_dir: Path,
    conns: int = 8,
    depth: int = 4,
    procs: int = 1,
) -> dict[str, Any]:
    """RSS of a fresh server before and after creating ``sessions`` idle sessions over REST.

    Sessions are created as fast as the server takes them: ``conns`` keep-alive connections,
    each with ``depth`` pipelined requests in flight.
    """
    with ServerProcess(repo, log_dir=log_dir) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            # one session and one step first, so lazily built code paths are not counted
            sid = client.post(f"/v1/models/{model}/sessions").json()["session_id"]
            card = client.get(f"/v1/models/{model}").json()["versions"][-1]["card"]
            client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0] * card["input_size"]]})
            client.delete(f"/v1/sessions/{sid}")
        time.sleep(0.5)
        before = server.rss()
        cfg = {
            "kind": "create",
            "host": "127.0.0.1",
            "port": server.port,
            "model": model,
            "conns": conns,
            "depth": depth,
            "total": sessions,
            "warmup": 0.0,
            "duration": 0.0,
            "timeout": 900,
            "input_size": card["input_size"],
            "output_size": card["output_size"],
        }
        load = drive(cfg, procs=procs, server_pid=server.pid, log_dir=log_dir)
        time.sleep(1.0)
        after = server.rss()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            live = _live_sessions(client)
    created = load.get("created", 0)
    state_bytes = 4 * sum(
        _prod(d for d in spec["shape"] if d is not None) for spec in card["states"]
    )
    return {
        "model": model,
        "state_bytes": state_bytes,
        "sessions": created,
        "live_sessions_metric": live,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_session": (after - before) / created if created else float("nan"),
        "create_rate_per_s": load["rate_per_s"],
        "create_p50_ms": load["p50_ms"],
        "create_p99_ms": load["p99_ms"],
        "create_s": load["window_s"],
        "errors": load["errors"],
        "error_samples": load["error_samples"],
    }


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _live_sessions(client: httpx.Client) -> float | None:
    """The server's own session gauge, if /metrics has one (a cross-check of the count)."""
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if (
            line.startswith("rnnserve_sessions")
            and not line.startswith("#")
            and "created" not in line
        ):
            name = line.split("{")[0].split(" ")[0]
            if name in ("rnnserve_sessions", "rnnserve_sessions_live", "rnnserve_sessions_active"):
                try:
                    return float(line.rsplit(" ", 1)[1])
                except ValueError:
                    return None
    return None


def startup(repo: Path, runs: int, *, log_dir: Path) -> dict[str, Any]:
    """Process spawn -> first /readyz 200, ``runs`` times (polled every 10 ms)."""
    times = []
    for _ in range(runs):
        server = ServerProcess(repo, log_dir=log_dir)
        try:
            server.start()
            times.append(server.ready_s)
        finally:
            server.stop()
    return {
        "repo": str(repo),
        "runs_s": times,
        "median_s": statistics.median(times),
    }
