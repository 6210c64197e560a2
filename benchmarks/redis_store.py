"""Redis store against the memory store, same load, same run.

The LSTM 2x128 of the memory test (8 inputs, 8 outputs, 2 KiB of state), two servers with
default batching, both up at once (the idle one idle): one on the memory store, one on a
throwaway ``redis-server`` this module starts on a free port (``--save '' --appendonly
no``, loopback). Each store gets 256 concurrent WebSocket streams (binary frames, one step
per message) and one stream alone (p50), in short windows taken in turns (memory, Redis,
Redis, memory, memory, Redis: ``loadgen.interleaved``); each figure is the median of its
store's three windows. From Redis's ``INFO commandstats`` and the server's step counter: script calls
and GETs per step over the whole run, stream opens included (Redis also counts the
commands a script runs inside it, SET, ZADD, GETRANGE, TIME: they are listed, not sent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.loadgen import ServerProcess, drive, interleaved, step_load
from benchmarks.redis_servers import ThrowawayRedis


def _steps_so_far(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rnnserve_session_steps_total")
    )


def _load(server: ServerProcess, card: dict, model: str, conns: int, duration: float,
          warmup: float, log_dir: Path) -> dict[str, Any]:  # fmt: skip
    cfg = step_load(server.port, model, card, "ws", conns, "binary", duration, warmup)
    r = drive(cfg, procs=1 if conns <= 128 else 2, server_pid=server.pid, log_dir=log_dir)
    return {k: r[k] for k in ("rate_per_s", "p50_ms", "p99_ms", "errors", "error_samples")}


def redis_vs_memory(
    repo: Path, model: str, card: dict, *, duration: float, warmup: float, log_dir: Path,
    streams: int = 256, rounds: int = 5,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"model": model, "streams": streams}
    redis_server = ThrowawayRedis(log_dir)
    redis_server.start()
    control = redis_server.client()

    def commandstats() -> dict[str, int]:
        stats = control.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    servers: dict[str, ServerProcess] = {}
    try:
        servers["memory"] = ServerProcess(repo, log_dir=log_dir).start()
        servers["redis"] = ServerProcess(
            repo, env={"RNNSERVE_SESSION_STORE": redis_server.url}, log_dir=log_dir
        ).start()
        # the steps counted before the commands and after them: a scrape of /metrics
        # counts the live sessions (one script per bucket), which is not a step's work
        steps0 = _steps_so_far(servers["redis"].url)
        stats0 = commandstats()
        figures: dict[str, dict[str, Any]] = {"memory": {}, "redis": {}}
        for conns in (streams, 1):
            # ``rounds`` windows each (five, one in the smoke run): see multiplex._compare_single
            measured = interleaved(
                ["memory", "redis"],
                lambda store, conns=conns: _load(
                    servers[store], card, model, conns, duration / 2, warmup / 2, log_dir
                ),
                rounds=rounds,
            )
            for store, r in measured.items():
                figures[store][f"ws_{conns}"] = r
        stats1 = commandstats()
        steps1 = _steps_so_far(servers["redis"].url)
    finally:
        for server in servers.values():
            server.stop()
        control.close()
        redis_server.stop()
    calls = {
        k: v - stats0.get(k, 0)
        for k, v in stats1.items()
        if k not in ("info", "ping") and v - stats0.get(k, 0) > 0
    }
    steps = max(steps1 - steps0, 1.0)
    out["memory"] = figures["memory"]
    out["redis"] = {
        **figures["redis"],
        "steps": steps,
        "redis_calls": calls,
        "scripts_per_step": (calls.get("evalsha", 0) + calls.get("eval", 0)) / steps,
        "gets_per_step": calls.get("get", 0) / steps,
        # scripts that are not a step's: bucket counts (one ZCOUNT each: the limits
        # and the sessions gauge), creations and sweeps (one ZREMRANGEBYSCORE each)
        "other_scripts_per_step": (calls.get("zcount", 0) + calls.get("zremrangebyscore", 0))
        / steps,
    }
    memory, redis_ = out["memory"], out["redis"]
    key = f"ws_{streams}"
    out["ratio_steps_per_s"] = redis_[key]["rate_per_s"] / memory[key]["rate_per_s"]
    out["p50_diff_ms"] = redis_["ws_1"]["p50_ms"] - memory["ws_1"]["p50_ms"]
    return out


def render(res: dict[str, Any]) -> list[str]:
    key = f"ws_{res['streams']}"
    streams = f"{res['streams']} streams steps/s"
    lines = [
        f"Redis store vs memory store, {res['model']} (LSTM 2x128), WS binary, 1 step/message",
        (
            f"  {'store':<8} {streams:>20} {'p50 ms':>7} {'p99 ms':>7}   {'1 stream p50 ms':>15}"
            f"   {'scripts/step (steps only)':>25}  {'GETs/step':>9}  errors"
        ),
    ]
    for store in ("memory", "redis"):
        r = res[store]
        many, one = r[key], r["ws_1"]
        scripts = (
            f"{r['scripts_per_step']:.3f} ({r['scripts_per_step'] - r['other_scripts_per_step']:.3f})"
            if store == "redis"
            else "-"
        )
        gets = f"{r['gets_per_step']:.3f}" if store == "redis" else "-"
        lines.append(
            f"  {store:<8} {many['rate_per_s']:>20,.0f} {many['p50_ms']:>7.2f} "
            f"{many['p99_ms']:>7.2f}   {one['p50_ms']:>15.3f}   {scripts:>25}  {gets:>9}  "
            f"{many['errors'] + one['errors']}"
        )
    lines.append(
        f"  Redis / memory steps/s {res['ratio_steps_per_s']:.2f} (target >= 0.8); "
        f"one-stream p50 difference {res['p50_diff_ms']:+.3f} ms (target <= 0.25 ms)"
    )
    calls = ", ".join(f"{k} {v:,}" for k, v in sorted(res["redis"]["redis_calls"].items()))
    lines.append(f"  INFO commandstats over the Redis run ({res['redis']['steps']:,.0f} steps): {calls}")
    return lines
