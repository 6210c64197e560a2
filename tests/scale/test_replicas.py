"""Two real ``rnn-serve`` processes sharing one Redis (the SIGKILL tests also on a local
3-primary Redis Cluster): any replica serves any session.

Every expectation comes from the independent onnxruntime reference run over the whole
sequence at once. A replica is killed with SIGKILL (no graceful shutdown) mid-stream; the
client retries its last request on the other replica with the same ``seq`` and goes on.
"""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import numpy as np
import websockets

from service.frames import decode_response, encode_request
from tests.scale.conftest import (
    LSTM,
    TOL,
    assert_state,
    chunk_sizes,
    eventually,
    send_without_reading,
)

DB_KILL_REST, DB_KILL_WS, DB_ALTERNATE, DB_RACE = 5, 6, 7, 8


def _kill(server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


async def _two_replicas(server_factory, model_repo, redis_url, db: int):
    url = redis_url(db)
    return (
        server_factory(model_repo, RNNSERVE_SESSION_STORE=url),
        server_factory(model_repo, RNNSERVE_SESSION_STORE=url),
    )


async def _step_count(client: httpx.AsyncClient, sid: str) -> int:
    r = await client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["step_count"]


async def test_replica_killed_mid_stream_rest_retry_on_the_other(
    server_factory, model_repo, shared_redis, reference, rng
):
    a, b = await _two_replicas(server_factory, model_repo, shared_redis, DB_KILL_REST)
    ref = reference(LSTM)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    expected, finals = ref.run(x)
    sizes = chunk_sizes(rng, len(x))
    lost = len(sizes) // 2  # the request whose answer A never sends
    outputs: list[list[float]] = []

    async with httpx.AsyncClient(base_url=a.url) as on_a, httpx.AsyncClient(base_url=b.url) as on_b:
        r = await on_a.post(f"/v1/models/{LSTM}/sessions")
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        pos = 0
        for n in sizes[:lost]:
            r = await on_a.post(
                f"/v1/sessions/{sid}/steps",
                json={"inputs": x[pos : pos + n].tolist(), "seq": pos + n},
            )
            assert r.status_code == 200, r.text
            assert r.json()["step_count"] == pos + n
            outputs.extend(r.json()["outputs"])
            pos += n

        # Send the next request to A and never read the answer; once B sees it applied
        # (it is in Redis), A dies without a chance to answer.
        n = sizes[lost]
        body = {"inputs": x[pos : pos + n].tolist(), "seq": pos + n}
        sock = send_without_reading(a.port, f"/v1/sessions/{sid}/steps", body)

        async def applied() -> bool:
            return await _step_count(on_b, sid) == pos + n

        await eventually(applied)
        _kill(a)
        sock.close()

        # The client's retry goes to B, same seq: the stored answer, nothing applied twice.
        r = await on_b.post(f"/v1/sessions/{sid}/steps", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["replayed"] is True and r.json()["step_count"] == pos + n
        outputs.extend(r.json()["outputs"])
        pos += n

        for k, n in enumerate(sizes[lost + 1 :]):
            body = {"inputs": x[pos : pos + n].tolist(), "seq": pos + n}
            r = await on_b.post(f"/v1/sessions/{sid}/steps", json=body)
            assert r.status_code == 200, r.text
            assert "replayed" not in r.json()
            if k == 0:  # a retry on B itself is a replay too, and still equal
                again = await on_b.post(f"/v1/sessions/{sid}/steps", json=body)
                assert again.json()["replayed"] is True
                assert again.json()["outputs"] == r.json()["outputs"]
            outputs.extend(r.json()["outputs"])
            pos += n

        state = (await on_b.get(f"/v1/sessions/{sid}/state")).json()

    np.testing.assert_allclose(np.asarray(outputs), expected, atol=TOL)
    assert state["step_count"] == len(x)
    assert_state(ref, state["state"], finals)


async def test_replica_killed_mid_stream_websocket_resume_on_the_other(
    server_factory, model_repo, shared_redis, reference, rng
):
    a, b = await _two_replicas(server_factory, model_repo, shared_redis, DB_KILL_WS)
    ref = reference(LSTM)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    expected, finals = ref.run(x)
    sizes = chunk_sizes(rng, len(x))
    lost = len(sizes) // 2
    outputs: list[np.ndarray] = []

    def frame(pos: int, n: int, binary: bool):
        if binary:
            return encode_request(x[pos : pos + n], seq=pos + n)
        return json.dumps({"inputs": x[pos : pos + n].tolist(), "seq": pos + n})

    def answer(message) -> tuple[np.ndarray, int, bool]:
        if isinstance(message, bytes):
            return decode_response(message)
        body = json.loads(message)
        assert "error" not in body, body
        return (
            np.asarray(body["outputs"], np.float32),
            body["step_count"],
            body.get("replayed", False),
        )

    pos = 0
    async with websockets.connect(f"{a.ws_url}/v1/models/{LSTM}/stream", close_timeout=1) as ws:
        info = json.loads(await ws.recv())
        sid = info["session_id"]
        assert info["step_count"] == 0
        for i, n in enumerate(sizes[:lost]):
            await ws.send(frame(pos, n, binary=i % 2 == 0))
            y, count, replayed = answer(await ws.recv())
            assert count == pos + n and not replayed
            outputs.append(y)
            pos += n
        # In doubt: A is killed right after the frame is sent. It may or may not have
        # applied it; the retry with the same seq on B is correct either way.
        n = sizes[lost]
        await ws.send(frame(pos, n, binary=True))
        _kill(a)

    async with websockets.connect(f"{b.ws_url}/v1/sessions/{sid}/stream", close_timeout=1) as ws:
        info = json.loads(await ws.recv())
        assert info["session_id"] == sid and info["step_count"] in (pos, pos + n)
        await ws.send(frame(pos, n, binary=True))
        y, count, replayed = answer(await ws.recv())
        assert count == pos + n
        assert replayed == (info["step_count"] == pos + n)
        outputs.append(y)
        pos += n
        for i, n in enumerate(sizes[lost + 1 :]):
            await ws.send(frame(pos, n, binary=i % 2 == 1))
            y, count, replayed = answer(await ws.recv())
            assert count == pos + n and not replayed
            outputs.append(y)
            pos += n

    async with httpx.AsyncClient(base_url=b.url) as on_b:
        state = (await on_b.get(f"/v1/sessions/{sid}/state")).json()
    np.testing.assert_allclose(np.concatenate(outputs), expected, atol=TOL)
    assert state["step_count"] == len(x)
    assert_state(ref, state["state"], finals)


async def test_alternating_replicas_without_stickiness(
    server_factory, model_repo, redis_db, reference, rng
):
    a, b = await _two_replicas(server_factory, model_repo, redis_db, DB_ALTERNATE)
    ref = reference(LSTM)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    expected, finals = ref.run(x)
    outputs: list[list[float]] = []
    async with httpx.AsyncClient(base_url=a.url) as on_a, httpx.AsyncClient(base_url=b.url) as on_b:
        clients = [on_a, on_b]
        sid = (await on_b.post(f"/v1/models/{LSTM}/sessions")).json()["session_id"]
        pos = 0
        for i, n in enumerate(chunk_sizes(rng, len(x))):
            body: dict = {"inputs": x[pos : pos + n].tolist()}
            if i % 3 == 0:
                body["seq"] = pos + n
            r = await clients[i % 2].post(f"/v1/sessions/{sid}/steps", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["step_count"] == pos + n
            outputs.extend(r.json()["outputs"])
            pos += n
        state = (await on_a.get(f"/v1/sessions/{sid}/state")).json()
        info_b = (await on_b.get(f"/v1/sessions/{sid}")).json()
    np.testing.assert_allclose(np.asarray(outputs), expected, atol=TOL)
    assert state["step_count"] == info_b["step_count"] == len(x)
    assert_state(ref, state["state"], finals)


async def test_two_replicas_racing_on_one_session_never_share_a_state(
    server_factory, model_repo, redis_db, reference, rng
):
    """Concurrent steps without seq through both replicas: each is applied on top of the
    previous one (compare-and-set on the revision), in some order given by step_count."""
    a, b = await _two_replicas(server_factory, model_repo, redis_db, DB_RACE)
    ref = reference(LSTM)
    per_replica = 12
    chunks = [
        rng.normal(size=(int(rng.integers(1, 4)), 3)).astype(np.float32)
        for _ in range(2 * per_replica)
    ]
    async with httpx.AsyncClient(base_url=a.url) as on_a, httpx.AsyncClient(base_url=b.url) as on_b:
        sid = (await on_a.post(f"/v1/models/{LSTM}/sessions")).json()["session_id"]

        async def fire(client: httpx.AsyncClient, chunk: np.ndarray):
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk.tolist()})
            return chunk, r

        results = await asyncio.gather(
            *(fire((on_a, on_b)[i % 2], chunk) for i, chunk in enumerate(chunks))
        )
        state = (await on_b.get(f"/v1/sessions/{sid}/state")).json()

    applied = []
    for chunk, r in results:
        if r.status_code == 409:  # lost the compare-and-set three times: nothing applied
            assert r.json()["error"]["code"] == "session_conflict", r.text
            continue
        assert r.status_code == 200, r.text
        applied.append((r.json()["step_count"], chunk, r.json()["outputs"]))
    assert len(applied) >= len(chunks) // 2, f"only {len(applied)} of {len(chunks)} applied"
    counts = [count for count, _, _ in applied]
    assert len(set(counts)) == len(counts), f"two requests ended at the same step_count: {counts}"
    applied.sort(key=lambda item: item[0])
    pos = 0
    for count, chunk, _ in applied:  # each applied exactly on top of the previous one
        assert count == pos + len(chunk), (count, pos, len(chunk))
        pos = count
    x = np.concatenate([chunk for _, chunk, _ in applied])
    expected, finals = ref.run(x)
    pos = 0
    for count, chunk, out in applied:
        np.testing.assert_allclose(np.asarray(out), expected[pos:count], atol=TOL)
        pos = count
    assert state["step_count"] == len(x)
    assert_state(ref, state["state"], finals)
