"""REST batch predict against the independent onnxruntime reference.

Every expectation comes from ``reference(name)`` (plain onnxruntime, one sequence at a
time, none of the service's code), never from the service itself.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

TOL = 1e-5


def _row_state(ref, finals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's batched final states with the batch axis removed (the API's shape)."""
    return {
        s["input"]: np.take(finals[s["input"]], 0, axis=s["shape"].index(None))
        for s in ref.card["states"]
    }


def _batched_state(ref, row: dict[str, list]) -> dict[str, np.ndarray]:
    """An API state payload (no batch axis) as the reference's batch-of-one tensors."""
    return {
        s["input"]: np.expand_dims(np.asarray(row[s["input"]], np.float32), s["shape"].index(None))
        for s in ref.card["states"]
    }


def _sequences(rng: np.random.Generator, size: int, lengths: list[int]) -> list[np.ndarray]:
    return [rng.normal(size=(n, size)).astype(np.float32) for n in lengths]


SIZES = {"tiny-lstm": 3, "nolengths-lstm": 3, "tiny-rnn": 1, "tiny-gru": 7, "tiny-relu": 2}


@pytest.mark.parametrize("name", list(SIZES))
async def test_variable_length_batch_equals_each_sequence_alone(
    make_client, model_repo, reference, name
):
    ref = reference(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    xs = _sequences(rng, SIZES[name], [5, 1, 12, 5, 3, 9])
    async with make_client(model_repo=model_repo) as client:
        r = await client.post(
            f"/v1/models/{name}/predict",
            json={"inputs": [x.tolist() for x in xs], "return_states": True},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == name and body["version"] == 1
    assert len(body["outputs"]) == len(xs) == len(body["states"])
    for x, out, state in zip(xs, body["outputs"], body["states"]):
        y, finals = ref.run(x)
        np.testing.assert_allclose(np.asarray(out), y, atol=TOL)
        for k, v in _row_state(ref, finals).items():
            np.testing.assert_allclose(np.asarray(state[k]), v, atol=TOL)


async def test_return_sequences_false_gives_the_last_step(make_client, model_repo, reference):
    ref = reference("tiny-lstm")
    xs = _sequences(np.random.default_rng(1), 3, [4, 1, 7])
    async with make_client(model_repo=model_repo) as client:
        r = await client.post(
            "/v1/models/tiny-lstm/predict",
            json={"inputs": [x.tolist() for x in xs], "return_sequences": False},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert "states" not in body or body["states"] is None
    for x, out in zip(xs, body["outputs"]):
        assert np.asarray(out).shape == (2,)
        np.testing.assert_allclose(np.asarray(out), ref.run(x)[0][-1], atol=TOL)


@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm", "tiny-gru"])
async def test_initial_states_are_honoured(make_client, model_repo, reference, name):
    ref = reference(name)
    rng = np.random.default_rng(7)
    xs = _sequences(rng, SIZES[name], [3, 6])
    states = [
        {
            s["input"]: rng.normal(size=[d for d in s["shape"] if d is not None]).tolist()
            for s in ref.card["states"]
        }
        for _ in xs
    ]
    async with make_client(model_repo=model_repo) as client:
        r = await client.post(
            f"/v1/models/{name}/predict",
            json={
                "inputs": [x.tolist() for x in xs],
                "initial_states": states,
                "return_states": True,
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    for x, s0, out, final in zip(xs, states, body["outputs"], body["states"]):
        y, finals = ref.run(x, _batched_state(ref, s0))
        np.testing.assert_allclose(np.asarray(out), y, atol=TOL)
        # and the initial state really mattered
        assert not np.allclose(np.asarray(out), ref.run(x)[0], atol=1e-3)
        for k, v in _row_state(ref, finals).items():
            np.testing.assert_allclose(np.asarray(final[k]), v, atol=TOL)


async def test_initial_states_count_must_match(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    state = {"h0": np.zeros((1, 12)).tolist()}
    async with make_client(model_repo=model_repo) as client:
        r = await client.post(
            "/v1/models/tiny-gru/predict",
            json={"inputs": [["B", "T"], ["B"]], "initial_states": [state]},
        )
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "invalid_input"
        bad_shape = {"h0": np.zeros((2, 12)).tolist()}
        r = await client.post(
            "/v1/models/tiny-gru/predict", json={"inputs": [["B"]], "initial_states": [bad_shape]}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert ref.card["states"][0]["input"] == "h0"


async def test_symbols_in_and_out_for_a_vocabulary_model(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    vocab = list("BTPSXVE")
    strings = ["BTSSXXTVVE", "BP", "BTXSE"]

    def one_hot(s: str) -> np.ndarray:
        return np.eye(7, dtype=np.float32)[[vocab.index(c) for c in s]]

    async with make_client(model_repo=model_repo) as client:
        r = await client.post(
            "/v1/models/tiny-gru/predict", json={"inputs": [list(s) for s in strings]}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        last = await client.post(
            "/v1/models/tiny-gru/predict",
            json={"inputs": [list(s) for s in strings], "return_sequences": False},
        )
        assert last.status_code == 200
        # one-hot numbers mean the same as symbols
        numeric = await client.post(
            "/v1/models/tiny-gru/predict", json={"inputs": [one_hot(s).tolist() for s in strings]}
        )
        assert numeric.status_code == 200
    for s, out, symbols, last_out, last_symbol, num_out in zip(
        strings,
        body["outputs"],
        body["symbols"],
        last.json()["outputs"],
        last.json()["symbols"],
        numeric.json()["outputs"],
    ):
        y, _ = ref.run(one_hot(s))
        np.testing.assert_allclose(np.asarray(out), y, atol=TOL)
        np.testing.assert_allclose(np.asarray(num_out), y, atol=TOL)
        np.testing.assert_allclose(np.asarray(out).sum(axis=-1), 1.0, atol=1e-5)
        assert symbols == [vocab[i] for i in y.argmax(axis=-1)]
        np.testing.assert_allclose(np.asarray(last_out), y[-1], atol=TOL)
        assert last_symbol == vocab[int(y[-1].argmax())]


async def test_unknown_symbol_and_symbols_for_a_numeric_model(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        r = await client.post("/v1/models/tiny-gru/predict", json={"inputs": [["B", "Q"]]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        assert "Q" in r.json()["error"]["message"]
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [["B"]]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


async def test_univariate_series_may_be_sent_flat(make_client, model_repo, reference):
    x = np.linspace(-1, 1, 9, dtype=np.float32)[:, None]
    async with make_client(model_repo=model_repo) as client:
        r = await client.post("/v1/models/tiny-rnn/predict", json={"inputs": [x[:, 0].tolist()]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        np.asarray(r.json()["outputs"][0]), reference("tiny-rnn").run(x)[0], atol=TOL
    )


async def test_version_routes(make_client, repo_copy, model_repo, reference):
    import shutil

    shutil.copytree(repo_copy / "tiny-relu" / "1", repo_copy / "tiny-relu" / "3")
    import json

    card_path = repo_copy / "tiny-relu" / "3" / "card.json"
    card = json.loads(card_path.read_text())
    card["version"] = 3
    card_path.write_text(json.dumps(card))
    x = np.random.default_rng(3).normal(size=(4, 2)).astype(np.float32)
    async with make_client(model_repo=repo_copy) as client:
        for path, version in [
            ("/v1/models/tiny-relu/versions/1/predict", 1),
            ("/v1/models/tiny-relu/versions/3/predict", 3),
            ("/v1/models/tiny-relu/predict", 3),
        ]:
            r = await client.post(path, json={"inputs": [x.tolist()]})
            assert r.status_code == 200, r.text
            assert r.json()["version"] == version
            np.testing.assert_allclose(
                np.asarray(r.json()["outputs"][0]), reference("tiny-relu").run(x)[0], atol=TOL
            )
        r = await client.post(
            "/v1/models/tiny-relu/versions/2/predict", json={"inputs": [x.tolist()]}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await client.post("/v1/models/nope/predict", json={"inputs": [x.tolist()]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        info = (await client.get("/v1/models/tiny-relu")).json()
        assert info["default_version"] == 3
        assert [v["version"] for v in info["versions"]] == [1, 3]
        assert all(v["ready"] for v in info["versions"])
    assert model_repo != repo_copy


async def test_model_listing(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        r = await client.get("/v1/models")
    assert r.status_code == 200
    names = {m["name"] for m in r.json()["models"]}
    assert names == set(SIZES)
    for m in r.json()["models"]:
        card = m["versions"][0]["card"]
        assert card["input_size"] == SIZES[m["name"]]


async def test_predict_limits(make_client, model_repo):
    x = [[0.0, 0.0, 0.0]] * 3
    async with make_client(
        model_repo=model_repo,
        max_batch_sequences=2,
        max_total_steps_per_predict=5,
        max_steps_per_request=4,
    ) as client:
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [x, x, x]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [x, x]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [x * 2]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "sequence_too_long"
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": []})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [[]]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [x[:2]]})
        assert r.status_code == 200
