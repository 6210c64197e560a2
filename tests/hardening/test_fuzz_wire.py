"""A fuzz pass over what schemathesis cannot see (issue 9, "beyond the list"), against one
real ``rnn-serve`` process:

- WebSocket messages: JSON text (valid, junk, truncated, NaN literals, deep nesting) and
  binary frames (valid, truncated, header fields that lie, random bytes, oversized);
- v2 binary bodies whose ``Inference-Header-Content-Length`` and ``binary_data_size`` lie.

For every input: no 5xx, no ``internal_error``, no close code 1011, no stack trace and no
error line in the server's log; every error is the documented shape; and a stream's
session advanced by exactly the steps of the messages that were answered with outputs.

Bounded: ``RNNSERVE_WIRE_FUZZ_EXAMPLES`` (default 120) per target, derandomized
(``RNNSERVE_WIRE_FUZZ_RANDOM=1`` explores new inputs).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import httpx
import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.frames import (
    FLAG_TOP_K,
    HEADER,
    decode_response,
    decode_top_k_response,
    encode_request,
)
from tests.conftest import ServerProcess, start_server

EXAMPLES = int(os.environ.get("RNNSERVE_WIRE_FUZZ_EXAMPLES", "120"))
WS_LIMIT = 4096
FEATURES = 3
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("RNNSERVE_WIRE_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLOSE_ALLOWED = {1000, 1003, 1008, 1009, 4404}


@pytest.fixture(scope="module")
def live(model_repo, tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(
        model_repo,
        tmp_path_factory.mktemp("wire-fuzz"),
        {"RNNSERVE_WS_MAX_MESSAGE_BYTES": str(WS_LIMIT), "RNNSERVE_MAX_BODY_BYTES": "65536",
         "RNNSERVE_LOG_LEVEL": "info"},
    )
    yield server
    server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            assert entry["level"] not in ("error", "critical"), line
            assert "exception" not in entry, line


# -- WebSocket messages --------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
good_steps = st.lists(st.lists(st.floats(-3, 3, width=32), min_size=FEATURES, max_size=FEATURES),
                      min_size=1, max_size=4)


@st.composite
def text_messages(draw) -> tuple[str, int]:
    """(message, steps it applies if answered with outputs)."""
    kind = draw(st.sampled_from(["valid", "junk", "truncated", "literal", "nested", "oversized", "fields"]))
    steps = draw(good_steps)
    valid = json.dumps({"inputs": steps})
    if kind == "valid":
        return valid, len(steps)
    if kind == "junk":
        return json.dumps(draw(json_values)), 0
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid) - 1))], 0
    if kind == "literal":
        return valid.replace(str(steps[0][0]), draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"])), 1), 0
    if kind == "nested":
        depth = draw(st.integers(100, 5000))
        return '{"inputs": ' + "[" * depth + "]" * depth + "}", 0
    if kind == "oversized":
        return json.dumps({"inputs": [[0.5] * FEATURES] * (WS_LIMIT // 8)}) + " " * draw(st.integers(0, 9000)), 0
    extra = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3))
    return json.dumps({"inputs": draw(json_values), **extra, "seq": draw(json_values)}), 0


@st.composite
def binary_messages(draw) -> tuple[bytes, int]:
    kind = draw(st.sampled_from(["valid", "truncated", "lying", "random", "oversized", "flags"]))
    steps = np.asarray(draw(good_steps), np.float32)
    frame = encode_request(steps)
    if kind == "valid":
        return frame, len(steps)
    if kind == "truncated":
        return frame[: draw(st.integers(0, len(frame) - 1))], 0
    if kind == "lying":
        n = draw(st.integers(0, 2**32 - 1))
        f = draw(st.integers(0, 2**32 - 1))
        seq = draw(st.integers(0, 2**64 - 1))
        head = HEADER.pack(b"RS", 1, draw(st.integers(0, 255)), n, f, seq)
        return head + frame[HEADER.size :], 0
    if kind == "random":
        return draw(st.binary(max_size=200)), 0
    if kind == "oversized":
        return frame + b"\0" * draw(st.integers(WS_LIMIT, WS_LIMIT + 9000)), 0
    flags = draw(st.integers(0, 255))
    extra = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
    return HEADER.pack(b"RS", 1, flags, len(steps), FEATURES, 0) + extra + frame[HEADER.size :], 0


def _session(live: ServerProcess) -> str:
    r = httpx.post(f"{live.url}/v1/models/tiny-lstm/sessions", timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def _check_stream(live: ServerProcess, messages: list[tuple[str | bytes, int]]) -> None:
    sid = _session(live)
    applied = 0
    ws = connect(f"{live.ws_url}/v1/sessions/{sid}/stream", open_timeout=10, close_timeout=5,
                 max_size=2**22)
    try:
        ws.recv(timeout=10)  # the session info
        for message, steps in messages:
            try:
                ws.send(message)
                answer = ws.recv(timeout=10)
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd is not None else None
                assert code in CLOSE_ALLOWED, (code, message[:80])
                ws = connect(f"{live.ws_url}/v1/sessions/{sid}/stream", open_timeout=10,
                             close_timeout=5, max_size=2**22)
                ws.recv(timeout=10)
                continue
            if isinstance(answer, bytes):
                if HEADER.unpack_from(answer)[2] & FLAG_TOP_K:  # a valid top-k request
                    outputs, _, step_count, _ = decode_top_k_response(answer)
                else:
                    outputs, step_count, _ = decode_response(answer)
                applied += outputs.shape[0]
                assert steps in (0, outputs.shape[0]) and step_count == applied
                continue
            body = json.loads(answer)
            if "error" in body:
                error = body["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str), body
                assert error["code"] != "internal_error", (body, message[:120])
                assert steps == 0, (body, message[:120])
                continue
            applied += len(body["outputs"])
            assert steps in (0, len(body["outputs"])) and body["step_count"] == applied, body
    finally:
        ws.close()
    # Refused messages left the session exactly as it was.
    info = httpx.get(f"{live.url}/v1/sessions/{sid}", timeout=10).json()
    assert info["step_count"] == applied, info


def test_websocket_messages(live):
    @SETTINGS
    @hypothesis.given(st.lists(text_messages() | binary_messages(), min_size=1, max_size=5))
    def run(messages) -> None:
        _check_stream(live, messages)

    run()


# -- v2 binary bodies ----------------------------------------------------------------------------


@st.composite
def v2_bodies(draw) -> tuple[bytes, dict[str, str]]:
    steps = draw(st.integers(1, 3))
    blob = np.zeros((1, steps, FEATURES), np.float32).tobytes()
    declared = draw(st.one_of(st.just(len(blob)), st.integers(-5, 2**63), st.none()))
    inputs = [{"name": draw(st.sampled_from(["x", "lengths", "y", ""])),
               "shape": draw(st.sampled_from([[1, steps, FEATURES], [1, steps], [2**31, 2**31, 3], [0, 1, 3]])),
               "datatype": draw(st.sampled_from(["FP32", "INT32", "FP16", "BYTES", "BOOL", "??"])),
               "parameters": {} if declared is None else {"binary_data_size": declared}}]
    parameters = draw(st.dictionaries(
        st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "seq", "binary_data_output"]),
        json_values, max_size=3))
    head = json.dumps({"inputs": inputs, "parameters": parameters}).encode()
    payload = blob[: draw(st.integers(0, len(blob)))] + draw(st.binary(max_size=16))
    header_length = draw(st.one_of(
        st.just(str(len(head))), st.integers(-10, 2**64).map(str),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6), st.none()))
    headers = {"content-type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    body = head + payload
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return body, headers


def test_v2_binary_bodies_that_lie(live):
    @SETTINGS
    @hypothesis.given(v2_bodies())
    def run(case) -> None:
        body, headers = case
        try:
            r = httpx.post(f"{live.url}/v2/models/tiny-lstm/infer", content=body, headers=headers, timeout=10)
        except httpx.LocalProtocolError:
            hypothesis.reject()  # a header value httpx itself refuses to send
        assert r.status_code < 500, (r.status_code, r.text, headers, body[:200])
        if r.status_code >= 400:
            assert r.headers["content-type"] == "application/json", (r.status_code, r.text, headers)
            assert isinstance(r.json()["error"], str), r.text

    run()
