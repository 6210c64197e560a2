"""Issue 9, items 3-5 and the repository half of 7: a reload is a deploy, and a deploy never
takes down what is serving; sessions are bound to the exact model they were created on."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.hardening.conftest import put_model_in_place, reload

TOL = 1e-5
X = [[0.1, -0.2, 0.3], [0.5, 0.0, -1.0]]


def _failures(client, model: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "rnnserve_model_load_failures_total" and sample.labels == {"model": model}:
                return sample.value
    return 0.0


def _version_info(client, name: str, version: int) -> dict:
    r = client.get(f"/v1/models/{name}")
    assert r.status_code == 200, r.text
    (info,) = [v for v in r.json()["versions"] if v["version"] == version]
    return info


def test_broken_card_over_a_serving_version_keeps_it_serving(client_for, repo_copy, reference):
    with client_for(model_repo=repo_copy) as client:
        sid = client.post("/v1/models/tiny-lstm/sessions").json()["session_id"]
        assert client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X[:1]}).status_code == 200
        (repo_copy / "tiny-lstm" / "1" / "card.json").write_text("{not json")
        report = reload(client)
        assert report["failed"] == ["tiny-lstm/1"] and report["unloaded"] == []
        # The live session carries on, on the copy it was created on.
        r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X[1:]})
        assert r.status_code == 200, r.text
        y, _ = reference("tiny-lstm").run(np.array(X))
        np.testing.assert_allclose(r.json()["outputs"], y[1:], atol=TOL)
        # New work too; the failure is reported, not served.
        assert client.post("/v1/models/tiny-lstm/sessions").status_code == 201
        info = _version_info(client, "tiny-lstm", 1)
        assert info["ready"] is True and "JSON" in info["error"]
        assert str(repo_copy) not in info["error"]
        assert _failures(client, "tiny-lstm") == 1
        # An unchanged broken folder is not retried on every poll.
        assert reload(client)["failed"] == []
        # Repaired: the new copy loads and the error clears.
        shutil.copy(reference("tiny-lstm").folder / "card.json", repo_copy / "tiny-lstm" / "1")
        assert reload(client)["loaded"] == ["tiny-lstm/1"]
        assert _version_info(client, "tiny-lstm", 1)["error"] is None
        assert client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X[:1]}).status_code == 200


def test_truncated_onnx_over_a_serving_version_keeps_every_route(client_for, repo_copy, reference):
    with client_for(model_repo=repo_copy) as client:
        onnx = repo_copy / "tiny-lstm" / "1" / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[:100])
        assert reload(client)["failed"] == ["tiny-lstm/1"]
        for path in ("/v1/models/tiny-lstm/predict", "/v1/models/tiny-lstm/versions/1/predict"):
            r = client.post(path, json={"inputs": [X]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(
                r.json()["outputs"][0], reference("tiny-lstm").run(np.array(X))[0], atol=TOL
            )
        assert client.post("/v1/models/tiny-lstm/sessions").status_code == 201
        assert client.get("/v2/models/tiny-lstm/ready").status_code == 200


def test_broken_new_version_beside_a_good_one_unversioned_routes_use_the_ready_one(
    client_for, repo_copy, reference
):
    with client_for(model_repo=repo_copy) as client:
        broken = repo_copy / "tiny-lstm" / "2"
        shutil.copytree(repo_copy / "tiny-lstm" / "1", broken)
        (broken / "card.json").write_text("{}")
        assert reload(client)["failed"] == ["tiny-lstm/2"]
        r = client.post("/v1/models/tiny-lstm/predict", json={"inputs": [X]})
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        created = client.post("/v1/models/tiny-lstm/sessions")
        assert created.status_code == 201 and created.json()["version"] == 1
        with client.websocket_connect("/v1/models/tiny-lstm/stream") as ws:
            assert ws.receive_json()["version"] == 1
        assert client.get("/v1/models/tiny-lstm").json()["default_version"] == 1
        assert client.post("/v1/models/tiny-lstm/versions/2/predict", json={"inputs": [X]}).status_code == 503
        # The version pinned explicitly is what the caller asked for.
        assert client.get("/v2/models/tiny-lstm/versions/2/ready").status_code == 400
        assert client.get("/v2/models/tiny-lstm/ready").status_code == 200


def test_model_replaced_in_place_answers_model_changed_and_still_exports(
    client_for, repo_copy, reference
):
    with client_for(model_repo=repo_copy) as client:
        sid = client.post("/v1/models/tiny-gru/sessions").json()["session_id"]
        r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": ["B", "T"]})
        assert r.status_code == 200
        before = client.get(f"/v1/sessions/{sid}/state").json()
        put_model_in_place(repo_copy, "tiny-relu", "tiny-gru")  # another hidden size
        assert reload(client)["loaded"] == ["tiny-gru/1"]
        for method, path, body in (
            ("post", f"/v1/sessions/{sid}/steps", {"inputs": [[0.0, 1.0]]}),
            ("post", f"/v1/sessions/{sid}/generate", {"steps": 2}),
            ("post", f"/v1/sessions/{sid}/reset", None),
        ):
            r = getattr(client, method)(path, json=body) if body else client.post(path)
            assert r.status_code == 409, (path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "model_changed"
            assert "create a new" in r.json()["error"]["message"]
        # Nothing changed, and the state can still be taken away.
        exported = client.get(f"/v1/sessions/{sid}/state")
        assert exported.status_code == 200, exported.text
        assert exported.json() == before
        # New sessions run on the new model.
        fresh = client.post("/v1/models/tiny-gru/sessions").json()["session_id"]
        r = client.post(f"/v1/sessions/{fresh}/steps", json={"inputs": [[0.0, 1.0]]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            r.json()["outputs"], reference("tiny-relu").run(np.array([[0.0, 1.0]]))[0], atol=TOL
        )


def test_same_model_rewritten_keeps_its_sessions(client_for, repo_copy, reference):
    """A reload of identical bytes (a touched file) is not a model change."""
    with client_for(model_repo=repo_copy) as client:
        sid = client.post("/v1/models/tiny-lstm/sessions").json()["session_id"]
        client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X[:1]})
        card = repo_copy / "tiny-lstm" / "1" / "card.json"
        card.write_text(card.read_text())  # new mtime: reloaded, with the same digest
        assert reload(client)["loaded"] == ["tiny-lstm/1"]
        r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X[1:]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            r.json()["outputs"], reference("tiny-lstm").run(np.array(X))[0][1:], atol=TOL
        )


def test_removed_version_answers_model_not_ready_and_still_exports(client_for, repo_copy):
    with client_for(model_repo=repo_copy) as client:
        sid = client.post("/v1/models/tiny-lstm/sessions").json()["session_id"]
        client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X})
        before = client.get(f"/v1/sessions/{sid}/state").json()
        shutil.copytree(repo_copy / "tiny-lstm" / "1", repo_copy / "moved" / "1")
        card = json.loads((repo_copy / "moved" / "1" / "card.json").read_text())
        (repo_copy / "moved" / "1" / "card.json").write_text(json.dumps({**card, "name": "moved"}))
        shutil.rmtree(repo_copy / "tiny-lstm")
        assert reload(client)["unloaded"] == ["tiny-lstm/1"]
        r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X[:1]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text
        exported = client.get(f"/v1/sessions/{sid}/state")
        assert exported.status_code == 200, exported.text
        assert exported.json() == before
        # ... and moved to another model with the same state contract.
        moved = client.post("/v1/models/moved/sessions", json={"state": before["state"]})
        assert moved.status_code == 201, moved.text


def test_non_version_folders_are_skipped_with_a_warning(client_for, repo_copy, caplog):
    for odd in ("²", "1_0", "+1", "v2"):
        shutil.copytree(repo_copy / "tiny-rnn" / "1", repo_copy / "tiny-rnn" / odd)
    with (
        caplog.at_level(logging.WARNING, logger="service.repository"),
        client_for(model_repo=repo_copy) as client,
    ):
        report = reload(client)
        assert report["failed"] == []
        assert [v["version"] for v in client.get("/v1/models/tiny-rnn").json()["versions"]] == [1]
        (repo_copy / "tiny-rnn" / "٣").mkdir()  # Arabic-Indic digit three
        assert client.post("/v1/repository/reload").status_code == 200
    assert any("²" in r.getMessage() for r in caplog.records)


def test_a_copy_that_keeps_mtime_and_size_is_still_a_change(client_for, repo_copy, reference):
    """``cp -p`` / ``rsync -a`` of another model of the same size keeps the old mtime: the
    change is still seen, and the sessions of the old model answer model_changed."""
    import os

    import onnx
    from onnx import numpy_helper

    folder = repo_copy / "tiny-lstm" / "1"
    with client_for(model_repo=repo_copy) as client:
        sid = client.post("/v1/models/tiny-lstm/sessions").json()["session_id"]
        before = {f: (folder / f).stat() for f in ("model.onnx", "card.json")}
        proto = onnx.load(folder / "model.onnx")
        tensor = next(t for t in proto.graph.initializer if numpy_helper.to_array(t).dtype == np.float32)
        tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))
        data = proto.SerializeToString()
        assert len(data) == before["model.onnx"].st_size
        card = json.loads((folder / "card.json").read_text())
        card.pop("sha256", None)
        text = json.dumps(card)
        text += " " * (before["card.json"].st_size - len(text))
        (folder / "model.onnx").write_bytes(data)
        (folder / "card.json").write_text(text)
        for f, st in before.items():
            os.utime(folder / f, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert (folder / f).stat().st_size == st.st_size
        assert reload(client)["loaded"] == ["tiny-lstm/1"]
        r = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": X})
        assert r.status_code == 409 and r.json()["error"]["code"] == "model_changed", r.text
