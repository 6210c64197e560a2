"""One-to-many generation through the API, checked against a reference loop over plain
onnxruntime, and the demo Reber model's generated strings against the grammar."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-5
DEMO = Path(__file__).resolve().parents[2] / "models"
VOCAB = list("BTPSXVE")


def _flat_state(ref, finals):
    return {
        s["input"]: np.take(finals[s["input"]], 0, axis=s["shape"].index(None))
        for s in ref.card["states"]
    }


async def test_value_generation_feeds_outputs_back(make_client, model_repo, reference):
    ref = reference("tiny-rnn")
    prime = np.array([[0.3], [-0.2], [0.5]], np.float32)
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-rnn/sessions")).json()["session_id"]
        r = await client.post(
            f"/v1/sessions/{sid}/generate", json={"steps": 6, "prime": prime.tolist()}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        exported = (await client.get(f"/v1/sessions/{sid}/state")).json()
        # the session continues right after the last generated value
        after = (await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1]]})).json()
    assert body["step_count"] == 3 + 6 == exported["step_count"]
    assert "text" not in body
    generated = np.asarray(body["generated"], np.float32)
    assert generated.shape == (6, 1)
    # reference loop: prime, then feed each output back one step at a time
    y, states = ref.run(prime)
    expected = []
    for _ in range(6):
        expected.append(y[-1])
        y, states = ref.run(y[-1:], states)
    np.testing.assert_allclose(generated, np.asarray(expected), atol=TOL)
    for k, v in _flat_state(ref, states).items():
        np.testing.assert_allclose(np.asarray(exported["state"][k]), v, atol=TOL)
    y_after, _ = ref.run(np.array([[0.1]], np.float32), states)
    np.testing.assert_allclose(np.asarray(after["outputs"]), y_after, atol=TOL)
    assert after["step_count"] == 10


async def test_value_generation_needs_a_prime(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-rnn/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 0


async def test_symbol_generation_greedy_matches_the_reference(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-gru/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 15, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
    eye = np.eye(7, dtype=np.float32)
    y, states = ref.run(eye[[0]])  # the start symbol B
    expected = []
    fed = 1
    while len(expected) < 15:
        symbol = VOCAB[int(np.argmax(y[-1]))]
        expected.append(symbol)
        y, states = ref.run(eye[[VOCAB.index(symbol)]], states)
        fed += 1
        if symbol == "E":
            break
    assert body["generated"] == expected
    assert body["text"] == "".join(expected)
    assert body["step_count"] == fed


async def test_symbol_generation_samples_from_the_vocabulary(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        runs = []
        for _ in range(2):
            sid = (await client.post("/v1/models/tiny-gru/sessions")).json()["session_id"]
            r = await client.post(
                f"/v1/sessions/{sid}/generate",
                json={"steps": 30, "temperature": 1.5, "seed": 42, "prime": ["B", "T"]},
            )
            assert r.status_code == 200, r.text
            runs.append(r.json())
            info = (await client.get(f"/v1/sessions/{sid}")).json()
            assert info["step_count"] == r.json()["step_count"] == 2 + len(r.json()["generated"])
    for body in runs:
        assert 1 <= len(body["generated"]) <= 30
        assert set(body["generated"]) <= set(VOCAB)
        assert body["text"] == "".join(body["generated"])
    assert runs[0]["generated"] == runs[1]["generated"]  # same seed, same state: same sample


@pytest.mark.parametrize("name", ["tiny-lstm", "tiny-relu", "nolengths-lstm"])
async def test_model_without_generation_is_not_supported(make_client, model_repo, name):
    size = {"tiny-lstm": 3, "tiny-relu": 2, "nolengths-lstm": 3}[name]
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post(f"/v1/models/{name}/sessions")).json()["session_id"]
        r = await client.post(
            f"/v1/sessions/{sid}/generate", json={"steps": 3, "prime": [[0.0] * size]}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "not_supported"
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 0


def _acceptor():
    try:
        from training.reber import accepts

        return accepts
    except ImportError:  # pragma: no cover - a minimal embedded-Reber acceptor
        moves = {
            0: {"T": 1, "P": 2},
            1: {"S": 1, "X": 3},
            2: {"T": 2, "V": 4},
            3: {"X": 2, "S": 5},
            4: {"P": 3, "V": 5},
        }

        def accepts(s: str) -> bool:
            if len(s) < 6 or s[0] != "B" or s[-1] != "E" or s[1] not in "TP" or s[-2] != s[1]:
                return False
            inner = s[2:-2]
            if len(inner) < 2 or inner[0] != "B" or inner[-1] != "E":
                return False
            state = 0
            for c in inner[1:-1]:
                if c not in moves.get(state, {}):
                    return False
                state = moves[state][c]
            return state == 5

        return accepts


@pytest.mark.skipif(
    not (DEMO / "reber-gru" / "1" / "model.onnx").exists(), reason="no demo reber-gru model"
)
async def test_reber_strings_generated_through_the_api_follow_the_grammar(make_client):
    card = json.loads((DEMO / "reber-gru" / "1" / "card.json").read_text())
    floor = card["metrics"]["generated_valid_fraction"] - 0.05
    accepts = _acceptor()
    n = 200
    async with make_client(model_repo=DEMO, batch_max_size=64) as client:

        async def one(i: int) -> str:
            r = await client.post("/v1/models/reber-gru/sessions")
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 99, "seed": i})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["step_count"] == 1 + len(body["generated"])
            assert set(body["generated"]) <= set(VOCAB)
            await client.delete(f"/v1/sessions/{sid}")
            return "B" + body["text"]

        strings = []
        for start in range(0, n, 50):
            strings += await asyncio.gather(*(one(i) for i in range(start, start + 50)))
    valid = sum(map(accepts, strings)) / n
    assert valid >= floor, (valid, floor, [s for s in strings if not accepts(s)][:10])


@pytest.mark.skipif(
    not (DEMO / "reber-gru" / "1" / "model.onnx").exists(), reason="no demo reber-gru model"
)
async def test_balanced_stop_counts_the_start_symbols_of_the_prime(make_client):
    """``generation.stop == balanced``: the inner E does not end a string the prime opened twice."""
    accepts = _acceptor()
    async with make_client(model_repo=DEMO) as client:
        texts = []
        for i in range(20):
            sid = (await client.post("/v1/models/reber-gru/sessions")).json()["session_id"]
            r = await client.post(
                f"/v1/sessions/{sid}/generate", json={"steps": 96, "seed": i, "prime": list("BPBT")}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["step_count"] == 4 + len(body["generated"])
            texts.append("BPBT" + body["text"])
    for text in texts:
        if len(text) < 100:  # stopped by the end symbol, not the step limit
            assert text.endswith("E") and text.count("E") == text.count("B") == 2, text
    assert sum(map(accepts, texts)) >= 17


async def test_value_generation_continues_from_the_last_answer(make_client, model_repo, reference):
    """Stream observations, then forecast ahead without a prime: the forecast starts from
    the model's last prediction and feeds each forecast back (checked step by step against
    onnxruntime directly)."""
    ref = reference("tiny-rnn")
    observed = np.array([[0.1], [0.5], [-0.3], [0.8]], np.float32)
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-rnn/sessions")).json()["session_id"]
        await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": observed[:2].tolist()})
        await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": observed[2:].tolist(), "seq": 4})
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        again = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 2})
    y, states = ref.run(observed)
    expected, last = [], y[-1]
    for _ in range(7):
        expected.append(last.copy())
        y, states = ref.run(last.reshape(1, 1), states)
        last = y[-1]
    assert body["step_count"] == 4 + 5
    assert np.allclose(np.array(body["generated"]), np.array(expected[:5]), atol=1e-5)
    assert np.allclose(np.array(again.json()["generated"]), np.array(expected[5:]), atol=1e-5)


async def test_value_generation_on_a_fresh_session_needs_a_prime(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-rnn/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        assert "prime" in r.json()["error"]["message"]
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 0


async def test_greedy_symbol_generation_continues_mid_string(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    vocab = list("BTPSXVE")
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-gru/sessions")).json()["session_id"]
        await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": list("BTS")})
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 6, "temperature": 0})
        assert r.status_code == 200, r.text
    eye = np.eye(7, dtype=np.float32)
    y, states = ref.run(eye[[vocab.index(c) for c in "BTS"]])
    expected = []
    for _ in range(len(r.json()["generated"])):
        symbol = int(np.argmax(y[-1]))
        expected.append(vocab[symbol])
        y, states = ref.run(eye[[symbol]], states)
    assert r.json()["generated"] == expected
