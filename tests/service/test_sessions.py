"""Sessions over REST: chunking invariance, state export/import, reset, delete, TTL, limits,
``seq`` exactly-once and ordering of concurrent requests, all checked against the
independent onnxruntime reference."""

from __future__ import annotations

import asyncio
import itertools
import random
from datetime import datetime

import numpy as np
import pytest

TOL = 1e-5
SIZES = {"tiny-lstm": 3, "nolengths-lstm": 3, "tiny-rnn": 1, "tiny-gru": 7, "tiny-relu": 2}


def _row_state(ref, finals):
    return {
        s["input"]: np.take(finals[s["input"]], 0, axis=s["shape"].index(None))
        for s in ref.card["states"]
    }


def _batched_state(ref, row):
    return {
        s["input"]: np.expand_dims(np.asarray(row[s["input"]], np.float32), s["shape"].index(None))
        for s in ref.card["states"]
    }


def _assert_state(ref, exported: dict, finals: dict) -> None:
    expected = _row_state(ref, finals)
    assert set(exported) == set(expected)
    for k, v in expected.items():
        np.testing.assert_allclose(np.asarray(exported[k]), v, atol=TOL)


async def _new(client, name: str, **body) -> str:
    r = await client.post(f"/v1/models/{name}/sessions", json=body or None)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


async def _step(client, sid: str, x, seq=None):
    body = {"inputs": np.asarray(x).tolist()}
    if seq is not None:
        body["seq"] = seq
    r = await client.post(f"/v1/sessions/{sid}/steps", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def _state(client, sid: str) -> dict:
    r = await client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("name", ["tiny-lstm", "nolengths-lstm", "tiny-gru", "tiny-rnn"])
async def test_chunks_of_1_7_and_the_rest_equal_the_whole(make_client, model_repo, reference, name):
    ref = reference(name)
    x = np.random.default_rng(11).normal(size=(30, SIZES[name])).astype(np.float32)
    y_ref, finals = ref.run(x)
    async with make_client(model_repo=model_repo) as client:
        sid = await _new(client, name)
        outs = []
        for a, b in [(0, 1), (1, 8), (8, 30)]:
            body = await _step(client, sid, x[a:b])
            assert body["step_count"] == b
            assert "replayed" not in body
            outs.extend(body["outputs"])
        exported = await _state(client, sid)
    np.testing.assert_allclose(np.asarray(outs), y_ref, atol=TOL)
    assert exported["step_count"] == 30 and exported["model"] == name and exported["version"] == 1
    _assert_state(ref, exported["state"], finals)


async def test_export_import_then_continue_equals_continuing_the_original(
    make_client, model_repo, reference
):
    ref = reference("tiny-lstm")
    rng = np.random.default_rng(5)
    x1, x2 = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(9, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo) as client:
        original = await _new(client, "tiny-lstm")
        await _step(client, original, x1)
        exported = (await _state(client, original))["state"]
        clone = await _new(client, "tiny-lstm", state=exported)
        info = (await client.get(f"/v1/sessions/{clone}")).json()
        assert info["step_count"] == 0 and info["model"] == "tiny-lstm"
        a = await _step(client, original, x2)
        b = await _step(client, clone, x2)
        sa, sb = (await _state(client, original))["state"], (await _state(client, clone))["state"]
    y_ref, finals = ref.run(np.concatenate([x1, x2]))
    np.testing.assert_allclose(np.asarray(a["outputs"]), y_ref[6:], atol=TOL)
    np.testing.assert_allclose(np.asarray(b["outputs"]), y_ref[6:], atol=TOL)
    _assert_state(ref, sa, finals)
    _assert_state(ref, sb, finals)
    # and the import path agrees with the reference started from the exported state
    y2, _ = ref.run(x2, _batched_state(ref, exported))
    np.testing.assert_allclose(np.asarray(b["outputs"]), y2, atol=TOL)


async def test_import_rejects_bad_states_and_creates_nothing(make_client, model_repo):
    async with make_client(model_repo=model_repo, max_sessions=1) as client:
        for state in [
            {"h0": np.zeros((2, 16)).tolist()},  # c0 missing
            {"h0": np.zeros((2, 16)).tolist(), "c0": np.zeros((2, 15)).tolist()},
            {"h0": np.zeros((2, 16)).tolist(), "c0": [["x"] * 16] * 2},
            {"h0": np.zeros((2, 16)).tolist(), "c0": np.zeros((2, 16)).tolist(), "extra": 1},
            "not an object",
        ]:
            r = await client.post("/v1/models/tiny-lstm/sessions", json={"state": state})
            assert r.status_code == 422, (state, r.text)
            assert r.json()["error"]["code"] == "invalid_input"
        nan_body = b'{"state": {"h0": [[NaN' + b", 0" * 15 + b"]" + b", [" + b"0, " * 15 + b"0]]"
        nan_body += b', "c0": ' + str(np.zeros((2, 16)).tolist()).encode() + b"}}"
        r = await client.post(
            "/v1/models/tiny-lstm/sessions",
            content=nan_body,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422, r.text
        # none of the refused requests used up the single allowed session
        assert (await client.post("/v1/models/tiny-lstm/sessions")).status_code == 201


async def test_reset_returns_to_zero_state(make_client, model_repo, reference):
    ref = reference("tiny-gru")
    x = np.eye(7, dtype=np.float32)[[0, 1, 3, 3, 4, 6]]
    async with make_client(model_repo=model_repo) as client:
        sid = await _new(client, "tiny-gru")
        await _step(client, sid, x)
        r = await client.post(f"/v1/sessions/{sid}/reset")
        assert r.status_code == 200 and r.json()["step_count"] == 0
        assert r.json()["session_id"] == sid
        exported = await _state(client, sid)
        assert exported["step_count"] == 0
        assert np.all(np.asarray(exported["state"]["h0"]) == 0)
        body = await _step(client, sid, x[:3])
    np.testing.assert_allclose(np.asarray(body["outputs"]), ref.run(x[:3])[0], atol=TOL)
    assert body["step_count"] == 3


async def test_delete_then_everything_is_404(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        sid = await _new(client, "tiny-rnn")
        await _step(client, sid, [[0.5]])
        r = await client.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 204
        for method, path, body in [
            ("GET", f"/v1/sessions/{sid}", None),
            ("GET", f"/v1/sessions/{sid}/state", None),
            ("POST", f"/v1/sessions/{sid}/steps", {"inputs": [[0.5]]}),
            ("POST", f"/v1/sessions/{sid}/reset", None),
            ("POST", f"/v1/sessions/{sid}/generate", {"steps": 2}),
            ("DELETE", f"/v1/sessions/{sid}", None),
        ]:
            r = await client.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["code"] == "session_not_found"
            assert isinstance(r.json()["error"]["message"], str)


async def test_session_info_fields(make_client, model_repo):
    async with make_client(model_repo=model_repo, session_ttl_s=120) as client:
        r = await client.post("/v1/models/tiny-lstm/sessions")
        assert r.status_code == 201
        created = r.json()
        sid = created["session_id"]
        await _step(client, sid, np.zeros((4, 3)))
        r = await client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200
    info = r.json()
    assert set(info) == {
        "session_id",
        "model",
        "version",
        "step_count",
        "created_at",
        "last_used",
        "expires_at",
    }
    assert info["session_id"] == sid and info["model"] == "tiny-lstm" and info["version"] == 1
    assert info["step_count"] == 4 and created["step_count"] == 0

    def parse(s: str) -> datetime:
        return datetime.fromisoformat(s)

    assert parse(info["created_at"]) <= parse(info["last_used"])
    assert abs((parse(info["expires_at"]) - parse(info["last_used"])).total_seconds() - 120) < 1e-3
    assert parse(created["created_at"]) == parse(info["created_at"])


@pytest.mark.parametrize("seed", [0, 1])
async def test_interleaved_sessions_never_mix(make_client, model_repo, reference, seed):
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    plans = []
    for k in range(16):
        name = ["tiny-lstm", "nolengths-lstm", "tiny-gru", "tiny-rnn"][k % 4]
        n = int(rng.integers(1, 25))
        x = rng.normal(size=(n, SIZES[name])).astype(np.float32)
        cuts = (
            sorted({int(c) for c in rng.integers(1, n, size=rng.integers(0, 4))}) if n > 1 else []
        )
        plans.append((name, x, [0, *cuts, n]))

    async with make_client(
        model_repo=model_repo, batch_max_size=pyrng.choice([3, 8, 64])
    ) as client:
        sids = [await _new(client, name) for name, _, _ in plans]

        async def run(sid, x, bounds):
            outs = []
            for a, b in itertools.pairwise(bounds):
                for _ in range(pyrng.randrange(3)):
                    await asyncio.sleep(0)
                body = await _step(client, sid, x[a:b])
                assert body["step_count"] == b
                outs.extend(body["outputs"])
            return outs

        order = list(range(len(plans)))
        pyrng.shuffle(order)
        results = await asyncio.gather(*(run(sids[i], plans[i][1], plans[i][2]) for i in order))
        states = [await _state(client, sid) for sid in sids]
    by_plan = dict(zip(order, results))
    for i, (name, x, _) in enumerate(plans):
        ref = reference(name)
        y_ref, finals = ref.run(x)
        np.testing.assert_allclose(np.asarray(by_plan[i]), y_ref, atol=TOL)
        assert states[i]["step_count"] == len(x)
        _assert_state(ref, states[i]["state"], finals)


async def test_seq_exactly_once(make_client, model_repo, reference):
    ref = reference("tiny-lstm")
    x = np.random.default_rng(2).normal(size=(8, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo) as client:
        sid = await _new(client, "tiny-lstm")
        first = await _step(client, sid, x[:3], seq=3)
        assert first["step_count"] == 3 and "replayed" not in first
        retry = await _step(client, sid, x[:3], seq=3)
        assert retry["replayed"] is True
        assert retry["step_count"] == 3
        assert retry["outputs"] == first["outputs"]
        assert (await _state(client, sid))["step_count"] == 3
        # skipping ahead and going back are refused with the session's step_count
        for bad_seq, steps in [(7, x[3:5]), (4, x[3:5]), (2, x[3:4]), (1, x[3:4])]:
            r = await client.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": steps.tolist(), "seq": bad_seq}
            )
            assert r.status_code == 409, (bad_seq, r.text)
            err = r.json()["error"]
            assert err["code"] == "seq_mismatch" and err["step_count"] == 3
        second = await _step(client, sid, x[3:5], seq=5)
        assert second["step_count"] == 5 and "replayed" not in second
        again = await _step(client, sid, x[3:5], seq=5)
        assert again["replayed"] is True and again["outputs"] == second["outputs"]
        # the first request can no longer be replayed: it is not the last one
        r = await client.post(
            f"/v1/sessions/{sid}/steps", json={"inputs": x[:3].tolist(), "seq": 3}
        )
        assert r.status_code == 409 and r.json()["error"]["step_count"] == 5
        # seq must be a positive integer (strict types: see test_errors.py)
        for bad in [0, -1, 2.5]:
            r = await client.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": x[5:6].tolist(), "seq": bad}
            )
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
        last = await _step(client, sid, x[5:])  # no seq: always applied
        assert last["step_count"] == 8
        exported = await _state(client, sid)
    y_ref, finals = ref.run(x)
    np.testing.assert_allclose(
        np.asarray(first["outputs"] + second["outputs"] + last["outputs"]), y_ref, atol=TOL
    )
    _assert_state(ref, exported["state"], finals)


async def test_ttl_expiry_and_unknown_ids(make_client, model_repo):
    async with make_client(model_repo=model_repo, session_ttl_s=0.5) as client:
        idle = await _new(client, "tiny-rnn")
        busy = await _new(client, "tiny-rnn")
        for _ in range(8):  # 0.8 s of use keeps the busy one alive
            await asyncio.sleep(0.1)
            await _step(client, busy, [[0.1]])
        for method, path, body in [
            ("GET", f"/v1/sessions/{idle}", None),
            ("POST", f"/v1/sessions/{idle}/steps", {"inputs": [[0.1]]}),
            ("GET", f"/v1/sessions/{idle}/state", None),
        ]:
            r = await client.request(method, path, json=body)
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "session_expired"
        r = await client.get(f"/v1/sessions/{busy}")
        assert r.status_code == 200 and r.json()["step_count"] == 8
        r = await client.get("/v1/sessions/no-such-session")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = await client.post("/v1/sessions/no-such-session/steps", json={"inputs": [[0.1]]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


async def test_max_sessions_refuses_and_keeps_existing_sessions(make_client, model_repo, reference):
    ref = reference("tiny-lstm")
    x = np.random.default_rng(9).normal(size=(5, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo, max_sessions=3) as client:
        sids = [await _new(client, "tiny-lstm") for _ in range(3)]
        for sid in sids:
            await _step(client, sid, x[:2])
        for path in ["/v1/models/tiny-lstm/sessions", "/v1/models/tiny-gru/versions/1/sessions"]:
            r = await client.post(path)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_sessions"
            assert r.headers.get("retry-after")
        outs = [await _step(client, sid, x[2:]) for sid in sids]
        states = [await _state(client, sid) for sid in sids]
        # freeing one makes room again
        assert (await client.delete(f"/v1/sessions/{sids[0]}")).status_code == 204
        assert (await client.post("/v1/models/tiny-lstm/sessions")).status_code == 201
    y_ref, finals = ref.run(x)
    for out, st in zip(outs, states):
        np.testing.assert_allclose(np.asarray(out["outputs"]), y_ref[2:], atol=TOL)
        _assert_state(ref, st["state"], finals)


async def test_concurrent_requests_to_one_session_apply_in_order(
    make_client, model_repo, reference
):
    ref = reference("tiny-lstm")
    n = 16
    x = np.random.default_rng(4).normal(size=(n, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo) as client:
        sid = await _new(client, "tiny-lstm")
        bodies = await asyncio.gather(*(_step(client, sid, x[i : i + 1]) for i in range(n)))
        exported = await _state(client, sid)
    counts = [b["step_count"] for b in bodies]
    assert sorted(counts) == list(range(1, n + 1))
    order = np.argsort(counts)  # request index applied at step 1, 2, ...
    applied = x[order]
    y_ref, finals = ref.run(applied)
    for i, body in enumerate(bodies):
        np.testing.assert_allclose(
            np.asarray(body["outputs"][0]), y_ref[body["step_count"] - 1], atol=TOL
        )
    assert exported["step_count"] == n
    _assert_state(ref, exported["state"], finals)


async def test_sessions_are_private_to_their_api_key(make_client, model_repo):
    async with make_client(model_repo=model_repo, api_keys=["alpha", "beta"]) as client:
        r = await client.post("/v1/models/tiny-rnn/sessions")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await client.post(
            "/v1/models/tiny-rnn/sessions", headers={"Authorization": "Bearer alpha"}
        )
        assert r.status_code == 201
        sid = r.json()["session_id"]
        r = await client.get(f"/v1/sessions/{sid}", headers={"X-API-Key": "beta"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
        r = await client.post(
            f"/v1/sessions/{sid}/steps", json={"inputs": [[1.0]]}, headers={"X-API-Key": "beta"}
        )
        assert r.status_code == 404
        r = await client.get(f"/v1/sessions/{sid}", headers={"X-API-Key": "alpha"})
        assert r.status_code == 200 and r.json()["step_count"] == 0
        r = await client.get(f"/v1/sessions/{sid}", headers={"X-API-Key": "gamma"})
        assert r.status_code == 401


async def test_concurrent_retries_of_one_request_apply_it_once(make_client, model_repo, reference):
    ref = reference("nolengths-lstm")
    x = np.random.default_rng(8).normal(size=(7, 3)).astype(np.float32)
    async with make_client(model_repo=model_repo) as client:
        sid = await _new(client, "nolengths-lstm")
        await _step(client, sid, x[:2], seq=2)
        bodies = await asyncio.gather(*(_step(client, sid, x[2:7], seq=7) for _ in range(6)))
        exported = await _state(client, sid)
    assert [b.get("replayed", False) for b in bodies].count(False) == 1
    assert all(b["step_count"] == 7 and b["outputs"] == bodies[0]["outputs"] for b in bodies)
    y_ref, finals = ref.run(x)
    np.testing.assert_allclose(np.asarray(bodies[0]["outputs"]), y_ref[2:], atol=TOL)
    assert exported["step_count"] == 7
    _assert_state(ref, exported["state"], finals)


async def test_expired_sessions_free_their_slots(make_client, model_repo):
    async with make_client(model_repo=model_repo, max_sessions=2, session_ttl_s=1.0) as client:
        first = await _new(client, "tiny-rnn")
        await _new(client, "tiny-rnn")
        assert (await client.post("/v1/models/tiny-rnn/sessions")).status_code == 429
        await asyncio.sleep(1.1)
        await _new(client, "tiny-rnn")
        r = await client.get(f"/v1/sessions/{first}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_expired"


async def test_per_key_session_limit(make_client, model_repo):
    async with make_client(
        model_repo=model_repo, api_keys=["a", "b"], max_sessions_per_key=1
    ) as client:
        a, b = {"X-API-Key": "a"}, {"X-API-Key": "b"}
        assert (await client.post("/v1/models/tiny-rnn/sessions", headers=a)).status_code == 201
        r = await client.post("/v1/models/tiny-rnn/sessions", headers=a)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
        r = await client.post("/v1/models/tiny-rnn/sessions", headers=b)
        assert r.status_code == 201
        sid = r.json()["session_id"]
        assert (
            await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [1.0]}, headers=b)
        ).status_code == 200


async def test_lean_and_documented_step_paths_answer_alike(make_client, model_repo, reference):
    """``POST /v1/sessions/{id}/steps`` has two implementations: the lean path taken before
    FastAPI's routing (bodies of floats) and the documented route (anything else, e.g.
    integer inputs). Interleaved on one session they give the reference's numbers, and
    every answer, error or not, reads the same from either, request id and metrics included."""
    ref = reference("tiny-lstm")
    rng = np.random.default_rng(21)
    x = rng.normal(size=(7, 3)).astype(np.float32)
    x[2] = [1.0, -2.0, 0.0]  # sent as integers: the documented route
    async with make_client(model_repo=model_repo, api_keys=["alpha", "beta"]) as client:
        alpha = {"x-api-key": "alpha"}
        r = await client.post("/v1/models/tiny-lstm/sessions", headers=alpha)
        sid = r.json()["session_id"]
        ys = []
        for t, (a, b) in enumerate([(0, 2), (2, 3), (3, 6), (6, 7)]):
            inputs = x[a:b].tolist() if t != 1 else [[int(v) for v in x[a]]]
            r = await client.post(
                f"/v1/sessions/{sid}/steps",
                json={"inputs": inputs, "seq": b},
                headers={**alpha, "x-request-id": f"req-{t}"},
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == f"req-{t}"
            ys.append(np.asarray(r.json()["outputs"]))
        y_ref, _ = ref.run(x)
        np.testing.assert_allclose(np.concatenate(ys), y_ref, atol=TOL)
        assert r.json()["step_count"] == 7

        lean, documented = {"inputs": [[0.5, 0.25, 0.125]]}, {"inputs": [[1, 2, 3]]}
        cases = [
            (f"/v1/sessions/{sid}/steps", alpha, {"seq": 99}),  # seq mismatch: 409
            (f"/v1/sessions/{sid}/steps", {"x-api-key": "beta"}, {}),  # another key's: 404
            (f"/v1/sessions/{sid}/steps", {}, {}),  # no key: 401
            ("/v1/sessions/no-such-id/steps", alpha, {}),  # unknown: 404
        ]
        for url, headers, extra in cases:
            a = await client.post(url, json={**lean, **extra}, headers=headers)
            b = await client.post(url, json={**documented, **extra}, headers=headers)
            assert a.status_code == b.status_code and a.status_code >= 400, (a.text, b.text)
            assert a.json() == b.json()
            same = lambda r: {
                k: v for k, v in r.headers.items() if k not in ("x-request-id", "content-length")
            }
            assert same(a) == same(b)
            assert a.headers["x-request-id"] and b.headers["x-request-id"]
        r = await client.get(f"/v1/sessions/{sid}", headers=alpha)
        assert r.json()["step_count"] == 7  # no refused request changed the session

        metrics = (await client.get("/metrics")).text
        ok = [
            line for line in metrics.splitlines()
            if line.startswith("rnnserve_requests_total{")
            and 'route="/v1/sessions/{session_id}/steps"' in line and 'status="200"' in line
        ]
        assert ok and float(ok[0].rsplit(" ", 1)[1]) == 4
