"""The app factory: everything is built from one Settings object, nothing at import time."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from service import __version__
from service.api import health, playground, rest, steps, stream, v2
from service.api.common import (
    ORJSONResponse,
    error_response,
    internal_error_response,
    json_problem,
)
from service.api.middleware import RequestContext
from service.config import Settings
from service.engine import Engine
from service.errors import HTTP_CODES, ServeError
from service.sessions import SessionStore

log = logging.getLogger("service.app")



def create_app(settings: Settings | None = None, *, store: SessionStore | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    engine = Engine(settings, store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        grpc_server = await _start_grpc(engine)
        log.info(
            "ready",
            extra={"models": [f"{v.name}/{v.version}" for v in engine.repository.versions() if v.ready]},
        )
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            await engine.stop()

    app = _App(
        title="rnnserve",
        version=__version__,
        description="Stateful serving of RNN, LSTM and GRU models: batch predict, sessions "
        "whose hidden state is carried across requests, WebSocket streaming, and the Open "
        "Inference Protocol (v2) with sequences.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        **_telemetry(settings),
    )
    app.state.settings = settings
    app.state.engine = engine
    app.include_router(health.router)
    app.include_router(rest.router)
    app.include_router(steps.router)
    app.include_router(stream.router)
    app.include_router(v2.router)
    app.include_router(playground.router)
    _install_error_handlers(app)
    app.outermost = partial(
        RequestContext,
        metrics=engine.metrics,
        max_body_bytes=settings.max_body_bytes,
        known_models=lambda: engine.repository.known_names,
        lean=rest.LeanStep(),
        lean_stream=stream.LeanStream(),
    )
    return app


def _telemetry(settings: Settings) -> dict:
    """FastAPI's OpenTelemetry bridge, off unless ``otel_telemetry`` (FastAPI releases
    before the bridge take no such argument)."""
    if settings.otel_telemetry or "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


class _App(FastAPI):
    """FastAPI with the access middleware (``outermost``) wrapped around its whole middleware
    stack rather than inside it: every answer, a 500 of Starlette's error middleware
    included, carries the request id and is counted, and the lean step path
    (``rest.LeanStep``) skips the layers and routing its requests do not need."""

    outermost: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.outermost is None else self.outermost(stack)


async def _start_grpc(engine: Engine):
    """The gRPC server in this event loop, or None when it is off or its extra is missing."""
    settings = engine.settings
    if not settings.grpc_port:
        return None
    try:
        from service.api.grpc_server import GrpcServer
    except ImportError as exc:
        log.warning(
            "gRPC is off: %s; install the grpc extra (pip install 'rnnserve[grpc]') to serve it",
            exc,
        )
        return None
    server = GrpcServer(engine, settings.host, settings.grpc_port)
    await server.start()
    log.info("gRPC listening", extra={"address": server.address})
    return server


def _problem(error: dict, body: object) -> str:
    loc = error.get("loc", ())
    if error.get("type") == "json_invalid" and isinstance(body, str) and len(loc) == 2:
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        return f"the body is not valid JSON: {json_problem(str(reason), body, int(loc[1]))}"
    return f"{'.'.join(str(p) for p in loc if p != 'body') or 'body'}: {error.get('msg')}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> ORJSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> ORJSONResponse:
        if isinstance(exc.body, bytes | bytearray):  # FastAPI did not read it as JSON
            kind = request.headers.get("content-type")
            message = (
                f"the body was sent as {kind[:80]!r}" if kind else "the body was sent without a Content-Type"
            ) + ": send JSON with Content-Type: application/json"
        else:
            message = "; ".join(_problem(e, exc.body) for e in exc.errors()[:5])
        return ORJSONResponse(
            {"error": {"code": "invalid_input", "message": message}}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return ORJSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> ORJSONResponse:
        log.exception("unhandled error")
        return internal_error_response()
