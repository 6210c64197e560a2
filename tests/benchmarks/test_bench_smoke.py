"""The benchmark suite's machinery, end to end, for a few seconds: models built, the
in-process limit, real servers driven by load-generator processes (WebSocket JSON and
binary, REST steps, predict), idle-session memory, start-up, targets and the table.

No timing assertions: only that every part ran, measured something and saw no errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import loadgen, run


def test_client_frames_are_masked_rfc6455() -> None:
    payload = b'{"inputs": [[0.5]]}'
    frame = loadgen.ws_client_frame(payload, 1)
    assert frame[0] == 0x81 and frame[1] == 0x80 | len(payload)
    mask, body = frame[2:6], frame[6:]
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload
    long = loadgen.ws_client_frame(b"x" * 300, 2)
    assert long[0] == 0x82 and long[1] == 0x80 | 126 and int.from_bytes(long[2:4], "big") == 300


@pytest.mark.timeout(300)
def test_suite_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    res = run.main(
        [
            "--smoke",
            "--quiet",
            "--only", r"^(ws-4-(json|binary)|rest-4|predict-8x10)$",
            "--out", str(out),
        ]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["targets"] and saved["table"]

    assert set(res["inprocess"]) == {run.DEMO, run.BENCH}
    for limit in res["inprocess"].values():
        for batch in ("1", "64", "256"):
            assert limit["batches"][batch]["calls"] > 0
        assert limit["predict"]["calls"] > 0

    names = {"ws-4-json", "ws-4-binary", "rest-4", "predict-8x10"}
    for config in ("off", "on"):
        measured = res["server"][config]
        assert set(measured) == names
        for name, r in measured.items():
            assert r["errors"] == 0, (config, name, r["error_samples"])
            assert r["count"] > 0 and r["steps_per_s"] > 0, (config, name)
            assert math.isfinite(r["p50_ms"]) and r["p99_ms"] >= r["p50_ms"]
            assert r["server_cpu_s"] is not None and r["gen_cpu_s"] >= 0

    mem = res["memory"]
    assert mem["errors"] == 0 and mem["sessions"] == 300
    assert mem["rss_after_bytes"] > 0 and mem["state_bytes"] > 0
    assert res["startup"]["median_s"] > 0
    payload = res["payload"]["modes"]  # answers checked for shape inside the measurement
    assert payload["binary-top_k"]["bytes_out_per_step"] == 20 + 20 * 8
    assert payload["binary-full"]["bytes_out_per_step"] == 20 + 4 * res["payload"]["classes"]
    assert payload["json-top_k"]["bytes_out_per_step"] < payload["json-full"]["bytes_out_per_step"]
    mux = res["multiplex"]  # multiplexed scenarios and the naive server, scaled down
    for group in ("mux", "ours", "naive"):
        for name, r in mux[group].items():
            assert r["errors"] == 0 and r["steps_per_s"] > 0, (group, name, r["error_samples"])
    redis_store = res["redis_store"]  # the suite needs redis-server, as the tests do
    for store in ("memory", "redis"):
        for load in ("ws_4", "ws_1"):
            assert redis_store[store][load]["errors"] == 0, redis_store[store][load]
            assert redis_store[store][load]["rate_per_s"] > 0
    # at most one commit script per step (the commits of one pipeline share one), plus
    # the session opens and bucket counts; no read
    assert 0 < redis_store["redis"]["scripts_per_step"] < 3.0
    assert redis_store["redis"]["gets_per_step"] < 0.1

    assert set(res["grpc"]) == {
        "ws-4-binary", "grpc-4-over-1", "grpc-4-over-4", "echo-4-over-1", "echo-4-over-4"
    }
    for name, r in res["grpc"].items():
        assert r["errors"] == 0 and r["count"] > 0, (name, r["error_samples"])

    verdicts = {t["verdict"] for t in res["targets"]}
    assert verdicts <= {"PASS", "MISS", "INFO"}
    table = capsys.readouterr().out
    assert "In-process onnxruntime" in table and "Targets" in table
    assert "WS binary, 4 sessions" in table
    assert "gRPC streams vs WebSocket" in table
