"""A Redis restart under a real server, with and without persistence.

With append-only persistence (``appendfsync always``) Redis is SIGKILLed while sessions
stream over REST and WebSocket; clients retry a 503 with the same ``seq``, and once Redis
is back every answered step is still there: every output equals the onnxruntime
reference and nothing is applied twice. Without persistence the sessions answer 404
``session_not_found`` (the server's cached copies never write them back), and new sessions
work at once, without restarting the server.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from benchmarks.redis_servers import ThrowawayRedis
from tests.scale.conftest import LSTM, TOL, assert_state

STEPS = 36


@pytest.fixture
def persistent_redis(tmp_path: Path):
    server = ThrowawayRedis(tmp_path, appendonly=True)
    server.start()
    yield server
    server.stop()


class Progress:
    def __init__(self) -> None:
        self.answered = 0
        self.unavailable = 0
        self.replayed = 0


async def _rest_session(client: httpx.AsyncClient, x: np.ndarray, progress: Progress) -> tuple:
    r = await client.post(f"/v1/models/{LSTM}/sessions")
    while r.status_code == 503:
        await asyncio.sleep(0.05)
        r = await client.post(f"/v1/models/{LSTM}/sessions")
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    outputs: list = []
    pos = 0
    while pos < len(x):
        end = min(pos + 1 + pos % 3, len(x))
        body = {"inputs": x[pos:end].tolist(), "seq": end}
        while True:
            r = await client.post(f"/v1/sessions/{sid}/steps", json=body)
            if r.status_code != 503:
                break
            assert r.json()["error"]["code"] == "store_unavailable", r.text
            progress.unavailable += 1
            await asyncio.sleep(0.05)  # the client's retry, same seq
        assert r.status_code == 200, r.text
        assert r.json()["step_count"] == end
        progress.replayed += bool(r.json().get("replayed"))
        outputs.extend(r.json()["outputs"])
        progress.answered += 1
        pos = end
        await asyncio.sleep(0.01)
    return sid, outputs


async def _ws_session(ws_url: str, x: np.ndarray, progress: Progress) -> tuple:
    async with websockets.connect(f"{ws_url}/v1/models/{LSTM}/stream", close_timeout=1) as ws:
        sid = json.loads(await ws.recv())["session_id"]
        outputs: list = []
        pos = 0
        while pos < len(x):
            end = min(pos + 1 + pos % 2, len(x))
            message = json.dumps({"inputs": x[pos:end].tolist(), "seq": end})
            while True:
                await ws.send(message)
                body = json.loads(await ws.recv())
                if "error" not in body:
                    break
                assert body["error"]["code"] == "store_unavailable", body  # stream stays open
                progress.unavailable += 1
                await asyncio.sleep(0.05)
            assert body["step_count"] == end, body
            progress.replayed += bool(body.get("replayed"))
            outputs.extend(body["outputs"])
            progress.answered += 1
            pos = end
            await asyncio.sleep(0.01)
    return sid, outputs


async def test_sigkilled_redis_with_append_only_loses_no_answered_step(
    server_factory, model_repo, reference, persistent_redis
):
    server = server_factory(model_repo, RNNSERVE_SESSION_STORE=persistent_redis.url)
    ref = reference(LSTM)
    rng = np.random.default_rng(11)
    xs = [rng.normal(size=(STEPS, 3)).astype(np.float32) for _ in range(6)]
    progress = Progress()

    async def restart_midway() -> None:
        while progress.answered < 40:
            await asyncio.sleep(0.005)
        persistent_redis.kill()  # no shutdown: only what the AOF holds survives
        await asyncio.sleep(0.3)
        persistent_redis.start()  # same port and directory: reloads the AOF

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        results = await asyncio.gather(
            *(_rest_session(client, x, progress) for x in xs[:4]),
            *(_ws_session(server.ws_url, x, progress) for x in xs[4:]),
            restart_midway(),
        )
        states = [
            (await client.get(f"/v1/sessions/{sid}/state")).json() for sid, _ in results[:-1]
        ]
    assert progress.unavailable > 0, "the restart happened while nobody was streaming"
    for x, (sid, outputs), state in zip(xs, results[:-1], states):
        expected, finals = ref.run(x)
        np.testing.assert_allclose(np.asarray(outputs), expected, atol=TOL)
        assert state["step_count"] == STEPS
        assert_state(ref, state["state"], finals)


async def test_redis_restarted_empty_sessions_are_gone_and_new_ones_work(
    server_factory, model_repo, reference, throwaway_redis
):
    server = server_factory(model_repo, RNNSERVE_SESSION_STORE=throwaway_redis.url)
    ref = reference(LSTM)
    x = np.random.default_rng(12).normal(size=(12, 3)).astype(np.float32)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        sid = (await client.post(f"/v1/models/{LSTM}/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[:4].tolist()})
        assert r.status_code == 200, r.text
        async with websockets.connect(
            f"{server.ws_url}/v1/sessions/{sid}/stream", close_timeout=1
        ) as ws:
            assert json.loads(await ws.recv())["step_count"] == 4
            await ws.send(json.dumps({"inputs": x[4:6].tolist(), "seq": 6}))
            assert json.loads(await ws.recv())["step_count"] == 6

            throwaway_redis.stop()
            throwaway_redis.start()  # same port, empty

            # the open stream's next message: the session is gone, never a wrong state
            await ws.send(json.dumps({"inputs": x[6:8].tolist(), "seq": 8}))
            body = json.loads(await ws.recv())
            if body.get("error", {}).get("code") == "store_unavailable":  # a stale connection
                await ws.send(json.dumps({"inputs": x[6:8].tolist(), "seq": 8}))
                body = json.loads(await ws.recv())
            assert body["error"]["code"] == "session_not_found", body
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4404

        for call in (
            client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[6:8].tolist(), "seq": 8}),
            client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[6:8].tolist()}),
            client.get(f"/v1/sessions/{sid}"),
            client.get(f"/v1/sessions/{sid}/state"),
        ):
            r = await call
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "session_not_found", r.text
        assert throwaway_redis.client().dbsize() == 0  # nothing written back from a cache

        sid = (await client.post(f"/v1/models/{LSTM}/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x.tolist(), "seq": 12})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["outputs"]), ref.run(x)[0], atol=TOL)
