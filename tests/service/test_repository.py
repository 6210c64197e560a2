"""The model repository: bad versions are reported and never stop the others; sessions stay
pinned to their version across reloads; removed versions are unloaded."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import Reference

TOL = 1e-5


def _copy_version(src: Path, dst: Path, **card_changes) -> Path:
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card.update(card_changes)
    (dst / "card.json").write_text(json.dumps(card))
    return dst


def _perturbed_copy(src: Path, dst: Path, name: str, version: int, scale: float = 1.3) -> Path:
    """Another version of a model: the same graph with different weights, card updated."""
    dst.mkdir(parents=True)
    proto = onnx.load(src / "model.onnx")
    for init in proto.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype == np.float32 and value.size > 1:
            init.CopyFrom(numpy_helper.from_array(value * np.float32(scale), init.name))
    onnx.save(proto, dst / "model.onnx")
    card = json.loads((src / "card.json").read_text())
    card.update(
        name=name,
        version=version,
        sha256=hashlib.sha256((dst / "model.onnx").read_bytes()).hexdigest(),
    )
    (dst / "card.json").write_text(json.dumps(card))
    return dst


def _break_repo(repo: Path) -> dict[str, str]:
    """Add broken models next to the good ones; returns name -> a word its error must mention."""
    good = repo / "tiny-rnn" / "1"
    corrupt = _copy_version(good, repo / "corrupt-onnx" / "1", name="corrupt-onnx", sha256=None)
    (corrupt / "model.onnx").write_bytes(b"this is not an onnx model" * 10)
    _copy_version(
        repo / "tiny-lstm" / "1",
        repo / "missing-input" / "1",
        name="missing-input",
        inputs={"sequence": "x", "lengths": "seq_lengths"},
    )
    _copy_version(good, repo / "wrong-version" / "2", name="wrong-version")  # card says version 1
    _copy_version(good, repo / "bad-digest" / "1", name="bad-digest", sha256="0" * 64)
    bad_card = _copy_version(good, repo / "bad-card" / "1", name="bad-card")
    (bad_card / "card.json").write_text("{not json")
    return {
        "corrupt-onnx": "",
        "missing-input": "seq_lengths",
        "wrong-version": "version",
        "bad-digest": "sha256",
        "bad-card": "",
    }


async def test_bad_models_are_reported_and_the_others_serve(make_client, repo_copy, reference):
    broken = _break_repo(repo_copy)
    x = np.random.default_rng(0).normal(size=(5, 1)).astype(np.float32)
    async with make_client(model_repo=repo_copy) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready"
        assert ready["models_failed"] == len(broken) and ready["models_ready"] == 5
        models = {m["name"]: m for m in (await client.get("/v1/models")).json()["models"]}
        for name, word in broken.items():
            (version,) = models[name]["versions"]
            assert version["ready"] is False, name
            assert isinstance(version["error"], str) and word in version["error"], (
                name,
                version["error"],
            )
        for name in ["tiny-lstm", "tiny-gru", "tiny-rnn", "tiny-relu", "nolengths-lstm"]:
            assert models[name]["versions"][0]["ready"] is True
            assert models[name]["versions"][0]["error"] is None
        for name in broken:
            version = models[name]["versions"][0]["version"]
            for method, path, body in [
                ("POST", f"/v1/models/{name}/predict", {"inputs": [x.tolist()]}),
                ("POST", f"/v1/models/{name}/versions/{version}/predict", {"inputs": [x.tolist()]}),
                ("POST", f"/v1/models/{name}/sessions", None),
            ]:
                r = await client.request(method, path, json=body)
                assert r.status_code == 503, (name, path, r.text)
                assert r.json()["error"]["code"] == "model_not_ready"
                assert r.headers.get("retry-after")
        r = await client.post("/v1/models/tiny-rnn/predict", json={"inputs": [x.tolist()]})
        assert r.status_code == 200
        np.testing.assert_allclose(
            np.asarray(r.json()["outputs"][0]), reference("tiny-rnn").run(x)[0], atol=TOL
        )


async def test_a_fixed_model_becomes_ready_on_reload(make_client, repo_copy):
    _copy_version(repo_copy / "tiny-rnn" / "1", repo_copy / "later" / "1", name="later", version=2)
    async with make_client(model_repo=repo_copy) as client:
        assert (await client.post("/v1/models/later/sessions")).status_code == 503
        card_path = repo_copy / "later" / "1" / "card.json"
        card = json.loads(card_path.read_text())
        card["version"] = 1
        card_path.write_text(json.dumps(card) + "\n")  # a different size: a new fingerprint
        report = (await client.post("/v1/repository/reload")).json()
        assert report["loaded"] == ["later/1"] and report["failed"] == []
        assert (await client.post("/v1/models/later/sessions")).status_code == 201


async def test_sessions_stay_on_their_version_across_reload(make_client, repo_copy, reference):
    ref1 = reference("tiny-lstm")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    async with make_client(model_repo=repo_copy) as client:
        r = await client.post("/v1/models/tiny-lstm/sessions")
        old = r.json()["session_id"]
        assert r.json()["version"] == 1
        first = (
            await client.post(f"/v1/sessions/{old}/steps", json={"inputs": x[:4].tolist()})
        ).json()

        v2 = _perturbed_copy(
            repo_copy / "tiny-lstm" / "1", repo_copy / "tiny-lstm" / "2", "tiny-lstm", 2
        )
        ref2 = Reference(v2)
        assert not np.allclose(ref2.run(x)[0], ref1.run(x)[0], atol=1e-3)

        async def keep_stepping():
            outs = []
            for i in range(4, 8):
                r = await client.post(
                    f"/v1/sessions/{old}/steps", json={"inputs": x[i : i + 1].tolist()}
                )
                assert r.status_code == 200, r.text
                outs.extend(r.json()["outputs"])
                await asyncio.sleep(0)
            return outs

        during, reload = await asyncio.gather(keep_stepping(), client.post("/v1/repository/reload"))
        assert reload.status_code == 200
        assert reload.json() == {"loaded": ["tiny-lstm/2"], "unloaded": [], "failed": []}

        r = await client.post("/v1/models/tiny-lstm/sessions")
        new = r.json()["session_id"]
        assert r.json()["version"] == 2
        new_out = (
            await client.post(f"/v1/sessions/{new}/steps", json={"inputs": x.tolist()})
        ).json()
        last = (
            await client.post(f"/v1/sessions/{old}/steps", json={"inputs": x[8:].tolist()})
        ).json()
        info = (await client.get(f"/v1/sessions/{old}")).json()
        assert info["version"] == 1 and info["step_count"] == 12
        predicted = (
            await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [x.tolist()]})
        ).json()
        assert predicted["version"] == 2
        v1_predicted = (
            await client.post(
                "/v1/models/tiny-lstm/versions/1/predict", json={"inputs": [x.tolist()]}
            )
        ).json()

        # remove v1: unloaded, its batcher closed, the old session gets a clear error
        engine = client.app.state.engine
        v1_entry = engine.repository.get("tiny-lstm", 1)
        assert "batcher" in v1_entry.extras
        shutil.rmtree(repo_copy / "tiny-lstm" / "1")
        report = (await client.post("/v1/repository/reload")).json()
        assert report == {"loaded": [], "unloaded": ["tiny-lstm/1"], "failed": []}
        assert "batcher" not in v1_entry.extras
        info = (await client.get("/v1/models/tiny-lstm")).json()
        assert [v["version"] for v in info["versions"]] == [2]
        r = await client.post(
            "/v1/models/tiny-lstm/versions/1/predict", json={"inputs": [x.tolist()]}
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await client.post(f"/v1/sessions/{old}/steps", json={"inputs": x[:1].tolist()})
        assert 400 <= r.status_code < 600 and r.status_code != 500, r.text
        assert r.json()["error"]["code"] in {"model_not_found", "model_not_ready"}
        # the v2 session is untouched by all this
        more = (
            await client.post(f"/v1/sessions/{new}/steps", json={"inputs": x[:2].tolist()})
        ).json()

    y1 = ref1.run(x)[0]
    np.testing.assert_allclose(
        np.asarray(first["outputs"] + during + last["outputs"]), y1, atol=TOL
    )
    np.testing.assert_allclose(np.asarray(v1_predicted["outputs"][0]), y1, atol=TOL)
    y2 = ref2.run(np.concatenate([x, x[:2]]))[0]
    np.testing.assert_allclose(np.asarray(new_out["outputs"]), y2[:12], atol=TOL)
    np.testing.assert_allclose(np.asarray(more["outputs"]), y2[12:], atol=TOL)
    np.testing.assert_allclose(np.asarray(predicted["outputs"][0]), y2[:12], atol=TOL)


async def test_reload_interval_picks_up_new_versions(make_client, repo_copy):
    async with make_client(model_repo=repo_copy, reload_interval_s=0.05) as client:
        _perturbed_copy(repo_copy / "tiny-gru" / "1", repo_copy / "tiny-gru" / "5", "tiny-gru", 5)
        for _ in range(100):
            info = (await client.get("/v1/models/tiny-gru")).json()
            if info["default_version"] == 5 and all(v["ready"] for v in info["versions"]):
                break
            await asyncio.sleep(0.05)
        assert info["default_version"] == 5
        r = await client.post("/v1/models/tiny-gru/sessions")
        assert r.status_code == 201 and r.json()["version"] == 5


async def test_missing_repository_is_ready_and_empty(make_client, tmp_path):
    async with make_client(model_repo=tmp_path / "nowhere") as client:
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/v1/models")).json() == {"models": []}
        r = await client.post("/v1/models/tiny-lstm/predict", json={"inputs": [[[0, 0, 0]]]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
