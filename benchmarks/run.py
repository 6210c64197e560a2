"""The benchmark suite: one command, a table on stdout, JSON in benchmarks/results/.

    python -m benchmarks.run                  # full run (~4.5 min on 2 cores), or `make bench`
    python -m benchmarks.run --quick          # short durations, 20k idle sessions (~2 min)
    python -m benchmarks.run --only 'ws-256'  # a subset of the server scenarios (regex)

Models (built into a temporary repository on every run, fixed seeds):
  sine-lstm   the demo LSTM 2x64, 1 feature (copied from models/ when present)
  bench-lstm  LSTM 2x256, 8 inputs, 8 outputs, random weights
  mem-lstm    LSTM 2x128, 8 inputs, 8 outputs (2 KiB of state per session), for memory

For each server scenario the same load runs against two servers: batching off
(RNNSERVE_BATCH_MAX_SIZE=1) and batching on (default settings). Load generators are
separate processes (see benchmarks/loadgen.py); the in-process onnxruntime limit runs in a
process of its own while no server runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import multiplex
from benchmarks.grpc_bench import measure as grpc_streams
from benchmarks.grpc_bench import render as render_grpc
from benchmarks.loadgen import ROOT, ServerProcess, drive, interleaved
from benchmarks.memory import idle_sessions, startup
from benchmarks.payload import render as render_payload
from benchmarks.payload import top_k_payload
from benchmarks.redis_store import redis_vs_memory
from benchmarks.redis_store import render as render_redis

DEMO_DIR = ROOT / "models" / "sine-lstm"
BENCH = "bench-lstm"
DEMO = "sine-lstm"
MEM = "mem-lstm"
MB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    kind: str  # ws | rest_step | predict
    conns: int
    frames: str = "json"
    batch: int = 0
    seq_len: int = 0

    def describe(self) -> str:
        if self.kind == "ws":
            return f"WS {self.frames}, {self.conns} session{'s' * (self.conns > 1)}"
        if self.kind == "rest_step":
            return f"REST steps, {self.conns} sessions"
        return f"predict {self.batch}x{self.seq_len}, {self.conns} client{'s' * (self.conns > 1)}"


def scenarios(sizes: tuple[int, ...], predict: tuple[int, int], rest_conns: int) -> list[Scenario]:
    n, t = predict
    out = []
    for conns in sizes:
        for frames in ("json", "binary"):
            out.append(Scenario(f"ws-{conns}-{frames}", BENCH, "ws", conns, frames))
    out.append(Scenario(f"rest-{rest_conns}", BENCH, "rest_step", rest_conns))
    out.append(Scenario(f"predict-{n}x{t}", BENCH, "predict", 2, batch=n, seq_len=t))
    # the demo model: per-message overhead dominates, the model is cheap
    out.append(Scenario("demo-ws-1-binary", DEMO, "ws", 1, "binary"))
    out.append(Scenario(f"demo-ws-{sizes[-1]}-json", DEMO, "ws", sizes[-1], "json"))
    out.append(Scenario(f"demo-ws-{sizes[-1]}-binary", DEMO, "ws", sizes[-1], "binary"))
    out.append(Scenario(f"demo-predict-{n}x{t}", DEMO, "predict", 2, batch=n, seq_len=t))
    return out


CONFIGS = {
    "off": {"RNNSERVE_BATCH_MAX_SIZE": "1"},
    "on": {},
}


# -- models ------------------------------------------------------------------------------


def build_models(root: Path, small: bool = False) -> tuple[Path, Path, dict[str, dict]]:
    """The serving repository (sine-lstm, bench-lstm) and the memory one (mem-lstm)."""
    import torch

    from training.export import export_model
    from training.model import RecurrentModel

    torch.set_num_threads(1)
    repo, mem_repo = root / "repo", root / "mem-repo"
    repo.mkdir(parents=True)
    mem_repo.mkdir(parents=True)
    demo_versions = (
        sorted(
            (p for p in DEMO_DIR.glob("*") if (p / "card.json").exists() and p.name.isdigit()),
            key=lambda p: int(p.name),
        )
        if DEMO_DIR.exists()
        else []
    )
    torch.manual_seed(0)
    if demo_versions:
        shutil.copytree(demo_versions[-1], repo / DEMO / "1")
        card = json.loads((repo / DEMO / "1" / "card.json").read_text())
        card["version"] = 1
        (repo / DEMO / "1" / "card.json").write_text(json.dumps(card))
        demo_source = str(demo_versions[-1].relative_to(ROOT))
    else:
        export_model(RecurrentModel("lstm", 1, 64, 1, num_layers=2), repo, DEMO)
        demo_source = "built (random weights): models/sine-lstm not found"
    hidden, mem_hidden = (32, 16) if small else (256, 128)
    export_model(RecurrentModel("lstm", 8, hidden, 8, num_layers=2), repo, BENCH)
    export_model(RecurrentModel("lstm", 8, mem_hidden, 8, num_layers=2), mem_repo, MEM)
    cards = {
        name: json.loads((r / name / "1" / "card.json").read_text())
        for r, name in ((repo, DEMO), (repo, BENCH), (mem_repo, MEM))
    }
    cards[DEMO]["source"] = demo_source
    return repo, mem_repo, cards


def _describe_card(card: dict) -> str:
    return (
        f"{card['cell'].upper()} {card['num_layers']}x{card['hidden_size']}, "
        f"in {card['input_size']}, out {card['output_size']}"
    )


# -- measuring ---------------------------------------------------------------------------


def run_inprocess(
    repo: Path, models: list[str], duration: float, warmup: float, predict: tuple[int, int]
) -> dict[str, Any]:
    cfg = {
        "models": [str(repo / m / "1") for m in models],
        "duration": duration,
        "warmup": warmup,
        "batches": [1, 64, 256],
        "predict": list(predict),
    }
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inprocess", json.dumps(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _procs_for(conns: int, override: int | None) -> int:
    if override:
        return override
    return 1 if conns <= 128 else 2


COMPARED_ON_OFF = ("ws-1-json", "ws-1-binary", "ws-256-json", "ws-256-binary")
"""The scenarios of the batching on/off targets: measured in turns on both servers
(``loadgen.interleaved``, three half-length windows each, medians)."""


def run_server_scenarios(
    repo: Path,
    cards: dict[str, dict],
    chosen: list[Scenario],
    *,
    duration: float,
    warmup: float,
    log_dir: Path,
    procs: int | None,
    profile_dir: Path | None,
    profile_re: str,
    verbose: bool,
) -> dict[str, dict[str, Any]]:
    """Every scenario against a server with batching off and one with it on, both up at
    once (the idle one idle); the on/off targets' scenarios in turns."""
    results: dict[str, dict[str, Any]] = {config: {} for config in CONFIGS}
    how = _How(log_dir, procs, profile_dir, profile_re)
    servers: dict[str, ServerProcess] = {}
    try:
        for config, env in CONFIGS.items():
            servers[config] = ServerProcess(repo, env=env, log_dir=log_dir).start()
        for sc in chosen:

            def measure(config: str, sc: Scenario = sc, share: float = 1.0) -> dict[str, Any]:
                return _server_window(
                    servers[config], config, sc, cards[sc.model], duration * share,
                    warmup * share, how,
                )  # fmt: skip

            if sc.name in COMPARED_ON_OFF:
                measured = interleaved(list(CONFIGS), lambda c, m=measure: m(c, share=0.5))
            else:
                measured = {config: measure(config) for config in CONFIGS}
            for config, r in measured.items():
                results[config][sc.name] = r
                if verbose:
                    print(
                        f"  [{config:>3}] {sc.name:<24} {r['steps_per_s']:>10.0f} steps/s  "
                        f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                        f"server {_pct(r.get('server_cpu_s'), r['window_s'])}  "
                        f"gen {_pct(r['gen_cpu_s'], r['window_s'])}  "
                        f"other {_pct(r.get('other_cpu_s'), r['window_s'])}  "
                        f"rows/call {r.get('mean_batch_rows', float('nan')):.1f}  errors {r['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
                if r["errors"]:
                    print(f"    errors: {r['error_samples']}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return results


@dataclass(frozen=True)
class _How:
    """How every server window is taken: logs, generator processes, profiles."""

    log_dir: Path
    procs: int | None
    profile_dir: Path | None
    profile_re: str


def _server_window(
    server: ServerProcess, config: str, sc: Scenario, card: dict, duration: float,
    warmup: float, how: _How,
) -> dict[str, Any]:  # fmt: skip
    """One measurement window of ``sc`` against ``server``."""
    cfg = {
        "kind": sc.kind,
        "host": "127.0.0.1",
        "port": server.port,
        "model": sc.model,
        "conns": sc.conns,
        "frames": sc.frames,
        "input_size": card["input_size"],
        "output_size": card["output_size"],
        "steps": 1,
        "batch": sc.batch,
        "seq_len": sc.seq_len,
        # predict calls are long: give them a longer window for a stable count
        "warmup": warmup,
        "duration": duration * (1.5 if sc.kind == "predict" else 1.0),
    }
    profiler = None
    if how.profile_dir is not None and re.search(how.profile_re, f"{config}:{sc.name}"):
        profiler = _Profiler(server.pid, how.profile_dir / f"{config}-{sc.name}.txt")
    started = time.monotonic()
    calls0 = _batch_counters(server.url, sc.model)
    r = drive(
        cfg,
        procs=_procs_for(sc.conns, how.procs),
        server_pid=server.pid,
        log_dir=how.log_dir,
        on_window=profiler,
    )
    calls1 = _batch_counters(server.url, sc.model)
    r["wall_s"] = time.monotonic() - started
    if calls0 and calls1 and calls1[1] > calls0[1]:
        # over the whole run (warm-up and drain included), from the server's metrics
        r["ort_calls"] = calls1[1] - calls0[1]
        r["mean_batch_rows"] = (calls1[0] - calls0[0]) / (calls1[1] - calls0[1])
    if profiler is not None:
        r["profile"] = profiler.summary()
        r["profile_file"] = str(profiler.out)
    r["model"] = sc.model
    if sc.kind == "predict":
        r["steps_per_s"] = r["rate_per_s"] * sc.batch * sc.seq_len
    else:
        r["steps_per_s"] = r["rate_per_s"]
    if r.get("server_cpu_s"):
        r["other_cpu_s"] = max(
            0.0, r["machine_busy_cpu_s"] - r["server_cpu_s"] - r["gen_cpu_psutil_s"]
        )
        # robust-ish to a shared machine: work done per CPU-second the server got
        r["steps_per_server_cpu_s"] = r["steps_per_s"] * r["window_s"] / r["server_cpu_s"]
    return r


def _batch_counters(url: str, model: str) -> tuple[float, float] | None:
    """(rows, onnxruntime calls) so far for ``model``, from the batch-size histogram."""
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"rnnserve_batch_size{suffix}{{") and f'model="{model}"' in line:
                found[suffix] = float(line.rsplit(" ", 1)[1])
    return (found.get("_sum", 0.0), found.get("_count", 0.0))  # no line yet: no call yet


class _Profiler:
    """py-spy (if installed) recording the server over one measurement window."""

    def __init__(self, pid: int, out: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.spy = spy if Path(spy).exists() else None
        self.pid, self.out = pid, out
        self.proc: subprocess.Popen | None = None

    def __call__(self, window_start: float, window_end: float) -> None:
        if self.spy is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        seconds = max(1, int(window_end - time.monotonic()))
        self.proc = subprocess.Popen(
            [
                self.spy,
                "record",
                "--pid",
                str(self.pid),
                "--duration",
                str(seconds),
                "--rate",
                "250",
                "--format",
                "raw",
                "--threads",
                "--nonblocking",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def summary(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        return summarise_profile(self.out) if self.out.exists() else None


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Share of samples per thread, per function (self) and per function (inclusive)."""
    from collections import Counter

    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    tidy = re.compile(r" \(/\S*?/(?:site-packages|python3\.\d+|main)/")
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[re.sub(r"^thread \(\d+\): ", "", frames[0]).replace("thread (", "(")] += n
        names = [re.sub(r":\d+\)$", ")", tidy.sub(" (", f)) for f in frames[1:]]
        if names:
            own[names[-1]] += n
        for name in set(names):
            incl[name] += n
    share = lambda c, n=top: [[k, round(100 * v / total, 1)] for k, v in c.most_common(n)]
    return {
        "samples": total,
        "threads": share(threads),
        "self": share(own),
        "inclusive": share(incl, 3 * top),
    }


def _pct(cpu_s: float | None, window: float) -> str:
    if cpu_s is None or not window:
        return "   -"
    return f"{100 * cpu_s / window:3.0f}%"


# -- targets and the table ---------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    server = res.get("server", {})
    on, off = server.get("on", {}), server.get("off", {})
    limit = res.get("inprocess", {}).get(BENCH, {})
    top = res["meta"]["sizes"][-1]

    def add(
        name: str, value: float | None, op: str, floor: float | None, unit: str, detail: str
    ) -> None:
        if value is None:
            return
        if floor is None:
            verdict = "INFO"
        elif op == ">=":
            verdict = "PASS" if value >= floor else "MISS"
        else:
            verdict = "PASS" if value <= floor else "MISS"
        out.append(
            {
                "target": name,
                "value": value,
                "op": op,
                "floor": floor,
                "unit": unit,
                "verdict": verdict,
                "detail": detail,
            }
        )

    for frames in ("binary", "json"):
        key = f"ws-{top}-{frames}"
        if key in on and key in off:
            a, b = on[key]["steps_per_s"], off[key]["steps_per_s"]
            add(
                f"{top} WS sessions ({frames}), batching on / off",
                a / b,
                ">=",
                2.5,
                "x",
                f"{a:,.0f} vs {b:,.0f} steps/s",
            )
    batch1 = limit.get("batches", {}).get("1", {}).get("steps_per_s")
    for frames, floor in (("json", 0.6), ("binary", 0.75)):
        key = f"ws-{top}-{frames}"
        if key in on and batch1:
            a = on[key]["steps_per_s"]
            add(
                f"{frames} frames, {top} sessions / in-process batch-1 loop",
                a / batch1,
                ">=",
                floor,
                "x",
                f"{a:,.0f} vs {batch1:,.0f} steps/s",
            )
    for frames in ("json", "binary"):
        key = f"ws-{top}-{frames}"
        if key in on:
            add(
                f"p99 round trip, {top} sessions ({frames}, batching on)",
                on[key]["p99_ms"],
                "<=",
                None,
                "ms",
                f"p50 {on[key]['p50_ms']:.2f} ms",
            )
    for frames in ("binary", "json"):
        key = f"ws-1-{frames}"
        if key in on and key in off:
            a, b = on[key]["p50_ms"], off[key]["p50_ms"]
            add(
                f"1 session p50 ({frames}): batching on - off",
                a - b,
                "<=",
                0.2,
                "ms",
                f"{a:.3f} vs {b:.3f} ms",
            )
    pred = next((k for k in on if k.startswith("predict-")), None)
    if pred and limit.get("predict"):
        a, b = on[pred]["steps_per_s"], limit["predict"]["steps_per_s"]
        add(
            f"{pred} (batching on) / in-process same batch",
            a / b,
            ">=",
            0.7,
            "x",
            f"{a:,.0f} vs {b:,.0f} steps/s",
        )
    mem = res.get("memory")
    if mem:
        projected = mem["rss_before_bytes"] + mem["bytes_per_session"] * 100_000
        label = "RSS with 100,000 idle 2x128 LSTM sessions"
        detail = f"{mem['bytes_per_session']:,.0f} B/session, {mem['sessions']:,} created"
        if mem["sessions"] != 100_000:
            label += " (projected)"
            value = projected
        else:
            value = mem["rss_after_bytes"]
        add(label, value / MB, "<=", 400, "MB", detail)
    if res.get("startup"):
        add(
            "ready after process spawn (median of runs)",
            res["startup"]["median_s"],
            "<=",
            2.0,
            "s",
            ", ".join(f"{t:.2f}" for t in res["startup"]["runs_s"]),
        )
    return out


def render(res: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = res["meta"]
    lines.append(
        f"rnnserve benchmarks  {meta['date']}  {meta['cpu']} x{meta['nproc']}  "
        f"RAM {meta['ram_gb']:.0f} GB  Python {meta['python']}  onnxruntime {meta['onnxruntime']}"
    )
    lines.append(
        f"window {meta['duration_s']:g} s after {meta['warmup_s']:g} s warm-up; "
        f"load average at start {meta['loadavg_start']}"
    )
    lines.append("")
    for name, card in res["cards"].items():
        lines.append(f"  {name:<11} {_describe_card(card)}")
    lines.append("")
    if res.get("inprocess"):
        lines.append("In-process onnxruntime (1 thread, tight loop, best of 3 windows) - the limit")
        lines.append(
            f"  {'model':<11} {'batch 1 steps/s':>16} {'(p50 us)':>9} {'batch 64 rows/s':>16} "
            f"{'batch 256 rows/s':>17} {'predict steps/s':>16} {'(ms/call)':>10}"
        )
        for name, r in res["inprocess"].items():
            b = r["batches"]
            p = r.get("predict", {})
            lines.append(
                f"  {name:<11} {b['1']['steps_per_s']:>16,.0f} {1000 * b['1']['p50_ms']:>9.0f} "
                f"{b['64']['rows_per_s']:>16,.0f} {b['256']['rows_per_s']:>17,.0f} "
                f"{p.get('steps_per_s', float('nan')):>16,.0f} {p.get('p50_ms', float('nan')):>10.1f}"
            )
        lines.append("")
    server = res.get("server")
    if server:
        lines.append(
            "Server (closed loop: each connection waits for its answer before sending the next)"
        )
        lines.append(
            f"  {'scenario':<26} {'model':<10} | {'batching off':^40} | {'batching on':^40} | {'on/off':>6}"
        )
        lines.append(
            f"  {'':<26} {'':<10} | {'steps/s':>9} {'p50 ms':>6} {'p99 ms':>6} {'rows':>5} {'cpu %':>11}"
            f" | {'steps/s':>9} {'p50 ms':>6} {'p99 ms':>6} {'rows':>5} {'cpu %':>11} | {'':>6}"
        )
        names = list(server.get("on", {}) or server.get("off", {}))
        for key in names:
            cells = []
            for config in ("off", "on"):
                r = server.get(config, {}).get(key)
                if r is None:
                    cells.append(f"{'-':>9} {'':>6} {'':>6} {'':>5} {'':>11}")
                    continue
                cpu = "/".join(
                    _pct(r.get(k), r["window_s"]).strip().rstrip("%")
                    for k in ("server_cpu_s", "gen_cpu_s", "other_cpu_s")
                )
                err = "!" if r["errors"] else ""
                rows = r.get("mean_batch_rows", float("nan"))
                cells.append(
                    f"{r['steps_per_s']:>9,.0f} {r['p50_ms']:>6.2f} {r['p99_ms']:>6.2f} {rows:>5.1f} {cpu:>11}{err}"
                )
            a = server.get("on", {}).get(key, {}).get("steps_per_s")
            b = server.get("off", {}).get(key, {}).get("steps_per_s")
            ratio = f"{a / b:6.2f}" if a and b else f"{'-':>6}"
            desc = res["scenarios"][key]["describe"]
            lines.append(
                f"  {desc:<26} {res['scenarios'][key]['model']:<10} | {cells[0]} | {cells[1]} | {ratio}"
            )
        lines.append(
            "  cpu %: server / load generators / everything else on the machine over the window,"
            f" % of one core (of {100 * meta['nproc']})"
        )
        lines.append(
            "  rows: sequences per onnxruntime call (server metrics); predict steps/s count"
            " sequences x steps; ! = errors"
        )
        lines.append("")
    mem = res.get("memory")
    if mem:
        lines.append(
            f"Idle sessions ({mem['model']}, {mem['state_bytes']} B state): {mem['sessions']:,} created in "
            f"{mem['create_s']:.1f} s ({mem['create_rate_per_s']:,.0f}/s, p50 {mem['create_p50_ms']:.2f} ms); "
            f"RSS {mem['rss_before_bytes'] / MB:.0f} MB -> {mem['rss_after_bytes'] / MB:.0f} MB, "
            f"{mem['bytes_per_session']:,.0f} B/session"
        )
    st = res.get("startup")
    if st:
        lines.append(
            f"Start-up (spawn -> /readyz 200, {Path(st['repo']).name}): median {st['median_s']:.2f} s "
            f"(runs: {', '.join(f'{t:.2f}' for t in st['runs_s'])})"
        )
    if mem or st:
        lines.append("")
    for config, measured in (server or {}).items():
        for key, r in measured.items():
            prof = r.get("profile")
            if not prof:
                continue
            lines.append(
                f"py-spy profile of the server, batching {config}, {key} ({prof['samples']} samples)"
            )
            lines.append(
                "  threads: " + ", ".join(f"{name} {pct}%" for name, pct in prof["threads"])
            )
            lines.append("  top self time:")
            lines.extend(f"    {pct:5.1f}%  {name}" for name, pct in prof["self"][:10])
            lines.append("")
    if res.get("payload"):
        lines.extend(render_payload(res["payload"]))
        lines.append("")
    if res.get("grpc"):
        lines.extend(render_grpc(res["grpc"], res.get("inprocess", {}).get(BENCH)))
        lines.append("")
    if res.get("redis_store"):
        lines.extend(render_redis(res["redis_store"]))
        lines.append("")
    if res.get("targets"):
        lines.append("Targets")
        for t in res["targets"]:
            floor = "" if t["floor"] is None else f"{t['op']} {t['floor']:g} {t['unit']}"
            lines.append(
                f"  {t['verdict']:<4}  {t['target']:<58} {t['value']:>9.3f} {t['unit']:<2} "
                f"{floor:<12} ({t['detail']})"
            )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------


def _meta(args: argparse.Namespace, sizes: tuple[int, ...]) -> dict[str, Any]:
    import onnxruntime
    import psutil

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit,
        "host": platform.node(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "ram_gb": psutil.virtual_memory().total / 1024**3,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "sizes": list(sizes),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "argv": sys.argv[1:],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short windows and 20,000 idle sessions")
    p.add_argument(
        "--smoke", action="store_true", help=argparse.SUPPRESS
    )  # the test's seconds-long run
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    p.add_argument("--duration", type=float, help="measurement window per scenario, s (default 6)")
    p.add_argument("--warmup", type=float, help="warm-up before each window, s (default 1.5)")
    p.add_argument(
        "--sessions", type=int, help="idle sessions for the memory test (default 100000)"
    )
    p.add_argument("--only", default="", help="regex: run only the server scenarios it matches")
    p.add_argument(
        "--skip",
        default="",
        help="comma list of parts to skip: inprocess,server,memory,startup,payload,grpc,multiplex,redis",
    )
    p.add_argument("--procs", type=int, default=None, help="load generator processes per scenario")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy raw profiles of the server here (scenarios from --profile-re)",
    )
    p.add_argument("--profile-re", default=r"on:ws-256-binary")
    p.add_argument("--quiet", action="store_true", help="no per-scenario progress on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration = args.duration or 0.4
        args.warmup = args.warmup or 0.2
        args.sessions = args.sessions or 300
    elif args.quick:
        args.duration = args.duration or 2.0
        args.warmup = args.warmup or 0.5
        args.sessions = args.sessions or 20_000
    args.duration = args.duration or 6.0
    args.warmup = args.warmup or 1.5
    args.sessions = args.sessions or 100_000
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sizes = (1, 4) if args.smoke else (1, 64, 256)
    predict = (8, 10) if args.smoke else (64, 100)
    rest_conns = 4 if args.smoke else 64
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    started = time.monotonic()
    res: dict[str, Any] = {"meta": _meta(args, sizes)}
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as tmp:
        root = Path(tmp)
        log_dir = root / "logs"
        log_dir.mkdir()
        say("building models ...")
        repo, mem_repo, cards = build_models(root, small=args.smoke)
        res["cards"] = {
            k: {
                f: v.get(f)
                for f in (
                    "cell",
                    "num_layers",
                    "hidden_size",
                    "input_size",
                    "output_size",
                    "source",
                )
                if f in v
            }
            for k, v in cards.items()
        }
        chosen = [s for s in scenarios(sizes, predict, rest_conns) if re.search(args.only, s.name)]
        res["scenarios"] = {
            s.name: {
                "describe": s.describe(),
                "model": s.model,
                "kind": s.kind,
                "conns": s.conns,
                "frames": s.frames,
            }
            for s in chosen
        }
        if "inprocess" not in skip:
            say("in-process onnxruntime ...")
            res["inprocess"] = run_inprocess(
                repo, [DEMO, BENCH], max(args.duration / 2, 0.3), min(args.warmup, 1.0), predict
            )
        if "server" not in skip and chosen:
            say("server scenarios ...")
            res["server"] = run_server_scenarios(
                repo,
                cards,
                chosen,
                duration=args.duration,
                warmup=args.warmup,
                log_dir=log_dir,
                procs=args.procs,
                profile_dir=args.profile,
                profile_re=args.profile_re,
                verbose=not args.quiet,
            )
        if "memory" not in skip:
            say(f"{args.sessions:,} idle sessions ...")
            res["memory"] = idle_sessions(mem_repo, MEM, args.sessions, log_dir=log_dir)
        if "startup" not in skip:
            say("start-up time ...")
            startup_repo = (
                ROOT / "models"
                if (ROOT / "models").is_dir() and any((ROOT / "models").glob("*/*/card.json"))
                else repo
            )
            res["startup"] = startup(startup_repo, 1 if args.smoke else 3, log_dir=log_dir)
        if "payload" not in skip:
            say("top-k payload over WebSocket ...")
            res["payload"] = top_k_payload(root, log_dir=log_dir, steps=20 if args.smoke else 200)
        if "grpc" not in skip:
            say("gRPC streams vs WebSocket ...")
            res["grpc"] = grpc_streams(
                repo, cards[BENCH], BENCH, duration=args.duration, warmup=args.warmup,
                log_dir=log_dir, sequences=sizes[-1],
            )
        if "multiplex" not in skip:
            say("multiplexed steps and the naive server ...")
            res["multiplex"] = multiplex.run(
                repo, cards, duration=args.duration, warmup=args.warmup, log_dir=log_dir,
                inprocess=res.get("inprocess"), verbose=not args.quiet, scale=16 if args.smoke else 1,
                rounds=1 if args.smoke else None,
            )  # fmt: skip
        if "redis" not in skip and shutil.which("redis-server"):
            say("Redis store vs memory store ...")
            res["redis_store"] = redis_vs_memory(
                mem_repo,
                MEM,
                cards[MEM],
                duration=args.duration,
                warmup=args.warmup,
                log_dir=log_dir,
                streams=sizes[-1],
                rounds=1 if args.smoke else 5,
            )
    res["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["meta"]["total_s"] = time.monotonic() - started
    res["targets"] = targets(res) + (multiplex.targets(res["multiplex"]) if "multiplex" in res else [])
    table = render(res) + ("\n\n" + multiplex.render(res["multiplex"]) if "multiplex" in res else "")
    res["table"] = table.splitlines()
    print(table)
    print(
        f"\n(total {res['meta']['total_s']:.0f} s; load average at end {res['meta']['loadavg_end']})"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
