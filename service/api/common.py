"""What every API surface shares: fast JSON responses, the engine, API-key owners, timestamps."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from fastapi import Request, WebSocket
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive

from service.api.schemas import ErrorResponse
from service.config import Settings
from service.engine import Engine
from service.errors import ServeError, Unauthorized
from service.sessions import SessionRecord

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
log = logging.getLogger("service.app")


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_ORJSON_OPTIONS)


def json_problem(message: str, doc: str, pos: int) -> str:
    """A JSON parser's complaint for people, with a hint for the literals Python's json
    module writes by default."""
    problem = f"{message} at character {pos}"
    if any(word in doc[max(pos - 1, 0) : pos + 9] for word in ("NaN", "Infinity")):
        problem += " (NaN and Infinity are not JSON numbers: send finite numbers)"
    return problem


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` for an app that is to read a body already read (or inflated) here."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def error_response(exc: ServeError) -> ORJSONResponse:
    """The HTTP answer to a ServeError, wherever it is raised (the app's exception handler,
    the lean step path)."""
    if exc.status >= 500 and exc.status != 503:
        log.error("request failed: %s", exc.message)
    return ORJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def internal_error_response() -> ORJSONResponse:
    """The answer to an unexpected exception (logged by the caller): no detail leaks."""
    return ORJSONResponse(
        {"error": {"code": "internal_error", "message": "internal error"}}, status_code=500
    )


class ORJSONRequest(Request):
    """A request whose JSON body is parsed by orjson (several times faster than json.loads
    on large predict bodies; it also refuses the non-standard NaN/Infinity literals)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class ORJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_orjson(request: Request) -> Response:
            return await handler(ORJSONRequest(request.scope, request.receive))

        return with_orjson


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error statuses a route may answer.

    422 is always listed: FastAPI would otherwise document its own validation body, which
    our handler replaces with ErrorResponse.
    """
    return {status: {"model": ErrorResponse} for status in sorted({*statuses, 422})}


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def session_info(record: SessionRecord, ttl_s: float) -> dict[str, Any]:
    return {
        "session_id": record.session_id,
        "model": record.model,
        "version": record.version,
        "step_count": record.step_count,
        "created_at": iso(record.created_at),
        "last_used": iso(record.last_used),
        "expires_at": iso(record.expires_at(ttl_s)),
    }


def presented_key(headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return headers.get("x-api-key")


def owner_for_key(settings: Settings, key: str | None) -> str | None:
    """The owner tag of a request: None without keys configured, else the key's digest.

    Raises Unauthorized for a missing or unknown key. Every configured key is compared in
    constant time, so timing reveals nothing about which keys exist.
    """
    if not settings.api_keys:
        return None
    if not key:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    presented = key.encode()
    matched = False
    for candidate in settings.api_keys:
        matched |= hmac.compare_digest(presented, candidate.encode())
    if not matched:
        raise Unauthorized("the API key is not valid")
    return hashlib.sha256(presented).hexdigest()[:32]


async def owner(request: Request) -> str | None:
    """FastAPI dependency: the caller's owner tag (see owner_for_key).

    ``async`` although it awaits nothing: a plain ``def`` would cost every request a trip
    through the thread pool."""
    return owner_for_key(request.app.state.settings, presented_key(request.headers))


def websocket_owner(websocket: WebSocket) -> str | None:
    key = presented_key(websocket.headers) or websocket.query_params.get("api_key")
    return owner_for_key(websocket.app.state.settings, key)


def rows(y: np.ndarray) -> list:
    return y.tolist()
