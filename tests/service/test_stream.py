"""WebSocket streaming against one real ``rnn-serve`` process (shared by this module).

Results are compared with the independent onnxruntime reference and with REST.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.frames import HEADER, decode_response, encode_request
from tests.conftest import ServerProcess, start_server

TOL = 1e-5


@pytest.fixture(scope="module")
def live(model_repo, tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(model_repo, tmp_path_factory.mktemp("ws-server"))
    yield server
    server.stop()


def _open(live: ServerProcess, path: str):
    ws = connect(live.ws_url + path, open_timeout=10, close_timeout=5)
    info = json.loads(ws.recv(timeout=10))
    return ws, info


def _send_json(ws, message) -> dict:
    ws.send(json.dumps(message) if not isinstance(message, str) else message)
    return json.loads(ws.recv(timeout=10))


def _send_binary(ws, x: np.ndarray, seq: int | None = None):
    ws.send(encode_request(x, seq))
    answer = ws.recv(timeout=10)
    assert isinstance(answer, bytes), answer
    return decode_response(answer)


def _closed_code(ws) -> int:
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(5):
            ws.recv(timeout=10)
    return info.value.rcvd.code if info.value.rcvd is not None else None


def _exported(live: ServerProcess, sid: str) -> dict:
    r = httpx.get(f"{live.url}/v1/sessions/{sid}/state", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _assert_state(ref, exported: dict, finals: dict) -> None:
    for s in ref.card["states"]:
        expected = np.take(finals[s["input"]], 0, axis=s["shape"].index(None))
        np.testing.assert_allclose(np.asarray(exported["state"][s["input"]]), expected, atol=TOL)


def test_json_stream_equals_reference_and_rest(live, reference):
    ref = reference("tiny-lstm")
    x = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    ws, info = _open(live, "/v1/models/tiny-lstm/stream")
    with ws:
        assert info["model"] == "tiny-lstm" and info["version"] == 1 and info["step_count"] == 0
        sid = info["session_id"]
        outs = []
        # several messages in flight at once: answered in order
        bounds = [0, 1, 8, 9, 15, 20]
        for a, b in itertools.pairwise(bounds):
            ws.send(json.dumps({"inputs": x[a:b].tolist()}))
        for a, b in itertools.pairwise(bounds):
            answer = json.loads(ws.recv(timeout=10))
            assert answer["step_count"] == b
            outs.extend(answer["outputs"])
    y_ref, finals = ref.run(x)
    np.testing.assert_allclose(np.asarray(outs), y_ref, atol=TOL)
    exported = _exported(live, sid)
    assert exported["step_count"] == 20
    _assert_state(ref, exported, finals)
    rest = httpx.post(
        f"{live.url}/v1/models/tiny-lstm/predict", json={"inputs": [x.tolist()]}, timeout=10
    )
    np.testing.assert_allclose(np.asarray(outs), np.asarray(rest.json()["outputs"][0]), atol=TOL)


def test_binary_frames_equal_json(live, reference):
    ref = reference("nolengths-lstm")
    x = np.random.default_rng(2).normal(size=(13, 3)).astype(np.float32)
    bounds = [0, 1, 8, 13]
    ws_json, info_json = _open(live, "/v1/models/nolengths-lstm/stream")
    ws_bin, info_bin = _open(live, "/v1/models/nolengths-lstm/stream")
    assert info_json["session_id"] != info_bin["session_id"]
    with ws_json, ws_bin:
        json_outs, bin_outs = [], []
        for a, b in itertools.pairwise(bounds):
            answer = _send_json(ws_json, {"inputs": x[a:b].tolist(), "seq": b})
            y, count, replayed = _send_binary(ws_bin, x[a:b], seq=b)
            assert answer["step_count"] == count == b and not replayed
            assert y.dtype == np.float32 and y.shape == (b - a, 2)
            json_outs.extend(answer["outputs"])
            bin_outs.append(y)
        # a binary retry of the last frame replays it
        y, count, replayed = _send_binary(ws_bin, x[8:13], seq=13)
        assert replayed and count == 13
        np.testing.assert_array_equal(y, bin_outs[-1])
        # and a frame without the seq flag is simply applied
        y_more, count, replayed = _send_binary(ws_bin, x[:2])
        assert count == 15 and not replayed
    np.testing.assert_array_equal(np.asarray(json_outs, np.float32), np.concatenate(bin_outs))
    y_ref, _ = ref.run(x)
    np.testing.assert_allclose(np.concatenate(bin_outs), y_ref, atol=TOL)
    y_ref_more, finals = ref.run(np.concatenate([x, x[:2]]))
    np.testing.assert_allclose(y_more, y_ref_more[13:], atol=TOL)
    _assert_state(ref, _exported(live, info_bin["session_id"]), finals)


def test_bad_messages_get_an_error_frame_and_leave_the_state(live, reference):
    ref = reference("tiny-lstm")
    rng = np.random.default_rng(3)
    good = []
    bad_messages = [
        ("not json", "invalid_input"),
        ('{"inputs": [[NaN, 1, 2]]}', "invalid_input"),
        ({"inputs": [[1, 2]]}, "invalid_input"),
        ({"inputs": [[1, 2, 3], [1, 2]]}, "invalid_input"),
        ({"inputs": [[1, "2", 3]]}, "invalid_input"),
        ({"inputs": []}, "invalid_input"),
        ({"inputs": [[1, 2, 3]], "extra": 1}, "invalid_input"),
        ({"steps": [[1, 2, 3]]}, "invalid_input"),
        ([1, 2, 3], "invalid_input"),
        ({"inputs": [[1, 2, 3]], "seq": 0}, "invalid_input"),
        ({"inputs": [[1, 2, 3]], "seq": True}, "invalid_input"),
        ({"inputs": [[1, 2, 3]], "seq": 999}, "seq_mismatch"),
    ]
    ws, info = _open(live, "/v1/models/tiny-lstm/stream")
    sid, count, outs = info["session_id"], 0, []
    with ws:
        for message, code in bad_messages:
            before = _exported(live, sid)
            answer = _send_json(ws, message)
            assert set(answer) == {"error"}, answer
            assert answer["error"]["code"] == code and answer["error"]["message"]
            after = _exported(live, sid)
            assert after["state"] == before["state"] and after["step_count"] == count
            x = rng.normal(size=(int(rng.integers(1, 5)), 3)).astype(np.float32)
            answer = _send_json(ws, {"inputs": x.tolist()})
            count += len(x)
            assert answer["step_count"] == count
            good.append(x)
            outs.extend(answer["outputs"])
        # well-formed binary frames with bad content are input errors too: stream stays open
        for frame in [np.zeros((2, 2), np.float32), np.array([[np.nan, 0, 0]], np.float32)]:
            ws.send(encode_request(frame))
            answer = json.loads(ws.recv(timeout=10))
            assert answer["error"]["code"] == "invalid_input"
        x = rng.normal(size=(3, 3)).astype(np.float32)
        y, c, _ = _send_binary(ws, x)
        assert c == count + 3
        good.append(x)
        outs.extend(y.tolist())
    y_ref, finals = ref.run(np.concatenate(good))
    np.testing.assert_allclose(np.asarray(outs), y_ref, atol=TOL)
    _assert_state(ref, _exported(live, sid), finals)


@pytest.mark.parametrize(
    "frame",
    [
        b"RS",  # shorter than the header
        b"XX" + bytes(HEADER.size),  # bad magic
        HEADER.pack(b"RS", 9, 0, 1, 3, 0) + bytes(12),  # bad version
        HEADER.pack(b"RS", 1, 0, 2, 3, 0) + bytes(12),  # payload shorter than the header says
        HEADER.pack(b"RS", 1, 0, 1, 3, 0) + bytes(16),  # payload longer
        HEADER.pack(b"RS", 1, 0xF8, 1, 3, 0) + bytes(12),  # undefined flag bits
    ],
)
def test_malformed_binary_frame_closes_1003_and_keeps_the_state(live, reference, frame):
    ref = reference("tiny-lstm")
    x = np.random.default_rng(4).normal(size=(6, 3)).astype(np.float32)
    ws, info = _open(live, "/v1/models/tiny-lstm/stream")
    sid = info["session_id"]
    with ws:
        first = _send_json(ws, {"inputs": x[:4].tolist()})
        ws.send(frame)
        error = json.loads(ws.recv(timeout=10))
        assert error["error"]["code"] == "bad_frame"
        assert _closed_code(ws) == 1003
    assert _exported(live, sid)["step_count"] == 4
    ws, info = _open(live, f"/v1/sessions/{sid}/stream")
    with ws:
        assert info["session_id"] == sid and info["step_count"] == 4
        rest = _send_json(ws, {"inputs": x[4:].tolist()})
    y_ref, _ = ref.run(x)
    np.testing.assert_allclose(np.asarray(first["outputs"] + rest["outputs"]), y_ref, atol=TOL)


def test_resume_a_rest_session_and_after_disconnect(live, reference):
    ref = reference("tiny-gru")
    vocab = list("BTPSXVE")
    text = "BTBTSSXXTVVETE"
    x = np.eye(7, dtype=np.float32)[[vocab.index(c) for c in text]]
    r = httpx.post(f"{live.url}/v1/models/tiny-gru/sessions", timeout=10)
    sid = r.json()["session_id"]
    r = httpx.post(
        f"{live.url}/v1/sessions/{sid}/steps", json={"inputs": list(text[:3])}, timeout=10
    )
    outs = r.json()["outputs"]
    ws, info = _open(live, f"/v1/sessions/{sid}/stream")
    with ws:
        assert info["session_id"] == sid and info["step_count"] == 3 and info["model"] == "tiny-gru"
        answer = _send_json(ws, {"inputs": list(text[3:8])})
        assert answer["step_count"] == 8
        assert answer["symbols"] == [vocab[i] for i in np.argmax(answer["outputs"], axis=-1)]
        outs += answer["outputs"]
    # disconnected: the session lives on; resume and continue
    ws, info = _open(live, f"/v1/sessions/{sid}/stream")
    with ws:
        assert info["step_count"] == 8
        answer = _send_json(ws, {"inputs": x[8:].tolist(), "seq": len(text)})
        outs += answer["outputs"]
        # a retried last message after a reconnect is a replay, not a second application
    ws, info = _open(live, f"/v1/sessions/{sid}/stream")
    with ws:
        retry = _send_json(ws, {"inputs": x[8:].tolist(), "seq": len(text)})
        assert retry["replayed"] is True and retry["step_count"] == len(text)
        assert retry["outputs"] == answer["outputs"]
    y_ref, finals = ref.run(x)
    np.testing.assert_allclose(np.asarray(outs), y_ref, atol=TOL)
    _assert_state(ref, _exported(live, sid), finals)


@pytest.mark.parametrize(
    "path, code",
    [
        ("/v1/sessions/no-such-session/stream", "session_not_found"),
        ("/v1/models/no-such-model/stream", "model_not_found"),
        ("/v1/models/tiny-lstm/versions/7/stream", "model_not_found"),
    ],
)
def test_unknown_session_or_model_closes_4404(live, path, code):
    ws = connect(live.ws_url + path, open_timeout=10, close_timeout=5)
    with ws:
        error = json.loads(ws.recv(timeout=10))
        assert error["error"]["code"] == code
        assert _closed_code(ws) == 4404


def test_deleted_session_mid_stream_closes_4404(live):
    ws, info = _open(live, "/v1/models/tiny-rnn/stream")
    with ws:
        assert _send_json(ws, {"inputs": [0.5, 0.25]})["step_count"] == 2
        assert (
            httpx.delete(f"{live.url}/v1/sessions/{info['session_id']}", timeout=10).status_code
            == 204
        )
        answer = _send_json(ws, {"inputs": [0.5]})
        assert answer["error"]["code"] == "session_not_found"
        assert _closed_code(ws) == 4404


def test_rate_and_size_limits_answer_with_error_frames(server_factory, model_repo, reference):
    ref = reference("tiny-rnn")
    server = server_factory(
        model_repo, RNNSERVE_WS_MAX_MESSAGES_PER_S="3", RNNSERVE_WS_MAX_MESSAGE_BYTES="200"
    )
    ws, info = _open(server, "/v1/models/tiny-rnn/stream")
    applied = []
    with ws:
        answer = _send_json(ws, {"inputs": [0.1] * 60})  # > 200 bytes
        assert answer["error"]["code"] == "payload_too_large"
        codes = []
        for i in range(8):
            answer = _send_json(ws, {"inputs": [[0.1 * i]]})
            if "error" in answer:
                codes.append(answer["error"]["code"])
            else:
                applied.append(0.1 * i)
                assert answer["step_count"] == len(applied)
        assert codes and set(codes) == {"rate_limited"}
        assert applied  # the first messages of the burst went through
    exported = _exported(server, info["session_id"])
    assert exported["step_count"] == len(applied)
    _, finals = ref.run(np.asarray(applied, np.float32)[:, None])
    _assert_state(ref, exported, finals)


def test_lean_stream_takes_exactly_the_stream_routes():
    """The access middleware hands these paths to the stream handlers directly (the same
    functions as the routes); anything else goes through the app's routing."""
    from service.api import stream

    lean = stream.LeanStream()
    taken = {
        "/v1/stream": (stream.stream_many, {}),
        "/v1/models/m/stream": (stream.stream_new, {"name": "m"}),
        "/v1/models/m/versions/3/stream": (stream.stream_new_version, {"name": "m", "version": "3"}),
        "/v1/sessions/abc/stream": (stream.stream_resume, {"session_id": "abc"}),
    }
    for path, expected in taken.items():
        assert lean.match({"path": path}) == expected
    for path in [
        "/v1/models/m/stream/", "/v1/models//stream", "/v1/models/m/versions/3/x/stream",
        "/v2/models/m/stream", "/v1/sessions/abc/steps", "/stream", "/v1/models/m/generate",
        "/v1/sessions/a/b/stream",
    ]:
        assert lean.match({"path": path}) is None, path
