"""Multiplexed steps (``POST /v1/steps``, WebSocket ``/v1/stream``, JSON and binary) against
one real server per session store (memory and Redis): every session gets exactly what it
would get alone, checked against onnxruntime run independently; one bad item fails only
itself."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.client import AsyncClient, Client, RnnServeError
from service.errors import InvalidInput, PayloadTooLarge, SequenceMismatch, SessionNotFound
from service.frames import decode_many, decode_many_response, encode_many, encode_many_response
from tests.conftest import REDIS_URL_BASE, ServerProcess, require_redis, start_server

TOL = 1e-5
MODELS = {"tiny-lstm": 3, "tiny-gru": 7, "tiny-relu": 2}


MUX_REDIS_DB = 14


@pytest.fixture(scope="module", params=["memory", "redis"])
def live(request, model_repo, tmp_path_factory) -> Iterator[ServerProcess]:
    """One server per store: on Redis, a round's records are read with one ``get_many``
    and committed with one ``commit_many`` (the memory store leases them in place)."""
    env = {"RNNSERVE_API_KEYS": "alice,bob", "RNNSERVE_MAX_MULTIPLEX_ITEMS": "64"}
    if request.param == "redis":
        import redis

        require_redis()
        redis.Redis.from_url(f"{REDIS_URL_BASE}/{MUX_REDIS_DB}").flushdb()
        env["RNNSERVE_SESSION_STORE"] = f"{REDIS_URL_BASE}/{MUX_REDIS_DB}"
    server = start_server(model_repo, tmp_path_factory.mktemp(f"mux-{request.param}"), env)
    yield server
    server.stop()
    if request.param == "redis":
        redis.Redis.from_url(f"{REDIS_URL_BASE}/{MUX_REDIS_DB}").flushdb()


ALICE = {"X-API-Key": "alice"}


def _create(live: ServerProcess, model: str, key: str = "alice") -> str:
    r = httpx.post(f"{live.url}/v1/models/{model}/sessions", headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def _post(live: ServerProcess, items: list, key: str = "alice") -> list[dict]:
    r = httpx.post(f"{live.url}/v1/steps", json={"steps": items}, headers={"X-API-Key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _ws(live: ServerProcess):
    return connect(live.ws_url + "/v1/stream", additional_headers=ALICE, open_timeout=10)


def test_rest_items_in_order_errors_alone(live, reference):
    rng = np.random.default_rng(3)
    a, b = _create(live, "tiny-lstm"), _create(live, "tiny-gru")
    xa = rng.normal(size=(3, 3)).astype(np.float32)
    xb = rng.normal(size=(2, 7)).astype(np.float32)
    results = _post(
        live,
        [
            {"session_id": a, "inputs": xa[:1].tolist(), "seq": 1},
            {"session_id": b, "inputs": xb.tolist(), "top_k": 2},
            {"session_id": a, "inputs": xa[1:].tolist(), "seq": 3},  # after a's first item
            {"session_id": a, "inputs": [[1.0, 2.0]]},  # wrong width
            {"session_id": "unknown", "inputs": [[1.0, 2.0, 3.0]]},
            {"session_id": a, "inputs": [[True, 1.0, 2.0]]},  # not a number
            {"session_id": a, "inputs": xa[:1].tolist(), "seq": 9},  # skips ahead
            {"session_id": a, "extra": 1, "inputs": []},
            "not an item",
        ],
    )
    assert [r.get("error", {}).get("code") for r in results] == [
        None, None, None, "invalid_input", "session_not_found", "invalid_input",
        "seq_mismatch", "invalid_input", "invalid_input",
    ]
    y_a = reference("tiny-lstm").run(xa)[0]
    y_b = reference("tiny-gru").run(xb)[0]
    np.testing.assert_allclose(results[0]["outputs"] + results[2]["outputs"], y_a, atol=TOL)
    assert [results[0]["step_count"], results[2]["step_count"]] == [1, 3]
    assert "outputs" not in results[1]  # top_k answers the best classes instead
    scores = [[e["score"] for e in row] for row in results[1]["top_k"]]
    np.testing.assert_allclose(scores, -np.sort(-y_b, axis=1)[:, :2], atol=TOL)
    best = [[e["index"] for e in row] for row in results[1]["top_k"]]
    assert best == np.argsort(-y_b, axis=1)[:, :2].tolist()
    assert results[1]["top_k"][0][0]["label"] == "BTPSXVE"[best[0][0]]
    assert results[4]["session_id"] == "unknown"

    # A retry of the last applied item is replayed; the session is exactly where it was.
    again = _post(live, [{"session_id": a, "inputs": xa[1:].tolist(), "seq": 3}])
    assert again[0]["replayed"] is True
    np.testing.assert_allclose(again[0]["outputs"], y_a[1:], atol=TOL)


def test_ownership_and_limits(live):
    a = _create(live, "tiny-lstm")
    bob = _post(live, [{"session_id": a, "inputs": [[1.0, 2.0, 3.0]]}], key="bob")
    assert bob[0]["error"]["code"] == "session_not_found"
    assert httpx.get(f"{live.url}/v1/sessions/{a}", headers=ALICE).json()["step_count"] == 0
    r = httpx.post(f"{live.url}/v1/steps", json={"steps": []}, timeout=10)
    assert r.status_code == 401
    too_many = [{"session_id": a, "inputs": [[0.0, 0.0, 0.0]]}] * 65
    r = httpx.post(f"{live.url}/v1/steps", json={"steps": too_many}, headers=ALICE, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    for body in (b"{", b"[]", b'{"steps": 3}', b'{"steps": [], "x": 1}'):
        r = httpx.post(f"{live.url}/v1/steps", content=body, headers=ALICE, timeout=10)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", body
    assert httpx.get(f"{live.url}/v1/sessions/{a}", headers=ALICE).json()["step_count"] == 0


async def test_expired_sessions_stay_private(make_client, model_repo):
    import asyncio

    async with make_client(model_repo=model_repo, api_keys=["alice", "bob"], session_ttl_s=0.3) as client:
        created = await client.post("/v1/models/tiny-lstm/sessions", headers=ALICE)
        item = {"session_id": created.json()["session_id"], "inputs": [[1.0, 2.0, 3.0]]}
        await asyncio.sleep(0.5)
        codes = {}
        for key in ("alice", "bob"):
            r = await client.post("/v1/steps", json={"steps": [item]}, headers={"X-API-Key": key})
            codes[key] = r.json()["results"][0]["error"]["code"]
        assert codes == {"alice": "session_expired", "bob": "session_not_found"}


def test_websocket_json_and_binary(live, reference):
    rng = np.random.default_rng(4)
    a, b = _create(live, "tiny-lstm"), _create(live, "tiny-relu")
    xa = rng.normal(size=(2, 3)).astype(np.float32)
    xb = rng.normal(size=(3, 2)).astype(np.float32)
    with _ws(live) as ws:
        ws.send(json.dumps({"steps": [{"session_id": a, "inputs": xa[:1].tolist(), "seq": 1}]}))
        first = json.loads(ws.recv(timeout=10))["results"]
        ws.send(encode_many([(a, xa[1:], 2), (b, xb, None), (b, xb[:, :1], None), ("nope", xb, 1)]))
        answer = ws.recv(timeout=10)
        assert isinstance(answer, bytes)
        second = decode_many_response(answer)
        ws.send("not json")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_input"
        ws.send(b"RM\x01\x00\xff\xff\x00\x00")  # a malformed frame closes with 1003
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "bad_frame"
    np.testing.assert_allclose(
        np.concatenate([first[0]["outputs"], second[0][0]]), reference("tiny-lstm").run(xa)[0], atol=TOL
    )
    assert second[0][1] == 2 and second[1][1] == 3
    np.testing.assert_allclose(second[1][0], reference("tiny-relu").run(xb)[0], atol=TOL)
    assert second[2]["code"] == "invalid_input" and second[3]["code"] == "session_not_found"


def test_limits_on_the_stream_keep_it_open_and_items_carry_symbols(live):
    """A well-formed binary frame over the item limit is refused as a JSON message is
    (413 payload_too_large with its limit), not as a malformed frame that closes the
    stream; a message over the size limit says its limit; multiplexed items of a softmax
    model with a vocabulary carry ``symbols`` as the single-session routes do."""
    a, g = _create(live, "tiny-lstm"), _create(live, "tiny-gru")
    x = np.zeros((1, 3), np.float32)
    with _ws(live) as ws:
        ws.send(encode_many([(a, x, None)] * 65))
        error = json.loads(ws.recv(timeout=10))["error"]
        assert (error["code"], error["limit"]) == ("payload_too_large", 64)
        ws.send(json.dumps({"steps": [{"session_id": a, "inputs": [[0.0] * 3]}] * 65}))
        error = json.loads(ws.recv(timeout=10))["error"]
        assert (error["code"], error["limit"]) == ("payload_too_large", 64)
        ws.send(json.dumps({"steps": [{"session_id": g, "inputs": ["B", "T"]}]}))
        (item,) = json.loads(ws.recv(timeout=10))["results"]
    single = httpx.post(
        f"{live.url}/v1/sessions/{_create(live, 'tiny-gru')}/steps",
        json={"inputs": ["B", "T"]}, headers=ALICE, timeout=10,
    ).json()  # fmt: skip
    assert item["symbols"] == single["symbols"] and len(item["symbols"]) == 2
    assert "symbols" not in _post(live, [{"session_id": a, "inputs": [[0.0] * 3]}])[0]
    r = httpx.get(f"{live.url}/v1/sessions/{a}", headers=ALICE, timeout=10)
    assert r.json()["step_count"] == 1  # only the last message's step


def test_oversized_stream_message_says_its_limit(model_repo, tmp_path):
    server = start_server(model_repo, tmp_path, {"RNNSERVE_WS_MAX_MESSAGE_BYTES": "1000"})
    try:
        with connect(server.ws_url + "/v1/models/tiny-lstm/stream", open_timeout=10) as ws:
            ws.recv(timeout=10)  # the session's info
            ws.send(json.dumps({"inputs": [[0.0, 0.0, 0.0]] * 100}))
            error = json.loads(ws.recv(timeout=10))["error"]
            assert (error["code"], error["limit"]) == ("payload_too_large", 1000)
            ws.send(json.dumps({"inputs": [[0.0, 0.0, 0.0]]}))
            assert json.loads(ws.recv(timeout=10))["step_count"] == 1
    finally:
        server.stop()


def _mux_frame(entries: list[tuple], ids: bytes, payload: bytes, flags: int = 0) -> bytes:
    """A hand-made multiplexed frame: (id_len, flags, steps, features, seq) entries."""
    table = b"".join(struct.pack("<HHIIQ", *entry) for entry in entries)
    return struct.pack("<2sBBI", b"RM", 1, flags, len(entries)) + table + ids + payload


@pytest.mark.parametrize(
    "frame",
    [
        # steps x features of (2**32-1)**2 and 2**33 wrap to a sum of 1 in int64: one float
        # of payload passed the length check, then the reshape failed (1011, internal_error)
        _mux_frame([(1, 0, 2**32 - 1, 2**32 - 1, 0), (1, 0, 2**31, 4, 0)], b"ab", bytes(4)),
        _mux_frame([(1, 0, 2**32 - 1, 1, 0)], b"a", bytes(4)),  # an item larger than the frame
        _mux_frame([(1, 6, 1, 1, 0)], b"a", bytes(4)),  # undefined item flags
        _mux_frame([(1, 0, 1, 1, 0)], b"a", bytes(4), flags=1),  # undefined header flags
    ],
)
def test_frames_that_lie_about_their_sizes_or_flags_close_1003(live, frame):
    sid = _create(live, "tiny-lstm")
    with _ws(live) as ws:
        ws.send(frame)
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "bad_frame"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1003
    r = httpx.get(f"{live.url}/v1/sessions/{sid}", headers=ALICE, timeout=10)
    assert r.status_code == 200 and r.json()["step_count"] == 0


def test_frames_round_trip():
    items = [("a", np.ones((2, 3), np.float32), 5), ("ßid", np.zeros((1, 1), np.float32), None)]
    decoded = decode_many(encode_many(items), 10)
    assert [(s, x.tolist(), q) for s, x, q in decoded] == [
        (s, x.tolist(), q) for s, x, q in items
    ]
    with pytest.raises(ValueError):
        decode_many(encode_many(items)[:-1], 10)
    with pytest.raises(PayloadTooLarge):  # a limit, not a malformed frame
        decode_many(encode_many(items), 1)


async def test_client_helpers_sync_and_async(live, reference):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    expected = reference("tiny-lstm").run(x)[0]
    with Client(live.url, api_key="alice") as client:
        a = client.create_session("tiny-lstm")
        got = client.step_many([(a, x[:1], 1), {"session_id": "zz", "inputs": x[:1].tolist()}])
        assert isinstance(got[1], RnnServeError) and got[1].code == "session_not_found"
        with client.multiplex(binary=True) as mux:
            (second,) = mux.send([(a, x[1:2], 2)])
        assert second.session_id == a.session_id and second.step_count == 2
    async with AsyncClient(live.url, api_key="alice") as aclient:
        (third,) = await aclient.step_many([{"session": a, "inputs": x[2:3], "seq": 3}])
        async with aclient.multiplex() as amux:
            (fourth,) = await amux.send([(a, x[3:], 4)])
    outputs = np.concatenate([got[0].outputs, second.outputs, third.outputs, fourth.outputs])
    np.testing.assert_allclose(outputs, expected, atol=TOL)


# -- the property: many sessions, random orders, bad items and retries ----------------------


@st.composite
def plans(draw):
    sessions = draw(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(MODELS)),
                st.lists(st.integers(1, 3), min_size=1, max_size=4),  # chunk lengths
            ),
            min_size=1,
            max_size=6,
        )
    )
    # A random merge of every session's chunks (each session's chunks stay in order).
    queue = [k for k, (_, chunks) in enumerate(sessions) for _ in chunks]
    order = draw(st.permutations(queue))
    bad = draw(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(["width", "unknown", "seq"])), max_size=4))
    cuts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=8))
    transports = draw(st.lists(st.sampled_from(["rest", "ws-json", "ws-binary"]), min_size=8, max_size=8))
    retries = draw(st.lists(st.booleans(), min_size=8, max_size=8))
    plain = draw(st.lists(st.booleans(), min_size=8, max_size=8))  # good items without seq
    seed = draw(st.integers(0, 2**16))
    return sessions, order, bad, cuts, transports, retries, plain, seed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans())
def test_property_each_session_gets_what_it_would_alone(live, reference, plan):
    sessions, order, bad, cuts, transports, retries, plain, seed = plan
    rng = np.random.default_rng(seed)
    ids, xs, bounds = [], [], []
    for model, chunks in sessions:
        ids.append(_create(live, model))
        xs.append(rng.normal(size=(sum(chunks), MODELS[model])).astype(np.float32))
        bounds.append(np.cumsum([0, *chunks]).tolist())
    done = [0] * len(sessions)  # chunks applied per session
    items: list[tuple] = []  # (kind, session index, chunk index)
    for k in order:
        items.append(("good", k, done[k]))
        done[k] += 1
    for position, kind in bad:
        items.insert(position % (len(items) + 1), (kind, position % len(sessions), None))
    expected = [reference(model).run(x)[0] for (model, _), x in zip(sessions, xs)]
    applied = [0] * len(sessions)

    def wire(item: tuple, seq: bool) -> tuple[str, np.ndarray, int | None]:
        kind, k, chunk = item
        if kind == "good":  # without seq, a message's items may all be alike (planned in bulk)
            a, b = bounds[k][chunk], bounds[k][chunk + 1]
            return ids[k], xs[k][a:b], b if seq else None
        if kind == "width":
            return ids[k], np.ones((1, MODELS[sessions[k][0]] + 1), np.float32), None
        if kind == "unknown":
            return "no-such-session", np.ones((1, 3), np.float32), None
        return ids[k], xs[k][:1], 10_000  # seq far ahead: seq_mismatch

    def send(batch: list[tuple], transport: str, seq: bool) -> list:
        wired = [wire(item, seq) for item in batch]
        if transport == "rest":
            rows = [{"session_id": s, "inputs": x.tolist(), **({"seq": q} if q else {})} for s, x, q in wired]
            return [r.get("error", {}).get("code") or (np.asarray(r["outputs"]), r["step_count"], r.get("replayed", False)) for r in _post(live, rows)]
        with _ws(live) as ws:
            if transport == "ws-binary":
                ws.send(encode_many(wired))
                return [r["code"] if isinstance(r, dict) else r for r in decode_many_response(ws.recv(timeout=30))]
            rows = [{"session_id": s, "inputs": x.tolist(), **({"seq": q} if q else {})} for s, x, q in wired]
            ws.send(json.dumps({"steps": rows}))
            answer = json.loads(ws.recv(timeout=30))["results"]
            return [r.get("error", {}).get("code") or (np.asarray(r["outputs"]), r["step_count"], r.get("replayed", False)) for r in answer]

    start, m = 0, 0
    while start < len(items):
        batch = items[start : start + cuts[m % len(cuts)]]
        start += len(batch)
        last_of = {item[1]: n for n, item in enumerate(batch) if item[0] == "good"}
        for attempt in range(2 if retries[m % 8] else 1):
            # A message is retried only with seq (without, a retry would apply it twice).
            answers = send(batch, transports[(m + attempt) % 8], retries[m % 8] or not plain[m % 8])
            for n, (item, answer) in enumerate(zip(batch, answers)):
                kind, k, chunk = item
                if kind == "width":
                    assert answer == "invalid_input"
                elif kind == "unknown":
                    assert answer == "session_not_found"
                elif kind == "seq":
                    assert answer == "seq_mismatch"
                elif attempt == 1 and last_of[k] != n:
                    assert answer == "seq_mismatch"  # only the last applied request replays
                else:
                    y, step_count, replayed = answer
                    a, b = bounds[k][chunk], bounds[k][chunk + 1]
                    assert step_count == b and replayed == (attempt == 1)
                    np.testing.assert_allclose(y, expected[k][a:b], atol=TOL)
                    applied[k] = b
        m += 1
    for k, session_id in enumerate(ids):
        info = httpx.get(f"{live.url}/v1/sessions/{session_id}", headers=ALICE).json()
        assert info["step_count"] == applied[k] == len(xs[k])


async def test_sliced_rounds_match_single_steps(model_repo, reference):
    """A round in slices of 2 items (the memory store's pipeline: a slice's call starts
    while the next is planned) answers every item as alone, in order: two models, a
    session twice, a seq replay, a seq mismatch, an unknown id and a bad shape."""
    from service.config import Settings
    from service.engine import Engine, StepItem, StepResult

    engine = Engine(Settings(model_repo=model_repo, mux_slice_items=2, grpc_port=0))
    await engine.start()
    try:
        rng = np.random.default_rng(11)
        names = ["tiny-lstm", "tiny-gru", "tiny-lstm", "tiny-relu", "tiny-gru"]
        ids = [(await engine.create_session(engine.model(n), None)).session_id for n in names]
        xs = [rng.normal(size=(1 + k % 2, MODELS[n])).astype(np.float32) for k, n in enumerate(names)]
        again = rng.normal(size=(2, MODELS["tiny-lstm"])).astype(np.float32)
        retried = (await engine.create_session(engine.model("tiny-relu"), None)).session_id
        xr = rng.normal(size=(3, MODELS["tiny-relu"])).astype(np.float32)
        first = await engine.step_many(None, [StepItem(retried, xr, 3)])
        assert isinstance(first[0], StepResult)
        items = [
            *(StepItem(sid, x) for sid, x in zip(ids, xs)),
            StepItem(ids[0], again),  # the same session again: runs after its first item
            StepItem(retried, xr, 3),  # a retry of the request already applied
            StepItem(ids[1], xs[1], 99),  # a seq that does not follow
            StepItem("nope", xs[0]),
            StepItem(ids[2], np.zeros((1, 5), np.float32)),  # wrong width
        ]
        heard: dict[int, object] = {}

        def on_ready(indices: list[int], answers: list) -> None:  # as blocks finish
            for i in indices:
                assert i not in heard
                heard[i] = answers[i]

        results = await engine.step_many(None, items, on_ready)
        # every item of a finished block was heard of, with its final result; the replay
        # and the mismatch (decided on a fresh read) and the failed parses are not
        assert set(heard) == {0, 1, 2, 3, 4, 5}
        assert all(results[i] is result for i, result in heard.items())
        for k, name in enumerate(names):
            y, states = reference(name).run(xs[k])
            assert isinstance(results[k], StepResult)
            np.testing.assert_allclose(results[k].outputs, y, atol=TOL)
            if k == 0:
                y0, _ = reference(name).run(again, states)
                np.testing.assert_allclose(results[5].outputs, y0, atol=TOL)
                assert results[5].step_count == xs[0].shape[0] + 2
        assert results[6].replayed and results[6].step_count == 3
        np.testing.assert_allclose(results[6].outputs, first[0].outputs, atol=0)
        assert isinstance(results[7], SequenceMismatch)
        assert isinstance(results[8], SessionNotFound)
        assert isinstance(results[9], InvalidInput)
    finally:
        await engine.stop()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_uniform_messages_and_their_near_misses(model_repo, reference, store, monkeypatch):
    """A message whose items are all alike (every session the caller's, one model, no
    seq, inputs of one shape: JSON lists or float32 arrays) is planned in bulk; a message
    with one item that is not so is planned item by item, and says why for that item
    alone. Either way, every session ends exactly where onnxruntime run directly puts it."""
    from service.config import Settings
    from service.engine import Engine, StepItem, StepResult

    settings = {"model_repo": model_repo, "grpc_port": 0, "batch_max_size": 4}
    if store == "redis":
        require_redis()
        settings["session_store"] = f"{REDIS_URL_BASE}/{MUX_REDIS_DB}"
    engine = Engine(Settings(**settings))
    await engine.start()
    bulk: list[bool] = []
    plan_uniform = engine._plan_uniform

    def watched(*args):
        jobs = plan_uniform(*args)
        bulk.append(jobs is not None)
        return jobs

    monkeypatch.setattr(engine, "_plan_uniform", watched)
    try:
        assert await engine.step_many(None, []) == []  # nothing to do: nothing planned
        assert not bulk
        lstm = engine.model("tiny-lstm")
        ids = [(await engine.create_session(lstm, None)).session_id for _ in range(6)]
        other = (await engine.create_session(engine.model("tiny-gru"), None)).session_id
        rng = np.random.default_rng(5)
        xs = rng.normal(size=(6, 20, MODELS["tiny-lstm"])).astype(np.float32)
        done = [0] * 6  # steps applied per session

        async def send(items: list[StepItem], expect_bulk: bool) -> list:
            bulk.clear()
            results = await engine.step_many(None, items)
            assert bulk and all(bulk) == expect_bulk
            return results

        def item(k: int, steps: int = 1, as_list: bool = False, **extra) -> StepItem:
            x = xs[k, done[k] : done[k] + steps]
            return StepItem(ids[k], x.tolist() if as_list else x, **extra)

        def applied(k: int, result, steps: int = 1) -> None:
            assert isinstance(result, StepResult), result
            y, _ = reference("tiny-lstm").run(xs[k, : done[k] + steps])
            np.testing.assert_allclose(result.outputs, y[done[k] :], atol=TOL)
            done[k] += steps
            assert result.step_count == done[k]

        for as_list in (False, True):  # 6 items in blocks of 4 and 2, arrays then JSON lists
            results = await send([item(k, as_list=as_list) for k in range(6)], True)
            for k, result in enumerate(results):
                applied(k, result)
        results = await send([item(k, steps=2) for k in range(6)], True)
        for k, result in enumerate(results):
            applied(k, result, steps=2)

        bad_x = np.full((1, MODELS["tiny-lstm"]), np.nan, np.float32)
        near_misses = [  # (item 0 replaced by, what it answers)
            (StepItem(ids[0], bad_x), InvalidInput),
            (StepItem(ids[0], bad_x.tolist()), InvalidInput),
            (StepItem("no-such-session", xs[0, :1]), SessionNotFound),
            (StepItem(other, xs[0, :1]), InvalidInput),  # the GRU takes other widths
            (StepItem(ids[0], xs[0, :1], 10_000), SequenceMismatch),
            (StepItem(ids[0], [[1.0, "2", 3.0]]), InvalidInput),
            (None, None),  # float64 inputs: planned item by item, and applied
            (StepItem(ids[0], xs[0, :1].tolist() + [[1.0]]), InvalidInput),
        ]
        for replacement, error in near_misses:
            items = [item(k) for k in range(6)]
            if replacement is None:
                replacement = StepItem(ids[0], xs[0, done[0] : done[0] + 1].astype(np.float64))
            items[0] = replacement
            results = await send(items, False)
            if error is None:
                applied(0, results[0])
            else:
                assert isinstance(results[0], error), results[0]
            for k in range(1, 6):
                applied(k, results[k])
        items = [item(k) for k in range(6)]
        items[2] = item(2, steps=3)  # another step count: a block of its own
        items[4] = item(4, seq=done[4] + 1)
        results = await send(items, False)
        for k, result in enumerate(results):
            applied(k, result, steps=3 if k == 2 else 1)
    finally:
        await engine.stop()


async def test_turns_in_bulk_keep_arrival_order_and_forget_who_gave_up():
    """A message takes its sessions' turns in bulk; a session another message holds is
    waited for, behind whoever came before, and one who gave up waiting leaves nothing
    behind once the session is free."""
    from service.engine import _Turns

    turns = _Turns()
    assert turns.enter_many(["a", "b"]) == []  # free: ours at once, no future
    waiting = turns.enter_many(["b", "c"])  # b is the first message's: wait for it
    assert [key for key, _ in waiting] == ["b"]
    late = turns.enter("b")  # a single step queues behind the second message
    turns.leave_many(["a", "b"])
    assert waiting[0][1].done() and not late.done()  # b passes on in arrival order
    gave_up = turns.enter("c")
    turns.abandon("c", gave_up)  # a caller cancelled while waiting
    turns.leave_many(["b", "c"])
    assert late.done()
    turns.leave("b")
    assert turns._users == {} and turns._waiters == {}


async def test_a_waiter_cancelled_as_the_holder_leaves_does_not_block_the_session(
    model_repo, reference
):
    """A request waiting for a session's turn is cancelled (its client went) in the loop
    iteration in which the holder leaves: the turn must still go to the next request, not
    stay counted for the one that gave up (every later request then waited for ever)."""
    from service.config import Settings
    from service.engine import Engine, StepItem, StepResult, _Turns

    turns = _Turns()
    assert turns.enter("k") is None  # A holds
    gave_up = turns.enter("k")  # B waits ...
    gave_up.cancel()  # ... and its task is cancelled: its future at once, its abandon later
    turns.leave("k")  # A leaves first
    assert turns.enter("k") is None  # C gets the free turn at once
    turns.abandon("k", gave_up)  # B counts itself out, late: nothing to undo
    turns.leave("k")
    assert turns._users == {} and turns._waiters == {}

    engine = Engine(Settings(model_repo=model_repo, grpc_port=0))
    await engine.start()
    try:
        sid = (await engine.create_session(engine.model("tiny-lstm"), None)).session_id
        x = np.random.default_rng(3).normal(size=(2, MODELS["tiny-lstm"])).astype(np.float32)
        lock = engine._session_lock(sid)  # a request holding the turn (a reset, say)
        await lock.__aenter__()
        waiting = asyncio.create_task(engine.step(sid, None, x[:1]))
        await asyncio.sleep(0)
        after = asyncio.create_task(engine.step_many(None, [StepItem(sid, x[:1])]))
        waiting.cancel()
        await lock.__aexit__(None, None, None)
        await asyncio.gather(waiting, return_exceptions=True)
        (first,) = await asyncio.wait_for(after, 5)
        second = await asyncio.wait_for(engine.step(sid, None, x[1:]), 5)
        y, _ = reference("tiny-lstm").run(x)
        assert isinstance(first, StepResult) and first.step_count == 1
        np.testing.assert_allclose(first.outputs, y[:1], atol=TOL)
        np.testing.assert_allclose(second.outputs, y[1:], atol=TOL)
    finally:
        await engine.stop()


def test_cli_sets_the_gc_threshold(monkeypatch):
    import gc

    from service import cli

    before = gc.get_threshold()
    monkeypatch.setattr(cli.uvicorn, "run", lambda app, **kwargs: None)
    monkeypatch.setattr(cli, "configure_logging", lambda *args: None)
    monkeypatch.setenv("RNNSERVE_GC_THRESHOLD", "12345")
    try:
        cli.main(["--grpc-port", "0"])
        assert gc.get_threshold() == (12345, *before[1:])
    finally:
        gc.set_threshold(*before)


def test_response_frames_round_trip_with_errors():
    """Answers in order: outputs (any float dtype), replays and failed items, mixed or all failed."""
    error = {"code": "session_not_found", "message": "no session x"}
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    mixed = [(y, 5, False), error, (y[:1].astype(np.float64), 9, True), error]
    listed = json.dumps([{"index": k, **error} for k in (1, 3)]).encode()
    out = decode_many_response(encode_many_response(mixed, listed))
    assert out[1] == out[3] == error
    assert out[0][0].tolist() == y.tolist() and out[0][1:] == (5, False)
    assert out[2][0].tolist() == y[:1].tolist() and out[2][1:] == (9, True)
    only = decode_many_response(encode_many_response([error], json.dumps([{"index": 0, **error}]).encode()))
    assert only == [error]
    assert decode_many_response(encode_many_response([])) == []


@pytest.mark.parametrize(
    ("slice_items", "n", "slices"),
    [
        (2, 5, [(2, True), (2, True), (1, False)]),
        (256, 64, [(64, False)]),  # not split below 64 items a slice
        (256, 130, [(65, True), (65, False)]),  # one slice per pool thread
        (256, 600, [(256, True), (256, True), (88, False)]),
    ],
)
async def test_only_a_messages_last_slice_may_run_on_the_loop(
    model_repo, reference, monkeypatch, slice_items, n, slices
):
    """The memory store's pipeline cuts a round into slices of at most ``mux_slice_items``,
    one per pool thread at least, but none smaller than 64 items for that. It submits
    each slice but the last with ``more``: those go to the pool (the event loop has the
    next slices to plan), and only the last may run on the loop's thread beside a pool
    call. The answers are the reference's."""
    from service.batching import StepBatcher
    from service.config import Settings
    from service.engine import Engine, StepItem, StepResult

    flags: list[tuple[int, bool]] = []
    submit_block = StepBatcher.submit_block

    async def spied(self, x, states, *, more=False):
        flags.append((x.shape[0], more))
        return await submit_block(self, x, states, more=more)

    monkeypatch.setattr(StepBatcher, "submit_block", spied)
    engine = Engine(Settings(model_repo=model_repo, mux_slice_items=slice_items, grpc_port=0))
    await engine.start()
    try:
        rng = np.random.default_rng(5)
        entry = engine.model("tiny-lstm")
        ids = [(await engine.create_session(entry, None)).session_id for _ in range(n)]
        xs = rng.normal(size=(n, 1, MODELS["tiny-lstm"])).astype(np.float32)
        results = await engine.step_many(None, [StepItem(sid, x) for sid, x in zip(ids, xs)])
        assert flags == slices
        ref = reference("tiny-lstm")
        for x, result in zip(xs, results):
            assert isinstance(result, StepResult)
            np.testing.assert_allclose(result.outputs, ref.run(x)[0], atol=TOL)
    finally:
        await engine.stop()
