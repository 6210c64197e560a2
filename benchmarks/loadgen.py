"""Load generators: lean closed-loop clients on raw sockets, in processes of their own.

Every connection sends one request, waits for its answer and sends the next (closed loop).
To leave as much CPU as possible to the server on a small machine, the clients are bare
``asyncio.Protocol`` objects (uvloop when available) that write pre-encoded bytes and parse
just enough of each answer to know it is complete and not an error: a minimal RFC 6455
WebSocket client (masked frames built once per connection) and a minimal HTTP/1.1
keep-alive client. No task, future or library call per message.

A generator runs as ``python -m benchmarks.loadgen '<json config>'`` and talks to its parent
over stdin/stdout::

    child  -> "READY <connections>"  once every connection is open (and its session made)
    parent -> "GO <t0>"              t0 on time.monotonic(), which is system-wide on Linux
    child  -> "RESULT <json>"        after sending from t0 and measuring in
                                     [t0 + warmup, t0 + warmup + duration)

The parent side (``drive``) splits the connections over one or more generator processes,
starts them together, samples the server's and the generators' CPU time over the window
and merges the results. ``ServerProcess`` starts and stops a real server: this checkout's
``python -m service.cli`` (not the installed ``rnn-serve``, which may be another checkout's).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------
# Child side: the clients.
# --------------------------------------------------------------------------------------


class Run:
    """Shared clock and counters of one generator process."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.start = 0.0
        self.window_start = 0.0
        self.window_end = 0.0
        self.count = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.busy = 0
        self.idle_waiter: asyncio.Future | None = None
        self.cpu: list[tuple[float, float]] = []
        self.remaining = 0  # "create": requests still to send
        self.created = 0
        self.validated = False

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message[:300])

    def record(self, sent_at: float, now: float) -> None:
        if self.window_start <= now < self.window_end:
            self.count += 1
            self.latencies.append(now - sent_at)

    def went_idle(self) -> None:
        self.busy -= 1
        if self.busy <= 0 and self.idle_waiter is not None and not self.idle_waiter.done():
            self.idle_waiter.set_result(None)


class _Conn(asyncio.Protocol):
    def __init__(self, run: Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.sent_at = 0.0
        self.active = False
        self.dead = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.opened()

    def connection_lost(self, exc) -> None:
        if not self.dead:
            self.dead = True
            self._fail(f"connection lost: {exc!r}")

    def _fail(self, message: str) -> None:
        self.dead = True
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(message))
            return
        self.run.error(message)
        if self.active:
            self.active = False
            self.run.went_idle()
        if self.transport is not None:
            self.transport.close()

    def begin(self) -> None:
        if self.dead:
            return
        self.active = True
        self.run.busy += 1
        self.send()

    def answered(self, problem: str | None) -> None:
        """Bookkeeping after one answer (``problem``: what is wrong with it); sends the next
        request unless the run is over."""
        now = time.monotonic()
        if problem is not None:
            self._fail(problem)
            return
        self.run.record(self.sent_at, now)
        if now < self.run.window_end:
            self.send()
        else:
            self.active = False
            self.run.went_idle()

    def opened(self) -> None:
        raise NotImplementedError

    def send(self) -> None:
        raise NotImplementedError


# -- WebSocket ---------------------------------------------------------------------------

_MASK = b"\x5a\x1c\x93\xe7"


def ws_client_frame(payload: bytes, opcode: int) -> bytes:
    """One masked client frame (FIN set) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = (_MASK * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + _MASK + masked


class WSConn(_Conn):
    """One WebSocket stream: the server makes a session on connect and sends its info first."""

    def __init__(self, run: Run, path: str, request: bytes, binary: bool) -> None:
        super().__init__(run)
        self.path = path
        self.request = request  # pre-encoded, pre-masked frame
        self.binary = binary
        self.handshaken = False
        self.session_id: str | None = None

    def opened(self) -> None:
        cfg = self.run.cfg
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {cfg['host']}:{cfg['port']}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send(self) -> None:
        self.sent_at = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:end]).split(b"\r\n", 1)[0]
            if b" 101 " not in status:
                self._fail(f"handshake refused: {bytes(buf[:end])[:200]!r}")
                return
            self.handshaken = True
            del buf[: end + 4]
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > n:
                break
            payload = bytes(buf[pos + head : end])
            pos = end
            self.frame(b0, payload)
            if self.dead:
                return
        if pos:
            del buf[:pos]

    def frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 9:  # ping: answer it so long runs are not cut off
            self.transport.write(ws_client_frame(payload, 10))
            return
        if opcode == 10:
            return
        if opcode == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
            self._fail(f"closed by the server: {code} {payload[2:]!r}")
            return
        if not b0 & 0x80 or opcode == 0:
            self._fail("fragmented frames are not expected")
            return
        if self.session_id is None:
            try:
                self.session_id = json.loads(payload)["session_id"]
            except (ValueError, KeyError):
                self._fail(f"first message is not session info: {payload[:200]!r}")
                return
            self.ready.set_result(None)
            return
        if self.binary:
            bad = None if opcode == 2 and payload[:2] == b"RS" else payload[:200].decode("latin-1")
        else:
            bad = None if payload.startswith(b'{"outputs"') else payload[:200].decode("latin-1")
        if bad is None and not self.run.validated:
            bad = validate(self.run.cfg, payload, self.binary)
            self.run.validated = True
        self.answered(bad)


# -- HTTP/1.1 ----------------------------------------------------------------------------


def http_request(method: str, path: str, cfg: dict[str, Any], body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {cfg['host']}:{cfg['port']}\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if body:
        head += "Content-Type: application/json\r\n"
    return (head + "\r\n").encode() + body


class HTTPConn(_Conn):
    """A keep-alive HTTP/1.1 connection: one request at a time (``depth`` > 1 pipelines)."""

    def __init__(self, run: Run, kind: str, depth: int = 1) -> None:
        super().__init__(run)
        self.kind = kind
        self.depth = depth
        self.request = b""
        self.need = -1
        self.status = 0
        self.body_len = 0
        self.pending: list[float] = []
        cfg = run.cfg
        self.create = http_request("POST", f"/v1/models/{cfg['model']}/sessions", cfg)

    def opened(self) -> None:
        if self.kind == "rest_step":
            self.transport.write(self.create)  # this connection's session
        elif self.kind == "predict":
            self.request = predict_request(self.run.cfg)
            self.ready.set_result(None)
        else:  # create
            self.request = self.create
            self.ready.set_result(None)

    def begin(self) -> None:
        if self.dead:
            return
        self.active = True
        self.run.busy += 1
        for _ in range(self.depth):
            if not self._send_one():
                break
        if not self.pending:
            self.active = False
            self.run.went_idle()

    def _send_one(self) -> bool:
        if self.kind == "create":
            if self.run.remaining <= 0:
                return False
            self.run.remaining -= 1
        self.pending.append(time.monotonic())
        self.transport.write(self.request)
        return True

    def send(self) -> None:
        self._send_one()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                self.status = int(head[9:12])
                at = head.find(b"content-length:")
                if at < 0:
                    self._fail("an answer without content-length")
                    return
                stop = head.find(b"\r\n", at)
                self.body_len = int(head[at + 15 : stop if stop > 0 else len(head)])
                self.need = end + 4 + self.body_len
            if len(buf) < self.need:
                return
            body = bytes(buf[self.need - self.body_len : self.need])
            del buf[: self.need]
            self.need = -1
            self.response(self.status, body)
            if self.dead:
                return

    def response(self, status: int, body: bytes) -> None:
        if not self.ready.done():  # rest_step: the session of this connection
            if status != 201:
                self._fail(f"session create answered {status}: {body[:200]!r}")
                return
            session_id = json.loads(body)["session_id"]
            self.request = step_request(self.run.cfg, session_id)
            self.ready.set_result(None)
            return
        sent_at = self.pending.pop(0)
        now = time.monotonic()
        run = self.run
        if self.kind == "create":
            if status != 201:
                self._fail(f"session create answered {status}: {body[:200]!r}")
                return
            run.created += 1
            run.count += 1
            run.latencies.append(now - sent_at)
            if not self._send_one() and not self.pending:
                self.active = False
                run.went_idle()
            return
        bad = None
        if status != 200:
            bad = f"{status}: {body[:200]!r}"
        elif self.kind == "rest_step" and not body.startswith(b'{"outputs"'):
            bad = f"unexpected answer {body[:200]!r}"
        elif not run.validated:
            bad = validate(run.cfg, body, False)
            run.validated = True
        if bad is not None:
            self._fail(bad)
            return
        run.record(sent_at, now)
        if now < run.window_end:
            self._send_one()
        elif not self.pending:
            self.active = False
            run.went_idle()


# -- payloads ----------------------------------------------------------------------------


def _inputs(cfg: dict[str, Any], rows: int, salt: int = 0):
    import numpy as np

    rng = np.random.default_rng(cfg.get("seed", 0) + salt)
    return rng.standard_normal((rows, cfg["input_size"])).astype(np.float32)


def ws_request(cfg: dict[str, Any], salt: int) -> bytes:
    x = _inputs(cfg, cfg.get("steps", 1), salt)
    if cfg["frames"] == "binary":
        from service.frames import encode_request

        return ws_client_frame(encode_request(x), 2)
    return ws_client_frame(json.dumps({"inputs": x.tolist()}).encode(), 1)


def step_request(cfg: dict[str, Any], session_id: str) -> bytes:
    x = _inputs(cfg, cfg.get("steps", 1), hash(session_id) & 0xFFFF)
    body = json.dumps({"inputs": x.tolist()}).encode()
    return http_request("POST", f"/v1/sessions/{session_id}/steps", cfg, body)


def predict_request(cfg: dict[str, Any]) -> bytes:
    import numpy as np

    rng = np.random.default_rng(cfg.get("seed", 0))
    x = rng.standard_normal((cfg["batch"], cfg["seq_len"], cfg["input_size"])).astype(np.float32)
    body = json.dumps({"inputs": x.tolist(), "return_sequences": True}).encode()
    return http_request("POST", f"/v1/models/{cfg['model']}/predict", cfg, body)


def validate(cfg: dict[str, Any], payload: bytes, binary: bool) -> str | None:
    """A full check of one answer (the first of a run): its shape is what the model gives."""
    out = cfg["output_size"]
    if binary:
        from service.frames import decode_response

        y, _, _ = decode_response(payload)
        return None if y.shape == (cfg.get("steps", 1), out) else f"binary answer shape {y.shape}"
    body = json.loads(payload)
    if cfg["kind"] == "predict":
        outputs = body["outputs"]
        shape = (len(outputs), len(outputs[0]), len(outputs[0][0]))
        want = (cfg["batch"], cfg["seq_len"], out)
        return None if shape == want else f"predict answer shape {shape} != {want}"
    outputs = body["outputs"]
    shape = (len(outputs), len(outputs[0]))
    return None if shape == (cfg.get("steps", 1), out) else f"answer shape {shape}"


# -- the child's main --------------------------------------------------------------------


def _cpu() -> tuple[float, float]:
    t = os.times()
    return t.user, t.system


async def _child(cfg: dict[str, Any], make_conns=None) -> dict[str, Any]:
    """``make_conns(run, cfg) -> list[_Conn]`` lets another module bring its own clients."""
    loop = asyncio.get_running_loop()
    run = Run(cfg)
    kind, n = cfg["kind"], cfg["conns"]
    conns: list[_Conn] = make_conns(run, cfg) if make_conns is not None else []
    for i in range(0 if make_conns is not None else n):
        if kind == "ws":
            request = ws_request(cfg, cfg.get("salt", 0) + i)
            path = f"/v1/models/{cfg['model']}/stream"
            conns.append(WSConn(run, path, request, cfg["frames"] == "binary"))
        else:
            conns.append(HTTPConn(run, kind, cfg.get("depth", 1)))
    opened = time.monotonic()
    for chunk in range(0, n, 64):
        await asyncio.gather(
            *(
                loop.create_connection(lambda c=c: c, cfg["host"], cfg["port"])
                for c in conns[chunk : chunk + 64]
            )
        )
    await asyncio.wait_for(asyncio.gather(*(c.ready for c in conns)), 60)
    setup_s = time.monotonic() - opened
    print(f"READY {n}", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    t0 = float(line.split()[1])
    run.start = t0
    run.window_start = t0 + cfg["warmup"]
    run.window_end = run.window_start + cfg["duration"]
    run.remaining = cfg.get("total", 0)
    run.idle_waiter = loop.create_future()
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    begun = time.monotonic()
    if kind == "create":  # as fast as possible until `total` exist; the window is the whole run
        run.window_start, run.window_end = begun, float("inf")
        cpu0 = _cpu()
        for c in conns:
            c.begin()
        await asyncio.wait_for(run.idle_waiter, cfg.get("timeout", 600))
        finished = time.monotonic()
        cpu1 = _cpu()
        window = finished - begun
    else:
        for c in conns:
            c.begin()
        await asyncio.sleep(max(0.0, run.window_start - time.monotonic()))
        cpu0 = _cpu()
        await asyncio.sleep(max(0.0, run.window_end - time.monotonic()))
        cpu1 = _cpu()
        window = cfg["duration"]
        if run.busy > 0:
            try:
                await asyncio.wait_for(run.idle_waiter, cfg.get("drain", 10.0))
            except TimeoutError:
                run.error(f"{run.busy} connections still waiting for an answer after the run")
    for c in conns:
        if c.transport is not None and not c.dead:
            c.dead = True
            c.transport.close()
    await asyncio.sleep(0.05)
    return {
        "kind": kind,
        "conns": n,
        "count": run.count,
        "created": run.created,
        "window_s": window,
        "setup_s": setup_s,
        "latencies_us": [round(v * 1e6, 1) for v in run.latencies],
        "errors": run.errors,
        "error_samples": run.error_samples,
        "cpu_user_s": cpu1[0] - cpu0[0],
        "cpu_sys_s": cpu1[1] - cpu0[1],
        "loop": type(loop).__module__.split(".")[0],
    }


def child_main(argv: list[str], make_conns=None) -> None:
    cfg = json.loads(argv[0])
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    result = runner(_child(cfg, make_conns))
    # The line is large (every latency sample) and stdout may have been left non-blocking
    # (PYTHONUNBUFFERED + an event loop): write it all, blocking, with os.write.
    data = ("RESULT " + json.dumps(result) + "\n").encode()
    sys.stdout.flush()
    os.set_blocking(1, True)
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


# --------------------------------------------------------------------------------------
# Parent side: processes.
# --------------------------------------------------------------------------------------


def percentiles(values_us: list[float]) -> dict[str, float]:
    if not values_us:
        return {
            "p50_ms": float("nan"),
            "p90_ms": float("nan"),
            "p99_ms": float("nan"),
            "max_ms": float("nan"),
        }
    import numpy as np

    a = np.asarray(values_us, np.float64) / 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "max_ms": float(a.max()),
    }


class _Lines:
    """Line reader over a child's stdout pipe with a deadline (no blocking past it)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("load generator did not answer in time")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(
                        f"load generator exited ({self.proc.poll()}) after {len(self.buf)} "
                        f"bytes without a full line: {self.buf[:120]!r}"
                    )
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def _spawn(cfg: dict[str, Any], log_dir: Path) -> tuple[subprocess.Popen, _Lines, Path]:
    err = Path(tempfile.mkstemp(prefix="loadgen-", suffix=".err", dir=log_dir)[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        # another module may speak the same READY / GO / RESULT protocol (grpc_bench does)
        [sys.executable, "-m", cfg.get("module", "benchmarks.loadgen"), json.dumps(cfg)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err.open("wb"),
    )
    return proc, _Lines(proc), err


def _expect(lines: _Lines, prefix: str, timeout: float, err: Path) -> str:
    try:
        while True:
            line = lines.readline(timeout)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
    except (TimeoutError, RuntimeError) as exc:
        tail = err.read_text(errors="replace")[-1500:] if err.exists() else ""
        raise RuntimeError(f"{exc}; generator stderr:\n{tail}") from exc


def drive(
    cfg: dict[str, Any],
    *,
    procs: int = 1,
    server_pid: int | None = None,
    log_dir: Path | None = None,
    on_window=None,
) -> dict[str, Any]:
    """Run one load (``cfg``) from ``procs`` generator processes; merged results.

    ``on_window(start, end)`` is called (blocking) at the start of the measurement window
    with its monotonic bounds, e.g. to run a profiler against the server meanwhile.
    """
    import psutil

    log_dir = log_dir or Path(tempfile.gettempdir())
    procs = max(1, min(procs, cfg["conns"]))
    share = [cfg["conns"] // procs + (1 if i < cfg["conns"] % procs else 0) for i in range(procs)]
    children = []
    try:
        for i, conns in enumerate(share):
            sub = dict(cfg, conns=conns, salt=1000 * i)
            if cfg["kind"] == "create":
                sub["total"] = cfg["total"] // procs + (1 if i < cfg["total"] % procs else 0)
            children.append(_spawn(sub, log_dir))
        for proc, lines, err in children:
            _expect(lines, "READY", 120, err)
        t0 = time.monotonic() + 0.05
        for proc, _, _ in children:
            proc.stdin.write(f"GO {t0!r}\n".encode())
            proc.stdin.flush()
        server = psutil.Process(server_pid) if server_pid else None
        gens = [psutil.Process(p.pid) for p, _, _ in children]
        window_start = t0 + cfg["warmup"]
        window_end = window_start + cfg["duration"]
        sample: dict[str, Any] = {}
        if cfg["kind"] != "create":
            time.sleep(max(0.0, window_start - time.monotonic()))
            s0 = server.cpu_times() if server else None
            g0 = [g.cpu_times() for g in gens]
            sys0 = psutil.cpu_times()
            if on_window is not None:
                on_window(window_start, window_end)
            time.sleep(max(0.0, window_end - time.monotonic()))
            s1 = server.cpu_times() if server else None
            g1 = [g.cpu_times() for g in gens]
            sys1 = psutil.cpu_times()
            busy = lambda t: (
                t.user + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + t.nice
            )
            sample = {
                "server_cpu_s": (s1.user + s1.system - s0.user - s0.system) if server else None,
                "gen_cpu_psutil_s": sum(
                    b.user + b.system - a.user - a.system for a, b in zip(g0, g1)
                ),
                "machine_busy_cpu_s": busy(sys1) - busy(sys0),
            }
        results = []
        for proc, lines, err in children:
            results.append(json.loads(_expect(lines, "RESULT", cfg.get("timeout", 600) + 60, err)))
            proc.wait(30)
    finally:
        for proc, _, err in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            try:
                err.unlink()
            except OSError:
                pass
    latencies = [v for r in results for v in r["latencies_us"]]
    window = max(r["window_s"] for r in results)
    count = sum(r["count"] for r in results)
    merged = {
        "kind": cfg["kind"],
        "conns": cfg["conns"],
        "procs": procs,
        "count": count,
        "window_s": window,
        "rate_per_s": count / window if window > 0 else float("nan"),
        **percentiles(latencies),
        "errors": sum(r["errors"] for r in results),
        "error_samples": [s for r in results for s in r["error_samples"]][:5],
        "gen_cpu_s": sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in results),
        "setup_s": max(r["setup_s"] for r in results),
        "loop": results[0]["loop"],
        **sample,
    }
    if cfg["kind"] == "create":
        merged["created"] = sum(r["created"] for r in results)
    return merged


# --------------------------------------------------------------------------------------
# A real server process.
# --------------------------------------------------------------------------------------


def step_load(
    port: int, model: str, card: dict, kind: str, conns: int, frames: str,
    duration: float, warmup: float,
) -> dict[str, Any]:  # fmt: skip
    """The config of ``drive`` for ``conns`` closed-loop streams of one step per message."""
    return {
        "kind": kind,
        "host": "127.0.0.1",
        "port": port,
        "model": model,
        "conns": conns,
        "frames": frames,
        "input_size": card["input_size"],
        "output_size": card["output_size"],
        "steps": 1,
        "batch": 0,
        "seq_len": 0,
        "warmup": warmup,
        "duration": duration,
    }


def median_of(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's figure from its windows: the median window's rate and percentiles
    (each key on its own), errors summed, and every window kept."""
    out = dict(windows[0])
    for key in ("steps_per_s", "messages_per_s", "rate_per_s", "p50_ms", "p99_ms"):
        if key in out:
            values = sorted(w[key] for w in windows)
            out[key] = values[len(values) // 2]
    out["errors"] = sum(w.get("errors") or 0 for w in windows)
    out["error_samples"] = [e for w in windows for e in (w.get("error_samples") or [])][:5]
    out["windows"] = windows
    return out


def interleaved(
    names: list[str], measure: Callable[[str], dict[str, Any]], rounds: int = 3
) -> dict[str, dict[str, Any]]:
    """Measurements to compare with each other, taken in turns rather than one after the
    other: ``rounds`` windows each, in an order reversed every round (a b, b a, a b), so
    drift of the machine's speed during the run falls on all of them alike. Each figure is
    the median over its windows (``median_of``)."""
    windows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names if k % 2 == 0 else names[::-1]:
            windows[name].append(measure(name))
    return {name: median_of(runs) for name, runs in windows.items()}


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server process, killing it after 15 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    repo: Path
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    port: int = 0
    proc: subprocess.Popen | None = None
    ready_s: float = float("nan")

    def start(self, timeout: float = 60.0) -> Self:
        """Spawn this checkout's server and return once /readyz answers 200 (``ready_s``
        after spawn)."""
        import httpx

        self.port = self.port or free_port()
        log = self.log_dir / f"server-{self.port}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "RNNSERVE_LOG_LEVEL": "warning",
            "RNNSERVE_GRPC_PORT": "0",
            **self.env,
        }
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "--model-repo",
                str(self.repo),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the server exited with {self.proc.returncode}: {log.read_text()[-2000:]}"
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        self.ready_s = time.monotonic() - started
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"the server was not ready in {timeout} s: {log.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    child_main(sys.argv[1:])
