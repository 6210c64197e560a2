"""``rnn-serve``: start the server (uvicorn underneath) on a model repository."""

from __future__ import annotations

import argparse
import gc
import resource
from pathlib import Path

import uvicorn

from service.app import create_app
from service.config import Settings
from service.logs import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnn-serve",
        description="Serve RNN/LSTM/GRU ONNX models with per-session state. Every other "
        "setting is an RNNSERVE_* environment variable (see the README).",
    )
    parser.add_argument("--model-repo", type=Path, help="model repository (RNNSERVE_MODEL_REPO)")
    parser.add_argument("--host", help="bind address (RNNSERVE_HOST)")
    parser.add_argument("--port", type=int, help="port (RNNSERVE_PORT)")
    parser.add_argument(
        "--grpc-port", type=int, help="gRPC port, 0 turns gRPC off (RNNSERVE_GRPC_PORT)"
    )
    parser.add_argument("--session-store", help="memory or redis://host:port/db")
    parser.add_argument("--log-level", help="debug, info, warning, error")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "model_repo": args.model_repo,
            "host": args.host,
            "port": args.port,
            "grpc_port": args.grpc_port,
            "session_store": args.session_store,
            "log_level": args.log_level,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_json)
    if settings.gc_threshold:  # the process is the server's own: tune its collector
        gc.set_threshold(settings.gc_threshold, *gc.get_threshold()[1:])
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        ws_max_size=settings.ws_max_message_bytes + 4096,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        limit_concurrency=connection_limit(settings),
        timeout_graceful_shutdown=10,
    )


def connection_limit(settings: Settings) -> int:
    """``max_connections``, and no more than the process's file descriptors allow, with
    room kept for the models, the Redis pool and gRPC, so that requests past it get a 503
    while descriptors are left to accept them."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    spare = 128 + settings.redis_max_connections
    return min(settings.max_connections, max(16, soft - spare))


if __name__ == "__main__":
    main()
