"""A reload that lands after a step has committed and before its answer is rendered.

Found by a race hunt (16 REST streams on Redis while a version was swapped in place 12
times): the routes looked the session's model up again after the step had committed, to
render symbols, ``top_k`` or a metric label. When the reload landed in between, an applied
step was answered 409 ``model_changed`` (503 ``model_not_ready`` for a removed version),
so a client without ``seq`` that retried applied it twice, and a retry with ``seq`` got 409
as well: its answer was lost although the step was applied once.

Here the store itself swaps the model in place right after its commit returns, which
makes the interleaving certain, on every route that answers a step. The step must be
answered with its own results (compared with onnxruntime run directly); the session's next
new step answers 409 ``model_changed``; a retry of the answered step with its ``seq``
replays the stored answer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Reference, require_redis
from tests.hardening.conftest import app_client, put_model_in_place

TOL = 1e-5
MODEL = "tiny-gru"  # a vocabulary: symbols and top_k are rendered with its card
SYMBOLS = "BTPSXVE"
FIRST, SECOND, THIRD = ["B", "T"], ["S", "X", "V"], ["P"]

_COMMITS = {
    "memory": ("advance_one", "advance", "commit", "commit_many"),
    "redis": ("commit", "commit_many"),
}
"""The store methods through which the engine's step paths commit, per store."""


def one_hot(symbols: list[str]) -> np.ndarray:
    return np.eye(len(SYMBOLS), dtype=np.float32)[[SYMBOLS.index(s) for s in symbols]]


def _swap_after_next_commit(client, repo: Path, store: str) -> list[str]:
    """Arm the app's store: right after its next commit returns, ``MODEL``'s version 1 is
    replaced in place (another model, another state contract) and the repository synced,
    before the engine goes on. Returns the list the hook appends the method's name to."""
    engine = client.app.state.engine
    fired: list[str] = []

    def hooked(name: str, original: Callable) -> Callable:
        def swap() -> None:
            if not fired:
                fired.append(name)
                put_model_in_place(repo, "tiny-relu", MODEL)
                report, _ = engine.repository.sync()
                assert report.loaded == [f"{MODEL}/1"], report

        if name in ("advance_one", "advance"):  # the memory store's synchronous bulk path

            def sync_wrapper(*args, **kwargs):
                result = original(*args, **kwargs)
                swap()
                return result

            return sync_wrapper

        async def async_wrapper(*args, **kwargs):
            result = await original(*args, **kwargs)
            swap()
            return result

        return async_wrapper

    for name in _COMMITS[store]:
        setattr(engine.store, name, hooked(name, getattr(engine.store, name)))
    return fired


@pytest.fixture(params=["memory", "redis"])
def served(request, repo_copy: Path, redis_db):
    """(client, repo, store) of an app on a private repository, on each store."""
    store = request.param
    settings = {"model_repo": repo_copy}
    if store == "redis":
        require_redis()
        settings["session_store"] = redis_db(6)
    with app_client(**settings) as client:
        yield client, repo_copy, store


def _rest(client, sid: str, inputs: list[str], seq: int) -> dict:
    r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": inputs, "seq": seq, "top_k": 2})
    assert r.status_code == 200, r.text
    return r.json()


def _ws(client, sid: str, inputs: list[str], seq: int) -> dict:
    with client.websocket_connect(f"/v1/sessions/{sid}/stream") as ws:
        ws.receive_json()  # the session's description
        ws.send_json({"inputs": inputs, "seq": seq})
        return ws.receive_json()


def _mux(client, sid: str, inputs: list[str], seq: int) -> dict:
    r = client.post(
        "/v1/steps", json={"steps": [{"session_id": sid, "inputs": inputs, "seq": seq, "top_k": 2}]}
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def _mux_ws(client, sid: str, inputs: list[str], seq: int) -> dict:
    with client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"steps": [{"session_id": sid, "inputs": inputs, "seq": seq, "top_k": 2}]})
        return ws.receive_json()["results"][0]


ROUTES = {"rest": _rest, "ws": _ws, "mux": _mux, "mux-ws": _mux_ws}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_step_is_answered_with_its_results_when_a_reload_lands_right_after_its_commit(
    served, route: str
):
    client, repo, store = served
    step = ROUTES[route]
    ref = Reference(repo / MODEL / "1")  # read before the swap: the model the session is on
    y_all, _ = ref.run(one_hot(FIRST + SECOND))
    sid = client.post(f"/v1/models/{MODEL}/sessions").json()["session_id"]
    first = step(client, sid, FIRST, 2)
    assert "error" not in first, first

    fired = _swap_after_next_commit(client, repo, store)
    answer = step(client, sid, SECOND, 5)
    assert fired, "the hook did not run: the step committed some other way"
    assert "error" not in answer, answer  # was 409 model_changed for an applied step
    assert answer["step_count"] == 5
    if "outputs" in answer:
        np.testing.assert_allclose(answer["outputs"], y_all[2:], atol=TOL)
    if "top_k" in answer:  # rendered with the card of the model the step ran on
        best = [[SYMBOLS[j] for j in np.argsort(-row, kind="stable")[:2]] for row in y_all[2:]]
        assert [[c["label"] for c in row] for row in answer["top_k"]] == best, answer["top_k"]
    if "symbols" in answer:
        assert answer["symbols"] == [SYMBOLS[int(np.argmax(row))] for row in y_all[2:]]

    # The swap took: a new step cannot run on the replaced model ...
    r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0, 1.0]], "seq": 6})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_changed", r.text
    r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": THIRD, "seq": 6})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_changed", r.text
    # ... but the retry of the answered step gets its answer again, applied once.
    again = step(client, sid, SECOND, 5)
    assert "error" not in again and again.get("replayed") is True, again
    assert again["step_count"] == 5
    if "outputs" in again:
        np.testing.assert_allclose(again["outputs"], y_all[2:], atol=TOL)
    exported = client.get(f"/v1/sessions/{sid}/state")
    assert exported.status_code == 200 and exported.json()["step_count"] == 5, exported.text


def test_generate_is_answered_when_a_reload_lands_right_after_its_commit(served):
    client, repo, store = served
    sid = client.post(f"/v1/models/{MODEL}/sessions").json()["session_id"]
    fired = _swap_after_next_commit(client, repo, store)
    r = client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3, "seed": 1, "top_k": 2})
    assert fired
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["step_count"] >= len(body["generated"]) >= 1
    assert all(c["label"] in SYMBOLS for row in body["top_k"] for c in row), body["top_k"]
    r = client.post(f"/v1/sessions/{sid}/generate", json={"steps": 1})
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_changed", r.text


def test_a_retry_after_the_version_was_removed_replays_and_a_new_step_is_refused(served):
    """The same exactly-once rule when the version is removed instead of replaced."""
    client, repo, _ = served
    sid = client.post(f"/v1/models/{MODEL}/sessions").json()["session_id"]
    answer = _rest(client, sid, FIRST, 2)
    shutil.rmtree(repo / MODEL / "1")
    r = client.post("/v1/repository/reload")
    assert r.status_code == 200 and r.json()["unloaded"] == [f"{MODEL}/1"], r.text
    again = _rest(client, sid, FIRST, 2)
    assert again["replayed"] is True and again["top_k"] == answer["top_k"], again
    r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": SECOND, "seq": 5})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text
    # a replay that does not match the last request is no replay
    r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": THIRD, "seq": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text
