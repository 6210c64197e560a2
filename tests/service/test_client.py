"""The Python client (service.client) against real server processes.

Every result is compared with the independent onnxruntime reference to 1e-5; streams are
broken on purpose to check that reconnecting never applies a step twice nor loses one.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from functools import partial

import httpx
import numpy as np
import pytest

from service.client import (
    AsyncClient,
    Client,
    GenerateResult,
    Prediction,
    RnnServeError,
    SessionInfo,
    StepResult,
)

pytestmark = pytest.mark.timeout(120)

ATOL = 1e-5
RNG = np.random.default_rng(7)
VOCAB = list("BTPSXVE")


def close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=ATOL)


def row_states(ref, finals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's batched final states as the API's per-sequence state payload."""
    return {s["input"]: np.take(finals[s["input"]], 0, axis=s["batch_axis"]) for s in ref.card["states"]}


def batched(ref, state: dict) -> dict[str, np.ndarray]:
    """An API state payload as the reference's batch-of-one feed."""
    return {
        s["input"]: np.expand_dims(np.asarray(state[s["input"]], np.float32), s["batch_axis"])
        for s in ref.card["states"]
    }


def one_hot(symbols) -> np.ndarray:
    x = np.zeros((len(symbols), len(VOCAB)), np.float32)
    for t, s in enumerate(symbols):
        x[t, VOCAB.index(s)] = 1.0
    return x


def greedy_symbols(ref, steps: int):
    """What greedy (temperature 0) generation from the start symbol gives, step by step."""
    y, states = ref.run(one_hot("B"))
    generated = []
    for _ in range(steps):
        symbol = VOCAB[int(np.argmax(y[-1]))]
        generated.append(symbol)
        y, states = ref.run(one_hot(symbol), states)
        if symbol == "E":
            break
    return generated, states


def value_generation(ref, prime: np.ndarray, steps: int):
    y, states = ref.run(prime)
    generated = []
    for _ in range(steps):
        generated.append(y[-1])
        y, states = ref.run(y[-1:], states)
    return np.asarray(generated), states


# -- REST, synchronous ---------------------------------------------------------------------


def test_models_and_predict(server, reference):
    ref = reference("tiny-lstm")
    with Client(server.url) as client:
        assert client.ready()
        names = [m["name"] for m in client.models()]
        assert {"tiny-lstm", "tiny-gru", "tiny-rnn"} <= set(names)
        info = client.model("tiny-lstm")
        assert info["default_version"] == 1
        assert info["versions"][0]["card"]["input_size"] == 3

        a = RNG.normal(size=(5, 3)).astype(np.float32)
        b = RNG.normal(size=(2, 3)).astype(np.float32)
        # lists and arrays, sequences of different lengths
        p = client.predict("tiny-lstm", [a.tolist(), b], return_states=True)
        assert isinstance(p, Prediction) and (p.model, p.version) == ("tiny-lstm", 1)
        for x, y, state in zip([a, b], p.outputs, p.states):
            y_ref, finals = ref.run(x)
            assert y.shape == (len(x), 2)
            close(y, y_ref)
            for k, v in row_states(ref, finals).items():
                close(state[k], v)

        # a [batch, steps, features] array, last step only, from given initial states
        batch = RNG.normal(size=(2, 4, 3)).astype(np.float32)
        starts = [p.states[0], {k: v.tolist() for k, v in p.states[1].items()}]
        last = client.predict(
            "tiny-lstm", batch, version=1, return_sequences=False, initial_states=starts
        )
        for x, y, state in zip(batch, last.outputs, starts):
            assert y.shape == (2,)
            close(y, ref.run(x, batched(ref, state))[0][-1])

        gru = client.predict("tiny-gru", [list("BTSSX")])
        y_ref, _ = reference("tiny-gru").run(one_hot("BTSSX"))
        close(gru.outputs[0], y_ref)
        assert gru.symbols == [[VOCAB[i] for i in np.argmax(y_ref, axis=1)]]

        with pytest.raises(RnnServeError) as err:
            client.model("missing")
        assert (err.value.status, err.value.code) == (404, "model_not_found")
        with pytest.raises(RnnServeError) as err:
            client.predict("tiny-lstm", [[[1.0, 2.0]]])
        assert (err.value.status, err.value.code) == (422, "invalid_input")
        assert not err.value.transient


def test_sessions(server, reference):
    lstm, gru, rnn = reference("tiny-lstm"), reference("tiny-gru"), reference("tiny-rnn")
    x = RNG.normal(size=(7, 3)).astype(np.float32)
    with Client(server.url) as client:
        info = client.create_session("tiny-lstm")
        assert isinstance(info, SessionInfo) and info.step_count == 0 and info.model == "tiny-lstm"
        first = client.step(info, x[:3])  # an array
        second = client.step(info.session_id, x[3:].tolist())  # a list
        assert isinstance(first, StepResult) and second.step_count == 7
        y_ref, finals = lstm.run(x)
        close(np.concatenate([first.outputs, second.outputs]), y_ref)
        assert client.session(info).step_count == 7

        exported = client.export_state(info)
        assert exported["step_count"] == 7 and exported["model"] == "tiny-lstm"
        for k, v in row_states(lstm, finals).items():
            close(exported["state"][k], v)

        # the exported state carries on in a new session, and in one created with it
        more = RNG.normal(size=(2, 3)).astype(np.float32)
        y_more, _ = lstm.run(more, finals)
        imported = client.import_state(exported)
        assert imported.session_id != info.session_id
        assert (imported.model, imported.version, imported.step_count) == ("tiny-lstm", 1, 0)
        close(client.step(imported, more).outputs, y_more)
        seeded = client.create_session("tiny-lstm", version=1, state=exported["state"])
        close(client.step(seeded, more).outputs, y_more)

        # seq: a retry is replayed, a wrong seq is refused and changes nothing
        once = client.step(info, more, seq=9)
        again = client.step(info, more, seq=9)
        close(once.outputs, y_more)
        assert not once.replayed and again.replayed and again.step_count == 9
        close(again.outputs, once.outputs)
        with pytest.raises(RnnServeError) as err:
            client.step(info, more, seq=20)
        assert (err.value.status, err.value.code) == (409, "seq_mismatch")
        assert err.value.details["step_count"] == 9

        reset = client.reset(info)
        assert reset.step_count == 0
        close(client.step(info, x).outputs, y_ref)

        # symbol generation (greedy) and value generation with a prime
        g = client.create_session("tiny-gru")
        expected, states = greedy_symbols(gru, 6)
        out = client.generate(g, 6, temperature=0.0)
        assert isinstance(out, GenerateResult) and out.generated == expected
        assert out.text == "".join(expected) and out.step_count == 1 + len(expected)
        close(client.step(g, ["T"]).outputs, gru.run(one_hot("T"), states)[0])
        sampled = [client.generate(client.create_session("tiny-gru"), 5, seed=3) for _ in range(2)]
        assert sampled[0].generated == sampled[1].generated

        r = client.create_session("tiny-rnn")
        prime = RNG.normal(size=(3, 1)).astype(np.float32)
        values, states = value_generation(rnn, prime, 4)
        out = client.generate(r, 4, prime=prime.ravel().tolist())
        close(out.generated, values)
        assert out.step_count == 7
        close(client.step(r, [0.25]).outputs, rnn.run(np.array([[0.25]]), states)[0])

        with pytest.raises(RnnServeError) as err:
            client.generate(info, 3)
        assert (err.value.status, err.value.code) == (400, "not_supported")

        client.delete(info)
        with pytest.raises(RnnServeError) as err:
            client.session(info)
        assert (err.value.status, err.value.code) == (404, "session_not_found")
        with pytest.raises(RnnServeError) as err:
            client.step(info, x)
        assert err.value.code == "session_not_found"

        report = client.reload()
        assert set(report) == {"loaded", "unloaded", "failed"} and report["failed"] == []


class FlakyTransport(httpx.HTTPTransport):
    """Breaks chosen step requests: ``lose`` applies the request on the server but loses
    the answer; ``503`` answers 503 without forwarding anything."""

    def __init__(self, plan: dict[int, str]) -> None:
        super().__init__()
        self.plan = dict(plan)
        self.steps = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/steps"):
            self.steps += 1
            action = self.plan.pop(self.steps, None)
            if action == "503":
                return httpx.Response(
                    503, json={"error": {"code": "store_unavailable", "message": "injected"}}
                )
            if action == "lose":
                super().handle_request(request).close()
                raise httpx.ReadError("injected: the answer was lost", request=request)
        return super().handle_request(request)


class AsyncFlakyTransport(httpx.AsyncHTTPTransport):
    def __init__(self, plan: dict[int, str]) -> None:
        super().__init__()
        self.plan = dict(plan)
        self.steps = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/steps"):
            self.steps += 1
            action = self.plan.pop(self.steps, None)
            if action == "503":
                return httpx.Response(503, json={"error": {"code": "x", "message": "injected"}})
            if action == "lose":
                await (await super().handle_async_request(request)).aclose()
                raise httpx.ReadError("injected: the answer was lost", request=request)
        return await super().handle_async_request(request)


def test_session_helper_retries_exactly_once(server, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(6, 3)).astype(np.float32)
    chunks = [x[:2], x[2:3], x[3:5], x[5:]]
    # request 2 is applied but its answer lost (retried as request 3: replayed),
    # request 4 meets a 503 (retried as request 5: applied then)
    transport = FlakyTransport({2: "lose", 4: "503"})
    with Client(server.url, transport=transport) as client:
        with client.open_session("tiny-lstm", backoff=0.01) as session:
            results = [session.step(c) for c in chunks]
            assert session.retried == 2 and session.step_count == 6
            assert [r.replayed for r in results] == [False, True, False, False]
            close(np.concatenate([r.outputs for r in results]), ref.run(x)[0])
            assert client.session(session).step_count == 6  # nothing applied twice
            sid = session.session_id
        with pytest.raises(RnnServeError) as err:
            client.session(sid)  # the with block deleted it
        assert err.value.code == "session_not_found"

        # attach to an existing session: its step_count is fetched, then tracked
        other = client.create_session("tiny-lstm")
        client.step(other, x[:2])
        attached = client.attach_session(other.session_id, backoff=0.01)
        assert attached.step_count == 2 and attached.model == "tiny-lstm"
        close(attached.step(x[2:]).outputs, ref.run(x)[0][2:])
        assert attached.export_state()["step_count"] == 6 == attached.refresh().step_count
        assert attached.reset().step_count == 0 == attached.step_count
        attached.delete()
        attached.delete(missing_ok=True)

        # without seq nothing is retried: the error says the outcome is unknown
        transport.plan = {transport.steps + 1: "lose"}
        bare = client.create_session("tiny-lstm")
        with pytest.raises(RnnServeError) as err:
            client.step(bare, x[:1])
        assert (err.value.status, err.value.code) == (None, "connection_error")
        assert err.value.transient

    with Client(f"{server.url}/no/prefix") as client, pytest.raises(RnnServeError) as err:
        client.models()  # the base URL's path is kept: /no/prefix/v1/models
    assert (err.value.status, err.value.code) == (404, "not_found")


# -- asynchronous ----------------------------------------------------------------------------


async def test_async_client(server, reference):
    lstm, gru = reference("tiny-lstm"), reference("tiny-gru")
    x = RNG.normal(size=(5, 3)).astype(np.float32)
    y_ref, finals = lstm.run(x)
    transport = AsyncFlakyTransport({5: "lose", 7: "503"})
    async with AsyncClient(server.url, transport=transport) as client:
        assert await client.ready()
        assert "tiny-gru" in [m["name"] for m in await client.models()]
        assert (await client.model("tiny-gru"))["versions"][0]["card"]["vocabulary"] == VOCAB
        p = await client.predict("tiny-lstm", [x], return_states=True)
        close(p.outputs[0], y_ref)

        info = await client.create_session("tiny-lstm")
        first = await client.step(info, x[:2], seq=2)
        second = await client.step(info, x[2:], seq=5)
        close(np.concatenate([first.outputs, second.outputs]), y_ref)
        assert (await client.session(info)).step_count == 5
        exported = await client.export_state(info)
        copy = await client.import_state(exported)
        more = x[:1]
        close((await client.step(copy, more)).outputs, lstm.run(more, finals)[0])
        assert (await client.reset(info)).step_count == 0

        # the exactly-once helper: request 5 applied + answer lost, request 7 a 503
        async with await client.open_session("tiny-lstm", backoff=0.01) as session:
            results = [await session.step(c) for c in (x[:2], x[2:4], x[4:])]
            assert session.retried == 2 and session.step_count == 5
            assert [r.replayed for r in results] == [False, True, False]
            close(np.concatenate([r.outputs for r in results]), y_ref)
            assert (await session.refresh()).step_count == 5

        attached = await client.attach_session(copy.session_id)
        assert attached.step_count == 1
        await attached.step(more)
        assert (await attached.export_state())["step_count"] == 2
        assert (await attached.reset()).step_count == 0 == attached.step_count
        await attached.delete()

        g = await client.open_session("tiny-gru")
        expected, _ = greedy_symbols(gru, 5)
        out = await g.generate(5, temperature=0)
        assert out.generated == expected and g.step_count == 1 + len(expected)
        await g.delete()
        with pytest.raises(RnnServeError) as err:
            await client.session(g.session_id)
        assert err.value.code == "session_not_found"
        await client.delete(info)
        assert (await client.reload())["failed"] == []


# -- WebSocket streams --------------------------------------------------------------------------


def _step_count_is(client: Client, session_id: str, count: int) -> bool:
    return client.session(session_id).step_count == count


def drop_on_send(stream, applied=None) -> None:
    """Break the stream's current connection at its next message.

    With ``applied`` (a callable true once the server has applied the message), the
    message is sent, and once the server applied it the connection is cut and the send
    fails as a dropped connection would: the answer is lost, so the client's retry must be
    answered as a replay. Without it, the connection is cut before the message leaves: the
    server never saw it, so the retry is applied afresh. Both are deterministic, where
    cutting the socket right after the send raced the server's read of the message against
    its sight of the closed connection, and the client's reader against the answer."""
    connection = stream.connection
    original = connection.send

    def send(message):
        if applied is not None:
            original(message)
            deadline = time.monotonic() + 10
            while not applied():
                assert time.monotonic() < deadline, "the server never applied the message"
                time.sleep(0.005)
        connection.close()
        raise ConnectionResetError("cut by the test")

    connection.send = send


def test_stream_json_and_binary_equal_rest(server, reference):
    lstm = reference("tiny-lstm")
    x = RNG.normal(size=(9, 3)).astype(np.float32)
    chunks = [x[:1], x[1:4], x[4:5].tolist(), x[5:]]
    with Client(server.url) as client:
        session = client.open_session("tiny-lstm")
        rest = np.concatenate([session.step(c).outputs for c in chunks])
        close(rest, lstm.run(x)[0])
        for binary in (False, True):
            stream = client.stream("tiny-lstm", chunks, binary=binary)
            results = list(stream)
            assert [r.step_count for r in results] == [1, 4, 5, 9]
            assert stream.step_count == 9 and stream.reconnects == 0
            got = np.concatenate([r.outputs for r in results])
            assert got.dtype == np.float32
            close(got, rest)
            assert client.session(stream.session_id).step_count == 9

        # symbols: JSON answers name them; binary frames one-hot them (vocabulary fetched)
        word = list("BTSSXXTVVE")
        y_ref, _ = reference("tiny-gru").run(one_hot(word))
        with client.stream("tiny-gru") as js:
            answers = [js.step(word[:4]), js.step(word[4:])]
        close(np.concatenate([a.outputs for a in answers]), y_ref)
        assert answers[0].symbols == [VOCAB[i] for i in np.argmax(y_ref[:4], axis=1)]
        binary = list(client.stream("tiny-gru", [word[:4], word[4:]], binary=True))
        close(np.concatenate([a.outputs for a in binary]), y_ref)
        assert binary[0].symbols is None

        # resuming: by session id, and through a Session whose step_count follows
        with client.stream(session_id=session.session_id, binary=True) as resumed:
            assert resumed.info.step_count == 9 == resumed.step_count
            more = resumed.step(x[:2])
        assert more.step_count == 11
        y_all, _ = lstm.run(np.concatenate([x, x[:2], x[:1]]))
        close(more.outputs, y_all[9:11])
        assert session.refresh().step_count == 11
        last = list(session.stream([x[:1]]))
        assert session.step_count == 12 and last[0].step_count == 12
        close(last[0].outputs, y_all[11:])
        session.delete()


def test_stream_reconnects_exactly_once(server, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(9, 3)).astype(np.float32)
    chunks = [x[:2], x[2:3], x[3:4], x[4:6], x[6:7], x[7:8], x[8:]]
    with Client(server.url) as client:
        for binary in (False, True):
            stream = client.stream("tiny-lstm", binary=binary, backoff=0.01)
            results = []
            with stream:
                for k, chunk in enumerate(chunks):
                    if k == 2:
                        stream.connection.close()  # dropped between two messages
                    if k == 4:  # dropped once the server applied the message, unanswered
                        applied = partial(_step_count_is, client, stream.session_id, 7)
                        drop_on_send(stream, applied)
                    if k == 5:
                        drop_on_send(stream)  # dropped before the message left
                    results.append(stream.step(chunk))
            assert stream.reconnects == 3
            assert [r.step_count for r in results] == [2, 3, 4, 6, 7, 8, 9]
            assert [r.replayed for r in results] == [False] * 4 + [True, False, False]
            close(np.concatenate([r.outputs for r in results]), ref.run(x)[0])
            assert client.session(stream.session_id).step_count == 9  # none applied twice


async def test_async_stream(server, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(6, 3)).astype(np.float32)
    y_ref = ref.run(x)[0]

    async def chunks():
        for t in range(0, 6, 2):
            yield x[t : t + 2]

    async with AsyncClient(server.url) as client:
        for binary in (False, True):
            stream = client.stream("tiny-lstm", chunks(), binary=binary)
            results = [r async for r in stream]
            assert [r.step_count for r in results] == [2, 4, 6]
            close(np.concatenate([r.outputs for r in results]), y_ref)

        # an unanswered message survives a dropped connection
        async with client.stream("tiny-lstm", binary=True, backoff=0.01) as stream:
            first = await stream.step(x[:3])
            connection = stream.connection
            original = connection.send

            async def send(message):
                await original(message)
                # lost once the server applied it (see drop_on_send)
                deadline = time.monotonic() + 10
                while (await client.session(stream.session_id)).step_count != 6:
                    assert time.monotonic() < deadline, "the server never applied the message"
                    await asyncio.sleep(0.005)
                await connection.close()
                raise ConnectionResetError("cut by the test")

            connection.send = send
            second = await stream.step(x[3:])
        assert second.replayed and stream.reconnects == 1 and second.step_count == 6
        close(np.concatenate([first.outputs, second.outputs]), y_ref)
        assert (await client.session(stream.session_id)).step_count == 6

        with pytest.raises(RnnServeError) as err:
            await client.stream(session_id="no-such-session").open()
        assert (err.value.status, err.value.code) == (404, "session_not_found")


def test_stream_errors(server, reference):
    ref = reference("tiny-lstm")
    x = RNG.normal(size=(3, 3)).astype(np.float32)
    with Client(server.url) as client:
        with client.stream("tiny-lstm") as stream:
            stream.step(x[:1])
            with pytest.raises(RnnServeError) as err:
                stream.step([[1.0, 2.0]])  # 2 features for a 3-feature model
            assert (err.value.status, err.value.code) == (422, "invalid_input")
            with pytest.raises(RnnServeError) as err:
                stream.step([["B"]])
            assert err.value.code == "invalid_input"
            after = stream.step(x[1:])  # the stream and the session go on untouched
        assert after.step_count == 3 and stream.reconnects == 0
        close(after.outputs, ref.run(x)[0][1:])

        with pytest.raises(RnnServeError) as err:
            list(client.stream("missing", [x]))
        assert (err.value.status, err.value.code) == (404, "model_not_found")
        with pytest.raises(RnnServeError) as err:
            client.stream(session_id="no-such-session").open()
        assert (err.value.status, err.value.code) == (404, "session_not_found")

        doomed = client.open_session("tiny-lstm")
        with client.stream(doomed) as stream:
            stream.step(x[:1])
            doomed.delete()
            with pytest.raises(RnnServeError) as err:
                stream.step(x[1:2])
            assert err.value.code == "session_not_found"
        with pytest.raises(RuntimeError):
            stream.step(x[:1])  # closed


def test_api_keys_and_rate_limited_stream(server_factory, model_repo, reference):
    server = server_factory(model_repo, RNNSERVE_API_KEYS="k1,k2", RNNSERVE_WS_MAX_MESSAGES_PER_S="20")
    x = [[0.1, 0.2, 0.3]]
    with Client(server.url, api_key="k1") as client:
        assert client.models()
        info = client.create_session("tiny-lstm")
        assert client.step(info, x).step_count == 1
        assert [r.step_count for r in client.stream(info, [x, x], binary=True)] == [2, 3]

        # 30 messages at once on a stream limited to 20 per second: the rate_limited
        # error frames are transient, so the stream waits and sends them again
        many = RNG.normal(size=(30, 3)).astype(np.float32)
        stream = client.stream("tiny-lstm", list(many[:, None, :]), backoff=0.05, retries=8)
        results = list(stream)
        assert [r.step_count for r in results] == list(range(1, 31))
        assert stream.retried > 0 and stream.reconnects == 0
        close(np.concatenate([r.outputs for r in results]), reference("tiny-lstm").run(many)[0])

        with Client(server.url, api_key="k2") as other:  # another key's session is invisible
            with pytest.raises(RnnServeError) as err:
                other.session(info)
            assert err.value.code == "session_not_found"
    for key in (None, "wrong"):
        with Client(server.url, api_key=key) as client:
            with pytest.raises(RnnServeError) as err:
                client.models()
            assert (err.value.status, err.value.code) == (401, "unauthorized")
            with pytest.raises(RnnServeError) as err:
                list(client.stream("tiny-lstm", [x]))
            assert (err.value.status, err.value.code) == (401, "unauthorized")
            # the multiplexed socket: the error frame sent before the close, not a
            # connection_error a retry loop would take for a network blip
            for binary in (False, True):
                with client.multiplex(binary=binary) as mux, pytest.raises(RnnServeError) as err:
                    mux.send([{"session_id": "s", "inputs": x}])
                assert (err.value.status, err.value.code) == (401, "unauthorized")
                assert not err.value.transient


def test_connection_errors_and_light_import(server):
    port = server.port
    server.stop()
    with Client(f"http://127.0.0.1:{port}", timeout=2) as client:
        assert not client.ready()
        with pytest.raises(RnnServeError) as err:
            client.models()
        assert (err.value.status, err.value.code) == (None, "connection_error")
        assert err.value.transient
        with pytest.raises(RnnServeError) as err:
            client.stream("tiny-lstm", retries=1, backoff=0.01).open()
        assert err.value.code == "connection_error"

    code = (
        "import sys, service.client; "
        "heavy = {'torch', 'fastapi', 'uvicorn', 'starlette', 'pydantic', 'onnxruntime'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- found by the client hunt of the fifth round -------------------------------------------


async def test_a_cancelled_async_step_never_shifts_the_answers(server):
    """A step cancelled after its message went out (a deadline around it) left its answer
    on the socket: the next step read it (5,000 rows for a 1-step message). The connection
    now goes with the cancelled call: the next step answers itself, or, when the abandoned
    message was applied meanwhile, refuses with seq_mismatch and the session's count."""
    big = np.zeros((5000, 3), np.float32)
    async with AsyncClient(server.url) as client:
        stream = client.stream("tiny-lstm", binary=True)
        await stream.open()
        await stream.step(np.zeros((1, 3), np.float32))
        with contextlib.suppress(TimeoutError):  # (on a fast machine it may just finish)
            await asyncio.wait_for(stream.step(big), 0.005)
        try:
            result = await stream.step(np.ones((1, 3), np.float32))
        except RnnServeError as exc:
            assert exc.code == "seq_mismatch" and exc.details["step_count"] in (1, 5001), exc
        else:
            assert result.outputs.shape == (1, 2) and result.step_count in (2, 5002), result
        await stream.close()
        sid = (await client.create_session("tiny-lstm")).session_id
        other = (await client.create_session("tiny-lstm")).session_id
        async with client.multiplex(binary=True) as mux:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(mux.send([{"session_id": sid, "inputs": big}]), 0.005)
            (mine,) = await mux.send([{"session_id": other, "inputs": np.ones((1, 3), np.float32)}])
        assert mine.session_id == other and mine.step_count == 1 and mine.outputs.shape == (1, 2)


def test_binary_multiplexed_results_read_like_the_other_paths(server, reference):
    """Binary multiplexed results: errors kept their code and message only (no
    ``step_count`` for a seq_mismatch), outputs were read-only views of the frame, and a
    flat series of a one-feature model was refused."""
    with Client(server.url) as client:
        sid = client.create_session("tiny-lstm").session_id
        rnn = client.create_session("tiny-rnn").session_id
        with client.multiplex(binary=True) as mux:
            ok, bad, flat = mux.send([
                {"session_id": sid, "inputs": [[0.1, 0.2, 0.3]], "seq": 1},
                {"session_id": sid, "inputs": [[0.1, 0.2, 0.3]], "seq": 9},
                {"session_id": rnn, "inputs": np.array([0.3, 0.1], np.float32)},
            ])
        assert bad.code == "seq_mismatch" and bad.details.get("step_count") == 1, bad
        ok.outputs += 1  # writable, as a JSON result's
        assert flat.step_count == 2
        close(flat.outputs, reference("tiny-rnn").run(np.array([[0.3], [0.1]], np.float32))[0])


def test_every_code_has_its_status_and_bare_proxy_statuses_are_transient():
    """model_changed (409) and unsupported_media_type (415) had no status outside REST;
    the table now comes from the server's own error hierarchy. A bare 429 (a proxy's) is
    retried like a bare 503, as docs/api.md says; an rnnserve 429 follows its code."""
    from service.errors import ModelChanged, ServeError

    assert RnnServeError.from_body({"error": {"code": "model_changed", "message": ""}}).status == 409
    assert RnnServeError.from_body({"error": {"code": "unsupported_media_type"}}).status == 415
    pending = [ServeError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        assert RnnServeError.from_body({"error": {"code": cls.code}}).status == cls.status
    assert ModelChanged.status == 409
    assert RnnServeError(429, "http_error", "Too Many Requests").transient
    assert RnnServeError(503, "http_error", "Service Unavailable").transient
    assert not RnnServeError(429, "too_many_sessions", "").transient
    assert RnnServeError(429, "overloaded", "").transient
