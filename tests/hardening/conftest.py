"""Helpers for the hardening tests: an in-process app behind Starlette's TestClient (HTTP
and WebSocket on one event loop), and ways to break a model repository as deploys do."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from service.config import Settings


@contextlib.contextmanager
def app_client(**overrides) -> Iterator[TestClient]:
    app = create_app(Settings(**overrides))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client_for():
    return app_client


def put_model_in_place(repo: Path, source: str, target: str, version: int = 1) -> None:
    """Replace ``target/version`` by ``source``'s graph and card (renamed to fit the folder):
    another model, with another state contract, under the same name and version."""
    folder = repo / target / str(version)
    shutil.copy(repo / source / "1" / "model.onnx", folder / "model.onnx")
    card = json.loads((repo / source / "1" / "card.json").read_text())
    card.update(name=target, version=version)
    (folder / "card.json").write_text(json.dumps(card))


def reload(client: TestClient) -> dict:
    r = client.post("/v1/repository/reload")
    assert r.status_code == 200, r.text
    return r.json()
