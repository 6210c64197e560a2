"""Schemathesis against the app's own OpenAPI document, in process.

Every HTTP operation of the document (WebSocket routes are not in it) gets
``RNNSERVE_FUZZ_EXAMPLES`` cases (25 by default; derandomized, so CI is reproducible),
a mix of schema-valid and schema-violating requests, with path parameters either generated
or pinned to a real model / version / live session so the fuzzing reaches the handlers.
Every answer must be below 500 and every 4xx must carry the documented error shape:
``{"error": {"code": str, "message": str}}`` on v1 and the rest, ``{"error": str}`` on v2.

A larger run: ``RNNSERVE_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/scale/test_fuzz.py -s``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from service.app import create_app
from service.config import Settings

EXAMPLES = int(os.environ.get("RNNSERVE_FUZZ_EXAMPLES", "25"))
PINNED_MODELS = ("tiny-lstm", "tiny-gru", "tiny-rnn")
LIVE = "live-session-placeholder"


def _assert_error_shape(path: str, status: int, text: str, curl: str) -> None:
    try:
        body = json.loads(text)
    except ValueError:
        pytest.fail(f"{status} answer is not JSON: {text[:200]!r}\n{curl}")
    if path.startswith("/v2"):
        if path.endswith("/ready") and "ready" in body:  # the protocol's "not ready" answer
            return
        ok = isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    else:
        error = body.get("error") if isinstance(body, dict) else None
        ok = (
            isinstance(error, dict)
            and isinstance(error.get("code"), str)
            and isinstance(error.get("message"), str)
            and error["code"]
        )
    assert ok, f"{status} body without the documented error shape: {text[:300]}\n{curl}"


def _fuzz(operation, strategy, client, counts, statuses) -> None:
    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=strategy)
    def run(case) -> None:
        if case.path_parameters and case.path_parameters.get("session_id") == LIVE:
            # a fresh live session per case, so a fuzzed DELETE or reset spoils nothing
            model = PINNED_MODELS[counts[operation.label] % 2]  # LSTM or GRU (generates)
            r = client.post(f"/v1/models/{model}/sessions")
            case.path_parameters["session_id"] = r.json()["session_id"]
        response = case.call()
        counts[operation.label] += 1
        statuses[response.status_code] += 1
        curl = case.as_curl_command()
        case.validate_response(response, checks=[not_a_server_error])
        if 400 <= response.status_code < 500:
            _assert_error_shape(operation.path, response.status_code, response.text, curl)

    run()


@pytest.fixture
def fuzz_app(model_repo):
    settings = Settings(
        model_repo=model_repo,
        max_steps_per_request=64,
        max_total_steps_per_predict=512,
        max_generate_steps=64,
        max_sessions=2000,
    )
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    try:
        yield app, schema
    finally:
        asgi.shutdown_lifespans()


def test_openapi_fuzz_no_server_errors_and_documented_error_shapes(fuzz_app):
    app, schema = fuzz_app
    client = asgi.get_client(app)
    pinned_values = {"name": None, "model_name": None, "version": "1", "session_id": LIVE}

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    counts: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    started = time.monotonic()

    for operation in operations:
        names = re.findall(r"\{(\w+)\}", operation.path)
        variants = [{}]  # everything generated
        if names:
            for model in PINNED_MODELS:
                variants.append(
                    {
                        n: (model if pinned_values.get(n, "x") is None else pinned_values[n])
                        for n in names
                    }
                )
        strategy = st.one_of(
            operation.as_strategy(mode, path_parameters=fixed or None)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            for fixed in variants
        )

        _fuzz(operation, strategy, client, counts, statuses)

    total = sum(counts.values())
    print(
        f"\nfuzz: {total} cases over {len(operations)} operations in "
        f"{time.monotonic() - started:.1f} s; statuses {dict(sorted(statuses.items()))}"
    )
    assert all(counts[op.label] > 0 for op in operations)
    client.close()
