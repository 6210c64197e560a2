"""A stateful property test of session semantics against a real app (issue 9, "beyond the list").

Hypothesis drives random interleavings of every way to touch a session (v1 steps with and
without ``seq``, retries and wrong ``seq``, concurrent steps, WebSocket JSON and binary
steps, multiplexed messages over REST and ``/v1/stream`` (JSON and binary), reset, delete, export / import, generate, batch predict, Triton START / plain / END,
concurrent STARTs), another API key poking at every session (it must see only what an
unknown id gets, and change nothing), and deploys: the served model swapped in place for
another one with the same state contract, broken files written over it, its folder
removed. Through HTTP and WebSocket on one in-process app, on the memory and Redis stores.

The reference is a plain model of the semantics (state, step_count, the last answer kept
for a retry, which exact model a session was created on) whose every number comes from
onnxruntime run directly on the model files, none of the service's code involved.

``RNNSERVE_STATEFUL_EXAMPLES`` (default 25) sets the number of examples; the run is
derandomized so CI is reproducible (``RNNSERVE_STATEFUL_RANDOM=1`` explores new ones):
``RNNSERVE_STATEFUL_EXAMPLES=300 RNNSERVE_STATEFUL_RANDOM=1 pytest tests/hardening/test_stateful.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import hypothesis
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from onnx import numpy_helper

from service.frames import decode_many_response, decode_response, encode_many, encode_request
from tests.conftest import Reference
from tests.hardening.conftest import app_client

MODEL = "tiny-rnn"
TOL = 1e-5
EXAMPLES = int(os.environ.get("RNNSERVE_STATEFUL_EXAMPLES", "25"))
MAX_SESSIONS = 5
SEQUENCE_IDS = (1, 2, 3)
OWNER, OTHER = "key-of-the-owner", "key-of-another"

values = st.floats(-2, 2, allow_nan=False, width=32)
step_lists = st.lists(values.map(lambda v: [v]), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def variants(model_repo: Path, tmp_path_factory) -> dict[str, Path]:
    """Two models with one state contract: the tiny RNN (A) and a re-weighted copy (B)."""
    root = tmp_path_factory.mktemp("variants")
    a, b = root / "A", root / "B"
    shutil.copytree(model_repo / MODEL / "1", a)
    b.mkdir()
    proto = onnx.load(a / "model.onnx")
    for k, tensor in enumerate(proto.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32:
            proto.graph.initializer[k].CopyFrom(numpy_helper.from_array(array * 0.7, tensor.name))
    onnx.save(proto, b / "model.onnx")
    card = json.loads((a / "card.json").read_text())
    card.pop("sha256", None)
    card["variant"] = "B"  # the card's size differs too, whatever the clock's resolution
    (b / "card.json").write_text(json.dumps(card))
    return {"A": a, "B": b}


@dataclass
class Expected:
    """What a session must be, computed by the reference."""

    model: str
    """The variant ("A" or "B") the session was created on."""
    states: dict[str, np.ndarray]
    step_count: int = 0
    last: np.ndarray | None = None
    """The last output row (what generation continues from); None after reset/import."""
    last_seq: int | None = None
    last_request: tuple | None = None
    """(inputs, answer) of the last request that carried seq, for retries."""
    extras: dict = field(default_factory=dict)


class SessionMachine(RuleBasedStateMachine):
    variants: ClassVar[dict[str, Path]] = {}
    store: ClassVar[str] = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.root = Path(tempfile.mkdtemp(prefix="stateful-"))
        self.stack.callback(shutil.rmtree, self.root, True)
        self.folder = self.root / MODEL / "1"
        shutil.copytree(self.variants["A"], self.folder)
        self.reference = {k: Reference(v) for k, v in self.variants.items()}
        self.card = self.reference["A"].card
        if self.store.startswith("redis"):
            import redis

            redis.Redis.from_url(self.store).flushdb()
        self.client = self.stack.enter_context(
            app_client(model_repo=self.root, session_store=self.store, api_keys=[OWNER, OTHER])
        )
        self.client.headers["X-API-Key"] = OWNER
        self.loaded: str | None = "A"
        """The variant the repository serves (None once the version is removed)."""
        self.sessions: dict[str, Expected] = {}
        self.gone: list[str] = []
        self.sequences: dict[int, Expected] = {}

    def teardown(self) -> None:
        self.stack.close()

    # -- the reference -----------------------------------------------------------------

    def run(self, model: str, x, states) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return self.reference[model].run(np.asarray(x, np.float32), states)

    def zero(self, model: str) -> dict[str, np.ndarray]:
        return self.reference[model].zero_states()

    def exported(self, states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            s["input"]: np.take(states[s["input"]], 0, axis=s["batch_axis"])
            for s in self.card["states"]
        }

    def imported(self, payload: dict) -> dict[str, np.ndarray]:
        return {
            s["input"]: np.expand_dims(np.asarray(payload[s["input"]], np.float32), s["batch_axis"])
            for s in self.card["states"]
        }

    def apply(self, expected: Expected, x, seq: int | None) -> np.ndarray:
        y, expected.states = self.run(expected.model, x, expected.states)
        expected.step_count += len(x)
        expected.last = y[-1]
        expected.last_seq = seq
        expected.last_request = (x, y) if seq is not None else None
        return y

    @staticmethod
    def close(actual, expected, what: str) -> None:
        np.testing.assert_allclose(np.asarray(actual, np.float32), expected, atol=TOL, err_msg=what)

    def pick(self, table: dict, k: int):
        keys = sorted(table)
        return keys[k % len(keys)]

    def refusal(self, expected: Expected) -> tuple[int, str] | None:
        """How a request that needs the session's model is refused, if it is."""
        if self.loaded is None:
            return 503, "model_not_ready"
        if expected.model != self.loaded:
            return 409, "model_changed"
        return None

    def expect_error(self, response, status: int, code: str) -> None:
        assert response.status_code == status, (status, code, response.status_code, response.text)
        assert response.json()["error"]["code"] == code, response.text

    # -- sessions over v1 ----------------------------------------------------------------

    @initialize()
    def first_session(self) -> None:
        self.create()

    @precondition(lambda self: self.loaded and len(self.sessions) < MAX_SESSIONS)
    @rule()
    def create(self) -> None:
        r = self.client.post(f"/v1/models/{MODEL}/sessions")
        assert r.status_code == 201, r.text
        self.sessions[r.json()["session_id"]] = Expected(self.loaded, self.zero(self.loaded))

    @precondition(lambda self: self.loaded and self.sessions and len(self.sessions) < MAX_SESSIONS)
    @rule(k=st.integers(0, 99))
    def export_and_import(self, k: int) -> None:
        source = self.pick(self.sessions, k)
        exported = self.client.get(f"/v1/sessions/{source}/state")
        assert exported.status_code == 200, exported.text
        body = exported.json()
        expected = self.sessions[source]
        assert body["step_count"] == expected.step_count
        for name, value in self.exported(expected.states).items():
            self.close(body["state"][name], value, f"exported {name}")
        r = self.client.post(f"/v1/models/{MODEL}/sessions", json={"state": body["state"]})
        assert r.status_code == 201, r.text
        self.sessions[r.json()["session_id"]] = Expected(self.loaded, self.imported(body["state"]))

    @precondition(lambda self: self.sessions)
    @rule(k=st.integers(0, 99), x=step_lists, mode=st.sampled_from(["none", "seq", "retry", "bad"]))
    def step(self, k: int, x, mode: str) -> None:
        sid = self.pick(self.sessions, k)
        expected = self.sessions[sid]
        retry = (
            mode == "retry"
            and expected.last_request is not None
            and expected.last_seq == expected.step_count
        )
        if retry:
            x = expected.last_request[0]
        body: dict = {"inputs": x}
        if mode != "none":
            body["seq"] = expected.step_count + len(x) + (mode == "bad")
        if retry:
            body["seq"] = expected.step_count
        r = self.client.post(f"/v1/sessions/{sid}/steps", json=body)
        # A retry of the last applied request is answered even once the session's model
        # was replaced or removed (exactly-once across a reload); a new step is refused.
        if not retry and (refused := self.refusal(expected)):
            return self.expect_error(r, *refused)
        if mode == "bad":
            self.expect_error(r, 409, "seq_mismatch")
            assert r.json()["error"]["step_count"] == expected.step_count
            return None
        assert r.status_code == 200, r.text
        answer = r.json()
        if retry:  # a retry: the stored answer, unchanged
            assert answer.get("replayed") is True, answer
            assert answer["step_count"] == expected.step_count
            self.close(answer["outputs"], expected.last_request[1], "replayed outputs")
            return None
        y = self.apply(expected, x, body.get("seq"))
        assert answer["step_count"] == expected.step_count and not answer.get("replayed")
        self.close(answer["outputs"], y, "step outputs")
        return None

    @precondition(lambda self: self.sessions)
    @rule(k=st.integers(0, 99), xs=st.lists(step_lists, min_size=2, max_size=4))
    def concurrent_steps(self, k: int, xs) -> None:
        """Steps racing on one session are applied one at a time, each exactly once; the
        step_count of each answer says where it landed."""
        sid = self.pick(self.sessions, k)
        expected = self.sessions[sid]
        with ThreadPoolExecutor(len(xs)) as pool:
            answers = list(
                pool.map(lambda x: self.client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x}), xs)
            )
        if refused := self.refusal(expected):
            for r in answers:
                self.expect_error(r, *refused)
            return
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        order = sorted(range(len(xs)), key=lambda i: answers[i].json()["step_count"])
        for i in order:
            y = self.apply(expected, xs[i], None)
            assert answers[i].json()["step_count"] == expected.step_count, "a step applied twice or skipped"
            self.close(answers[i].json()["outputs"], y, "concurrent step outputs")

    @precondition(lambda self: len(self.sessions) >= 2)
    @rule(k=st.integers(0, 99), xs=st.lists(st.lists(values.map(lambda v: [v]), min_size=1, max_size=2), min_size=2, max_size=6))
    def crowded_steps(self, k: int, xs) -> None:
        """Steps of several sessions at once (on the memory store, those that arrive
        together run as one crowd): each session gets exactly its own next step."""
        keys = sorted(self.sessions)
        sids = [keys[(k + i) % len(keys)] for i in range(min(len(xs), len(keys)))]
        xs = xs[: len(sids)]
        with ThreadPoolExecutor(len(sids)) as pool:
            answers = list(
                pool.map(
                    lambda sx: self.client.post(f"/v1/sessions/{sx[0]}/steps", json={"inputs": sx[1]}),
                    zip(sids, xs),
                )
            )
        for sid, x, r in zip(sids, xs, answers):
            expected = self.sessions[sid]
            if refused := self.refusal(expected):
                self.expect_error(r, *refused)
                continue
            assert r.status_code == 200, r.text
            y = self.apply(expected, x, None)
            assert r.json()["step_count"] == expected.step_count, "a step applied twice or skipped"
            self.close(r.json()["outputs"], y, "crowded step outputs")

    @precondition(lambda self: self.sessions)
    @rule(k=st.integers(0, 99), xs=st.lists(step_lists, min_size=1, max_size=3), binary=st.booleans(),
          with_seq=st.booleans())
    def websocket_steps(self, k: int, xs, binary: bool, with_seq: bool) -> None:
        sid = self.pick(self.sessions, k)
        expected = self.sessions[sid]
        with self.client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
            info = ws.receive_json()
            assert info["step_count"] == expected.step_count, info
            for x in xs:
                seq = expected.step_count + len(x) if with_seq else None
                if binary:
                    ws.send_bytes(encode_request(np.asarray(x, np.float32), seq))
                else:
                    ws.send_json({"inputs": x, **({"seq": seq} if seq else {})})
                if refused := self.refusal(expected):
                    frame = ws.receive_json()
                    assert frame["error"]["code"] == refused[1], frame
                    continue
                if binary:
                    outputs, step_count, replayed = decode_response(ws.receive_bytes())
                else:
                    frame = ws.receive_json()
                    assert "error" not in frame, frame
                    outputs, step_count, replayed = frame["outputs"], frame["step_count"], False
                y = self.apply(expected, x, seq)
                assert step_count == expected.step_count and not replayed
                self.close(outputs, y, "WebSocket outputs")

    @precondition(lambda self: self.sessions or self.sequences)
    @rule(
        picks=st.lists(
            st.tuples(st.integers(0, 99), step_lists, st.sampled_from(["none", "seq", "retry", "bad"])),
            min_size=1,
            max_size=5,
        ),
        route=st.sampled_from(["rest", "json", "binary"]),
        stray=st.sampled_from([None, "gone", "unknown"]),
    )
    def multiplexed(self, picks, route: str, stray: str | None) -> None:
        """Steps for several sessions (v1 ones and Triton sequences' alike) in one message,
        over ``POST /v1/steps`` or ``/v1/stream`` (JSON or binary frames): each item gets
        what the single-session route would answer at its place in the message (items of
        one session apply in order, a retry replays, a wrong ``seq`` or a replaced model
        fails the item alone), and an unknown or deleted session fails only its item."""
        live = dict(self.sessions)
        live.update({_sequence_session(i): e for i, e in self.sequences.items()})
        ids = sorted(live)
        items: list[tuple[str, list, int | None]] = []
        wanted: list[tuple] = []  # ("ok", y, step_count, replayed) or ("error", code, step_count)
        for k, x, mode in picks:
            sid = ids[k % len(ids)]
            expected = live[sid]
            retry = (
                mode == "retry"
                and expected.last_request is not None
                and expected.last_seq == expected.step_count
            )
            if retry:
                x, seq = expected.last_request[0], expected.step_count
            else:
                seq = None if mode == "none" else expected.step_count + len(x) + (mode == "bad")
            items.append((sid, x, seq))
            if not retry and (refused := self.refusal(expected)):
                wanted.append(("error", refused[1], None))
            elif mode == "bad":
                wanted.append(("error", "seq_mismatch", expected.step_count))
            elif retry:
                wanted.append(("ok", expected.last_request[1], expected.step_count, True))
            else:
                y = self.apply(expected, x, seq)
                wanted.append(("ok", y, expected.step_count, False))
        if stray is not None and (stray == "unknown" or self.gone):
            sid = self.gone[-1] if stray == "gone" else "no-such-session"
            at = len(items) // 2
            items.insert(at, (sid, [[0.5]], None))
            wanted.insert(at, ("error", "session_not_found", None))
        got = self._send_multiplexed(items, route)
        assert len(got) == len(wanted), got
        for i, (answer, want) in enumerate(zip(got, wanted)):
            what = f"item {i} of {len(items)} over {route}"
            if want[0] == "error":
                assert answer[0] == "error" and answer[1] == want[1], (what, answer, want)
                if want[2] is not None:
                    assert answer[2] == want[2], (what, answer, want)
                continue
            assert answer[0] == "ok", (what, answer, want)
            assert (answer[2], answer[3]) == (want[2], want[3]), (what, answer, want)
            self.close(answer[1], want[1], what)

    def _send_multiplexed(self, items: list[tuple[str, list, int | None]], route: str) -> list[tuple]:
        """Per item ("ok", outputs, step_count, replayed) or ("error", code, step_count)."""
        if route == "binary":
            with self.client.websocket_connect("/v1/stream") as ws:
                ws.send_bytes(encode_many([(s, np.asarray(x, np.float32), q) for s, x, q in items]))
                decoded = decode_many_response(ws.receive_bytes())
            return [
                ("error", r["code"], r.get("step_count")) if isinstance(r, dict) else ("ok", *r)
                for r in decoded
            ]
        body = {"steps": [{"session_id": s, "inputs": x, **({"seq": q} if q else {})} for s, x, q in items]}
        if route == "rest":
            r = self.client.post("/v1/steps", json=body)
            assert r.status_code == 200, r.text
            results = r.json()["results"]
        else:
            with self.client.websocket_connect("/v1/stream") as ws:
                ws.send_json(body)
                results = ws.receive_json()["results"]
        return [
            ("error", r["error"]["code"], r["error"].get("step_count"))
            if "error" in r
            else ("ok", r["outputs"], r["step_count"], r.get("replayed", False))
            for r in results
        ]

    @precondition(lambda self: self.sessions)
    @rule(k=st.integers(0, 99))
    def reset(self, k: int) -> None:
        sid = self.pick(self.sessions, k)
        expected = self.sessions[sid]
        r = self.client.post(f"/v1/sessions/{sid}/reset")
        if refused := self.refusal(expected):
            return self.expect_error(r, *refused)
        assert r.status_code == 200 and r.json()["step_count"] == 0, r.text
        self.sessions[sid] = Expected(expected.model, self.zero(expected.model))
        return None

    @precondition(lambda self: self.sessions)
    @rule(k=st.integers(0, 99))
    def delete(self, k: int) -> None:
        sid = self.pick(self.sessions, k)
        r = self.client.delete(f"/v1/sessions/{sid}")
        assert r.status_code == 204, r.text
        del self.sessions[sid]
        self.gone.append(sid)

    @precondition(lambda self: self.sessions)
    @rule(k=st.integers(0, 99), steps=st.integers(1, 3), prime=st.none() | step_lists)
    def generate(self, k: int, steps: int, prime) -> None:
        sid = self.pick(self.sessions, k)
        expected = self.sessions[sid]
        body: dict = {"steps": steps, **({"prime": prime} if prime is not None else {})}
        r = self.client.post(f"/v1/sessions/{sid}/generate", json=body)
        if refused := self.refusal(expected):
            return self.expect_error(r, *refused)
        if prime is None and (expected.step_count == 0 or expected.last is None):
            return self.expect_error(r, 422, "invalid_input")
        assert r.status_code == 200, r.text
        if prime is not None:
            self.apply(expected, prime, None)
        generated = []
        for _ in range(steps):
            generated.append(expected.last)
            self.apply(expected, [expected.last.tolist()], None)
        answer = r.json()
        assert answer["step_count"] == expected.step_count
        self.close(answer["generated"], np.asarray(generated), "generated values")
        return None

    @precondition(lambda self: self.loaded)
    @rule(xs=st.lists(step_lists, min_size=1, max_size=3))
    def predict(self, xs) -> None:
        r = self.client.post(f"/v1/models/{MODEL}/predict", json={"inputs": xs})
        assert r.status_code == 200, r.text
        for got, x in zip(r.json()["outputs"], xs):
            self.close(got, self.run(self.loaded, x, None)[0], "predict outputs")

    @precondition(lambda self: self.sessions or self.gone or self.sequences)
    @rule(
        k=st.integers(0, 99),
        action=st.sampled_from(["info", "state", "steps", "generate", "reset", "delete", "stream", "v2"]),
    )
    def another_key(self, k: int, action: str) -> None:
        """Another key sees nothing of these sessions: every answer is the unknown id's, and
        nothing changes (the invariant checks the sessions afterwards)."""
        ids = sorted(self.sessions) + self.gone[-2:] + [_sequence_session(i) for i in self.sequences]
        sid = ids[k % len(ids)]
        other = {"X-API-Key": OTHER}
        if action == "stream":
            with self.client.websocket_connect(f"/v1/sessions/{sid}/stream", headers=other) as ws:
                assert ws.receive_json()["error"]["code"] == "session_not_found"
            return
        if action == "v2":  # the same sequence id under another key is another sequence
            sequence_id = SEQUENCE_IDS[k % len(SEQUENCE_IDS)]
            body = {
                "inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": [0.5]}],
                "parameters": {"sequence_id": sequence_id},
            }
            r = self.client.post(f"/v2/models/{MODEL}/infer", json=body, headers=other)
            assert r.status_code == 400 and "START" in r.json()["error"], r.text
            return
        method, path, body = {
            "info": ("GET", "", None),
            "state": ("GET", "/state", None),
            "steps": ("POST", "/steps", {"inputs": [[0.5]]}),
            "generate": ("POST", "/generate", {"steps": 1, "prime": [[0.5]]}),
            "reset": ("POST", "/reset", None),
            "delete": ("DELETE", "", None),
        }[action]
        r = self.client.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=other)
        unknown = self.client.request(method, f"/v1/sessions/{sid}x{path}", json=body, headers=other)
        self.expect_error(r, 404, "session_not_found")
        assert r.json()["error"]["message"] == unknown.json()["error"]["message"].replace(f"{sid}x", sid)

    # -- Triton sequences over v2 ----------------------------------------------------------

    def v2(self, sequence_id: int, x, start: bool, end: bool, seq: int | None = None):
        parameters = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
        if seq is not None:
            parameters["seq"] = seq
        body = {
            "inputs": [
                {"name": "x", "shape": [1, len(x), 1], "datatype": "FP32", "data": [v for (v,) in x]}
            ],
            "parameters": parameters,
        }
        return self.client.post(f"/v2/models/{MODEL}/infer", json=body)

    @rule(
        sequence_id=st.sampled_from(SEQUENCE_IDS),
        x=step_lists,
        start=st.booleans(),
        end=st.booleans(),
        mode=st.sampled_from(["none", "seq", "bad"]),
    )
    def triton(self, sequence_id: int, x, start: bool, end: bool, mode: str) -> None:
        expected = self.sequences.get(sequence_id)
        base = 0 if start or expected is None else expected.step_count
        seq = None if mode == "none" else base + len(x) + (mode == "bad")
        r = self.v2(sequence_id, x, start, end, seq)
        if not start:
            if expected is None:
                assert r.status_code == 400 and "START" in r.json()["error"], r.text
                return
            if refused := self.refusal(expected):
                assert r.status_code == refused[0], r.text
                return
        elif self.loaded is None:
            assert r.status_code == 404, r.text
            return
        if mode == "bad":  # refused, and the sequence is exactly as it was
            assert r.status_code == 409 and "seq" in r.json()["error"], r.text
            return
        if start:
            expected = Expected(self.loaded, self.zero(self.loaded))
        assert expected is not None
        assert r.status_code == 200, r.text
        y = self.apply(expected, x, seq)
        answer = r.json()
        assert answer["parameters"]["step_count"] == expected.step_count
        self.close(np.reshape(answer["outputs"][0]["data"], (-1, 1)), y, "v2 outputs")
        if end:
            self.sequences.pop(sequence_id, None)
        else:
            self.sequences[sequence_id] = expected

    @precondition(lambda self: self.loaded)
    @rule(sequence_id=st.sampled_from(SEQUENCE_IDS), x=step_lists, n=st.integers(2, 5))
    def concurrent_starts(self, sequence_id: int, x, n: int) -> None:
        """Each of n STARTs racing on one sequence starts it from the zero state."""
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda _: self.v2(sequence_id, x, True, False), range(n)))
        y, states = self.run(self.loaded, x, None)
        for r in answers:
            assert r.status_code == 200, r.text
            assert r.json()["parameters"]["step_count"] == len(x)
            self.close(np.reshape(r.json()["outputs"][0]["data"], (-1, 1)), y, "START outputs")
        self.sequences[sequence_id] = Expected(self.loaded, states, len(x), y[-1])

    # -- deploys -----------------------------------------------------------------------------

    @rule(variant=st.sampled_from(["A", "B"]))
    def deploy(self, variant: str) -> None:
        """Write a model's files over the served version, then reload."""
        target = variant
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "card.json"):
            shutil.copy(self.variants[target] / name, self.folder / name)
        r = self.client.post("/v1/repository/reload")
        assert r.status_code == 200 and r.json()["failed"] == [], r.text
        if target != self.loaded:  # identical files may not even look changed
            assert r.json()["loaded"] == [f"{MODEL}/1"], r.text
        self.loaded = target

    @precondition(lambda self: self.loaded)
    @rule(cut=st.integers(0, 200))
    def broken_deploy(self, cut: int) -> None:
        """Truncated files over the served version: reported, and nothing changes."""
        onnx_file = self.folder / "model.onnx"
        onnx_file.write_bytes(onnx_file.read_bytes()[:cut])
        r = self.client.post("/v1/repository/reload")
        assert r.status_code == 200 and r.json()["failed"] == [f"{MODEL}/1"], r.text
        info = self.client.get(f"/v1/models/{MODEL}").json()["versions"][0]
        assert info["ready"] is True and info["error"], info

    @precondition(lambda self: self.loaded)
    @rule()
    def remove_version(self) -> None:
        """Delete the served version's folder: its sessions answer 503 and still export."""
        shutil.rmtree(self.folder)
        r = self.client.post("/v1/repository/reload")
        assert r.status_code == 200 and r.json()["unloaded"] == [f"{MODEL}/1"], r.text
        self.loaded = None
        self.expect_error(self.client.post(f"/v1/models/{MODEL}/sessions"), 404, "model_not_found")

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def sessions_are_as_expected(self) -> None:
        """After every rule: each live session (v1 or Triton sequence) exports exactly the
        reference's state and step_count, and a step that cannot apply (a wrong ``seq``)
        is refused for the right reason (``model_changed`` once its model was replaced)."""
        live = dict(self.sessions)
        for sequence_id, expected in self.sequences.items():
            live[_sequence_session(sequence_id)] = expected
        for sid, expected in live.items():
            r = self.client.get(f"/v1/sessions/{sid}/state")
            assert r.status_code == 200, r.text
            assert r.json()["step_count"] == expected.step_count, (r.json(), expected.step_count)
            for name, value in self.exported(expected.states).items():
                self.close(r.json()["state"][name], value, f"state {name} of {sid}")
            r = self.client.post(
                f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0]], "seq": expected.step_count + 5}
            )
            if refused := self.refusal(expected):
                self.expect_error(r, *refused)
            else:
                self.expect_error(r, 409, "seq_mismatch")
        for sequence_id in set(SEQUENCE_IDS) - set(self.sequences):
            r = self.client.get(f"/v1/sessions/{_sequence_session(sequence_id)}")
            self.expect_error(r, 404, "session_not_found")
        for sid in self.gone[-3:]:
            self.expect_error(self.client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")


def _sequence_session(sequence_id: int) -> str:
    """The session behind a Triton sequence of OWNER's key (docs/v2.md)."""
    owner = hashlib.sha256(OWNER.encode()).hexdigest()[:32]
    key = f"{owner}\x00{MODEL}\x00u:{sequence_id}".encode()
    return "seq-" + hashlib.sha256(key).hexdigest()[:32]


def _run(examples: int) -> None:
    settings = hypothesis.settings(
        max_examples=examples,
        stateful_step_count=25,
        deadline=None,
        derandomize=not os.environ.get("RNNSERVE_STATEFUL_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    hypothesis.stateful.run_state_machine_as_test(SessionMachine, settings=settings)


def test_session_semantics_hold_under_random_interleavings(variants, monkeypatch):
    monkeypatch.setattr(SessionMachine, "variants", variants)
    _run(EXAMPLES)


def test_session_semantics_hold_on_redis(variants, redis_db, monkeypatch):
    """The same machine with the Redis store (its cache, scripts and tombstones)."""
    monkeypatch.setattr(SessionMachine, "variants", variants)
    monkeypatch.setattr(SessionMachine, "store", redis_db(11))
    _run(max(EXAMPLES // 3, 1))


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_start_over_a_sequence_of_a_replaced_model_restarts_it_on_the_new_one(
    variants, redis_db, monkeypatch, store
):
    """Found by this machine with random seeds, on Redis: a START over a live sequence
    whose model had been replaced kept the old model's identity in the replica's cache
    and in the record it wrote, with the new model's state, so the sequence's next step
    answered model_changed. The rules it took, in the order it took them."""
    monkeypatch.setattr(SessionMachine, "variants", variants)
    if store == "redis":
        monkeypatch.setattr(SessionMachine, "store", redis_db(11))
    machine = SessionMachine()
    try:
        machine.first_session()
        machine.deploy(variant="B")
        machine.concurrent_starts(sequence_id=2, x=[[0.0]], n=2)
        machine.sessions_are_as_expected()
        machine.remove_version()
        machine.deploy(variant="A")
        machine.concurrent_starts(sequence_id=2, x=[[0.0]], n=2)
        machine.sessions_are_as_expected()
        machine.triton(sequence_id=2, x=[[0.5]], start=False, end=False, mode="seq")
        machine.sessions_are_as_expected()
    finally:
        machine.teardown()
