"""Triton sequence control is atomic: START (reset + its steps) and END (its steps + release)
are each one engine operation under the session's lock, and a rejected request changes
nothing. Each test reproduces a defect of issue #9 items 1 and 2.

A long ``generate`` keeps the sequence busy so that the requests under test queue behind
it in the order they were sent (0.1 s apart), as they would against a loaded server.
"""

from __future__ import annotations

import asyncio

import numpy as np

from service.engine import Engine

URL = "/v2/models/tiny-rnn/infer"
X = np.array([[[0.5]], [[-0.25]], [[1.0]]], np.float32)  # three one-step requests
BUSY_STEPS = 200_000  # far more than the test waits for: generate is cancelled once used
SETTINGS = {"max_generate_steps": BUSY_STEPS}


def body(x: np.ndarray, seq_id: int = 88, **parameters) -> dict:
    """A one-sequence v2 request; ``x`` is [time, features] (or already [1, time, features])."""
    x = x if x.ndim == 3 else x[None]
    return {
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}],
        "parameters": {"sequence_id": seq_id, **parameters},
    }


def y_of(response) -> np.ndarray:
    (out,) = response.json()["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


async def _busy(client, *requests: dict) -> tuple[list, object]:
    """START the sequence, keep it busy with a long generate, then send ``requests``
    0.1 s apart, concurrently; every one must have been sent while generate still ran."""
    started = await client.post(URL, json=body(X[0], sequence_start=True))
    assert started.status_code == 200, started.text
    session_id = Engine.sequence_session_id(None, "tiny-rnn", 88)
    generate = asyncio.ensure_future(
        client.post(f"/v1/sessions/{session_id}/generate", json={"steps": BUSY_STEPS})
    )
    await asyncio.sleep(0.05)

    async def later(k: int, request: dict):
        await asyncio.sleep(0.1 * k)
        return await client.post(URL, json=request)

    tasks = [asyncio.ensure_future(later(k, r)) for k, r in enumerate(requests)]
    await asyncio.sleep(0.1 * len(requests) + 0.05)
    assert not generate.done(), "generate finished too soon to keep the sequence busy"
    assert not any(task.done() for task in tasks), "a request did not wait for its turn"
    generate.cancel()  # an abandoned generate commits nothing and gives the turn on
    return await asyncio.gather(*tasks), session_id


async def test_end_then_start_leaves_the_new_sequence(make_client, model_repo, reference):
    zero = reference("tiny-rnn").run(X[1])[0]
    async with make_client(model_repo=model_repo, **SETTINGS) as client:
        (end, start), _ = await _busy(
            client, body(X[0], sequence_end=True), body(X[1], sequence_start=True)
        )
        assert end.status_code == 200, end.text
        assert end.json()["parameters"]["sequence_end"] is True
        assert start.status_code == 200, start.text
        assert start.json()["parameters"]["step_count"] == 1
        np.testing.assert_allclose(y_of(start)[0], zero, atol=1e-5)
        after = await client.post(URL, json=body(X[2]))
        assert after.status_code == 200, after.text
        assert after.json()["parameters"]["step_count"] == 2


async def test_request_behind_an_end_must_start_again(make_client, model_repo):
    async with make_client(model_repo=model_repo, **SETTINGS) as client:
        (end, plain), session_id = await _busy(
            client, body(X[0], sequence_end=True), body(X[1])
        )
        assert end.status_code == 200, end.text
        assert plain.status_code == 400 and "START" in plain.json()["error"]
        assert (await client.get(f"/v1/sessions/{session_id}")).status_code == 404


async def test_start_is_applied_before_a_request_sent_after_it(make_client, model_repo, reference):
    ref = reference("tiny-rnn")
    expected = ref.run(X[1:, 0])[0]
    async with make_client(model_repo=model_repo, **SETTINGS) as client:
        (start, plain), _ = await _busy(client, body(X[1], sequence_start=True), body(X[2]))
        assert start.json()["parameters"]["step_count"] == 1
        np.testing.assert_allclose(y_of(start)[0, 0], expected[0], atol=1e-5)
        assert plain.json()["parameters"]["step_count"] == 2
        np.testing.assert_allclose(y_of(plain)[0, 0], expected[1], atol=1e-5)


async def test_concurrent_starts_each_start_from_zero(make_client, model_repo, reference):
    zero = reference("tiny-rnn").run(X[0])[0]
    async with make_client(model_repo=model_repo, **SETTINGS) as client:
        answers, _ = await _busy(client, *[body(X[0], sequence_start=True)] * 10)
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["parameters"]["step_count"] == 1
            np.testing.assert_allclose(y_of(answer)[0], zero, atol=1e-5)


async def test_rejected_requests_leave_the_sequence_as_it_was(make_client, model_repo, reference):
    ref = reference("tiny-rnn")
    steps = np.array([0.5, -0.25, 1.0, 0.75, 0.1], np.float32)[:, None]
    expected = ref.run(steps)[0]
    session_id = Engine.sequence_session_id(None, "tiny-rnn", 88)
    async with make_client(model_repo=model_repo) as client:
        for t in range(4):
            flags = {"sequence_start": True} if t == 0 else {}
            r = await client.post(URL, json=body(steps[t : t + 1], **flags))
            assert r.status_code == 200, r.text
        rejected = [
            body(steps[4:5], sequence_start=True, seq=99),  # issue #9 item 2
            body(steps[4:5], seq=99),
            body(steps[4:5], sequence_end=True, seq=99),
            body(np.ones((1, 1, 2), np.float32), sequence_start=True),  # wrong input size
            body(np.ones((1, 1, 2), np.float32), sequence_end=True),
        ]
        for request in rejected:
            r = await client.post(URL, json=request)
            assert r.status_code in (400, 409), r.text
            info = (await client.get(f"/v1/sessions/{session_id}")).json()
            assert info["step_count"] == 4, request
        last = await client.post(URL, json=body(steps[4:5], seq=5, sequence_end=True))
        assert last.status_code == 200, last.text
        np.testing.assert_allclose(y_of(last)[0, 0], expected[4], atol=1e-5)


async def test_start_and_end_together_leave_nothing(make_client, model_repo, reference):
    zero = reference("tiny-rnn").run(X[0])[0]
    session_id = Engine.sequence_session_id(None, "tiny-rnn", 5)
    async with make_client(model_repo=model_repo) as client:
        for _ in range(2):  # on an unknown id, then over a live one
            r = await client.post(URL, json=body(X[0], 5, sequence_start=True, sequence_end=True))
            assert r.status_code == 200, r.text
            assert r.json()["parameters"]["step_count"] == 1
            np.testing.assert_allclose(y_of(r)[0], zero, atol=1e-5)
            assert (await client.get(f"/v1/sessions/{session_id}")).status_code == 404
            await client.post(URL, json=body(X[1], 5, sequence_start=True))
