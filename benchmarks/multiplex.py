"""Multiplexed steps and the naive-server baseline (issue #12), measured in one run.

    python -m benchmarks.multiplex                 # on its own (~2 min), or through benchmarks.run

Scenarios, all on bench-lstm (LSTM 2x256, 8 in, 8 out) unless named otherwise:

- ``mux-<n>-<frames>-<c>c``: ``n`` sessions spread over ``c`` WebSocket connections to
  ``/v1/stream``, every message one step for each of the connection's sessions (JSON or
  binary multiplexed frames); ``mux-rest-<n>``: the same over ``POST /v1/steps``;
- ``ws-256-json``: the per-connection WebSocket at 256 streams, for the 4x target;
- ``ws-1-json``, ``rest-1``, ``rest-256``: single-session paths, on our server and on the
  naive server of benchmarks/naive.py (``naive-*``);
- the in-process onnxruntime loop at batch 256 (benchmarks.inprocess), the limit.

Steps/s count session steps (a 256-item message is 256 steps); p50/p99 are per message.
The load generators run in processes of their own on the same machine (as in run.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadgen import (
    ROOT,
    HTTPConn,
    Run,
    WSConn,
    child_main,
    drive,
    free_port,
    http_request,
    interleaved,
    step_load,
    stop_process,
    ws_client_frame,
)

BENCH = "bench-lstm"


# -- the generator side: multiplexed connections -------------------------------------------


def _create_sessions(cfg: dict[str, Any], n: int) -> list[str]:
    conn = http.client.HTTPConnection(cfg["host"], cfg["port"], timeout=60)
    ids = []
    for _ in range(n):
        conn.request("POST", f"/v1/models/{cfg['model']}/sessions")
        response = conn.getresponse()
        body = response.read()
        if response.status != 201:
            raise RuntimeError(f"session create answered {response.status}: {body[:200]!r}")
        ids.append(json.loads(body)["session_id"])
    conn.close()
    return ids


def _message(cfg: dict[str, Any], ids: list[str], salt: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(salt)
    x = rng.standard_normal((len(ids), 1, cfg["input_size"])).astype(np.float32)
    if cfg["frames"] == "binary":
        from service.frames import encode_many

        return encode_many([(s, x[k], None) for k, s in enumerate(ids)])
    return json.dumps(
        {"steps": [{"session_id": s, "inputs": x[k].tolist()} for k, s in enumerate(ids)]}
    ).encode()


def _check(cfg: dict[str, Any], payload: bytes, items: int, full: bool) -> str | None:
    """Cheap check of every answer (no error item), full check of the first one."""
    if cfg["frames"] == "binary":
        if payload[:2] != b"RM" or int.from_bytes(payload[8:12], "little") != 0:
            return f"bad or failed multiplexed answer {payload[:60]!r}"
        if full:
            from service.frames import decode_many_response

            results = decode_many_response(payload)
            shapes = {r[0].shape for r in results if not isinstance(r, dict)}
            if len(results) != items or shapes != {(1, cfg["output_size"])}:
                return f"answer has {len(results)} items of shapes {shapes}"
        return None
    if not payload.startswith(b'{"results"') or b'"error"' in payload:
        return f"failed multiplexed answer {payload[:300]!r}"
    if full:
        results = json.loads(payload)["results"]
        if len(results) != items or any(len(r["outputs"][0]) != cfg["output_size"] for r in results):
            return "answer does not have one output per item"
    return None


class MuxConn(WSConn):
    """One multiplexed WebSocket: each message carries one step for each of its sessions."""

    def __init__(self, run: Run, message: bytes, items: int) -> None:
        binary = run.cfg["frames"] == "binary"
        super().__init__(run, "/v1/stream", ws_client_frame(message, 2 if binary else 1), binary)
        self.items = items
        self.session_id = "-"  # no session info frame on /v1/stream

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.handshaken and not self.ready.done():
            self.ready.set_result(None)

    def frame(self, b0: int, payload: bytes) -> None:
        if b0 & 0x0F in (8, 9, 10):
            super().frame(b0, payload)
            return
        bad = _check(self.run.cfg, payload, self.items, not self.run.validated)
        self.run.validated = True
        self.answered(bad)


class MuxRESTConn(HTTPConn):
    """``POST /v1/steps`` on a keep-alive connection (the HTTP parser of loadgen)."""

    def __init__(self, run: Run, message: bytes, items: int) -> None:
        super().__init__(run, "mux")
        self.request = http_request("POST", "/v1/steps", run.cfg, message)
        self.items = items

    def opened(self) -> None:
        self.ready.set_result(None)

    def response(self, status: int, body: bytes) -> None:
        sent_at = self.pending.pop(0)
        now = time.monotonic()
        bad = f"{status}: {body[:200]!r}" if status != 200 else None
        if bad is None:
            bad = _check(self.run.cfg, body, self.items, not self.run.validated)
            self.run.validated = True
        if bad is not None:
            self._fail(bad)
            return
        self.run.record(sent_at, now)
        if now < self.run.window_end:
            self._send_one()
        elif not self.pending:
            self.active = False
            self.run.went_idle()


def _make_conns(run: Run, cfg: dict[str, Any]) -> list:
    """The generator's connections, each with its own sessions made first (over REST)."""
    per_conn = cfg["sessions"] // cfg["total_conns"]
    conns = []
    for i in range(cfg["conns"]):
        ids = _create_sessions(cfg, per_conn)
        message = _message(cfg, ids, cfg.get("salt", 0) + i)
        kind = MuxRESTConn if cfg["transport"] == "rest" else MuxConn
        conns.append(kind(run, message, per_conn))
    return conns


# -- the parent side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MuxScenario:
    name: str
    sessions: int
    frames: str = "json"
    conns: int = 1
    transport: str = "ws"


MUX_SCENARIOS = [
    MuxScenario("mux-256-json-1c", 256),
    MuxScenario("mux-256-binary-1c", 256, "binary"),
    MuxScenario("mux-256-json-4c", 256, conns=4),
    MuxScenario("mux-256-binary-4c", 256, "binary", 4),
    MuxScenario("mux-4096-json-1c", 4096),
    MuxScenario("mux-4096-binary-1c", 4096, "binary"),
    MuxScenario("mux-4096-binary-4c", 4096, "binary", 4),
    MuxScenario("mux-rest-256", 256, transport="rest"),
]
COMPARED = ("mux-256-json-1c", "mux-256-binary-1c", "mux-4096-json-1c", "mux-4096-binary-1c")
"""Measured in turns with the per-connection WebSocket at 256 streams (their targets)."""
# (name, loadgen kind, connections): the same load against our server and the naive one
SINGLE = [("ws-1-json", "ws", 1), ("rest-1", "rest_step", 1), ("rest-256", "rest_step", 256)]


class _Server:
    """Our server from this checkout (``python -m service.cli``) or the naive one."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / f"mux-server-{self.port}.log"
        full_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "RNNSERVE_LOG_LEVEL": "warning",
            "RNNSERVE_GRPC_PORT": "0",
            **env,
        }
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=full_env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("POST", f"/v1/models/{BENCH}/sessions")
                if conn.getresponse().status == 201:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server not ready in 90 s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)


def _single_cfg(port: int, card: dict, kind: str, conns: int, duration: float, warmup: float) -> dict:
    return step_load(port, BENCH, card, kind, conns, "json", duration, warmup)


def _summary(r: dict[str, Any], items: int) -> dict[str, Any]:
    keys = ("p50_ms", "p99_ms", "errors", "error_samples", "conns", "server_cpu_s", "gen_cpu_s", "window_s")
    out = {k: r.get(k) for k in keys}
    out["steps_per_s"] = r["rate_per_s"] * items
    out["messages_per_s"] = r["rate_per_s"]
    return out


def _compare_single(
    naive: _Server,
    ours: _Server,
    card: dict,
    results: dict[str, Any],
    duration: float,
    warmup: float,
    log_dir: Path,
    scale: int,
    only: str,
    say,
    rounds: int,
) -> None:
    """The single-session comparisons, in short windows alternating between the two servers
    (both up, the idle one idle): naive, ours, ours, naive, naive, ours, ...
    (``loadgen.interleaved``); each figure is the median over its server's five windows
    (one stream's p50 moves by 10-20 % between windows on a shared VM: with three, the
    ratio of two servers within 5 % of each other flipped between runs)."""
    servers = {"naive": naive, "ours": ours}
    for name, kind, conns in SINGLE:
        if not re.search(only, name) and not re.search(only, f"naive-{name}"):
            continue
        conns = max(1, conns // scale)

        def measure(who: str, kind: str = kind, conns: int = conns) -> dict[str, Any]:
            server = servers[who]
            cfg = _single_cfg(server.port, card, kind, conns, duration / 2, warmup / 2)
            r = drive(cfg, procs=1 if conns <= 128 else 2, server_pid=server.pid, log_dir=log_dir)
            return _summary(r, 1)

        for who, r in interleaved(["naive", "ours"], measure, rounds=rounds).items():
            results[who][name] = r
            say(f"{who} {name}", r)


def _mux_window(
    ours: _Server, card: dict, sc: MuxScenario, duration: float, warmup: float, log_dir: Path,
    scale: int,
) -> dict[str, Any]:  # fmt: skip
    cfg = {
        **_single_cfg(ours.port, card, "mux", sc.conns, duration, warmup),
        "module": "benchmarks.multiplex",
        "frames": sc.frames,
        "sessions": sc.sessions // scale,
        "total_conns": sc.conns,
        "transport": sc.transport,
    }
    r = _summary(
        drive(cfg, procs=1, server_pid=ours.pid, log_dir=log_dir), sc.sessions // scale // sc.conns
    )
    r.update(sessions=sc.sessions // scale, frames=sc.frames, transport=sc.transport)
    return r


def run(
    repo: Path,
    cards: dict[str, dict],
    *,
    duration: float,
    warmup: float,
    log_dir: Path,
    inprocess: dict[str, Any] | None = None,
    verbose: bool = True,
    scale: int = 1,
    only: str = "",
    rounds: int | None = None,
) -> dict[str, Any]:
    """The single-session scenarios alternately on the naive server and ours, then the
    rest on ours. ``scale`` divides the session counts and ``rounds`` (if given) sets the
    windows per compared figure (the smoke test's seconds-long run: 16 and 1)."""
    card = cards[BENCH]
    results: dict[str, Any] = {"ours": {}, "naive": {}, "mux": {}}

    def say(name: str, r: dict[str, Any]) -> None:
        if verbose:
            print(
                f"  {name:<24} {r['steps_per_s']:>10.0f} steps/s  p50 {r['p50_ms']:7.2f} ms  "
                f"p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}",
                file=sys.stderr,
                flush=True,
            )

    naive = _Server(
        [sys.executable, "-m", "uvicorn", "benchmarks.naive:create_app", "--factory",
         "--no-access-log", "--log-level", "warning"],
        {"NAIVE_MODEL_DIR": str(repo / BENCH / "1")},
        log_dir,
    )
    try:
        ours = _Server(
            [sys.executable, "-m", "service.cli", "--model-repo", str(repo)],
            {"RNNSERVE_MAX_MULTIPLEX_ITEMS": "8192", "RNNSERVE_WS_MAX_MESSAGE_BYTES": str(64 << 20)},
            log_dir,
        )
    except BaseException:
        naive.stop()
        raise
    try:
        try:
            _compare_single(
                naive, ours, card, results, duration, warmup, log_dir, scale, only, say,
                rounds or 5,
            )  # fmt: skip
        finally:
            naive.stop()
        # The scenarios that the targets compare with each other, in turns (three short
        # windows each, medians); the other multiplexed ones after, one window each.
        scenarios = {sc.name: sc for sc in MUX_SCENARIOS}
        compared = [n for n in ("ws-256-json", *COMPARED) if re.search(only, n)]

        def measure(name: str) -> dict[str, Any]:
            if name == "ws-256-json":
                conns = max(1, 256 // scale)
                cfg = _single_cfg(ours.port, card, "ws", conns, duration / 2, warmup / 2)
                r = drive(cfg, procs=1 if conns <= 128 else 2, server_pid=ours.pid, log_dir=log_dir)
                return _summary(r, 1)
            return _mux_window(ours, card, scenarios[name], duration / 2, warmup / 2, log_dir, scale)

        for name, r in interleaved(compared, measure, rounds=rounds or 3).items():
            results["ours" if name == "ws-256-json" else "mux"][name] = r
            say(name if name in scenarios else f"ours {name}", r)
        for sc in MUX_SCENARIOS:
            if sc.name in COMPARED or not re.search(only, sc.name):
                continue
            r = _mux_window(ours, card, sc, duration, warmup, log_dir, scale)
            results["mux"][sc.name] = r
            say(sc.name, r)
        results["mux"] = {sc.name: results["mux"][sc.name] for sc in MUX_SCENARIOS if sc.name in results["mux"]}
    finally:
        ours.stop()
    if inprocess is not None:
        results["inprocess_batch256"] = inprocess[BENCH]["batches"]["256"]["steps_per_s"]
    return results


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The floors of issue #12 as measured ratios."""
    mux, ours, naive = res["mux"], res["ours"], res["naive"]
    limit = res.get("inprocess_batch256")
    ws256 = ours["ws-256-json"]["steps_per_s"]
    rows = []

    def add(name: str, value: float | None, floor: float, op: str = ">=") -> None:
        if value is None:
            return
        met = value >= floor if op == ">=" else value <= floor
        rows.append(
            {
                "target": name,
                "value": value,
                "op": op,
                "floor": floor,
                "unit": "x",
                "verdict": "PASS" if met else "MISS",
                "detail": "issue #12, one run (medians of alternating windows where compared)",
            }
        )

    if limit:
        add("mux 256 JSON / in-process batch 256", mux["mux-256-json-1c"]["steps_per_s"] / limit, 0.35)
        add("mux 256 binary / in-process batch 256", mux["mux-256-binary-1c"]["steps_per_s"] / limit, 0.5)
    add("mux 256 JSON / per-connection WS 256", mux["mux-256-json-1c"]["steps_per_s"] / ws256, 4.0)
    add("mux 256 binary / per-connection WS 256", mux["mux-256-binary-1c"]["steps_per_s"] / ws256, 4.0)
    add(
        "mux 4096 / mux 256 steps/s (binary, 1 conn)",
        mux["mux-4096-binary-1c"]["steps_per_s"] / mux["mux-256-binary-1c"]["steps_per_s"],
        1.0,
    )
    add(
        "mux 4096 / mux 256 steps/s (JSON, 1 conn)",
        mux["mux-4096-json-1c"]["steps_per_s"] / mux["mux-256-json-1c"]["steps_per_s"],
        1.0,
    )
    add("WS 1 stream p50 / naive", ours["ws-1-json"]["p50_ms"] / naive["ws-1-json"]["p50_ms"], 1.0, "<=")
    add("REST 1 stream p50 / naive", ours["rest-1"]["p50_ms"] / naive["rest-1"]["p50_ms"], 1.0, "<=")
    add("REST 256 streams steps/s / naive", ours["rest-256"]["steps_per_s"] / naive["rest-256"]["steps_per_s"], 1.0)
    return rows


def render(res: dict[str, Any]) -> str:
    lines = ["| scenario | steps/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
    if res.get("inprocess_batch256"):
        lines.append(f"| in-process onnxruntime, batch 256 | {res['inprocess_batch256']:,.0f} | | | |")
    for group in ("mux", "ours", "naive"):
        for name, r in res[group].items():
            label = name if group == "mux" else f"{group}: {name}"
            lines.append(
                f"| {label} | {r['steps_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
            )
    lines += ["", "| target | ratio | floor | verdict |", "|---|---|---|---|"]
    for t in targets(res):
        lines.append(f"| {t['target']} | {t['value']:.2f} | {t['op']} {t['floor']:g} | {t['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.run import build_models, run_inprocess

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", default="", help="regex: run only the scenarios it matches")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "multiplex.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rnnserve-mux-") as tmp:
        root = Path(tmp)
        repo, _, cards = build_models(root)
        limit = run_inprocess(repo, [BENCH], args.duration, args.warmup, (64, 32))
        res = run(
            repo, cards, duration=args.duration, warmup=args.warmup, log_dir=root,
            inprocess=limit, only=args.only,
        )  # fmt: skip
    res["meta"] = {"cpus": os.cpu_count(), "duration_s": args.duration, "warmup_s": args.warmup,
                   "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(render(res) if not args.only else json.dumps(res, indent=1, default=str)[:4000])
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("{"):
        child_main(sys.argv[1:], _make_conns)
    else:
        main()
