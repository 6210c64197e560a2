"""Load test: replicas sharing Redis, many concurrent sessions, REST and WebSocket mixed.

    python -m benchmarks.loadtest --replicas 2 --sessions 1000 --steps 100
    python -m benchmarks.loadtest --ws-streams 1000 --sessions 200 --redis redis://127.0.0.1:6379/9
    python -m benchmarks.loadtest --ws-streams 1000 --sessions 200 --start-cluster

``--ws-streams N`` adds N WebSocket streams that are all open at once for the whole run,
each on its own new session (``/v1/models/{name}/stream`` on a random replica), sending its
``--steps`` steps in random chunks with ``seq``. ``--redis`` takes ``redis://...`` or
``redis-cluster://host:port,...``; ``--start-cluster`` starts a local Redis Cluster of 3
primaries on free ports for the run (and stops it after).

Starts ``--replicas`` real ``rnn-serve`` processes on one Redis database (flushed first),
then drives ``--sessions`` sessions of ``--steps`` random steps each, at most
``--concurrency`` at a time. Every session is cut into random chunks (1..``--max-chunk``
steps); each chunk goes to a replica picked at random (no stickiness), either as a REST
step or over a WebSocket resumed on that replica (``/v1/sessions/{id}/stream``, JSON or
binary frames), always with ``seq``. Nothing is retried: any error counts.

At the end every session's outputs are compared with an offline onnxruntime run of its
whole sequence from the zero state, and every session must still exist with
``step_count == --steps``. Exit status 0 only with zero errors, zero lost sessions and
a max difference within ``--tolerance``.

Pass ``--url`` (repeatable) instead to load already-running replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets

from service.frames import decode_response, encode_request

REPO_ROOT = Path(__file__).resolve().parent.parent


# -- offline reference (plain onnxruntime, none of the service's code) -------------------


class OfflineReference:
    """Runs ``<repo>/<name>/<version>/model.onnx`` on one whole sequence from zero state."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        self.card = json.loads((folder / "card.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.names = {i.name for i in self.session.get_inputs()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        feed = {
            s["input"]: np.zeros([1 if d is None else d for d in s["shape"]], np.float32)
            for s in self.card["states"]
        }
        feed[self.card["inputs"]["sequence"]] = np.asarray(x, np.float32)[None]
        lengths = self.card["inputs"].get("lengths")
        if lengths in self.names:
            feed[lengths] = np.array([len(x)], np.int32)
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, feed)))
        return out[self.card["outputs"]["sequence"]][0]


# -- replicas --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_replicas(
    repo: Path, count: int, store: str, log_dir: Path, extra_env: dict[str, str] | None = None
) -> list[tuple[subprocess.Popen, str]]:
    started: list[tuple[subprocess.Popen, str]] = []
    for _ in range(count):
        port = _free_port()
        env = {
            **os.environ,
            "RNNSERVE_SESSION_STORE": store,
            "RNNSERVE_LOG_LEVEL": "warning",
            "RNNSERVE_GRPC_PORT": "0",
            # this checkout's server, whichever checkout installed the venv
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        }
        log = (log_dir / f"replica-{port}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--model-repo", str(repo)]
            + ["--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        started.append((proc, f"http://127.0.0.1:{port}"))
    deadline = time.monotonic() + 60
    for proc, url in started:
        while True:
            if proc.poll() is not None:
                stop_replicas(started)
                raise RuntimeError(
                    f"replica {url} exited with {proc.returncode} (logs in {log_dir})"
                )
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_replicas(started)
                raise RuntimeError(f"replica {url} not ready in 60 s (logs in {log_dir})")
            time.sleep(0.05)
    return started


def stop_replicas(replicas: Sequence[tuple[subprocess.Popen, str]]) -> None:
    for proc, _ in replicas:
        if proc.poll() is None:
            proc.terminate()
    for proc, _ in replicas:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the load --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    replicas: int
    sessions: int
    steps_per_session: int
    duration_s: float = 0.0
    steps: int = 0
    requests: int = 0
    rest_requests: int = 0
    ws_messages: int = 0
    ws_connections: int = 0
    errors: int = 0
    lost_sessions: int = 0
    wrong_sessions: int = 0
    max_abs_diff: float = 0.0
    steps_per_s: float = 0.0
    requests_per_s: float = 0.0
    latency_ms_p50: float = 0.0
    latency_ms_p99: float = 0.0
    per_replica_requests: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    ws_streams: int = 0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.lost_sessions == 0 and self.wrong_sessions == 0

    def summary(self) -> str:
        return (
            f"{self.replicas} replicas, {self.sessions} sessions x {self.steps_per_session} steps "
            f"({self.ws_streams} of them WebSocket streams open throughout): "
            f"{self.duration_s:.1f} s, {self.steps_per_s:,.0f} steps/s, "
            f"{self.requests} requests ({self.rest_requests} REST, {self.ws_messages} WebSocket "
            f"messages on {self.ws_connections} connections) = {self.requests_per_s:,.0f}/s, "
            f"latency p50 {self.latency_ms_p50:.1f} ms p99 {self.latency_ms_p99:.1f} ms, "
            f"per replica {self.per_replica_requests}; errors {self.errors}, "
            f"lost sessions {self.lost_sessions}, wrong sessions {self.wrong_sessions}, "
            f"max |diff| {self.max_abs_diff:.2e}"
        )


def _chunks(rng: random.Random, total: int, largest: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(min(rng.randint(1, largest), total - sum(sizes)))
    return sizes


async def run_load(
    urls: Sequence[str],
    model: str,
    inputs: Sequence[np.ndarray],
    reference: Callable[[np.ndarray], np.ndarray],
    *,
    concurrency: int = 100,
    ws_fraction: float = 0.5,
    max_chunk: int = 8,
    seed: int = 0,
    tolerance: float = 1e-5,
    headers: dict[str, str] | None = None,
    ws_streams: int = 0,
) -> LoadResult:
    """Drive one session per array of ``inputs`` through ``urls``; see the module docstring.
    The first ``ws_streams`` sessions are WebSocket streams kept open the whole time."""
    rng = random.Random(seed)
    steps = len(inputs[0])
    result = LoadResult(replicas=len(urls), sessions=len(inputs), steps_per_session=steps)
    result.ws_streams = ws_streams
    result.per_replica_requests = [0] * len(urls)
    latencies: list[float] = []
    outputs: list[list[np.ndarray]] = [[] for _ in inputs]
    session_ids: list[str | None] = [None] * len(inputs)
    gate = asyncio.Semaphore(concurrency)
    # Idle connections are dropped by the client before the server's keep-alive timeout
    # (uvicorn: 5 s) can close them: reusing one the server is closing just then fails
    # with a ReadError that is the client's race, not the server's (seen once on CI).
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0
    )
    clients = [
        httpx.AsyncClient(base_url=u, timeout=60, limits=limits, headers=headers) for u in urls
    ]
    ws_headers = list((headers or {}).items())

    def fail(message: str) -> None:
        result.errors += 1
        if len(result.error_samples) < 20:
            result.error_samples.append(message)

    async def rest_step(replica: int, sid: str, x: np.ndarray, seq: int) -> np.ndarray | None:
        started = time.perf_counter()
        r = await clients[replica].post(
            f"/v1/sessions/{sid}/steps", json={"inputs": x.tolist(), "seq": seq}
        )
        latencies.append(time.perf_counter() - started)
        result.requests += 1
        result.rest_requests += 1
        result.per_replica_requests[replica] += 1
        if r.status_code != 200 or r.json().get("step_count") != seq or r.json().get("replayed"):
            fail(f"REST {urls[replica]} seq {seq}: {r.status_code} {r.text[:200]}")
            return None
        return np.asarray(r.json()["outputs"], np.float32)

    async def ws_step(
        ws, replica: int, x: np.ndarray, seq: int, local: random.Random
    ) -> np.ndarray | None:
        """One message (binary or JSON at random) and its answer, checked."""
        started = time.perf_counter()
        if local.random() < 0.5:
            await ws.send(encode_request(x, seq))
        else:
            await ws.send(json.dumps({"inputs": x.tolist(), "seq": seq}))
        answer = await ws.recv()
        latencies.append(time.perf_counter() - started)
        result.requests += 1
        result.ws_messages += 1
        result.per_replica_requests[replica] += 1
        if isinstance(answer, bytes):
            y, count, replayed = decode_response(answer)
        else:
            body = json.loads(answer)
            if "error" in body:
                fail(f"WS {urls[replica]} seq {seq}: {body}")
                return None
            y = np.asarray(body["outputs"], np.float32)
            count, replayed = body["step_count"], body.get("replayed", False)
        if count != seq or replayed:
            fail(f"WS {urls[replica]} seq {seq}: step_count {count} replayed {replayed}")
            return None
        return y

    async def ws_segment(
        replica: int, sid: str, parts: list[tuple[np.ndarray, int]], local: random.Random
    ) -> list[np.ndarray] | None:
        ws_url = urls[replica].replace("http://", "ws://", 1)
        got: list[np.ndarray] = []
        async with websockets.connect(
            f"{ws_url}/v1/sessions/{sid}/stream",
            additional_headers=ws_headers,
            close_timeout=5,
            max_size=None,
        ) as ws:
            result.ws_connections += 1
            info = json.loads(await ws.recv())
            if "error" in info:
                fail(f"WS open {urls[replica]}: {info}")
                return None
            for x, seq in parts:
                y = await ws_step(ws, replica, x, seq, local)
                if y is None:
                    return None
                got.append(y)
        return got

    async def stream(index: int) -> None:
        """One session over one WebSocket, open from its first step to its last."""
        local = random.Random(rng.random())
        x = inputs[index]
        replica = local.randrange(len(urls))
        ws_url = urls[replica].replace("http://", "ws://", 1)
        try:
            async with websockets.connect(
                f"{ws_url}/v1/models/{model}/stream",
                additional_headers=ws_headers,
                close_timeout=5,
                open_timeout=120,
                max_size=None,
            ) as ws:
                result.ws_connections += 1
                info = json.loads(await ws.recv())
                if "error" in info:
                    fail(f"WS open {urls[replica]}: {info}")
                    return
                session_ids[index] = info["session_id"]
                pos = 0
                for n in _chunks(local, len(x), max_chunk):
                    seq = pos + n
                    y = await ws_step(ws, replica, x[pos:seq], seq, local)
                    if y is None:
                        return
                    outputs[index].append(y)
                    pos = seq
        except (TimeoutError, OSError, websockets.WebSocketException) as exc:
            fail(f"stream {index}: {type(exc).__name__}: {exc}")

    async def drive(index: int) -> None:
        local = random.Random(rng.random())
        x = inputs[index]
        async with gate:
            try:
                replica = local.randrange(len(urls))
                r = await clients[replica].post(f"/v1/models/{model}/sessions")
                result.requests += 1
                result.per_replica_requests[replica] += 1
                if r.status_code != 201:
                    fail(f"create {urls[replica]}: {r.status_code} {r.text[:200]}")
                    return
                sid = session_ids[index] = r.json()["session_id"]
                sizes = _chunks(local, len(x), max_chunk)
                pos, k = 0, 0
                while k < len(sizes):
                    replica = local.randrange(len(urls))
                    if local.random() < ws_fraction:
                        parts = []
                        for n in sizes[k : k + local.randint(1, 5)]:
                            parts.append((x[pos : pos + n], pos + n))
                            pos += n
                            k += 1
                        got = await ws_segment(replica, sid, parts, local)
                        if got is None:
                            return
                        outputs[index].extend(got)
                    else:
                        n = sizes[k]
                        y = await rest_step(replica, sid, x[pos : pos + n], pos + n)
                        if y is None:
                            return
                        outputs[index].append(y)
                        pos += n
                        k += 1
            except (httpx.HTTPError, OSError, websockets.WebSocketException) as exc:
                fail(f"session {index}: {type(exc).__name__}: {exc}")

    started = time.perf_counter()
    try:
        await asyncio.gather(
            *(stream(i) for i in range(ws_streams)),
            *(drive(i) for i in range(ws_streams, len(inputs))),
        )
        result.duration_s = time.perf_counter() - started

        async def check(index: int) -> None:
            sid = session_ids[index]
            if sid is None:
                result.lost_sessions += 1
                return
            async with gate:
                r = await clients[index % len(clients)].get(f"/v1/sessions/{sid}")
            if r.status_code != 200 or r.json()["step_count"] != steps:
                result.lost_sessions += 1
                if len(result.error_samples) < 20:
                    result.error_samples.append(f"session {sid}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(check(i) for i in range(len(inputs))))
    finally:
        for client in clients:
            await client.aclose()

    for index, x in enumerate(inputs):
        if not outputs[index]:
            result.wrong_sessions += 1
            continue
        got = np.concatenate(outputs[index])
        expected = reference(x)
        if got.shape != expected.shape:
            result.wrong_sessions += 1
            continue
        diff = float(np.max(np.abs(got - expected)))
        result.max_abs_diff = max(result.max_abs_diff, diff)
        if diff > tolerance:
            result.wrong_sessions += 1
    result.steps = sum(sum(len(y) for y in out) for out in outputs)
    result.steps_per_s = result.steps / result.duration_s if result.duration_s else 0.0
    result.requests_per_s = result.requests / result.duration_s if result.duration_s else 0.0
    if latencies:
        result.latency_ms_p50 = float(np.percentile(latencies, 50) * 1000)
        result.latency_ms_p99 = float(np.percentile(latencies, 99) * 1000)
    return result


def make_inputs(sessions: int, steps: int, input_size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(steps, input_size)).astype(np.float32) for _ in range(sessions)]


def flush_store(url: str) -> None:
    """Empty the session store: the database of ``redis://``, every primary of a cluster."""
    if url.startswith("redis-cluster://"):
        from redis.cluster import ClusterNode, RedisCluster

        from service.sessions.redis_cluster import parse_nodes

        nodes = [ClusterNode(host, port) for host, port in parse_nodes(url)]
        client = RedisCluster(startup_nodes=nodes)
        try:
            client.flushall(target_nodes=RedisCluster.PRIMARIES)
        finally:
            client.close()
        return
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


# -- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", default="sine-lstm")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9",
                        help="session store, redis://... or redis-cluster://...; its database "
                             "(every node of a cluster) is FLUSHED before and after")  # fmt: skip
    parser.add_argument("--start-cluster", action="store_true",
                        help="start a local 3-primary Redis Cluster for the run instead")  # fmt: skip
    parser.add_argument("--ws-streams", type=int, default=0,
                        help="WebSocket streams open at once for the whole run (in addition "
                             "to --sessions)")  # fmt: skip
    parser.add_argument("--url", action="append", default=[],
                        help="use running replicas instead of starting them (repeatable)")  # fmt: skip
    parser.add_argument("--api-key", help="sent as X-API-Key")
    parser.add_argument("--concurrency", type=int, default=100, help="sessions driven at once")
    parser.add_argument("--ws-fraction", type=float, default=0.5)
    parser.add_argument("--max-chunk", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--keep", action="store_true", help="leave the sessions in Redis")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    folder = args.repo / args.model
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    reference = OfflineReference(folder / str(version))
    inputs = make_inputs(
        args.ws_streams + args.sessions, args.steps, reference.card["input_size"], args.seed
    )
    headers = {"X-API-Key": args.api_key} if args.api_key else None

    replicas: list[tuple[subprocess.Popen, str]] = []
    urls = args.url
    log_dir = Path(tempfile.mkdtemp(prefix="rnnserve-load-"))
    cluster = None
    store = args.redis
    if args.start_cluster and not urls:
        from benchmarks.redis_servers import LocalCluster

        cluster = LocalCluster(log_dir / "cluster")
        cluster.start()
        store = cluster.url
    if not urls:
        flush_store(store)
        # every WebSocket stream is open at once: let a replica wait on Redis, not refuse
        extra = {"RNNSERVE_MAX_QUEUE": str(max(4096, 4 * (args.ws_streams + args.concurrency)))}
        replicas = start_replicas(args.repo, args.replicas, store, log_dir, extra)
        urls = [url for _, url in replicas]
    try:
        result = asyncio.run(
            run_load(
                urls,
                args.model,
                inputs,
                reference,
                concurrency=args.concurrency,
                ws_fraction=args.ws_fraction,
                max_chunk=args.max_chunk,
                seed=args.seed,
                tolerance=args.tolerance,
                headers=headers,
                ws_streams=args.ws_streams,
            )
        )
    finally:
        stop_replicas(replicas)
        if replicas and not args.keep and cluster is None:
            flush_store(store)
        if cluster is not None:
            cluster.stop()
    print(result.summary())
    for sample in result.error_samples:
        print("  ", sample)
    if replicas:
        print(f"replica logs: {log_dir}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
