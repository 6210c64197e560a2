"""256 Triton sequences over gRPC streams against WebSocket sessions, with the in-process limit.

    python -m benchmarks.grpc_bench                  # ~1 min: builds bench-lstm, one server
    python -m benchmarks.grpc_bench --duration 2     # shorter windows
    python -m benchmarks.run --only '^$' --skip memory,startup   # the same, as part 'grpc'

One server (batching on, default settings) with gRPC on; the same 256 sequences of
bench-lstm, one step per request, closed loop (each sequence sends its next step when the
answer to the previous one arrives), driven three ways:

- WebSocket, binary frames, 256 connections (``benchmarks/loadgen.py``: the reference);
- gRPC ``ModelStreamInfer``, 256 sequences multiplexed over 1 stream;
- gRPC ``ModelStreamInfer``, 256 sequences over 4 streams (64 each, 2 client processes);
- for scale, the same two gRPC loads against a bare grpc.aio server that answers every
  request at once with zeros (no model, no engine): the transport's own ceiling here.

The gRPC clients are ``grpc.aio`` stubs with pre-built ``ModelInferRequest`` messages
(raw contents), in processes of their own speaking loadgen's READY / GO / RESULT protocol,
so ``loadgen.drive`` samples their CPU and the server's over the same window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import ROOT, ServerProcess, drive, free_port

SEQUENCES = 256
MODULE = "benchmarks.grpc_bench"


# -- the child: one process driving some streams --------------------------------------------


async def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    loop = asyncio.get_running_loop()
    streams, per = cfg["conns"], cfg["per_stream"]
    salt = cfg.get("salt", 0)
    out_bytes = cfg["output_size"] * 4
    channel = grpc.aio.insecure_channel(f"{cfg['host']}:{cfg['grpc_port']}")
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(salt)

    def message(index: int, start: bool) -> Any:
        request = service_pb2.ModelInferRequest(model_name=cfg["model"], id=str(index))
        request.inputs.add(name="x", datatype="FP32", shape=[1, 1, cfg["input_size"]])
        x = rng.standard_normal(cfg["input_size"]).astype(np.float32)
        request.raw_input_contents.append(x.tobytes())
        request.parameters["sequence_id"].int64_param = salt * 1000 + index + 1
        if start:
            request.parameters["sequence_start"].bool_param = True
        return request

    total = streams * per
    steps = [message(i, False) for i in range(total)]
    sent_at = [0.0] * total
    state = {"count": 0, "busy": 0, "errors": 0, "stop": False}
    samples: list[str] = []
    latencies: list[float] = []
    window = [float("inf"), float("inf")]
    idle = loop.create_future()
    queues = [asyncio.Queue() for _ in range(streams)]

    async def requests(q: asyncio.Queue):
        while (item := await q.get()) is not None:
            yield item

    def error(text: str) -> None:
        state["errors"] += 1
        if len(samples) < 5:
            samples.append(text[:300])

    async def read(k: int, call) -> None:
        q = queues[k]
        while (response := await call.read()) is not grpc.aio.EOF:
            now = time.monotonic()
            if response.error_message:
                error(response.error_message)
                index = None
            else:
                index = int(response.infer_response.id)
                if len(response.infer_response.raw_output_contents[0]) != out_bytes:
                    error("wrong output size")
            if index is None:
                continue
            if window[0] <= now < window[1]:
                state["count"] += 1
                latencies.append(now - sent_at[index])
            if state["stop"]:
                state["busy"] -= 1
                if state["busy"] == 0 and not idle.done():
                    idle.set_result(None)
            else:
                sent_at[index] = now
                q.put_nowait(steps[index])

    calls = [stub.ModelStreamInfer(requests(q)) for q in queues]
    opened = time.monotonic()
    # START every sequence (and warm the streams up) before the clock runs.
    for k, call in enumerate(calls):
        for i in range(k * per, (k + 1) * per):
            queues[k].put_nowait(message(i, True))
        for _ in range(per):
            response = await call.read()
            if response.error_message:
                raise RuntimeError(response.error_message)
    setup_s = time.monotonic() - opened
    readers = [asyncio.create_task(read(k, call)) for k, call in enumerate(calls)]
    print(f"READY {streams}", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    t0 = float(line.split()[1])
    window[0] = t0 + cfg["warmup"]
    window[1] = window[0] + cfg["duration"]
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    state["busy"] = total
    for k in range(streams):
        for i in range(k * per, (k + 1) * per):
            sent_at[i] = time.monotonic()
            queues[k].put_nowait(steps[i])
    await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
    cpu0 = os.times()
    await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
    cpu1 = os.times()
    state["stop"] = True
    try:
        await asyncio.wait_for(idle, 10)
    except TimeoutError:
        error(f"{state['busy']} sequences still waiting for an answer after the run")
    for q in queues:
        q.put_nowait(None)
    for task in readers:
        task.cancel()
    await channel.close()
    return {
        "kind": "grpc",
        "conns": streams,
        "count": state["count"],
        "created": 0,
        "window_s": cfg["duration"],
        "setup_s": setup_s,
        "latencies_us": [round(v * 1e6, 1) for v in latencies],
        "errors": state["errors"],
        "error_samples": samples,
        "cpu_user_s": cpu1.user - cpu0.user,
        "cpu_sys_s": cpu1.system - cpu0.system,
        "loop": type(loop).__module__.split(".")[0],
    }


def child_main(argv: list[str]) -> None:
    result = asyncio.run(_child(json.loads(argv[0])))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


# -- the transport's own ceiling: a grpc.aio server that only answers ------------------------


async def _echo(port: int, output_size: int) -> None:
    """``ModelStreamInfer`` answering every request at once with zeros: no model, no engine,
    no translation. What grpc.aio streams cost on this machine, for scale."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    y = np.zeros(output_size, np.float32).tobytes()

    class Echo(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelStreamInfer(self, requests, context):
            async for request in requests:
                response = service_pb2.ModelInferResponse(
                    model_name=request.model_name, model_version="1", id=request.id
                )
                response.outputs.add(name="y", datatype="FP32", shape=[1, 1, output_size])
                response.raw_output_contents.append(y)
                yield service_pb2.ModelStreamInferResponse(infer_response=response)

    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("LISTENING", flush=True)
    await server.wait_for_termination()


def _start_echo(port: int, output_size: int, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", MODULE, "--echo", str(port), str(output_size)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(log_dir / f"echo-{port}.log").open("wb"),
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"LISTENING":
        proc.kill()
        raise RuntimeError(f"the echo server did not start: see {log_dir}/echo-{port}.log")
    return proc


# -- the parent --------------------------------------------------------------------------------


def measure(
    repo: Path,
    card: dict[str, Any],
    model: str,
    *,
    duration: float,
    warmup: float,
    log_dir: Path,
    sequences: int = SEQUENCES,
) -> dict[str, dict[str, Any]]:
    """WebSocket at ``sequences`` connections, then gRPC over 1 and 4 streams, one server."""
    grpc_port = free_port()
    base = {
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "model": model,
        "input_size": card["input_size"],
        "output_size": card["output_size"],
        "steps": 1,
        "warmup": warmup,
        "duration": duration,
    }
    results: dict[str, dict[str, Any]] = {}
    env = {"RNNSERVE_GRPC_PORT": str(grpc_port)}
    with ServerProcess(repo, env=env, log_dir=log_dir) as server:
        loads = {
            f"ws-{sequences}-binary": (
                dict(base, kind="ws", frames="binary", conns=sequences, port=server.port),
                1 if sequences <= 128 else 2,
            ),
            f"grpc-{sequences}-over-1": (
                dict(base, kind="grpc", module=MODULE, conns=1, per_stream=sequences),
                1,
            ),
            f"grpc-{sequences}-over-4": (
                dict(base, kind="grpc", module=MODULE, conns=4, per_stream=sequences // 4),
                2,
            ),
        }
        for name, (cfg, procs) in loads.items():
            r = drive(cfg, procs=procs, server_pid=server.pid, log_dir=log_dir)
            r["steps_per_s"] = r["rate_per_s"]
            results[name] = r
    echo_port = free_port()
    echo = _start_echo(echo_port, card["output_size"], log_dir)
    try:
        for streams, procs in ((1, 1), (4, 2)):
            cfg = dict(
                base,
                grpc_port=echo_port,
                kind="grpc",
                module=MODULE,
                conns=streams,
                per_stream=sequences // streams,
            )
            r = drive(cfg, procs=procs, server_pid=echo.pid, log_dir=log_dir)
            r["steps_per_s"] = r["rate_per_s"]
            results[f"echo-{sequences}-over-{streams}"] = r
    finally:
        echo.kill()
        echo.wait(5)
    return results


def render(results: dict[str, dict[str, Any]], limit: dict[str, Any] | None) -> list[str]:
    batch1 = (limit or {}).get("batches", {}).get("1", {}).get("steps_per_s")
    batch256 = (limit or {}).get("batches", {}).get("256", {}).get("rows_per_s")
    ws = next((r["steps_per_s"] for k, r in results.items() if k.startswith("ws-")), None)
    header = (
        f"  {'load':<24} {'steps/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'cpu %':>9}"
        f" {'/ WS':>6} {'/ batch-1':>9} {'/ batch-256':>11}"
    )
    lines = ["gRPC streams vs WebSocket (the same sequences, one step per request)", header]
    for name, r in results.items():
        cpu = "/".join(
            f"{100 * r[k] / r['window_s']:.0f}" if r.get(k) is not None else "-"
            for k in ("server_cpu_s", "gen_cpu_s")
        )
        ratios = [
            f"{r['steps_per_s'] / base:.2f}" if base else "-" for base in (ws, batch1, batch256)
        ]
        lines.append(
            f"  {name:<24} {r['steps_per_s']:>9,.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
            f" {cpu:>9}{'!' if r['errors'] else ' '}"
            f"{ratios[0]:>6} {ratios[1]:>9} {ratios[2]:>11}"
        )
    if batch1 and batch256:
        lines.append(
            f"  in-process limit: batch 1 {batch1:,.0f} steps/s, batch 256 {batch256:,.0f} rows/s"
        )
    lines.append(
        "  cpu %: server / load generators, % of one core; / batch-1 and / batch-256: the "
        "in-process onnxruntime limit (steps/s at batch 1, rows/s at batch 256); echo: a bare "
        "grpc.aio server answering zeros (no model), the transport's own ceiling"
    )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.run import BENCH, build_models, run_inprocess

    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_bench", description=__doc__)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--small", action="store_true", help="a 2x32 bench model (smoke runs)")
    p.add_argument("--out", type=Path, help="also write the measurements here as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rnnserve-grpc-bench-") as tmp:
        root = Path(tmp)
        log_dir = root / "logs"
        log_dir.mkdir()
        repo, _, cards = build_models(root, small=args.small)
        limit = run_inprocess(repo, [BENCH], max(args.duration / 2, 0.3), 1.0, (8, 10))[BENCH]
        results = measure(
            repo, cards[BENCH], BENCH, duration=args.duration, warmup=args.warmup, log_dir=log_dir
        )
    table = render(results, limit)
    print("\n".join(table))
    print(f"(load average {[round(x, 2) for x in os.getloadavg()]})")
    res = {"results": results, "limit": limit, "table": table, "loadavg": os.getloadavg()}
    if args.out:
        args.out.write_text(json.dumps(res, indent=1, default=float) + "\n")
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("{"):
        child_main(sys.argv[1:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--echo":
        asyncio.run(_echo(int(sys.argv[2]), int(sys.argv[3])))
    else:
        main()
