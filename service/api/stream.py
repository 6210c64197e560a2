"""WebSocket streaming: one session per connection, answers in order, JSON or binary frames.

Each connection reads one message, answers it, then reads the next: a slow or vanished
client leaves at most one message and one answer in server memory (the rest waits in TCP
buffers, whose limits push back on the client), and its session stays for resumption
until the TTL. A bad message gets an error frame and leaves the stream open and the state untouched.
Rate and size limits answer with error frames and keep the stream open. Close codes:
4401 unauthorized, 4404 session or model not found/expired, 1013 (try again later) a stream
that could not open its session because the store is unavailable or full, 1003 a malformed
binary frame, 1009 a message over the transport's hard size cap, 1011 an internal error.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.datastructures import Headers, QueryParams
from starlette.types import Message, Receive, Scope, Send

from service.api import steps
from service.api.common import dumps, session_info, websocket_owner
from service.api.rest import step_content
from service.engine import Engine
from service.errors import InvalidInput, PayloadTooLarge, RateLimited, ServeError
from service.frames import FrameError, decode_request, encode_response, encode_top_k_response
from service.repository import parse_version
from service.topk import check_k, top_indices

router = APIRouter(tags=["stream"])
log = logging.getLogger("service.stream")

CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
_CLOSE_CODES = {
    401: CLOSE_UNAUTHORIZED,
    404: CLOSE_NOT_FOUND,
    429: CLOSE_TRY_AGAIN,
    503: CLOSE_TRY_AGAIN,
}


@router.websocket("/v1/stream")
async def stream_many(websocket: WebSocket) -> None:
    """Multiplexed: each message carries steps for many sessions (see service.api.steps),
    as JSON text or as a binary multiplexed frame (service.frames); answers in order."""
    engine: Engine = websocket.app.state.engine
    await websocket.accept()
    try:
        who = websocket_owner(websocket)
    except ServeError as exc:
        await websocket.send_text(dumps(exc.body()).decode())
        await websocket.close(_CLOSE_CODES.get(exc.status, CLOSE_POLICY))
        return
    settings = engine.settings
    limiter = _RateLimiter(settings.ws_max_messages_per_s)
    while True:
        message = await _receive(websocket)
        if message is None:
            return
        binary, text = message
        try:
            _admit(settings, limiter, binary, text)
            if binary is not None:
                try:
                    answer = await steps.run_binary(engine, who, binary)
                except FrameError as exc:
                    await websocket.send_text(
                        dumps({"error": {"code": "bad_frame", "message": str(exc)}}).decode()
                    )
                    await websocket.close(CLOSE_UNSUPPORTED)
                    return
                await websocket.send_bytes(answer)
            else:
                parsed = steps.parse_json(text or "", settings.max_multiplex_items)
                answer = await steps.answer_json(engine, who, parsed)
                await websocket.send_text(answer.decode())
        except WebSocketDisconnect:
            return
        except ServeError as exc:
            try:
                await websocket.send_text(dumps(exc.body()).decode())
            except (WebSocketDisconnect, RuntimeError):
                return
        except Exception:
            log.exception("multiplexed stream failed")
            await _close_internal(websocket)
            return


async def _receive(websocket: WebSocket) -> tuple[bytes | None, str | None] | None:
    """The next message as (bytes, text), or None once the client has gone."""
    try:
        message = await websocket.receive()
    except WebSocketDisconnect:
        return None
    if message["type"] == "websocket.disconnect":
        return None
    return message.get("bytes"), message.get("text")


async def _close_internal(websocket: WebSocket) -> None:
    try:
        await websocket.send_text(
            dumps({"error": {"code": "internal_error", "message": "internal error"}}).decode()
        )
        await websocket.close(CLOSE_INTERNAL)
    except Exception:  # noqa: BLE001, S110 - the client may already be gone
        pass


def _admit(settings, limiter: _RateLimiter, binary: bytes | None, text: str | None) -> None:
    """The per-message size and rate limits of every stream."""
    size = len(binary) if binary is not None else len(text or "")
    if binary is None and size * 4 > settings.ws_max_message_bytes:
        size = len(text.encode())  # only count UTF-8 bytes when it could matter
    if size > settings.ws_max_message_bytes:
        raise PayloadTooLarge(
            f"message of {size} bytes exceeds the limit of {settings.ws_max_message_bytes}",
            limit=settings.ws_max_message_bytes,
        )
    limiter.take()


@router.websocket("/v1/models/{name}/stream")
async def stream_new(websocket: WebSocket, name: str) -> None:
    await _open(websocket, name=name, version=None)


@router.websocket("/v1/models/{name}/versions/{version}/stream")
async def stream_new_version(websocket: WebSocket, name: str, version: str) -> None:
    await _open(websocket, name=name, version=version)


@router.websocket("/v1/sessions/{session_id}/stream")
async def stream_resume(websocket: WebSocket, session_id: str) -> None:
    await _open(websocket, session_id=session_id)


async def _open(
    websocket: WebSocket,
    *,
    name: str | None = None,
    version: str | None = None,
    session_id: str | None = None,
) -> None:
    engine: Engine = websocket.app.state.engine
    await websocket.accept()
    try:
        who = websocket_owner(websocket)
        if session_id is None:
            number = None if version is None else parse_version(version)
            record = await engine.create_session(engine.model(name, number), who)
        else:
            record = await engine.session(session_id, who)
    except ServeError as exc:
        await websocket.send_text(dumps(exc.body()).decode())
        await websocket.close(_CLOSE_CODES.get(exc.status, CLOSE_POLICY))
        return
    except Exception:  # a bug, not the client's doing: still a frame and a close code
        log.exception("stream could not open its session")
        await _close_internal(websocket)
        return
    await websocket.send_text(dumps(session_info(record, engine.store.ttl_s)).decode())
    await _serve(websocket, engine, record.session_id, record.model, who)


async def _serve(
    websocket: WebSocket, engine: Engine, session_id: str, model: str, who: str | None
) -> None:
    settings = engine.settings
    metrics = engine.metrics
    limiter = _RateLimiter(settings.ws_max_messages_per_s)
    answered: dict[str, Any] | None = None

    while True:
        message = await _receive(websocket)
        if message is None:
            return
        binary, text = message
        kind = "binary" if binary is not None else "json"
        try:
            _admit(settings, limiter, binary, text)
            if binary is not None:
                try:
                    x, seq, k = decode_request(binary)
                except FrameError as exc:
                    await websocket.send_text(
                        dumps({"error": {"code": "bad_frame", "message": str(exc)}}).decode()
                    )
                    await websocket.close(CLOSE_UNSUPPORTED)
                    return
                if k is not None:
                    check_k(k)
                result = await engine.step(session_id, who, x, seq)
                count, replayed = result.step_count, result.replayed
                await websocket.send_bytes(
                    encode_response(result.outputs, count, replayed)
                    if k is None
                    else encode_top_k_response(*top_indices(result.outputs, k), count, replayed)
                )
            else:
                inputs, seq, k = _json_message(text)
                result = await engine.step(session_id, who, inputs, seq)
                content = step_content(result, k)
                await websocket.send_text(dumps(content).decode())
            if answered is None:  # the session's model name, not a fresh lookup: a reload
                answered = {  # after the step must not turn its answer into an error
                    k: metrics.ws_messages.labels(model, k, "ok") for k in ("json", "binary")
                }
            answered[kind].inc()  # children looked up once per connection, not per message
        except WebSocketDisconnect:
            return
        except ServeError as exc:
            metrics.ws_messages.labels(model, kind, exc.code).inc()
            try:
                await websocket.send_text(dumps(exc.body()).decode())
            except (WebSocketDisconnect, RuntimeError):
                return
            if exc.code in ("session_not_found", "session_expired"):
                await websocket.close(CLOSE_NOT_FOUND)
                return
        except Exception:
            log.exception("stream failed")
            await _close_internal(websocket)
            return


_MESSAGE_FIELDS = frozenset({"inputs", "seq", "top_k"})


class LeanStream:
    """The WebSocket routes of this module taken by the access middleware before FastAPI's
    middleware and routing: the same handlers run on ``_Socket``, a minimal stand-in for
    Starlette's WebSocket over the raw ASGI calls, so that no wrapper layer runs per
    message. Behaviour (frames, errors, close codes) is that of the routes above."""

    def match(self, scope: Scope) -> tuple[Any, dict[str, str]] | None:
        """(handler, path parameters) of a stream route, else None."""
        parts = scope["path"].split("/")
        # ['', 'v1', ..., 'stream']: /v1/stream, /v1/models/{name}/stream,
        # /v1/models/{name}/versions/{version}/stream, /v1/sessions/{session_id}/stream
        if len(parts) < 3 or parts[1] != "v1" or parts[-1] != "stream" or not all(parts[2:]):
            return None
        if len(parts) == 3:
            return stream_many, {}
        if len(parts) == 5 and parts[2] == "models":
            return stream_new, {"name": parts[3]}
        if len(parts) == 7 and parts[2] == "models" and parts[4] == "versions":
            return stream_new_version, {"name": parts[3], "version": parts[5]}
        if len(parts) == 5 and parts[2] == "sessions":
            return stream_resume, {"session_id": parts[3]}
        return None

    async def __call__(
        self, handler: Any, params: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        scope["path_params"] = params
        await handler(_Socket(scope, receive, send), **params)


class _Socket:
    """What this module's handlers use of Starlette's WebSocket, over the raw ASGI calls:
    ``accept``, ``receive``, ``send_text``/``send_bytes`` (WebSocketDisconnect once the
    client has gone, RuntimeError after a close), ``close``, ``headers``,
    ``query_params``, ``app``."""

    __slots__ = ("_closed", "_receive", "_send", "scope")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self._closed = False

    @property
    def app(self) -> Any:
        return self.scope["app"]

    @property
    def headers(self) -> Headers:
        return Headers(scope=self.scope)

    @property
    def query_params(self) -> QueryParams:
        return QueryParams(self.scope.get("query_string", b""))

    async def accept(self) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            raise WebSocketDisconnect(1006)
        await self._send({"type": "websocket.accept"})

    async def receive(self) -> Message:
        return await self._receive()

    async def send_text(self, data: str) -> None:
        await self._out({"type": "websocket.send", "text": data})

    async def send_bytes(self, data: bytes) -> None:
        await self._out({"type": "websocket.send", "bytes": data})

    async def close(self, code: int = 1000) -> None:
        await self._out({"type": "websocket.close", "code": code})
        self._closed = True

    async def _out(self, message: Message) -> None:
        if self._closed:
            raise RuntimeError("the WebSocket is closed")
        try:
            await self._send(message)
        except OSError:  # the client has gone (uvicorn's ClientDisconnected is an OSError)
            self._closed = True
            raise WebSocketDisconnect(1006) from None


def _json_message(text: str | None) -> tuple[Any, int | None, int | None]:
    try:
        message = orjson.loads(text or "")
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the message is not valid JSON: {exc}") from exc
    if not isinstance(message, dict) or "inputs" not in message:
        raise InvalidInput(
            'a message must be an object {"inputs": [step, ...], "seq"?: n, "top_k"?: k}'
        )
    if not message.keys() <= _MESSAGE_FIELDS:
        raise InvalidInput(f"unknown fields {sorted(set(message) - _MESSAGE_FIELDS)}")
    seq = message.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise InvalidInput("seq must be a positive integer")
    k = message.get("top_k")
    return message["inputs"], seq, (None if k is None else check_k(k))


class _RateLimiter:
    """A token bucket of one second's worth of messages; rate 0 means unlimited."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            raise RateLimited(f"more than {self.rate:g} messages per second on this stream")
        self.tokens -= 1
