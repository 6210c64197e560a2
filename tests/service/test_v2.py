"""The Open Inference Protocol (v2) routes in process: JSON shapes, errors, binary codec, sequences.

The same surface is driven by the real tritonclient against a real server in
test_tritonclient.py; here we check the exact JSON the routes answer.
"""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from service.engine import Engine

sequence_session_id = Engine.sequence_session_id

RNG = np.random.default_rng(7)


def x_tensor(x: np.ndarray, name: str = "x", flat: bool = False) -> dict:
    return {
        "name": name,
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist() if flat else x.tolist(),
    }


def y_of(body: dict) -> np.ndarray:
    (out,) = body["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32"
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def split_binary(response) -> tuple[dict, bytes]:
    size = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:size]), response.content[size:]


async def test_health_metadata_and_config(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        assert (await client.get("/v2/health/ready")).json() == {"ready": True}

        server = (await client.get("/v2")).json()
        assert server["name"] == "rnnserve"
        assert set(server["extensions"]) == {
            "binary_tensor_data",
            "classification",
            "sequence",
            "model_configuration",
        }

        meta = (await client.get("/v2/models/tiny-lstm")).json()
        assert meta == {
            "name": "tiny-lstm",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 3]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 2]}],
        }
        assert (await client.get("/v2/models/tiny-lstm/versions/1")).json() == meta

        ready = await client.get("/v2/models/tiny-gru/versions/1/ready")
        assert ready.status_code == 200 and ready.json() == {"name": "tiny-gru", "ready": True}

        config = (await client.get("/v2/models/tiny-gru/config")).json()
        assert config["max_batch_size"] == 0
        assert config["input"][0]["dims"] == [-1, -1, 7]
        assert config["input"][1] == {
            "name": "lengths",
            "data_type": "TYPE_INT32",
            "dims": [-1],
            "optional": True,
        }
        assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 1800 * 10**6

        for path, status in [
            ("/v2/models/nope", 404),
            ("/v2/models/nope/ready", 404),
            ("/v2/models/tiny-lstm/versions/9", 404),
            ("/v2/models/tiny-lstm/versions/9/ready", 404),
            ("/v2/models/tiny-lstm/versions/abc/ready", 400),
            ("/v2/repository/index", 404),
            ("/v2/models/tiny-lstm/infer", 405),  # GET on a POST route
        ]:
            response = await client.get(path)
            assert response.status_code == status, path
            assert isinstance(response.json()["error"], str), path


async def test_batch_infer_json_matches_reference(make_client, model_repo, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(3, 5, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo) as client:
        nested = await client.post(
            "/v2/models/tiny-lstm/infer", json={"id": "req-1", "inputs": [x_tensor(x)]}
        )
        assert nested.status_code == 200, nested.text
        body = nested.json()
        assert body["model_name"] == "tiny-lstm" and body["model_version"] == "1"
        assert body["id"] == "req-1"
        assert "parameters" not in body
        assert body["outputs"][0]["shape"] == [3, 5, 2]
        y = y_of(body)
        for row in range(3):
            np.testing.assert_allclose(y[row], ref.run(x[row])[0], atol=1e-5)

        # Flat data, FP64 and an explicit JSON output selection give the same numbers.
        flat = await client.post(
            "/v2/models/tiny-lstm/versions/1/infer",
            json={
                "inputs": [{**x_tensor(x.astype(np.float64), flat=True), "datatype": "FP64"}],
                "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
            },
        )
        assert flat.status_code == 200, flat.text
        assert "id" not in flat.json()
        np.testing.assert_allclose(y_of(flat.json()), y, atol=1e-6)


async def test_lengths_input_pads_rows_with_zeros(make_client, model_repo, reference):
    """Rows of a padded batch may end early; a model without a lengths input works too."""
    ref = reference("nolengths-lstm")
    x = RNG.normal(size=(2, 4, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo) as client:
        response = await client.post(
            "/v2/models/nolengths-lstm/infer",
            json={
                "inputs": [
                    x_tensor(x),
                    {"name": "lengths", "shape": [2], "datatype": "INT32", "data": [4, 2]},
                ]
            },
        )
        assert response.status_code == 200, response.text
        y = y_of(response.json())
        np.testing.assert_allclose(y[0], ref.run(x[0])[0], atol=1e-5)
        np.testing.assert_allclose(y[1, :2], ref.run(x[1, :2])[0], atol=1e-5)
        assert not y[1, 2:].any()


async def test_binary_tensors_in_and_out(make_client, model_repo, reference):
    ref = reference("tiny-relu")
    x = RNG.normal(size=(2, 3, 2)).astype(np.float32)
    header = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 3, 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            },
        ],
        "parameters": {"binary_data_output": True},
    }
    content, headers = binary_body(header, x.astype("<f4").tobytes())
    async with make_client(model_repo=model_repo) as client:
        response = await client.post(
            "/v2/models/tiny-relu/infer",
            content=content,
            headers={**headers, "Accept-Encoding": "identity"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/octet-stream"
        head, raw = split_binary(response)
        (out,) = head["outputs"]
        assert out["shape"] == [2, 3, 3] and out["parameters"] == {"binary_data_size": len(raw)}
        y = np.frombuffer(raw, "<f4").reshape(2, 3, 3)
        for row in range(2):
            np.testing.assert_allclose(y[row], ref.run(x[row])[0], atol=1e-5)

        # A per-output binary_data=false wins over binary_data_output: plain JSON back.
        header["outputs"] = [{"name": "y", "parameters": {"binary_data": False}}]
        content, headers = binary_body(header, x.tobytes())
        response = await client.post("/v2/models/tiny-relu/infer", content=content, headers=headers)
        assert "inference-header-content-length" not in response.headers
        np.testing.assert_allclose(y_of(response.json()), y, atol=1e-6)

        # gzip both ways (what tritonclient's compression options send).
        plain = json.dumps({"inputs": [x_tensor(np.tile(x, (1, 60, 1)))]}).encode()
        response = await client.post(
            "/v2/models/tiny-relu/infer",
            content=gzip.compress(plain),
            headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-encoding"] == "gzip"
        assert y_of(response.json()).shape == (2, 180, 3)


async def test_bad_requests_are_400_in_v2_shape(make_client, model_repo):
    good = x_tensor(np.zeros((1, 2, 3), np.float32))
    cases = [
        ({"inputs": [{**good, "datatype": "BYTES"}]}, "not supported"),
        ({"inputs": [{**good, "datatype": "FP33"}]}, "unknown datatype"),
        ({"inputs": [{**good, "datatype": "BOOL", "data": [True] * 6}]}, "must be FP32"),
        ({"inputs": [{**good, "shape": [2, 3]}]}, "expected [batch, time, 3]"),
        ({"inputs": [{**good, "shape": [1, 3, 2]}]}, "expected [batch, time, 3]"),
        ({"inputs": [{**good, "shape": [1, 0, 3], "data": []}]}, "must be >= 1"),
        ({"inputs": [{**good, "data": [1, 2, 3]}]}, "needs 6"),
        ({"inputs": [{**good, "data": [[["a", "b", "c"]] * 2]}]}, "not FP32"),
        ({"inputs": [good, {**good, "name": "h0"}]}, "unknown input"),
        ({"inputs": [{**good, "name": "z"}]}, "unknown input"),
        ({"inputs": []}, "non-empty"),
        ({"inputs": [good], "outputs": [{"name": "h_n"}]}, "unknown output"),
        ({"inputs": [{k: v for k, v in good.items() if k != "data"}]}, "no data"),
        ({"inputs": [good], "parameters": {"sequence_id": True}}, "sequence_id"),
        ({"inputs": [good], "parameters": {"sequence_id": -1}}, "64-bit"),
        ({"inputs": [good], "parameters": {"sequence_id": 2**64}}, "unsigned integer"),
        ({"inputs": [good], "parameters": {"seq": 2}}, "need a non-zero sequence_id"),
        (
            {
                "inputs": [x_tensor(np.zeros((2, 2, 3), np.float32))],
                "parameters": {"sequence_id": 5, "sequence_start": True},
            },
            "[1, time, 3]",
        ),
        (
            {"inputs": [good, {"name": "lengths", "shape": [1], "datatype": "INT32", "data": [3]}]},
            "between 1 and",
        ),
        (
            {"inputs": [good], "outputs": [{"name": "y", "parameters": {"classification": 0}}]},
            "classification must be an integer >= 1",
        ),
    ]
    async with make_client(model_repo=model_repo) as client:
        for body, expected in cases:
            response = await client.post("/v2/models/tiny-lstm/infer", json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert isinstance(error, str) and expected in error, (expected, error)

        def sized(n: int) -> dict:
            bare = {k: v for k, v in good.items() if k != "data"}
            return {**bare, "parameters": {"binary_data_size": n}}

        nans = np.full(6, np.nan, "<f4").tobytes()
        raw = [
            (b"{not json", {}, "not valid JSON"),
            (b"[1]", {}, "JSON object"),
            (*binary_body({"inputs": [sized(4)]}, b"\0" * 4), "binary_data_size 4 != 6 FP32"),
            (*binary_body({"inputs": [sized(24)]}, b"\0" * 8), "runs past the end"),
            (*binary_body({"inputs": [good]}, b"\0" * 8), "8 bytes of binary data"),
            (*binary_body({"inputs": [sized(24)]}, nans), "NaN"),
            (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, "outside the body"),
            (b"garbage", {"Content-Encoding": "gzip"}, "cannot be decompressed"),
        ]
        for content, headers, expected in raw:
            response = await client.post(
                "/v2/models/tiny-lstm/infer", content=content, headers=headers
            )
            assert response.status_code == 400, (content, response.text)
            assert expected in response.json()["error"]

        missing = await client.post("/v2/models/nope/infer", json={"inputs": [good]})
        assert missing.status_code == 404 and "nope" in missing.json()["error"]


async def test_api_keys_keep_health_open_and_errors_in_v2_shape(make_client, model_repo):
    async with make_client(model_repo=model_repo, api_keys=["secret"]) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.get("/v2/models/tiny-lstm/ready")).status_code == 200
        for method, path in [
            ("GET", "/v2"),
            ("GET", "/v2/models/tiny-lstm"),
            ("POST", "/v2/models/tiny-lstm/infer"),
        ]:
            response = await client.request(method, path, json={})
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["error"]
        ok = await client.post(
            "/v2/models/tiny-lstm/infer",
            json={"inputs": [x_tensor(np.zeros((1, 1, 3), np.float32))]},
            headers={"Authorization": "Bearer secret"},
        )
        assert ok.status_code == 200, ok.text


async def test_sequence_carries_state_and_is_a_session(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    x = np.eye(7, dtype=np.float32)[[0, 1, 3, 2, 6]]  # B T S P E, one-hot
    expected = ref.run(x)[0]
    url = "/v2/models/tiny-gru/infer"

    def step(t: int, seq_id, **flags) -> dict:
        return {
            "inputs": [x_tensor(x[None, t : t + 1])],
            "parameters": {"sequence_id": seq_id, **flags},
        }

    async with make_client(model_repo=model_repo) as client:
        first = await client.post(url, json=step(0, 42, sequence_start=True, seq=1))
        assert first.status_code == 200, first.text
        params = first.json()["parameters"]
        session_id = sequence_session_id(None, "tiny-gru", 42)
        assert params == {"sequence_id": 42, "session_id": session_id, "step_count": 1}
        outputs = [y_of(first.json())[0, 0]]

        # The sequence is an ordinary session, visible through v1.
        info = (await client.get(f"/v1/sessions/{session_id}")).json()
        assert info["model"] == "tiny-gru" and info["step_count"] == 1

        # Exactly-once: a retried request (same seq) is answered again, not re-applied.
        second = await client.post(url, json=step(1, 42, seq=2))
        retry = await client.post(url, json=step(1, 42, seq=2))
        assert retry.json()["parameters"]["replayed"] is True
        assert retry.json()["parameters"]["step_count"] == 2
        assert y_of(retry.json()).tolist() == y_of(second.json()).tolist()
        outputs.append(y_of(second.json())[0, 0])
        skipped = await client.post(url, json=step(2, 42, seq=9))
        assert skipped.status_code == 409 and "seq" in skipped.json()["error"]

        wrong_version = await client.post("/v2/models/tiny-gru/versions/2/infer", json=step(2, 42))
        assert wrong_version.status_code == 400

        # A chunk of two steps, then the END step.
        chunk = await client.post(
            url, json={"inputs": [x_tensor(x[None, 2:4])], "parameters": {"sequence_id": 42}}
        )
        outputs.extend(y_of(chunk.json())[0])
        last = await client.post(url, json=step(4, 42, sequence_end=True))
        assert last.json()["parameters"]["sequence_end"] is True
        outputs.append(y_of(last.json())[0, 0])
        np.testing.assert_allclose(np.asarray(outputs), expected, atol=1e-5)

        assert (await client.get(f"/v1/sessions/{session_id}")).status_code == 404
        after = await client.post(url, json=step(0, 42))
        assert after.status_code == 400 and "START" in after.json()["error"]

        # START on a live sequence restarts it from the zero state.
        await client.post(url, json=step(0, "s-1", sequence_start=True))
        await client.post(url, json=step(1, "s-1"))
        again = await client.post(url, json=step(0, "s-1", sequence_start=True))
        np.testing.assert_allclose(y_of(again.json())[0, 0], expected[0], atol=1e-5)
        assert again.json()["parameters"]["step_count"] == 1
        assert again.json()["parameters"]["sequence_id"] == "s-1"


async def test_sequences_are_private_to_their_api_key(make_client, model_repo):
    url = "/v2/models/tiny-lstm/infer"
    body = {
        "inputs": [x_tensor(np.ones((1, 1, 3), np.float32))],
        "parameters": {"sequence_id": 7, "sequence_start": True},
    }
    async with make_client(model_repo=model_repo, api_keys=["alice", "bob"]) as client:
        started = await client.post(url, json=body, headers={"X-API-Key": "alice"})
        assert started.status_code == 200
        body["parameters"] = {"sequence_id": 7}
        bob = await client.post(url, json=body, headers={"X-API-Key": "bob"})
        assert bob.status_code == 400 and "START" in bob.json()["error"]
        alice = await client.post(url, json=body, headers={"X-API-Key": "alice"})
        assert alice.json()["parameters"]["step_count"] == 2


def test_binary_header_length_is_exact():
    """The response header length covers exactly the JSON; the blob is little-endian FP32."""
    from service.api.binary import OutputTensor, encode_response

    y = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    body, size = encode_response({"model_name": "m"}, [OutputTensor("y", y, binary=True)])
    head = json.loads(body[:size])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 24
    assert struct.unpack("<6f", body[size:]) == tuple(range(6))


@pytest.mark.parametrize("sequence_id", [1, "1"])
def test_session_ids_separate_keys_models_and_id_types(sequence_id):
    ids = {
        sequence_session_id(None, "m", sequence_id),
        sequence_session_id("k", "m", sequence_id),
        sequence_session_id(None, "n", sequence_id),
        sequence_session_id(None, "m", 1 if sequence_id == "1" else "1"),
    }
    assert len(ids) == 4 and all(i.startswith("seq-") for i in ids)


async def test_oversized_body_is_413_in_the_v2_shape(make_client, model_repo):
    async with make_client(model_repo=model_repo, max_body_bytes=2048) as client:
        body = {"inputs": [{"name": "x", "shape": [1, 200, 3], "datatype": "FP32", "data": [0.5] * 600}]}
        r = await client.post("/v2/models/tiny-lstm/infer", json=body)
        assert r.status_code == 413
        assert isinstance(r.json()["error"], str) and "limit" in r.json()["error"]
