"""A small run of benchmarks/loadtest.py under pytest: two real replicas on Redis (a single
server, then the local 3-primary cluster), 40 concurrent sessions x 100 steps, random
chunks, REST and WebSocket mixed, every request to a random replica, beside 24 WebSocket
streams open throughout. Zero errors, nothing lost, every output equal to the reference."""

from __future__ import annotations

from benchmarks.loadtest import make_inputs, run_load
from tests.scale.conftest import LSTM, TOL

DB_LOAD = 9


async def test_two_replicas_40_sessions_rest_and_websocket_mixed(
    server_factory, model_repo, shared_redis, reference
):
    url = shared_redis(DB_LOAD)
    replicas = [server_factory(model_repo, RNNSERVE_SESSION_STORE=url) for _ in range(2)]
    ref = reference(LSTM)
    inputs = make_inputs(sessions=24 + 40, steps=100, input_size=3, seed=40)
    result = await run_load(
        [r.url for r in replicas],
        LSTM,
        inputs,
        lambda x: ref.run(x)[0],
        concurrency=40,
        ws_fraction=0.5,
        max_chunk=8,
        seed=1,
        tolerance=TOL,
        ws_streams=24,
    )
    print("\n" + result.summary())
    assert result.errors == 0, result.error_samples
    assert result.lost_sessions == 0 and result.wrong_sessions == 0, result.error_samples
    assert result.steps == 64 * 100
    assert result.ws_connections >= 24
    assert result.max_abs_diff <= TOL
    assert result.rest_requests > 0 and result.ws_messages > 0
    assert all(n > 0 for n in result.per_replica_requests)
