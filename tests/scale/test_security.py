"""API keys, session privacy, unguessable ids, every limit's 4xx code, model-name
traversal, and a non-root image. In-process apps (no network) unless stated."""

from __future__ import annotations

import base64
import builtins
import io
import json
import os
import re

import numpy as np
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.config import Settings
from tests.conftest import REPO_ROOT
from tests.scale.conftest import LSTM

KEY_A, KEY_B = "key-alpha-0123456789", "key-beta-9876543210"
PUBLIC = {"/healthz", "/readyz", "/metrics"}
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
"""FastAPI's own documentation routes are public: they describe the API, they serve nothing."""
PLAYGROUND = {"/", "/playground/{name}"}
"""The browser playground's page and files are public; its API calls carry the key."""


V2_PUBLIC = re.compile(
    r"^/v2/(health/.*|models/\{name\}(/versions/\{version\})?/ready|\{path:path\})$"
)
"""OIP health and model readiness (what probes call), and the v2 catch-all that answers 404."""


def _is_public(path: str) -> bool:
    return path in PUBLIC or path in DOCS or path in PLAYGROUND or bool(V2_PUBLIC.match(path))


def _all_routes(routes, prefix: str = ""):
    """(path, route) of every route, through included routers of any FastAPI version."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from _all_routes(inner.routes, prefix + getattr(context, "prefix", ""))
        else:
            yield prefix + route.path, route


def _fill(path: str, session_id: str) -> str:
    return (
        path.replace("{name}", LSTM)
        .replace("{model_name}", LSTM)
        .replace("{version}", "1")
        .replace("{model_version}", "1")
        .replace("{session_id}", session_id)
    )


@pytest.fixture
def keyed_app(model_repo):
    """A started app with two API keys, and a TestClient on it (HTTP and WebSocket)."""
    app = create_app(Settings(model_repo=model_repo, api_keys=[KEY_A, KEY_B]))
    with TestClient(app) as client:
        yield app, client


def _new_session(client: TestClient, key: str = KEY_A, model: str = LSTM) -> str:
    r = client.post(f"/v1/models/{model}/sessions", headers={"X-API-Key": key})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


# -- API keys ---------------------------------------------------------------------------


def test_every_route_but_health_metrics_and_docs_needs_a_key(keyed_app):
    app, client = keyed_app
    sid = _new_session(client)
    http_routes, ws_routes = [], []
    for path, route in _all_routes(app.routes):
        methods = getattr(route, "methods", None)
        if methods:
            http_routes += [(m, path) for m in sorted(methods - {"HEAD", "OPTIONS"})]
        else:
            ws_routes.append(path)
    assert len(http_routes) >= 15 and len(ws_routes) >= 3, (http_routes, ws_routes)

    for method, path in http_routes:
        url = _fill(path, sid)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        anonymous = client.request(method, url, json=body)
        wrong = client.request(method, url, json=body, headers={"Authorization": "Bearer nope"})
        keyed = client.request(method, url, json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        if _is_public(path):
            assert anonymous.status_code != 401, (method, path)
            continue
        for r in (anonymous, wrong):
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            if path.startswith("/v2"):  # the protocol's own shape
                assert isinstance(error, str) and error, (path, r.text)
            else:
                assert error["code"] == "unauthorized" and error["message"], (path, r.text)
        assert keyed.status_code != 401, (method, path, keyed.text)

    for path in ws_routes:
        url = _fill(path, sid)
        for suffix in ("", "?api_key=nope"):
            with client.websocket_connect(url + suffix) as ws:
                assert ws.receive_json()["error"]["code"] == "unauthorized", path
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 4401


def test_both_header_forms_and_the_websocket_query_key(keyed_app):
    _, client = keyed_app
    forms = [
        {"Authorization": f"Bearer {KEY_A}"},
        {"authorization": f"bearer {KEY_A}"},
        {"X-API-Key": KEY_A},
    ]
    sids = []
    for headers in forms:
        r = client.post(f"/v1/models/{LSTM}/sessions", headers=headers)
        assert r.status_code == 201, (headers, r.text)
        sids.append(r.json()["session_id"])
    for sid in sids:  # all three forms are the same owner
        for headers in forms:
            assert client.get(f"/v1/sessions/{sid}", headers=headers).status_code == 200
    for query, headers in [(f"?api_key={KEY_A}", {}), ("", {"X-API-Key": KEY_A})]:
        with client.websocket_connect(
            f"/v1/sessions/{sids[0]}/stream{query}", headers=headers
        ) as ws:
            assert ws.receive_json()["session_id"] == sids[0]
            ws.send_json({"inputs": [[0.1, 0.2, 0.3]]})
            assert "outputs" in ws.receive_json()


def test_a_session_of_key_a_is_exactly_unknown_to_key_b(keyed_app):
    _, client = keyed_app
    sid = _new_session(client, KEY_A)
    x = np.random.default_rng(0).normal(size=(4, 3)).tolist()
    r = client.post(
        f"/v1/sessions/{sid}/steps", json={"inputs": x, "seq": 4}, headers={"X-API-Key": KEY_A}
    )
    assert r.status_code == 200
    before = client.get(f"/v1/sessions/{sid}/state", headers={"X-API-Key": KEY_A}).json()
    unknown = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()

    def calls(target: str):
        return [
            ("GET", f"/v1/sessions/{target}", None),
            ("GET", f"/v1/sessions/{target}/state", None),
            ("POST", f"/v1/sessions/{target}/steps", {"inputs": x}),
            ("POST", f"/v1/sessions/{target}/steps", {"inputs": x[:1], "seq": 4}),
            ("POST", f"/v1/sessions/{target}/generate", {"steps": 2}),
            ("POST", f"/v1/sessions/{target}/reset", None),
            ("DELETE", f"/v1/sessions/{target}", None),
        ]

    b = {"X-API-Key": KEY_B}
    for (method, path, body), (_, unknown_path, _) in zip(calls(sid), calls(unknown)):
        theirs = client.request(method, path, json=body, headers=b)
        nobody = client.request(method, unknown_path, json=body, headers=b)
        assert theirs.status_code == nobody.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"]["code"] == "session_not_found"
        assert theirs.text.replace(sid, "ID") == nobody.text.replace(unknown, "ID"), path
        assert set(theirs.headers) - {"x-request-id"} == set(nobody.headers) - {"x-request-id"}

    frames = []
    for target in (sid, unknown):
        with client.websocket_connect(f"/v1/sessions/{target}/stream", headers=b) as ws:
            frames.append(json.dumps(ws.receive_json()).replace(target, "ID"))
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4404
    assert frames[0] == frames[1] and "session_not_found" in frames[0]

    after = client.get(f"/v1/sessions/{sid}/state", headers={"X-API-Key": KEY_A}).json()
    assert after == before  # B's reset, steps and delete did nothing


def test_session_ids_are_unguessable_and_unique(model_repo):
    app = create_app(Settings(model_repo=model_repo))
    with TestClient(app) as client:
        ids = [client.post(f"/v1/models/{LSTM}/sessions").json()["session_id"] for _ in range(300)]
    assert len(set(ids)) == len(ids)
    for sid in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", sid), sid
        raw = base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
        assert len(raw) >= 16, f"{sid} carries only {len(raw) * 8} bits"


# -- limits -----------------------------------------------------------------------------


def _error(r, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]


def test_request_limits_have_their_own_codes(model_repo):
    settings = Settings(
        model_repo=model_repo,
        max_body_bytes=4096,
        max_steps_per_request=5,
        max_batch_sequences=2,
        max_total_steps_per_predict=8,
    )
    row = [0.1, 0.2, 0.3]
    with TestClient(create_app(settings)) as client:
        sid = _new_session(client, key="")
        big = {"inputs": [row] * 400}  # > 4096 bytes
        _error(client.post(f"/v1/sessions/{sid}/steps", json=big), 413, "payload_too_large")
        _error(
            client.post(f"/v1/models/{LSTM}/predict", json={"inputs": [[row] * 400]}),
            413,
            "payload_too_large",
        )
        _error(
            client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row] * 6}),
            413,
            "sequence_too_long",
        )
        _error(
            client.post(f"/v1/models/{LSTM}/predict", json={"inputs": [[row] * 6]}),
            413,
            "sequence_too_long",
        )
        _error(
            client.post(f"/v1/models/{LSTM}/predict", json={"inputs": [[row]] * 3}),
            413,
            "payload_too_large",
        )
        _error(
            client.post(f"/v1/models/{LSTM}/predict", json={"inputs": [[row] * 5, [row] * 4]}),
            413,
            "payload_too_large",
        )
        # Nothing refused above touched the session; limits that hold pass.
        ok = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [row] * 5, "seq": 5})
        assert ok.status_code == 200 and ok.json()["step_count"] == 5, ok.text
        ok = client.post(f"/v1/models/{LSTM}/predict", json={"inputs": [[row] * 4, [row] * 4]})
        assert ok.status_code == 200, ok.text


def test_chunked_body_over_the_limit_is_413(model_repo):
    """Without Content-Length the limit is checked while reading; still 413, not 400."""
    settings = Settings(model_repo=model_repo, max_body_bytes=2048)

    def chunks():
        yield b'{"inputs": [['
        for _ in range(300):
            yield b"[0.1, 0.2, 0.3],"
        yield b"[0.1, 0.2, 0.3]]]}"

    with TestClient(create_app(settings)) as client:
        r = client.post(
            f"/v1/models/{LSTM}/predict",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
    _error(r, 413, "payload_too_large")


def test_websocket_message_size_and_rate_limits(model_repo):
    settings = Settings(model_repo=model_repo, ws_max_message_bytes=256, ws_max_messages_per_s=3)
    row = [0.1, 0.2, 0.3]
    with TestClient(create_app(settings)) as client:
        with client.websocket_connect(f"/v1/models/{LSTM}/stream") as ws:
            sid = ws.receive_json()["session_id"]
            ws.send_text(json.dumps({"inputs": [row] * 40}))  # > 256 bytes
            assert ws.receive_json()["error"]["code"] == "payload_too_large"
            ws.send_bytes(b"\0" * 300)
            assert ws.receive_json()["error"]["code"] == "payload_too_large"
            answers = []
            for _ in range(8):  # one second allows 3, they arrive within milliseconds
                ws.send_text(json.dumps({"inputs": [row]}))
                answers.append(ws.receive_json())
            codes = [a["error"]["code"] for a in answers if "error" in a]
            applied = [a for a in answers if "error" not in a]
            assert codes and set(codes) == {"rate_limited"}, answers
            assert [a["step_count"] for a in applied] == list(range(1, len(applied) + 1))
        info = client.get(f"/v1/sessions/{sid}").json()
        assert info["step_count"] == len(applied)  # refused messages changed nothing


def test_session_count_limits_per_key_and_in_total(model_repo):
    settings = Settings(
        model_repo=model_repo, api_keys=[KEY_A, KEY_B], max_sessions_per_key=2, max_sessions=3
    )
    with TestClient(create_app(settings)) as client:
        a1, a2 = _new_session(client, KEY_A), _new_session(client, KEY_A)
        r = client.post(f"/v1/models/{LSTM}/sessions", headers={"X-API-Key": KEY_A})
        _error(r, 429, "too_many_sessions")
        assert r.headers["retry-after"] == "1"
        with client.websocket_connect(f"/v1/models/{LSTM}/stream?api_key={KEY_A}") as ws:
            assert ws.receive_json()["error"]["code"] == "too_many_sessions"
        _new_session(client, KEY_B)  # B has its own quota...
        r = client.post(f"/v1/models/{LSTM}/sessions", headers={"X-API-Key": KEY_B})
        _error(r, 429, "too_many_sessions")  # ...but the server holds its total of 3
        assert client.delete(f"/v1/sessions/{a1}", headers={"X-API-Key": KEY_A}).status_code == 204
        _new_session(client, KEY_B)
        assert client.get(f"/v1/sessions/{a2}", headers={"X-API-Key": KEY_A}).status_code == 200


# -- model names ------------------------------------------------------------------------

TRAVERSALS = [
    "..",
    "../x",
    "../../etc/passwd",
    "..%2F..%2Fetc",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2E%2E",
    "%2E%2E%2F%2E%2E%2Fetc",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "..\\..\\windows",
    "tiny-lstm/../tiny-lstm",
    "tiny-lstm%2F..%2F..%2F..%2Fetc",
    "~root",
    "tiny-lstm%00",
    str(REPO_ROOT),
]


async def _asgi_request(app, method: str, raw_path: str, body: bytes = b"") -> tuple[int, dict]:
    """Call the app with a raw path exactly as a server would pass it (no client cleanup)."""
    from urllib.parse import unquote

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": unquote(raw_path), "raw_path": raw_path.encode(),
        "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1), "server": ("t", 80),
        "headers": [(b"host", b"t"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload)


async def test_model_names_never_reach_the_filesystem(make_client, model_repo, monkeypatch):
    touched: list[str] = []

    def spy(original):
        def wrapper(path, *args, **kwargs):
            touched.append(str(path))
            return original(path, *args, **kwargs)

        return wrapper

    async with make_client(model_repo=model_repo) as client:
        app = client.app
        for module, name in [(builtins, "open"), (io, "open"), (os, "open"), (os, "stat"),
                             (os, "lstat"), (os, "listdir"), (os, "scandir")]:  # fmt: skip
            monkeypatch.setattr(module, name, spy(getattr(module, name)))
        session_body = b""
        for name in TRAVERSALS:
            for method, template, body in [
                ("GET", "/v1/models/{}", b""),
                ("POST", "/v1/models/{}/predict", b'{"inputs": [[[0.1, 0.2, 0.3]]]}'),
                ("POST", "/v1/models/{}/sessions", session_body),
                ("POST", "/v1/models/{}/versions/1/predict", b'{"inputs": [[[0.1, 0.2, 0.3]]]}'),
                ("POST", "/v1/models/{}/versions/1/sessions", session_body),
            ]:
                status, payload = await _asgi_request(app, method, template.format(name), body)
                assert status == 404, (name, method, template, status, payload)
                assert payload["error"]["code"] in ("model_not_found", "not_found"), payload
        monkeypatch.undo()
    assert touched == [], f"file system touched while resolving model names: {touched[:10]}"


# -- image --------------------------------------------------------------------------------


def test_dockerfile_final_stage_runs_as_non_root():
    dockerfile = REPO_ROOT / "Dockerfile"
    if not dockerfile.exists():
        pytest.skip("no Dockerfile yet")
    final_stage = re.split(r"(?im)^FROM\s", dockerfile.read_text())[-1]
    users = re.findall(r"(?im)^USER\s+(\S+)", final_stage)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users


def test_connections_past_the_limit_are_answered_503_at_once(model_repo, tmp_path):
    """RNNSERVE_MAX_CONNECTIONS (uvicorn's limit_concurrency): with that many connections
    open (here requests never finished), a request on a new connection is answered 503 at
    once, and served again as soon as they close. (It does not time the unfinished ones
    out: docs/operations.md, "Facing untrusted clients".)"""
    import socket
    import time

    import httpx

    from tests.conftest import start_server

    server = start_server(model_repo, tmp_path, env={"RNNSERVE_MAX_CONNECTIONS": "4"})
    held = []
    try:
        for _ in range(4):  # requests that never end: the headers are never finished
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        time.sleep(0.3)
        r = httpx.get(f"{server.url}/healthz", timeout=5)
        assert r.status_code == 503, r.text
        for sock in held:
            sock.close()
        held.clear()
        deadline = time.monotonic() + 5
        while (r := httpx.get(f"{server.url}/healthz", timeout=5)).status_code != 200:
            assert time.monotonic() < deadline, r.text  # freed as soon as they close
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
        server.stop()
