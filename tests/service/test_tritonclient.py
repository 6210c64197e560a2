"""NVIDIA's own client (tritonclient.http) against a real rnn-serve process.

Covers what a Triton user would call: health, metadata, config, batch infer with binary and
JSON tensors (and compression), and Triton sequences (START / continue / END, integer and
string ids, interleaved, expiry) compared with an independent onnxruntime reference.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

RNG = np.random.default_rng(11)


def client_for(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=30)


def x_input(x: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32" if x.dtype == np.float32 else "FP64")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_metadata_and_config(server):
    client = client_for(server)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("tiny-lstm")
        assert client.is_model_ready("tiny-lstm", "1")
        assert not client.is_model_ready("no-such-model")

        meta = client.get_server_metadata()
        assert meta["name"] == "rnnserve" and "sequence" in meta["extensions"]

        model = client.get_model_metadata("tiny-gru", "1")
        assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
        assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 7]}]
        assert model["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 7]}]

        config = client.get_model_config("tiny-gru")
        assert config["sequence_batching"]["max_sequence_idle_microseconds"] > 0

        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata("no-such-model")
        assert missing.value.status() == "404" and "no-such-model" in missing.value.message()
    finally:
        client.close()


def test_batch_infer_binary_and_json(server, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(3, 6, 3)).astype(np.float32)
    expected = np.stack([ref.run(row)[0] for row in x])
    client = client_for(server)
    try:
        for binary_in in (True, False):
            for binary_out in (True, False):
                result = client.infer(
                    "tiny-lstm",
                    [x_input(x, binary_in)],
                    outputs=[httpclient.InferRequestedOutput("y", binary_data=binary_out)],
                    request_id=f"r-{binary_in}-{binary_out}",
                )
                y = result.as_numpy("y")
                assert y.dtype == np.float32 and y.shape == (3, 6, 2)
                np.testing.assert_allclose(y, expected, atol=1e-5)
                response = result.get_response()
                assert response["id"] == f"r-{binary_in}-{binary_out}"
                assert response["model_version"] == "1"

        # No outputs named: tritonclient asks for everything in binary.
        result = client.infer("tiny-lstm", [x_input(x.astype(np.float64))], model_version="1")
        np.testing.assert_allclose(result.as_numpy("y"), expected, atol=1e-5)

        # Compressed request and response bodies.
        result = client.infer(
            "tiny-lstm",
            [x_input(np.tile(x, (1, 20, 1)))],
            request_compression_algorithm="gzip",
            response_compression_algorithm="deflate",
        )
        assert result.as_numpy("y").shape == (3, 120, 2)

        with pytest.raises(InferenceServerException) as bad:
            client.infer("tiny-lstm", [x_input(np.zeros((1, 2, 5), np.float32))])
        assert bad.value.status() == "400" and "[batch, time, 3]" in bad.value.message()
    finally:
        client.close()


def test_sequences_step_by_step_match_the_whole_sequence(server, reference):
    """Two interleaved sequences (integer and string ids) stepped one infer at a time."""
    ref = reference("tiny-gru")
    first = np.eye(7, dtype=np.float32)[[0, 1, 3, 3, 2, 6]]
    second = np.eye(7, dtype=np.float32)[[0, 4, 5, 2, 6, 1]]
    ids = [9001, "user-7"]
    client = client_for(server)
    try:
        got: dict = {sid: [] for sid in ids}
        steps = len(first)
        for t in range(steps):
            for sid, seq in zip(ids, (first, second)):
                result = client.infer(
                    "tiny-gru",
                    [x_input(seq[None, t : t + 1], binary=sid == 9001)],
                    sequence_id=sid,
                    sequence_start=t == 0,
                    sequence_end=t == steps - 1,
                )
                got[sid].append(result.as_numpy("y")[0, 0])
                params = result.get_response()["parameters"]
                assert params["sequence_id"] == sid and params["step_count"] == t + 1
        np.testing.assert_allclose(np.stack(got[9001]), ref.run(first)[0], atol=1e-5)
        np.testing.assert_allclose(np.stack(got["user-7"]), ref.run(second)[0], atol=1e-5)

        # Both ended: continuing either without START is refused.
        for sid in ids:
            with pytest.raises(InferenceServerException) as ended:
                client.infer("tiny-gru", [x_input(first[None, :1])], sequence_id=sid)
            assert ended.value.status() == "400" and "START" in ended.value.message()
    finally:
        client.close()


def test_sequence_expires_after_the_ttl(server_factory, model_repo, reference):
    """Also: a server with API keys, reached with tritonclient's headers."""
    server = server_factory(model_repo, RNNSERVE_SESSION_TTL_S="1", RNNSERVE_API_KEYS="k1")
    ref = reference("tiny-rnn")
    x = RNG.normal(size=(1, 3, 1)).astype(np.float32)
    headers = {"Authorization": "Bearer k1"}
    client = client_for(server)
    try:
        with pytest.raises(InferenceServerException) as denied:
            client.infer("tiny-rnn", [x_input(x)])
        assert denied.value.status() == "401"
        assert client.is_server_live()  # health stays open

        start = client.infer(
            "tiny-rnn", [x_input(x[:, :2])], sequence_id=5, sequence_start=True, headers=headers
        )
        # Exactly-once through tritonclient's custom parameters: a retry is replayed.
        step = {"sequence_id": 5, "headers": headers, "parameters": {"seq": 3}}
        more = client.infer("tiny-rnn", [x_input(x[:, 2:])], **step)
        again = client.infer("tiny-rnn", [x_input(x[:, 2:])], **step)
        assert again.get_response()["parameters"]["replayed"] is True
        np.testing.assert_array_equal(again.as_numpy("y"), more.as_numpy("y"))
        y = np.concatenate([start.as_numpy("y")[0], more.as_numpy("y")[0]])
        np.testing.assert_allclose(y, ref.run(x[0])[0], atol=1e-5)

        time.sleep(1.5)
        with pytest.raises(InferenceServerException) as expired:
            client.infer("tiny-rnn", [x_input(x)], sequence_id=5, headers=headers)
        assert expired.value.status() == "400"
        assert "expired" in expired.value.message() and "START" in expired.value.message()
    finally:
        client.close()
