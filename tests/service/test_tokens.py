"""Token-input models (int64 ids into an embedding) and top-k answers, on every v1 route.

Numbers are compared with onnxruntime run directly on the model file and with an
independent ``argsort`` of its output (never with the service's top-k code).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.card import ModelCard
from tests.conftest import TOKEN_VOCABULARY

TOL = 1e-5


class TokenReference:
    """One sequence of ids through onnxruntime, from zero states or given ones."""

    def __init__(self, folder: Path) -> None:
        self.card = json.loads((folder / "card.json").read_text())
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.out_names = [o.name for o in self.session.get_outputs()]

    def zero_states(self) -> dict[str, np.ndarray]:
        return {
            s["input"]: np.zeros([1 if d is None else d for d in s["shape"]], np.float32)
            for s in self.card["states"]
        }

    def run(self, ids, states=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = dict(states or self.zero_states())
        feed["x"] = np.asarray(ids, np.int64)[None]
        feed["lengths"] = np.array([len(ids)], np.int32)
        result = dict(zip(self.out_names, self.session.run(None, feed)))
        return result["y"][0], {s["input"]: result[s["output"]] for s in self.card["states"]}


@pytest.fixture(scope="module")
def token_ref(token_repo):
    cache: dict[str, TokenReference] = {}

    def get(name: str) -> TokenReference:
        if name not in cache:
            cache[name] = TokenReference(token_repo / name / "1")
        return cache[name]

    return get


def best(y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent top-k: a full stable argsort, best first."""
    order = np.argsort(-y, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(y, order, axis=-1)


def assert_top_k(answer: list, y: np.ndarray, k: int, labels: list[str] | None) -> None:
    """``answer`` [steps][k] of {index, score, label?} equals the argsort of y [steps, C]."""
    indices, scores = best(y, k)
    assert len(answer) == y.shape[0]
    for step, row in enumerate(answer):
        assert [c["index"] for c in row] == indices[step].tolist()
        np.testing.assert_allclose([c["score"] for c in row], scores[step], atol=TOL)
        if labels is None:
            assert all("label" not in c for c in row)
        else:
            assert [c["label"] for c in row] == [labels[i] for i in indices[step]]


# -- the card ------------------------------------------------------------------------------


def _card(**changes) -> dict:
    card = {
        "name": "m",
        "version": 1,
        "cell": "gru",
        "num_layers": 1,
        "hidden_size": 4,
        "input_size": 3,
        "output_size": 3,
        "output_activation": "softmax",
        "inputs": {"sequence": "x", "kind": "tokens"},
        "outputs": {"sequence": "y"},
        "states": [{"input": "h0", "output": "hn", "shape": [1, None, 4]}],
        "parity_max_abs_diff": 0.0,
    }
    card.update(changes)
    return card


def test_card_accepts_token_models_and_refuses_what_cannot_work():
    assert ModelCard.model_validate(_card()).token_inputs
    named = ModelCard.model_validate(_card(vocabulary=["a", "b", "c"]))
    assert named.output_names == ["a", "b", "c"]
    labelled = ModelCard.model_validate(_card(output_size=2, labels=["no", "yes"]))
    assert labelled.output_names == ["no", "yes"]
    assert ModelCard.model_validate(_card(output_size=2)).output_names is None
    mixed = _card(
        cell="mixed",
        num_layers=2,
        layers=[{"cell": "gru", "hidden_size": 4}, {"cell": "lstm", "hidden_size": 2}],
    )
    assert ModelCard.model_validate(mixed).layers[1].cell == "lstm"
    refused = {
        "vocabulary has 2 symbols": _card(vocabulary=["a", "b"]),
        "labels has 3 names": _card(output_size=2, labels=["a", "b", "c"]),
        "shared by input and output": _card(generation={"mode": "symbol"}),
        "cannot feed outputs back into token inputs": _card(generation={"mode": "value"}),
        "not in the vocabulary": _card(
            vocabulary=["a", "b", "c"], generation={"mode": "symbol", "end_symbol": "z"}
        ),
        'cell "mixed" needs layers': _card(cell="mixed"),
        "layers lists 1 layers": _card(num_layers=2, layers=[{"cell": "gru", "hidden_size": 4}]),
    }
    for message, card in refused.items():
        with pytest.raises(ValueError, match=message):
            ModelCard.model_validate(card)


def test_runner_refuses_a_graph_that_does_not_fit_a_token_card(token_repo, model_repo, tmp_path):
    from service.config import Settings
    from service.runtime import CardMismatch, Runner

    folder = token_repo / "tiny-items" / "1"
    card = ModelCard.read(folder / "card.json")
    too_large = card.model_copy(update={"input_size": 60, "output_size": 60})
    with pytest.raises(CardMismatch, match="dry run"):  # 50 embedding rows: id 59 fails
        Runner(folder / "model.onnx", too_large, Settings())
    values_graph = model_repo / "tiny-gru" / "1"
    as_tokens = ModelCard.read(values_graph / "card.json").model_copy(
        update={"inputs": card.inputs}
    )
    with pytest.raises(CardMismatch, match="rank 3, card implies 2"):
        Runner(values_graph / "model.onnx", as_tokens, Settings())


# -- batching and sessions -------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.lists(st.integers(0, 49), min_size=1, max_size=9), min_size=1, max_size=5
    )
)
def test_padded_id_batches_equal_each_sequence_alone(token_repo, token_ref, sequences):
    from service.batching import StepBatch, StepJob
    from service.config import Settings
    from service.runtime import Runner

    folder = token_repo / "tiny-items" / "1"
    runner = Runner(folder / "model.onnx", ModelCard.read(folder / "card.json"), Settings())
    jobs = [StepJob(np.asarray(ids, np.int64), runner.zero_state()) for ids in sequences]
    StepBatch(runner, jobs).run()
    for ids, job in zip(sequences, jobs):
        assert job.error is None
        y_ref, finals = token_ref("tiny-items").run(ids)
        np.testing.assert_allclose(job.result[0], y_ref, atol=TOL)
        np.testing.assert_allclose(job.result[1], finals["h0"].ravel(), atol=TOL)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 9), min_size=1, max_size=16), st.data())
def test_id_chunks_with_carried_state_equal_the_whole(token_repo, token_ref, ids, data):
    """Mixed GRU+LSTM states of different sizes carried across chunks == one whole run."""
    from service.batching import StepBatch, StepJob
    from service.config import Settings
    from service.runtime import Runner

    folder = token_repo / "tiny-chars" / "1"
    runner = Runner(folder / "model.onnx", ModelCard.read(folder / "card.json"), Settings())
    cuts = sorted(data.draw(st.sets(st.integers(1, len(ids) - 1), max_size=4)) if len(ids) > 1 else [])
    state, outs = runner.zero_state(), []
    for a, b in itertools.pairwise([0, *cuts, len(ids)]):
        job = StepJob(np.asarray(ids[a:b], np.int64), state)
        StepBatch(runner, [job]).run()
        assert job.error is None
        outs.append(job.result[0])
        state = job.result[1]
    y_ref, finals = token_ref("tiny-chars").run(ids)
    np.testing.assert_allclose(np.concatenate(outs), y_ref, atol=TOL)
    expected = np.concatenate([finals[name].ravel() for name in ("h0", "h1", "c1")])
    np.testing.assert_allclose(state, expected, atol=TOL)


async def test_session_fed_ids_and_symbols_in_chunks_equals_whole(make_client, token_repo, token_ref):
    ref = token_ref("tiny-chars")
    ids = np.random.default_rng(3).integers(0, 10, 23).tolist()
    y_ref, finals = ref.run(ids)
    async with make_client(model_repo=token_repo) as client:
        sid = (await client.post("/v1/models/tiny-chars/sessions")).json()["session_id"]
        outs, bounds = [], [0, 1, 6, 7, 15, 23]
        for n, (a, b) in enumerate(itertools.pairwise(bounds)):
            # alternate plain ids, symbols, and a mix of both in one request
            chunk = ids[a:b] if n % 3 == 0 else [TOKEN_VOCABULARY[i] for i in ids[a:b]]
            if n % 3 == 2:
                chunk = [c if t % 2 else TOKEN_VOCABULARY.index(c) for t, c in enumerate(chunk)]
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk})
            assert r.status_code == 200, r.text
            assert r.json()["step_count"] == b
            assert r.json()["symbols"] == [TOKEN_VOCABULARY[i] for i in np.argmax(r.json()["outputs"], 1)]
            outs.extend(r.json()["outputs"])
        np.testing.assert_allclose(np.asarray(outs), y_ref, atol=TOL)
        state = (await client.get(f"/v1/sessions/{sid}/state")).json()["state"]
        for name, tensor in finals.items():
            np.testing.assert_allclose(np.asarray(state[name]), tensor[:, 0], atol=TOL)

        # Bad steps: a clear 422 and the session exactly as it was.
        for bad, message in [
            ([1, 10], "out of range [0, 10)"),
            ([-1], "out of range"),
            ([1.0], "must be a token id"),
            ([True], "inputs.0"),  # refused by the schema already
            (["a", "?"], "unknown symbol '?'"),
            ([[0.0] * 10], "must be a token id"),
            ([], "empty"),
        ]:
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": bad})
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_input"
            assert message in r.json()["error"]["message"], (bad, r.json())
        after = (await client.get(f"/v1/sessions/{sid}/state")).json()
        assert after["step_count"] == 23 and after["state"] == state

        # A model without a vocabulary takes ids only.
        sid = (await client.post("/v1/models/tiny-items/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": ["a"]})
        assert r.status_code == 422 and "no vocabulary" in r.json()["error"]["message"]


# -- top-k -------------------------------------------------------------------------------------


async def test_predict_and_steps_top_k_equal_argsort(make_client, token_repo, token_ref):
    rng = np.random.default_rng(5)
    sequences = [rng.integers(0, 50, n).tolist() for n in (4, 1, 7)]
    async with make_client(model_repo=token_repo) as client:
        r = await client.post(
            "/v1/models/tiny-items/predict", json={"inputs": sequences, "top_k": 5}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert "outputs" not in body and "symbols" not in body
        for ids, answer in zip(sequences, body["top_k"]):
            assert_top_k(answer, token_ref("tiny-items").run(ids)[0], 5, None)

        r = await client.post(
            "/v1/models/tiny-items/predict",
            json={"inputs": sequences, "top_k": 3, "return_sequences": False},
        )
        for ids, answer in zip(sequences, r.json()["top_k"]):
            assert_top_k([answer], token_ref("tiny-items").run(ids)[0][-1:], 3, None)

        # labels come from the vocabulary; k above the classes lists every class
        chars = [[0, 3, 4, 9]]
        y_ref = token_ref("tiny-chars").run(chars[0])[0]
        r = await client.post("/v1/models/tiny-chars/predict", json={"inputs": chars, "top_k": 99})
        assert_top_k(r.json()["top_k"][0], y_ref, 10, TOKEN_VOCABULARY)

        sid = (await client.post("/v1/models/tiny-chars/sessions")).json()["session_id"]
        r = await client.post(
            f"/v1/sessions/{sid}/steps", json={"inputs": ["^", "c"], "top_k": 2}
        )
        assert "outputs" not in r.json() and r.json()["step_count"] == 2
        assert_top_k(r.json()["top_k"], y_ref[:2], 2, TOKEN_VOCABULARY)
        r = await client.post(
            f"/v1/sessions/{sid}/steps", json={"inputs": ["d", 9], "top_k": 1, "seq": 4}
        )
        assert_top_k(r.json()["top_k"], y_ref[2:], 1, TOKEN_VOCABULARY)
        # a retried seq replays the same answer, in top-k form too
        again = await client.post(
            f"/v1/sessions/{sid}/steps", json={"inputs": ["d", 9], "top_k": 1, "seq": 4}
        )
        assert again.json()["replayed"] and again.json()["top_k"] == r.json()["top_k"]

        # k must be an integer >= 1; a refused request changes nothing
        r = await client.post(
            "/v1/models/tiny-chars/predict", json={"inputs": chars, "top_k": 0}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        for bad in (0, -1, 2.5, "3", True):
            r = await client.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": [1], "top_k": bad}
            )
            assert r.status_code == 422, (bad, r.text)
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 4


async def test_one_hot_models_take_top_k(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    x = np.eye(7, dtype=np.float32)[[0, 1, 4, 3]]
    async with make_client(model_repo=model_repo) as client:
        r = await client.post(
            "/v1/models/tiny-gru/predict", json={"inputs": [list("BTXS")], "top_k": 3}
        )
        assert r.status_code == 200, r.text
        assert_top_k(r.json()["top_k"][0], ref.run(x)[0], 3, list("BTPSXVE"))
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [[[0.1, 0.2, 0.3]]]})
        assert "outputs" in r.json() and "top_k" not in r.json()


async def test_generation_feeds_back_ids(make_client, token_repo, token_ref):
    """Greedy generation equals stepping onnxruntime by hand on the argmax id."""
    ref = token_ref("tiny-chars")
    prime = [0, 2, 5]
    y, states = ref.run(prime)
    expected, drawn = [], []
    last = y[-1]
    for _ in range(12):
        index = int(np.argmax(last))
        drawn.append(last)
        expected.append(TOKEN_VOCABULARY[index])
        if TOKEN_VOCABULARY[index] == "$":
            break
        y, states = ref.run([index], states)
        last = y[-1]
    async with make_client(model_repo=token_repo) as client:
        sid = (await client.post("/v1/models/tiny-chars/sessions")).json()["session_id"]
        r = await client.post(
            f"/v1/sessions/{sid}/generate",
            json={"steps": 12, "temperature": 0, "prime": ["^", 2, "e"], "top_k": 3},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["generated"] == expected
        assert body["text"] == "".join(expected)
        assert body["step_count"] == len(prime) + len(expected)
        assert_top_k(body["top_k"], np.asarray(drawn), 3, TOKEN_VOCABULARY)
        # the session consumed the prime and every generated id: one more step agrees
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [1]})
        _, after = ref.run([1], ref.run(prime + [TOKEN_VOCABULARY.index(s) for s in expected])[1])
        state = (await client.get(f"/v1/sessions/{sid}/state")).json()["state"]
        for name, tensor in after.items():
            np.testing.assert_allclose(np.asarray(state[name]), tensor[:, 0], atol=TOL)

        # from the start symbol alone
        sid = (await client.post("/v1/models/tiny-chars/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3, "seed": 1})
        assert r.status_code == 200 and r.json()["step_count"] == 1 + len(r.json()["generated"])


# -- a real server: WebSocket and v2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(token_repo, tmp_path_factory):
    from tests.conftest import free_port, start_server

    port = free_port()
    server = start_server(
        token_repo, tmp_path_factory.mktemp("token-server"), {"RNNSERVE_GRPC_PORT": str(port)}
    )
    server.grpc = f"127.0.0.1:{port}"
    yield server
    server.stop()


def test_websocket_ids_and_top_k_json_and_binary(token_server, token_ref):
    from websockets.sync.client import connect

    from service.frames import (
        FrameError,
        decode_response,
        decode_top_k_response,
        encode_request,
    )

    ref = token_ref("tiny-items")
    ids = np.random.default_rng(8).integers(0, 50, 12)
    y_ref, _ = ref.run(ids)
    with connect(token_server.ws_url + "/v1/models/tiny-items/stream", open_timeout=10) as ws:
        json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"inputs": ids[:3].tolist(), "top_k": 4}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer["step_count"] == 3 and "outputs" not in answer
        assert_top_k(answer["top_k"], y_ref[:3], 4, None)

        ws.send(encode_request(ids[3:7], seq=7, top_k=6))  # ids as uint32, top-k asked
        frame = ws.recv(timeout=10)
        assert len(frame) == 20 + 4 * 6 * 2 * 4  # header + 4 steps x 6 (index u32, score f32)
        indices, scores, count, replayed = decode_top_k_response(frame)
        assert count == 7 and not replayed
        expected_i, expected_s = best(y_ref[3:7], 6)
        np.testing.assert_array_equal(indices, expected_i)
        np.testing.assert_allclose(scores, expected_s, atol=TOL)
        with pytest.raises(FrameError):
            decode_response(frame)

        ws.send(encode_request(ids[7:], seq=12))  # ids, every output
        y, count, _ = decode_response(ws.recv(timeout=10))
        assert count == 12
        np.testing.assert_allclose(y, y_ref[7:], atol=TOL)

        # errors: an error frame, the stream stays open, the session unchanged
        for message in (
            json.dumps({"inputs": [1], "top_k": 0}),
            json.dumps({"inputs": [50]}),
            encode_request(np.zeros((1, 50), np.float32)),  # one-hot values to a token model
            encode_request(np.array([50])),
            encode_request(np.array([1]), top_k=0),
        ):
            ws.send(message)
            error = json.loads(ws.recv(timeout=10))
            assert error["error"]["code"] == "invalid_input", error
        ws.send(json.dumps({"inputs": [int(ids[0])], "top_k": 1}))
        assert json.loads(ws.recv(timeout=10))["step_count"] == 13


def test_v2_int64_ids_and_classification(token_server, token_ref):
    import httpx
    import tritonclient.http as httpclient

    rng = np.random.default_rng(9)
    x = rng.integers(0, 10, (3, 5)).astype(np.int64)
    lengths = np.array([5, 2, 4], np.int32)
    ref = token_ref("tiny-chars")
    y_rows = [ref.run(row[:n])[0] for row, n in zip(x, lengths)]

    meta = httpx.get(f"{token_server.url}/v2/models/tiny-chars", timeout=10).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "INT64", "shape": [-1, -1]}]
    config = httpx.get(f"{token_server.url}/v2/models/tiny-chars/config", timeout=10).json()
    assert config["input"][0] == {"name": "x", "data_type": "TYPE_INT64", "dims": [-1, -1]}

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{token_server.port}")
    try:
        for binary in (True, False):
            x_in = httpclient.InferInput("x", list(x.shape), "INT64")
            x_in.set_data_from_numpy(x, binary_data=binary)
            len_in = httpclient.InferInput("lengths", [3], "INT32")
            len_in.set_data_from_numpy(lengths, binary_data=binary)
            # every output, padded steps zero
            result = client.infer("tiny-chars", [x_in, len_in])
            y = result.as_numpy("y")
            for row, n in enumerate(lengths):
                np.testing.assert_allclose(y[row, :n], y_rows[row], atol=TOL)
                assert not y[row, n:].any()
            # the classification extension: the best k of each sequence's last step
            out = httpclient.InferRequestedOutput("y", binary_data=binary, class_count=3)
            result = client.infer("tiny-chars", [x_in, len_in], outputs=[out])
            classes = result.as_numpy("y")
            assert classes.shape == (3, 3)
            for row, n in enumerate(lengths):
                indices, scores = best(y_rows[row][n - 1], 3)
                parsed = [
                    (c.decode() if isinstance(c, bytes) else c).split(":") for c in classes[row]
                ]
                assert [int(p[1]) for p in parsed] == indices.tolist()
                np.testing.assert_allclose([float(p[0]) for p in parsed], scores, atol=TOL)
                assert [p[2] for p in parsed] == [TOKEN_VOCABULARY[i] for i in indices]

        # a Triton sequence of ids, classified step by step (no labels on tiny-items)
        ids = rng.integers(0, 50, 6).astype(np.int64)
        y_items = token_ref("tiny-items").run(ids)[0]
        for t in range(6):
            x_in = httpclient.InferInput("x", [1, 1], "INT64")
            x_in.set_data_from_numpy(ids[None, t : t + 1])
            out = httpclient.InferRequestedOutput("y", class_count=5)
            result = client.infer(
                "tiny-items",
                [x_in],
                outputs=[out],
                sequence_id=77,
                sequence_start=t == 0,
                sequence_end=t == 5,
            )
            parsed = [c.decode().split(":") for c in result.as_numpy("y")[0]]
            assert all(len(p) == 2 for p in parsed)
            assert [int(p[1]) for p in parsed] == best(y_items[t], 5)[0].tolist()

        # k above the classes is clamped: every class, best first
        r = httpx.post(
            f"{token_server.url}/v2/models/tiny-chars/infer",
            json={
                "inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 2], "data": [0, 4]}],
                "outputs": [{"name": "y", "parameters": {"classification": 99}}],
            },
            timeout=10,
        )
        (out,) = r.json()["outputs"]
        assert out["datatype"] == "BYTES" and out["shape"] == [1, 10]
        expected = best(ref.run([0, 4])[0][-1], 10)[0]
        assert [int(c.split(":")[1]) for c in out["data"]] == expected.tolist()

        # floats for a token model, out-of-range ids: 400, nothing run
        for tensor in (
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]},
            {"name": "x", "datatype": "INT64", "shape": [1, 2, 1], "data": [1, 2]},
            {"name": "x", "datatype": "INT64", "shape": [1, 2], "data": [1, 10]},
        ):
            r = httpx.post(
                f"{token_server.url}/v2/models/tiny-chars/infer", json={"inputs": [tensor]}, timeout=10
            )
            assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text
    finally:
        client.close()


def test_grpc_int64_ids_and_class_count(token_server, token_ref):
    """The same classification through tritonclient.grpc (shares the v2 data plane)."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(10).integers(0, 50, (2, 4)).astype(np.int64)
    client = grpcclient.InferenceServerClient(token_server.grpc)
    try:
        meta = client.get_model_metadata("tiny-items", as_json=True)
        assert meta["inputs"][0]["datatype"] == "INT64"
        x_in = grpcclient.InferInput("x", list(x.shape), "INT64")
        x_in.set_data_from_numpy(x)
        out = grpcclient.InferRequestedOutput("y", class_count=7)
        classes = client.infer("tiny-items", [x_in], outputs=[out]).as_numpy("y")
        assert classes.shape == (2, 7)
        for row in range(2):
            expected = best(token_ref("tiny-items").run(x[row])[0][-1], 7)[0]
            assert [int(c.decode().split(":")[1]) for c in classes[row]] == expected.tolist()
        y = client.infer("tiny-items", [x_in]).as_numpy("y")
        np.testing.assert_allclose(y[1], token_ref("tiny-items").run(x[1])[0], atol=TOL)
    finally:
        client.close()


def test_python_client_ids_symbols_and_top_k(token_server, token_ref):
    """service.client: ids and symbols over REST and streams (binary frames carry ids)."""
    import asyncio

    from service.client import AsyncClient, Client

    ref = token_ref("tiny-chars")
    word = list("^abcd$ba")
    ids = [TOKEN_VOCABULARY.index(c) for c in word]
    y_ref, _ = ref.run(ids)
    with Client(token_server.url) as client:
        prediction = client.predict("tiny-chars", [word], top_k=3)
        assert prediction.outputs is None
        assert_top_k(prediction.top_k[0], y_ref, 3, TOKEN_VOCABULARY)

        session = client.open_session("tiny-chars")
        first = session.step(word[:3])
        np.testing.assert_allclose(first.outputs, y_ref[:3], atol=TOL)
        second = session.step(ids[3:], top_k=2)
        assert second.outputs is None and second.step_count == len(word)
        assert_top_k(second.top_k, y_ref[3:], 2, TOKEN_VOCABULARY)
        generated = session.generate(2, temperature=0, top_k=1)
        assert len(generated.top_k) == len(generated.generated)
        assert generated.top_k[0][0]["label"] == generated.generated[0]

        for binary in (False, True):
            with client.stream("tiny-chars", binary=binary) as stream:
                a = stream.step(word[:5])  # symbols: ids in binary frames
                b = stream.step(np.asarray(ids[5:]))  # an integer array: ids
            np.testing.assert_allclose(np.concatenate([a.outputs, b.outputs]), y_ref, atol=TOL)
            with client.stream("tiny-chars", binary=binary, top_k=4) as stream:
                answers = [stream.step(ids[:2]), stream.step(word[2:])]
            assert answers[1].step_count == len(word)
            top = answers[0].top_k + answers[1].top_k
            labels = None if binary else TOKEN_VOCABULARY  # binary answers carry no labels
            assert_top_k(top, y_ref, 4, labels)

    async def run_async():
        async with AsyncClient(token_server.url) as client:
            step = await (await client.open_session("tiny-items")).step([3, 1, 4], top_k=5)
            assert_top_k(step.top_k, token_ref("tiny-items").run([3, 1, 4])[0], 5, None)
            async with client.stream("tiny-items", binary=True, top_k=5) as stream:
                answer = await stream.step([3, 1, 4])
            assert_top_k(answer.top_k, token_ref("tiny-items").run([3, 1, 4])[0], 5, None)

    asyncio.run(run_async())
