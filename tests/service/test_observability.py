"""Prometheus metrics that move with traffic, JSON request logs with request ids, and an
OpenAPI document that describes every route with its bodies and errors."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_parse_and_move_with_requests(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        before = _samples((await client.get("/metrics")).text)
        sid = (await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"]
        for _ in range(3):
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[1, 2, 3], [0, 0, 1]]})
            assert r.status_code == 200
        await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[1, 2]]})  # 422
        await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [[[1, 2, 3]]] * 5})
        after = _samples((await client.get("/metrics")).text)

    route = "/v1/sessions/{session_id}/steps"
    # Session routes are labelled with the session's model, errors included.
    assert _value(after, "rnnserve_requests_total", route=route, model="tiny-lstm", status="200") - _value(
        before, "rnnserve_requests_total", route=route, model="tiny-lstm", status="200"
    ) == 3
    assert _value(after, "rnnserve_requests_total", route=route, model="tiny-lstm", status="422") == 1
    assert _value(after, "rnnserve_session_steps_total", model="tiny-lstm") == 6
    assert _value(after, "rnnserve_sessions_created_total", model="tiny-lstm") == 1
    assert _value(after, "rnnserve_sessions_active") == 1
    predict = "/v1/models/{name}/predict"
    assert _value(after, "rnnserve_request_latency_seconds_count", route=predict, model="tiny-lstm") == 1
    # Three step calls and one predict of five sequences went through the batcher.
    assert _value(after, "rnnserve_batch_size_count", model="tiny-lstm") >= 4
    assert _value(after, "rnnserve_batch_size_sum", model="tiny-lstm") == 8
    # Queue waits count the sequences that queued: the predict's five always do; a lone
    # session's step run at once (the runtime idle) does not queue.
    assert 5 <= _value(after, "rnnserve_batch_queue_wait_seconds_count", model="tiny-lstm") <= 8
    assert _value(after, "rnnserve_models_ready") == 5


async def test_metrics_count_model_load_failures(make_client, repo_copy):
    (repo_copy / "tiny-gru" / "1" / "model.onnx").write_bytes(b"not onnx")
    async with make_client(model_repo=repo_copy) as client:
        samples = _samples((await client.get("/metrics")).text)
    assert _value(samples, "rnnserve_model_load_failures_total", model="tiny-gru") == 1


def test_request_id_and_json_log_lines_without_input_data(server_factory, model_repo):
    server = server_factory(model_repo, RNNSERVE_LOG_LEVEL="info")
    with httpx.Client(base_url=server.url) as client:
        sid = client.post("/v1/models/tiny-lstm/sessions").json()["session_id"]
        r = client.post(
            f"/v1/sessions/{sid}/steps",
            json={"inputs": [[0.918273645, 2, 3]]},
            headers={"X-Request-ID": "req-abc-123"},
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-123"
        generated = client.get("/healthz").headers["x-request-id"]
        assert len(generated) >= 16
        assert client.get("/healthz").headers["x-request-id"] != generated
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = server.log.read_text()
        if "req-abc-123" in text:
            break
        time.sleep(0.05)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    (entry,) = [e for e in lines if e.get("request_id") == "req-abc-123"]
    assert entry["route"] == "/v1/sessions/{session_id}/steps"
    assert entry["session"] == sid and entry["status"] == 200 and entry["latency_ms"] > 0
    assert entry["level"] == "info" and "ts" in entry
    assert "0.918273645" not in text and "918273" not in text


async def test_openapi_documents_every_route(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        spec = (await client.get("/openapi.json")).json()
        assert (await client.get("/docs")).status_code == 200
    paths = spec["paths"]
    for route in [
        "/v1/models",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/versions/{version}/predict",
        "/v1/models/{name}/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/steps",
        "/v1/sessions/{session_id}/state",
        "/v1/sessions/{session_id}/generate",
        "/v1/sessions/{session_id}/reset",
        "/v1/repository/reload",
        "/healthz",
        "/readyz",
        "/metrics",
    ]:
        assert route in paths, route
    for path, operations in paths.items():
        if not path.startswith("/v1/"):
            continue
        for method, op in operations.items():
            responses = op["responses"]
            success = [code for code in responses if code.startswith("2")]
            assert success, (method, path)
            errors = [code for code in responses if code[0] in "45"]
            assert errors, f"{method} {path} documents no error responses"
            for code in errors:
                schema = responses[code]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith("/ErrorResponse"), (method, path, code)
            if method == "post" and "requestBody" in op:
                ref = op["requestBody"]["content"]["application/json"]["schema"]
                assert "$ref" in ref or "anyOf" in ref
    schemas = spec["components"]["schemas"]
    for name in ("PredictRequest", "StepRequest", "GenerateRequest"):
        assert schemas[name].get("examples"), f"{name} has no example"


async def test_fastapi_opentelemetry_bridge_is_off_unless_asked_for(
    make_client, model_repo, monkeypatch
):
    """FastAPI's OpenTelemetry bridge looks for a configured provider on every request; the
    server leaves it off (its metrics and logs are its own) unless RNNSERVE_OTEL_TELEMETRY."""
    from opentelemetry import trace

    lookups = 0
    real = trace.get_tracer_provider

    def counted():
        nonlocal lookups
        lookups += 1
        return real()

    monkeypatch.setattr(trace, "get_tracer_provider", counted)
    for enabled, expected in ((False, 0), (True, 3)):
        lookups = 0
        async with make_client(model_repo=model_repo, otel_telemetry=enabled) as client:
            lookups = 0  # (start-up may look once)
            sid = (await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"]
            for _ in range(2):
                r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[1, 2, 3]]})
                assert r.status_code == 200
        assert (lookups >= expected) if expected else (lookups == 0), (enabled, lookups)
