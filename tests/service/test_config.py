"""Settings: the RNNSERVE_ environment prefix, list splitting, validation and sane defaults."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.cli import parse_args
from service.config import Settings


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("RNNSERVE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults_are_sane(clean_env):
    s = Settings()
    assert s.model_repo == Path("models")
    assert s.host == "127.0.0.1" and s.port == 8000
    assert s.grpc_port == 8001  # Triton's; the tests' conftest sets 0 for every other test
    assert s.session_store == "memory"
    assert s.api_keys == []
    assert s.session_ttl_s > 0 and s.max_sessions >= 1000
    assert 1 <= s.max_steps_per_request <= s.max_total_steps_per_predict
    assert s.max_body_bytes >= 1024 * 1024
    assert s.batch_max_size > 1 and s.batch_max_delay_ms == 0 and s.batch_max_inflight >= 1
    assert s.max_queue >= s.batch_max_size
    assert s.reload_interval_s == 0
    assert s.ws_max_messages_per_s == 0 and s.ws_max_message_bytes >= 64


def test_environment_prefix(clean_env):
    clean_env.setenv("RNNSERVE_API_KEYS", "a,b")
    clean_env.setenv("RNNSERVE_MAX_SESSIONS", "7")
    clean_env.setenv("RNNSERVE_BATCH_MAX_DELAY_MS", "2.5")
    clean_env.setenv("RNNSERVE_MODEL_REPO", "/srv/models")
    clean_env.setenv("RNNSERVE_LOG_JSON", "false")
    clean_env.setenv("RNNSERVE_SESSION_STORE", "redis://cache:6379/2")
    clean_env.setenv("RNNSERVE_NOT_A_SETTING", "ignored")
    clean_env.setenv("MAX_SESSIONS", "3")  # no prefix: not ours
    s = Settings()
    assert s.api_keys == ["a", "b"]
    assert s.max_sessions == 7
    assert s.batch_max_delay_ms == 2.5
    assert s.model_repo == Path("/srv/models")
    assert s.log_json is False
    assert s.session_store == "redis://cache:6379/2"
    assert not hasattr(s, "not_a_setting")
    # explicit arguments win over the environment
    assert Settings(max_sessions=9).max_sessions == 9


@pytest.mark.parametrize(
    "raw, keys", [(" a , b ,,c ", ["a", "b", "c"]), ("", []), ("solo", ["solo"])]
)
def test_api_keys_split_on_commas(clean_env, raw, keys):
    clean_env.setenv("RNNSERVE_API_KEYS", raw)
    assert Settings().api_keys == keys
    assert Settings(api_keys=raw).api_keys == keys


@pytest.mark.parametrize(
    "env",
    [
        {"RNNSERVE_MAX_SESSIONS": "0"},
        {"RNNSERVE_SESSION_TTL_S": "0"},
        {"RNNSERVE_BATCH_MAX_SIZE": "0"},
        {"RNNSERVE_MAX_BODY_BYTES": "10"},
        {"RNNSERVE_ORT_GRAPH_OPTIMIZATION": "fastest"},
        {"RNNSERVE_PORT": "eighty"},
    ],
)
def test_invalid_values_are_refused(clean_env, env):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValidationError):
        Settings()


def test_cli_flags():
    args = parse_args(["--model-repo", "/m", "--port", "9001", "--host", "0.0.0.0"])
    assert args.model_repo == Path("/m") and args.port == 9001 and args.host == "0.0.0.0"
    assert parse_args([]).model_repo is None  # the environment decides
    assert parse_args(["--grpc-port", "0"]).grpc_port == 0 and parse_args([]).grpc_port is None


def test_environment_reaches_a_real_server(server_factory, model_repo):
    """RNNSERVE_API_KEYS="k1,k2" in the environment of an ``rnn-serve`` process."""
    server = server_factory(model_repo, RNNSERVE_API_KEYS="k1,k2", RNNSERVE_MAX_SESSIONS="2")
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # health never needs a key
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    r = httpx.post(f"{server.url}/v1/models/tiny-rnn/sessions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers.get("www-authenticate") == "Bearer"
    for key in ["k1", "k2"]:
        r = httpx.post(
            f"{server.url}/v1/models/tiny-rnn/sessions", headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 201, r.text
    r = httpx.post(f"{server.url}/v1/models/tiny-rnn/sessions", headers={"X-API-Key": "k1"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
    with connect(f"{server.ws_url}/v1/models/tiny-rnn/stream", open_timeout=10) as ws:
        assert '"unauthorized"' in ws.recv(timeout=10)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 4401


def test_the_connection_limit_stays_under_the_descriptor_limit(monkeypatch):
    """With 1,024 descriptors (a common default) and 10,000 connections allowed, half-sent
    requests took every descriptor and new clients were reset instead of answered 503."""
    import resource

    from service.cli import connection_limit

    settings = Settings(model_repo="models")
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 4096))
    assert connection_limit(settings) == 1024 - 128 - settings.redis_max_connections
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1_000_000, 1_000_000))
    assert connection_limit(settings) == settings.max_connections == 10_000
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY,) * 2)
    assert connection_limit(settings) == 10_000
