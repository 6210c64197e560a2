"""The Open Inference Protocol over gRPC, driven by NVIDIA's own clients (tritonclient.grpc
and tritonclient.grpc.aio) against real server processes, with numbers compared to an
independent onnxruntime run."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import free_port, start_server

RNG = np.random.default_rng(13)
FUZZ_EXAMPLES = int(os.environ.get("RNNSERVE_FUZZ_EXAMPLES", "60"))
KEY_A, KEY_B = "key-a-0123456789", "key-b-9876543210"


def grpc_server(factory, repo: Path, **env: str):
    port = free_port()
    server = factory(repo, rnnserve_grpc_port=port, **env)
    server.grpc = f"127.0.0.1:{port}"
    return server


@pytest.fixture(scope="module")
def shared(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server with gRPC for the tests that do not need their own."""
    port = free_port()
    server = start_server(
        model_repo, tmp_path_factory.mktemp("grpc"), {"RNNSERVE_GRPC_PORT": str(port)}
    )
    server.grpc = f"127.0.0.1:{port}"
    yield server
    server.stop()


def x_input(x: np.ndarray, name: str = "x", module=grpcclient):
    tensor = module.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x, np.float32))
    return tensor


class Collector:
    """The sync client's stream callback: (result, error) pairs in arrival order."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.items.put((result, error))

    def next(self, timeout: float = 20.0):
        return self.items.get(timeout=timeout)


# -- health, metadata, config --------------------------------------------------------------


def test_health_metadata_config_reflection(shared):
    client = grpcclient.InferenceServerClient(shared.grpc)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny-lstm") and client.is_model_ready("tiny-lstm", "1")
        assert not client.is_model_ready("no-such-model")
        assert not client.is_model_ready("tiny-lstm", "9")

        meta = client.get_server_metadata()
        assert meta.name == "rnnserve" and "sequence" in meta.extensions

        model = client.get_model_metadata("tiny-gru", "1", as_json=True)
        assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
        assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1", "7"]}]
        assert model["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "-1", "7"]}]

        config = client.get_model_config("tiny-lstm").config
        assert [i.name for i in config.input] == ["x", "lengths"]
        assert list(config.input[0].dims) == [-1, -1, 3] and config.input[1].optional
        assert [o.name for o in config.output] == ["y"] and list(config.output[0].dims) == [
            -1,
            -1,
            2,
        ]
        assert config.sequence_batching.max_sequence_idle_microseconds > 0

        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata("no-such-model")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        assert "no-such-model" in missing.value.message()
    finally:
        client.close()

    with grpc.insecure_channel(shared.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as absent:
            stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="tiny-lstm"))
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED

    metrics = httpx.get(f"{shared.url}/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelMetadata",status="NOT_FOUND"' in metrics
    assert 'model="unknown"' in metrics and 'model="no-such-model"' not in metrics


# -- infer ----------------------------------------------------------------------------------


def test_infer_raw_and_typed_match_onnxruntime(shared, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(3, 6, 3)).astype(np.float32)
    expected = np.stack([ref.run(row)[0] for row in x])

    client = grpcclient.InferenceServerClient(shared.grpc)
    try:
        result = client.infer(
            "tiny-lstm",
            [x_input(x)],
            outputs=[grpcclient.InferRequestedOutput("y")],
            request_id="raw-1",
        )
        y = result.as_numpy("y")
        assert y.dtype == np.float32 and y.shape == (3, 6, 2)
        np.testing.assert_allclose(y, expected, atol=1e-5)
        response = result.get_response()
        assert response.id == "raw-1" and response.model_version == "1"

        # lengths: row 1 ends after 4 steps; its padded outputs are zeros.
        lengths = grpcclient.InferInput("lengths", [3], "INT32")
        lengths.set_data_from_numpy(np.array([6, 4, 6], np.int32))
        y = client.infer("tiny-lstm", [x_input(x), lengths], model_version="1").as_numpy("y")
        np.testing.assert_allclose(y[1, :4], ref.run(x[1, :4])[0], atol=1e-5)
        assert not y[1, 4:].any()

        with pytest.raises(InferenceServerException) as bad:
            client.infer("tiny-lstm", [x_input(x[:, :, :2])])
        assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "[batch, time, 3]" in bad.value.message()
    finally:
        client.close()

    # Typed contents (what clients other than tritonclient send), through the bare stub.
    request = service_pb2.ModelInferRequest(model_name="tiny-lstm", id="typed-1")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(shared.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request)
        assert response.id == "typed-1" and response.outputs[0].datatype == "FP32"
        assert list(response.outputs[0].shape) == [3, 6, 2]
        y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 6, 2)
        np.testing.assert_allclose(y, expected, atol=1e-5)

        del tensor.contents.fp32_contents[-1]
        with pytest.raises(grpc.RpcError) as short:
            stub.ModelInfer(request)
        assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(short.value.trailing_metadata())["rnnserve-error-code"] == "invalid_input"


def test_classification_output_over_a_stream(shared, reference):
    """``class_count`` on the requested output: BYTES "score:index:label" [batch, k] from
    each step's last output, best first, as over HTTP v2."""
    ref = reference("tiny-gru")
    x = RNG.random(size=(5, 7)).astype(np.float32)
    whole = ref.run(x)[0]
    labels = ref.card["vocabulary"]
    client = grpcclient.InferenceServerClient(shared.grpc)
    answers = Collector()
    client.start_stream(callback=answers)
    try:
        for t in range(5):
            client.async_stream_infer(
                "tiny-gru",
                [x_input(x[None, t : t + 1])],
                outputs=[grpcclient.InferRequestedOutput("y", class_count=3)],
                sequence_id=31,
                sequence_start=t == 0,
                sequence_end=t == 4,
                priority=1,
            )
        for t in range(5):
            result, error = answers.next()
            assert error is None, error
            classes = result.as_numpy("y")
            assert classes.shape == (1, 3) and classes.dtype == object
            parsed = [c.decode().split(":") for c in classes[0]]
            best = np.argsort(-whole[t], kind="stable")[:3]
            assert [int(p[1]) for p in parsed] == best.tolist()
            assert [p[2] for p in parsed] == [labels[i] for i in best]
            np.testing.assert_allclose([float(p[0]) for p in parsed], whole[t, best], atol=1e-5)
    finally:
        client.stop_stream()
        client.close()


def _bad_requests() -> list[tuple[str, service_pb2.ModelInferRequest, grpc.StatusCode]]:
    def request(model="tiny-lstm", **parameters) -> service_pb2.ModelInferRequest:
        r = service_pb2.ModelInferRequest(model_name=model)
        for key, (kind, value) in parameters.items():
            setattr(r.parameters[key], kind, value)
        return r

    def raw(r, shape, datatype="FP32", data=None):
        r.inputs.add(name="x", datatype=datatype, shape=shape)
        count = int(np.prod(shape))
        r.raw_input_contents.append(data if data is not None else b"\0" * 4 * count)
        return r

    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    typed_fp16 = request()
    typed_fp16.inputs.add(name="x", datatype="FP16", shape=[1, 1, 3])
    huge_typed = request()
    huge_typed.inputs.add(name="x", datatype="FP32", shape=[2**31, 2**31, 3])
    twice = raw(raw(request(), [1, 1, 3]), [1, 1, 3])
    one_raw_two_inputs = raw(request(), [1, 1, 3])
    one_raw_two_inputs.inputs.add(name="lengths", datatype="INT32", shape=[1])
    return [
        ("no inputs", request(), invalid),
        ("unknown model", raw(request("nope"), [1, 1, 3]), missing),
        ("bad version", raw(request(), [1, 1, 3]), invalid),
        ("short raw", raw(request(), [1, 2, 3], data=b"\0" * 12), invalid),
        ("BYTES", raw(request(), [1, 1, 3], "BYTES"), invalid),
        ("typed FP16", typed_fp16, invalid),
        ("huge typed shape", huge_typed, invalid),
        ("input twice", twice, invalid),
        ("raw for one of two inputs", one_raw_two_inputs, invalid),
        ("negative shape", raw(request(), [1, -1, 3], data=b""), invalid),
        ("float sequence id", raw(request(sequence_id=("double_param", 1.5)), [1, 1, 3]), invalid),
        ("seq without id", raw(request(seq=("int64_param", 1)), [1, 1, 3]), invalid),
        (
            "seq zero",
            raw(request(sequence_id=("int64_param", 8), seq=("int64_param", 0)), [1, 1, 3]),
            invalid,
        ),
    ]


def test_bad_requests_are_refused_and_the_stream_survives(shared):
    cases = _bad_requests()
    cases[2][1].model_version = "v1"
    good = service_pb2.ModelInferRequest(model_name="tiny-lstm", id="good")
    good.inputs.add(name="x", datatype="FP32", shape=[1, 1, 3])
    good.raw_input_contents.append(np.ones(3, np.float32).tobytes())
    with grpc.insecure_channel(shared.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, request, code in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=10)
            assert refused.value.code() == code, (name, refused.value.details())
        answers = list(stub.ModelStreamInfer(iter([r for _, r, _ in cases] + [good]), timeout=20))
    assert len(answers) == len(cases) + 1  # one answer each, in whatever order
    (ok,) = [a for a in answers if not a.error_message]
    assert ok.infer_response.id == "good"


_PARAM_KINDS = {
    "bool_param": st.booleans(),
    "int64_param": st.integers(-(2**63), 2**63 - 1),
    "uint64_param": st.integers(0, 2**64 - 1),
    "double_param": st.floats(allow_nan=True, allow_infinity=True),
    "string_param": st.text(max_size=300),
}
_params = st.dictionaries(
    st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "seq", "priority", "x"]),
    st.sampled_from(sorted(_PARAM_KINDS)).flatmap(
        lambda kind: _PARAM_KINDS[kind].map(lambda value: (kind, value))
    ),
    max_size=4,
)
_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "lengths", "y", ""]),
        "datatype": st.sampled_from(
            ["FP32", "FP64", "INT32", "INT64", "BYTES", "FP16", "BOOL", "?"]
        ),
        "shape": st.lists(st.integers(-2, 5), max_size=4),
        "raw": st.none() | st.binary(max_size=200),
        "params": _params,
    }
)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    model=st.sampled_from(["tiny-lstm", "tiny-gru", "nope", ""]),
    version=st.sampled_from(["", "1", "2", "-1", "x"]),
    params=_params,
    tensors=st.lists(_tensor, max_size=3),
    outputs=st.lists(st.tuples(st.sampled_from(["y", "z"]), _params), max_size=2),
)
def test_any_request_gets_a_client_error_or_an_answer(
    shared, model, version, params, tensors, outputs
):
    """Whatever a client sends, the answer is a result or a client-side status, never an
    internal error, and the server keeps serving."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for key, (kind, value) in params.items():
        setattr(request.parameters[key], kind, value)
    raws = []
    for t in tensors:
        tensor = request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        for key, (kind, value) in t["params"].items():
            setattr(tensor.parameters[key], kind, value)
        raws.append(t["raw"])
    if raws and all(r is not None for r in raws):
        request.raw_input_contents.extend(raws)
    for name, out_params in outputs:
        out = request.outputs.add(name=name)
        for key, (kind, value) in out_params.items():
            setattr(out.parameters[key], kind, value)
    with grpc.insecure_channel(shared.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
            }, (exc.code(), exc.details())
        (answer,) = stub.ModelStreamInfer(iter([request]), timeout=10)
        assert "internal error" not in answer.error_message


# -- streams ----------------------------------------------------------------------------------


def test_stream_sequence_step_by_step_equals_whole(shared, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(12, 3)).astype(np.float32)
    whole = ref.run(x)[0]
    client = grpcclient.InferenceServerClient(shared.grpc)
    answers = Collector()
    client.start_stream(callback=answers)
    try:
        for t in range(12):
            client.async_stream_infer(
                "tiny-lstm",
                [x_input(x[None, t : t + 1])],
                request_id=f"s{t}",
                sequence_id=4242,
                sequence_start=t == 0,
                sequence_end=t == 11,
            )
        got = []
        for t in range(12):
            result, error = answers.next()
            assert error is None, error
            assert result.get_response().id == f"s{t}"  # in request order
            got.append(result.as_numpy("y")[0, 0])
        np.testing.assert_allclose(np.stack(got), whole, atol=1e-5)
        last = result.get_response().parameters
        assert last["step_count"].int64_param == 12 and last["sequence_end"].bool_param

        # Without START on the ended sequence and on an unknown one: an error response each,
        # and the stream still answers the next request.
        for sequence_id in (4242, "never-started"):
            client.async_stream_infer("tiny-lstm", [x_input(x[None, :1])], sequence_id=sequence_id)
            result, error = answers.next()
            assert result is None and "START" in error.message()
        client.async_stream_infer(
            "tiny-lstm",
            [x_input(x[None, :3])],
            sequence_id="fresh",
            sequence_start=True,
            sequence_end=True,
            enable_empty_final_response=True,
        )
        result, error = answers.next()
        assert error is None
        assert result.get_response().parameters["triton_final_response"].bool_param
        np.testing.assert_allclose(result.as_numpy("y")[0], whole[:3], atol=1e-5)
    finally:
        client.stop_stream()
        client.close()


def test_64_sequences_interleaved_on_one_stream(shared, reference):
    ref = reference("tiny-rnn")
    steps = 4
    xs = RNG.normal(size=(64, steps, 1)).astype(np.float32)
    solo = [ref.run(x)[0] for x in xs]
    ids = [i + 1 if i % 2 else f"seq-{i}" for i in range(64)]

    async def drive():
        client = aioclient.InferenceServerClient(shared.grpc)

        async def requests():
            for t in range(steps):
                for i, sequence_id in enumerate(ids):
                    yield {
                        "model_name": "tiny-rnn",
                        "inputs": [x_input(xs[i, None, t : t + 1], module=aioclient)],
                        "request_id": f"{i}/{t}",
                        "sequence_id": sequence_id,
                        "sequence_start": t == 0,
                        "sequence_end": t == steps - 1,
                    }

        got: dict[int, list] = {i: [] for i in range(64)}
        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                i, t = map(int, result.get_response().id.split("/"))
                assert t == len(got[i])  # each sequence answered in its own order
                got[i].append(result.as_numpy("y")[0, 0])
                if sum(map(len, got.values())) == 64 * steps:
                    break
        finally:
            await client.close()
        return got

    got = asyncio.run(asyncio.wait_for(drive(), 60))
    for i in range(64):
        np.testing.assert_allclose(np.stack(got[i]), solo[i], atol=1e-5)


_EXAMPLE = iter(range(1, 10**6))


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    data=st.data(),
)
def test_any_interleaving_of_chunks_on_one_stream_equals_each_whole(
    shared, reference, lengths, data
):
    """Sequences cut into chunks of any size, their requests interleaved in any order on one
    stream: each sequence's answers, in its order, are its whole-sequence result."""
    ref = reference("tiny-rnn")
    example = next(_EXAMPLE)
    rng = np.random.default_rng(example)
    xs = [rng.normal(size=(n, 1)).astype(np.float32) for n in lengths]
    chunks = []  # per sequence: the cut points
    for n in lengths:
        cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3)) if n > 1 else [])
        chunks.append(list(zip([0, *cuts], [*cuts, n])))
    order = data.draw(st.permutations([i for i, c in enumerate(chunks) for _ in c]))
    client = grpcclient.InferenceServerClient(shared.grpc)
    answers = Collector()
    client.start_stream(callback=answers)
    sent = [0] * len(chunks)
    try:
        for i in order:
            k = sent[i]
            a, b = chunks[i][k]
            sent[i] += 1
            client.async_stream_infer(
                "tiny-rnn",
                [x_input(xs[i][None, a:b])],
                request_id=f"{i}/{k}",
                sequence_id=f"hyp-{example}-{i}",
                sequence_start=k == 0,
                sequence_end=k == len(chunks[i]) - 1,
            )
        got: dict[int, list] = {i: [] for i in range(len(chunks))}
        for _ in order:
            result, error = answers.next()
            assert error is None, error
            i, k = map(int, result.get_response().id.split("/"))
            assert k == len(got[i])
            got[i].append(result.as_numpy("y")[0])
    finally:
        client.stop_stream()
        client.close()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(np.concatenate(got[i]), ref.run(x)[0], atol=1e-5)


def test_sequence_moves_between_grpc_http_v2_and_v1(shared, reference):
    ref = reference("tiny-relu")
    x = RNG.normal(size=(8, 2)).astype(np.float32)
    whole = ref.run(x)[0]
    g = grpcclient.InferenceServerClient(shared.grpc)
    h = httpclient.InferenceServerClient(f"127.0.0.1:{shared.port}")
    session = {}
    try:

        def over_grpc(t, **flags):
            result = g.infer("tiny-relu", [x_input(x[None, t : t + 2])], sequence_id=77, **flags)
            session["id"] = result.get_response().parameters["session_id"].string_param
            return result.as_numpy("y")[0]

        def over_v1(t):  # the sequence's session, by the id every answer carries
            answer = httpx.post(
                f"{shared.url}/v1/sessions/{session['id']}/steps",
                json={"inputs": x[t : t + 2].tolist()},
            )
            assert answer.status_code == 200, answer.text
            return np.asarray(answer.json()["outputs"], np.float32)

        def over_http(t, **flags):
            tensor = httpclient.InferInput("x", [1, 2, 2], "FP32")
            tensor.set_data_from_numpy(x[None, t : t + 2])
            return h.infer("tiny-relu", [tensor], sequence_id=77, **flags).as_numpy("y")[0]

        parts = [
            over_grpc(0, sequence_start=True),
            over_http(2),
            over_v1(4),
            over_grpc(6, sequence_end=True),
        ]
        np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)
        with pytest.raises(InferenceServerException):  # ended over gRPC: gone for HTTP too
            over_http(0)
    finally:
        g.close()
        h.close()


# -- API keys --------------------------------------------------------------------------------


def test_api_keys(server_factory, model_repo, reference):
    server = grpc_server(
        server_factory, model_repo, rnnserve_api_keys=f"{KEY_A},{KEY_B}", rnnserve_log_level="info"
    )
    x = RNG.normal(size=(1, 2, 3)).astype(np.float32)
    client = grpcclient.InferenceServerClient(server.grpc)
    a = {"authorization": f"Bearer {KEY_A}"}
    b = {"x-api-key": KEY_B}
    try:
        assert client.is_server_live() and client.is_model_ready("tiny-lstm")  # open
        for headers in (None, {"authorization": "Bearer nope"}):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("tiny-lstm", [x_input(x)], headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException) as refused:
                client.get_model_metadata("tiny-lstm", headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"

        first = client.infer(
            "tiny-lstm", [x_input(x)], sequence_id=9, sequence_start=True, headers=a
        ).as_numpy("y")
        with pytest.raises(InferenceServerException) as other:
            client.infer("tiny-lstm", [x_input(x)], sequence_id=9, headers=b)
        assert "START" in other.value.message()
        second = client.infer("tiny-lstm", [x_input(x)], sequence_id=9, headers=a).as_numpy("y")
        expected = reference("tiny-lstm").run(np.concatenate([x[0], x[0]]))[0]
        np.testing.assert_allclose(np.concatenate([first[0], second[0]]), expected, atol=1e-5)

        # A stream without a key is refused as a whole.
        answers = Collector()
        client.start_stream(callback=answers)
        try:
            client.async_stream_infer("tiny-lstm", [x_input(x)])
        except InferenceServerException:
            pass  # the client may already know the stream was refused
        result, error = answers.next()
        assert result is None and "StatusCode.UNAUTHENTICATED" in str(error.status())
        client.stop_stream()
    finally:
        client.close()

    # JSON access logs cover gRPC calls like HTTP ones (and never carry the key).
    lines = [
        json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")
    ]
    calls = [e for e in lines if e.get("method") == "gRPC"]
    statuses = {(e["route"].rsplit("/", 1)[1], e["status"]) for e in calls}
    assert {("ModelInfer", "UNAUTHENTICATED"), ("ModelInfer", "OK")} <= statuses
    assert all(e.get("model") in (None, "tiny-lstm") and e["latency_ms"] >= 0 for e in calls)
    assert KEY_A not in server.log.read_text()


# -- a replica killed mid-stream --------------------------------------------------------------


def test_replica_killed_mid_stream_continues_on_another(
    server_factory, model_repo, reference, redis_db
):
    store = redis_db(5)
    with ThreadPoolExecutor(2) as pool:  # start both replicas at once
        a, b = pool.map(
            lambda _: grpc_server(server_factory, model_repo, rnnserve_session_store=store), "ab"
        )
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(12, 3)).astype(np.float32)
    whole = ref.run(x)[0]

    def request(t, **extra):
        return {
            "model_name": "tiny-lstm",
            "inputs": [x_input(x[None, t : t + 1], module=aioclient)],
            "sequence_id": "kill-me",
            "sequence_start": t == 0,
            "parameters": {"seq": t + 1},  # the step count once this request is applied
            **extra,
        }

    async def drive():
        got: dict[int, np.ndarray] = {}
        client = aioclient.InferenceServerClient(a.grpc)
        sent = asyncio.Queue()

        async def requests():
            while (item := await sent.get()) is not None:
                yield item

        stream = client.stream_infer(requests())
        for t in range(6):
            await sent.put(request(t))
            result, error = await anext(stream)
            assert error is None, error
            got[t] = result.as_numpy("y")[0, 0]
        await sent.put(request(6))
        await asyncio.sleep(0.01)
        os.kill(a.proc.pid, signal.SIGKILL)  # step 6 may or may not have been applied
        with pytest.raises(Exception):  # noqa: B017 - whatever the broken stream raises
            while True:  # the answer to step 6 may have been sent just before the kill
                await asyncio.wait_for(anext(stream), 20)
        await client.close()

        client = aioclient.InferenceServerClient(b.grpc)
        sent = asyncio.Queue()
        stream = client.stream_infer(requests())
        replays = 0
        for t in [6, 6, *range(7, 12)]:  # step 6 again (applied once), and once more
            await sent.put(request(t, sequence_end=t == 11))
            result, error = await anext(stream)
            assert error is None, error
            params = result.get_response().parameters
            assert params["step_count"].int64_param == t + 1
            replays += "replayed" in params
            if t in got:
                np.testing.assert_array_equal(result.as_numpy("y")[0, 0], got[t])
            got[t] = result.as_numpy("y")[0, 0]
        await sent.put(None)
        await client.close()
        assert replays >= 1
        return got

    got = asyncio.run(asyncio.wait_for(drive(), 60))
    np.testing.assert_allclose(np.stack([got[t] for t in range(12)]), whole, atol=1e-5)


def test_no_grpc_extra_serves_http_only(tmp_path, model_repo):
    """Without grpcio importable the server logs a warning and serves HTTP."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "grpc.py").write_text("raise ImportError('grpcio is not installed')\n")
    port = free_port()
    server = start_server(
        model_repo,
        tmp_path,
        {
            "RNNSERVE_GRPC_PORT": str(port),
            "RNNSERVE_LOG_LEVEL": "info",
            "PYTHONPATH": os.pathsep.join([str(blocker), str(Path(__file__).parents[2])]),
        },
    )
    try:
        assert "gRPC is off" in server.log.read_text()
        with pytest.raises(InferenceServerException):
            grpcclient.InferenceServerClient(f"127.0.0.1:{port}").is_server_live(client_timeout=2)
    finally:
        server.stop()


def test_error_codes_map_to_the_grpc_status_a_client_can_act_on():
    """Retrying is what ABORTED tells a client; a changed model or a seq gap needs another
    action, so they are FAILED_PRECONDITION, and every 4xx maps to a non-INTERNAL status."""
    import grpc

    from service import errors
    from service.api.grpc_server import status_of

    assert status_of(errors.SessionConflict("x"))[0] is grpc.StatusCode.ABORTED
    assert status_of(errors.SequenceMismatch("x"))[0] is grpc.StatusCode.FAILED_PRECONDITION
    changed = [c for c in vars(errors).values() if getattr(c, "code", None) == "model_changed"]
    assert changed, "the model_changed error exists"
    assert status_of(changed[0]("x"))[0] is grpc.StatusCode.FAILED_PRECONDITION
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.ServeError) and cls.status < 500:
            assert status_of(cls("x"))[0] is not grpc.StatusCode.INTERNAL, cls


async def test_a_stream_whose_answers_are_not_read_stops_being_read():
    """A client that sends requests and never reads the answers held up to 512 answers of
    any size (64 requests of 838 ids on a 5,000-output model pinned 1.1 GiB). Each request
    now reserves its answer's size (steps x the model's output size) in the stream's byte
    budget until the answer is sent, so reading stops once they fill it."""
    from types import SimpleNamespace

    from service.api.grpc_server import _Stream

    card = SimpleNamespace(output_size=1000, inputs=SimpleNamespace(sequence="x"))
    answered: list[int] = []

    class Servicer:
        engine = SimpleNamespace(model=lambda name, version: SimpleNamespace(card=card))

        async def answer(self, message, who):
            answered.append(len(answered))
            out = service_pb2.ModelInferResponse(raw_output_contents=[bytes(4 * 1000 * 100)])
            return service_pb2.ModelStreamInferResponse(infer_response=out)

    async def requests():
        for k in range(50):
            request = service_pb2.ModelInferRequest(model_name="wide", id=str(k))
            request.inputs.add(name="x", datatype="INT64", shape=[1, 100])
            yield request

    stream = _Stream(Servicer(), None, byte_budget=1_000_000)  # 2 answers of 400 KB fit
    answers = stream.run(requests())
    first = await anext(answers)  # the client reads one answer, then nothing more
    assert first.infer_response.raw_output_contents
    await asyncio.sleep(0.5)
    assert len(answered) <= 4, f"{len(answered)} answers held for a client that reads none"
    assert stream.bytes <= 1_000_000 + 500_000
    rest = [a async for a in answers]  # reading again lets every request through
    assert len(rest) == 49 and len(answered) == 50
