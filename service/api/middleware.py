"""One ASGI middleware for every HTTP request: request id, body limit, metrics, one log line."""

from __future__ import annotations

import logging
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.common import dumps
from service.errors import PayloadTooLarge
from service.metrics import Metrics

log = logging.getLogger("service.access")


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = 500
        limit = self.max_body_bytes

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reject(scope, send, request_id, PayloadTooLarge(
                f"the body of {declared} bytes exceeds the limit of {limit}", limit=limit
            ))
            self._record(scope, 413, started, request_id)
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

        try:
            await self.app(scope, counted_receive, send_with_id)
        finally:
            self._record(scope, status, started, request_id)

    def _record(self, scope: Scope, status: int, started: float, request_id: str) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        params = scope.get("path_params") or {}
        model = params.get("name") or params.get("model_name") or ""
        self.metrics.requests.labels(template, model, str(status)).inc()
        self.metrics.latency.labels(template, model).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "route": template,
                    "model": model or None,
                    "session": params.get("session_id"),
                    "status": status,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")[:128]
            if candidate.isprintable():
                return candidate
    return secrets.token_hex(8)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(scope: Scope, send: Send, request_id: str, error: PayloadTooLarge) -> None:
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
