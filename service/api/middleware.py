"""One ASGI middleware for every HTTP request: request id, body limit, metrics, one log line.

It also undoes ``Content-Encoding: gzip|deflate`` on v1 bodies (v2 does so in its own codec),
within the same body limit after inflating. It wraps the whole app (outside FastAPI's own
middleware), and hands ``POST /v1/sessions/{id}/steps`` to the lean step path
(``service.api.rest.LeanStep``), which falls back to the app for any uncommon body, and the
WebSocket streams to ``service.api.stream.LeanStream``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.binary import CONTENT_ENCODINGS, InflatedTooLarge, TensorError, decompress
from service.api.common import dumps, replaying
from service.errors import InvalidInput, PayloadTooLarge, ServeError, UnsupportedMediaType
from service.metrics import UNKNOWN_MODEL, Metrics, track_served_model

log = logging.getLogger("service.access")


class LeanPath(Protocol):
    """A route served before the app's middleware and routing (``rest.LeanStep``)."""

    def session_id(self, scope: Scope) -> str | None: ...

    async def __call__(
        self, session_id: str, scope: Scope, receive: Receive, send: Send, app: ASGIApp
    ) -> None: ...


class LeanSocketPath(Protocol):
    """WebSocket routes served before the app's middleware and routing (``stream.LeanStream``)."""

    def match(self, scope: Scope) -> tuple[Any, dict[str, str]] | None: ...

    async def __call__(
        self, handler: Any, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None: ...


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        known_models: Callable[[], Collection[str]] = frozenset,
        lean: LeanPath | None = None,
        lean_stream: LeanSocketPath | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.known_models = known_models
        self.lean = lean
        self.lean_stream = lean_stream
        self._id_prefix = secrets.token_hex(8) + "-"
        self._ids = itertools.count(1)
        """Generated request ids: a random prefix per process and a counter, unique across
        replicas and restarts without a random draw per request."""
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        """(route, model, status) -> the request counter's and latency histogram's children:
        labels() takes a lock and builds a key, so it runs once per series, not per request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            taken = (
                self.lean_stream.match(scope)
                if self.lean_stream is not None and scope["type"] == "websocket"
                else None
            )
            if taken is None:
                await self.app(scope, receive, send)
            else:
                await self.lean_stream(*taken, scope, receive, send)
            return
        started = time.perf_counter()
        given_id, declared, encoding = _headers_of_interest(scope)
        request_id = given_id or f"{self._id_prefix}{next(self._ids):x}"
        served = track_served_model()
        status = 500
        limit = self.max_body_bytes

        if declared is not None and declared > limit:
            await _reject(scope, send, request_id, PayloadTooLarge(
                f"the body of {declared} bytes exceeds the limit of {limit}", limit=limit
            ))
            self._record(scope, 413, started, request_id, served)
            return

        received = 0
        too_large: PayloadTooLarge | None = None

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = PayloadTooLarge(
                        f"the body exceeds the limit of {limit} bytes", limit=limit
                    )
                    raise too_large
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if too_large is not None:
                # Whatever the app made of the aborted body read, the answer is 413.
                if message["type"] == "http.response.start":
                    status = too_large.status
                    await _reject(scope, send, request_id, too_large)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        app_receive: Receive = counted_receive
        if encoding is not None and scope.get("path", "").startswith("/v1/"):
            try:
                scope, app_receive = await _inflated(scope, counted_receive, encoding, limit)
            except ServeError as exc:
                failure = too_large or exc
                await _reject(scope, send, request_id, failure)
                self._record(scope, failure.status, started, request_id, served)
                return

        lean = self.lean
        session_id = lean.session_id(scope) if lean is not None and encoding is None else None
        try:
            if session_id is None:
                await self.app(scope, app_receive, send_with_id)
            else:
                await lean(session_id, scope, app_receive, send_with_id, self.app)
        finally:
            self._record(scope, status, started, request_id, served)

    def _record(
        self, scope: Scope, status: int, started: float, request_id: str, served: list[str]
    ) -> None:
        elapsed = time.perf_counter() - started
        template = scope.get("route_template") or getattr(scope.get("route"), "path", None) or "unmatched"
        params = scope.get("path_params") or {}
        # The URL's model, else the model of the session the request touched.
        named = params.get("name") or params.get("model_name") or (served[0] if served else None)
        # Only loaded model names become labels: a caller's text never creates a series.
        model = named if named in self.known_models() else UNKNOWN_MODEL
        series = self._series.get((template, model, status))
        if series is None:
            series = self._series[(template, model, status)] = (
                self.metrics.requests.labels(template, model, str(status)),
                self.metrics.latency.labels(template, model),
            )
        series[0].inc()
        series[1].observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "route": template,
                    "model": model,
                    "session": params.get("session_id"),
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )


def _headers_of_interest(scope: Scope) -> tuple[str | None, int | None, str | None]:
    """One pass over the headers: the client's request id (printable, at most 128
    characters, else None), the declared Content-Length, the Content-Encoding."""
    request_id = length = encoding = None
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"x-request-id":
            candidate = value.decode("latin-1")[:128]
            request_id = candidate if candidate.isprintable() and candidate else None
        elif name == b"content-encoding":
            encoding = value.decode("latin-1")
    return request_id, length, encoding


async def _inflated(
    scope: Scope, receive: Receive, encoding: str, limit: int
) -> tuple[Scope, Receive]:
    """The request with its compressed body read whole and inflated (within ``limit``)."""
    kind = encoding.strip().lower()
    if kind not in CONTENT_ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:40]!r} is not supported: send the body "
            "uncompressed, or compressed with gzip or deflate"
        )
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    try:
        body = decompress(raw, kind, limit) if raw else raw
    except InflatedTooLarge as exc:
        raise PayloadTooLarge(str(exc), limit=limit) from None
    except TensorError as exc:
        raise InvalidInput(f"{exc}; send the body uncompressed or as valid {kind}") from None
    headers = [
        (name, value)
        for name, value in scope.get("headers", [])
        if name not in (b"content-encoding", b"content-length")
    ]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}, replaying(body, receive)


async def _reject(scope: Scope, send: Send, request_id: str, error: ServeError) -> None:
    # The Open Inference Protocol's error body is a bare message.
    v2 = scope.get("path", "").startswith("/v2")
    body = dumps({"error": error.message} if v2 else error.body())
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
