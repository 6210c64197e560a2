"""A Python client for the rnnserve v1 API: REST calls, exactly-once sessions, WebSocket streams.

Installed with the base package and light on purpose: it imports only httpx, websockets,
numpy, orjson, the standard library and :mod:`service.frames` (never torch, fastapi or
uvicorn)::

    from service.client import Client

    with Client("http://127.0.0.1:8000", api_key="k1") as client:
        print([m["name"] for m in client.models()])
        y = client.predict("sine-lstm", [[0.0, 0.1, 0.2]]).outputs[0]

        with client.open_session("sine-lstm") as session:      # deleted on exit
            session.step([[0.0], [0.1]])                         # sends seq=2, retried safely
            session.step(np.array([[0.2]]))                      # seq=3

        for result in client.stream("sine-lstm", chunks, binary=True):
            print(result.step_count, result.outputs)

:class:`AsyncClient`, :class:`AsyncSession` and :class:`AsyncStream` mirror the sync API.

Exactly-once: a request that carries ``seq`` (the session's step_count once the request is
applied) is applied once however often it is sent; a retry of the last applied request is
answered from the server's copy of its outputs (``replayed``). :class:`Session` and
:class:`Stream` send ``seq`` on every step, so they can retry after a dropped connection, a
timeout or a 503 without ever applying a step twice. Every server error raises
:class:`RnnServeError` with the HTTP status and the stable error ``code``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import numpy as np
import orjson
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect as _ws_connect

from service.errors import code_statuses
from service.frames import (
    decode_many_response,
    decode_response,
    decode_top_k_response,
    encode_many,
    encode_request,
)

try:  # websockets >= 13: the new asyncio implementation
    from websockets.asyncio.client import connect as _ws_aconnect

    _LEGACY_ASYNC = False
except ImportError:  # pragma: no cover - websockets 12
    from websockets.client import connect as _ws_aconnect  # type: ignore[no-redef]

    _LEGACY_ASYNC = True

__all__ = [
    "AsyncClient",
    "AsyncMultiplex",
    "AsyncSession",
    "AsyncStream",
    "Client",
    "GenerateResult",
    "Multiplex",
    "Prediction",
    "RnnServeError",
    "Session",
    "SessionInfo",
    "StepResult",
    "Stream",
]

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# The HTTP status of each error code (WebSocket error frames carry only the code), from
# the server's own error hierarchy.
_CODE_STATUS = code_statuses()
_TRANSIENT_CODES = {
    "connection_error",
    "timeout",
    "overloaded",
    "rate_limited",
    "session_conflict",
    "store_unavailable",
    "model_not_ready",
}
_TRANSIENT_STATUSES = {429, 502, 503, 504}
"""A bare status without one of our codes (a proxy's answer) that is worth retrying: 429
too (an rnnserve 429 is decided by its code: ``too_many_sessions`` is not transient)."""


class RnnServeError(Exception):
    """An error answer of the server, or a failure to reach it.

    ``status`` is the HTTP status (``None`` when no HTTP answer arrived: ``code`` is then
    ``connection_error`` or ``timeout``), ``code`` the stable machine code of the
    ``{"error": {"code", "message", ...}}`` body, ``details`` its other fields (for example
    ``limit`` or ``step_count``).
    """

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        details: Mapping[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        return f"[{where}{self.code}] {self.message}"

    def __repr__(self) -> str:
        return (
            f"RnnServeError(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, details={self.details!r})"
        )

    @property
    def transient(self) -> bool:
        """True when sending the same request again later may succeed (a connection failure,
        a timeout, 502/503/504, an overload or rate limit, a store conflict)."""
        if self.code in _TRANSIENT_CODES:
            return True
        return self.status in _TRANSIENT_STATUSES and self.code not in _CODE_STATUS

    @classmethod
    def from_body(
        cls, body: Any, status: int | None = None, retry_after: float | None = None
    ) -> RnnServeError:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return cls(status, "http_error", f"unexpected answer: {str(body)[:200]}")
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        code = str(error.get("code", "http_error"))
        if status is None:
            status = _CODE_STATUS.get(code)
        return cls(status, code, str(error.get("message", "")), details, retry_after=retry_after)

    @classmethod
    def from_response(cls, response: httpx.Response) -> RnnServeError:
        retry_after = _retry_after(response.headers.get("retry-after"))
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return cls.from_body(body, response.status_code, retry_after)
        text = response.text.strip()[:200] or response.reason_phrase
        return cls(response.status_code, "http_error", text, retry_after=retry_after)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _transport_error(exc: Exception) -> RnnServeError:
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        error = RnnServeError(None, "timeout", f"no answer in time: {exc!r}")
    else:
        error = RnnServeError(None, "connection_error", f"cannot reach the server: {exc!r}")
    error.__cause__ = exc
    return error


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session as the server describes it (timestamps are ISO 8601 UTC strings)."""

    session_id: str
    model: str
    version: int
    step_count: int
    created_at: str
    last_used: str
    expires_at: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionInfo:
        return cls(
            session_id=data["session_id"],
            model=data["model"],
            version=int(data["version"]),
            step_count=int(data["step_count"]),
            created_at=data.get("created_at", ""),
            last_used=data.get("last_used", ""),
            expires_at=data.get("expires_at", ""),
        )


@dataclass(slots=True)
class StepResult:
    """The answer to one step request: ``outputs`` is a float32 ``[steps, output_size]``
    array, ``step_count`` the session's count after it, ``symbols`` the most probable symbol
    per step (softmax models with a vocabulary; JSON only), ``replayed`` True when the server
    answered a retry of an already applied request from its copy. Asked with ``top_k``,
    ``outputs`` is None and ``top_k`` holds per step the best classes, best first:
    ``{"index", "score", "label"?}`` (labels in JSON answers only)."""

    outputs: np.ndarray | None
    step_count: int
    symbols: list[str] | None = None
    replayed: bool = False
    top_k: list[list[dict[str, Any]]] | None = None
    """Per step, the best ``top_k`` classes (multiplexed steps that asked for them)."""
    session_id: str | None = None
    """Set on the results of multiplexed steps."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepResult:
        outputs = data.get("outputs")
        return cls(
            outputs=None if outputs is None else np.asarray(outputs, np.float32),
            step_count=int(data["step_count"]),
            symbols=data.get("symbols"),
            replayed=bool(data.get("replayed", False)),
            session_id=data.get("session_id"),
            top_k=data.get("top_k"),
        )


@dataclass(slots=True)
class GenerateResult:
    """``generated``: symbols (symbol models) or output vectors (value models), one per
    generated step; ``text`` joins one-character symbols; ``step_count`` after generating."""

    generated: list[Any]
    step_count: int
    text: str | None = None
    top_k: list[list[dict[str, Any]]] | None = None
    """With ``top_k``: per generated step, the best classes it was drawn from."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GenerateResult:
        return cls(data["generated"], int(data["step_count"]), data.get("text"), data.get("top_k"))


@dataclass(slots=True)
class Prediction:
    """A batch prediction: per sequence a float32 ``[steps, output_size]`` array (or
    ``[output_size]`` with ``return_sequences=False``); ``states`` (with ``return_states``)
    holds each sequence's final state as arrays keyed by the card's state input names."""

    model: str
    version: int
    outputs: list[np.ndarray] | None
    """None when asked with ``top_k``."""
    symbols: list[Any] | None = None
    states: list[dict[str, np.ndarray]] | None = None
    top_k: list[Any] | None = None
    """With ``top_k``: per sequence ``[steps][k]`` (or ``[k]``) of ``{"index", "score", "label"?}``."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prediction:
        states, outputs = data.get("states"), data.get("outputs")
        return cls(
            model=data["model"],
            version=int(data["version"]),
            outputs=None if outputs is None else [np.asarray(y, np.float32) for y in outputs],
            symbols=data.get("symbols"),
            states=None
            if states is None
            else [{k: np.asarray(v, np.float32) for k, v in s.items()} for s in states],
            top_k=data.get("top_k"),
        )


# -- encoding --------------------------------------------------------------------------


def _default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def _dumps(content: Any) -> bytes:
    return orjson.dumps(content, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)


def _check_steps(inputs: Any) -> int:
    """The number of time steps in one request's inputs (a list of steps or an array)."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a list of time steps, e.g. list('BTS') for symbols")
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 0:
            raise TypeError("inputs must be a [steps, features] array (or [steps] for 1 feature)")
        return int(inputs.shape[0])
    if isinstance(inputs, Sequence):
        return len(inputs)
    raise TypeError(f"inputs must be a list of time steps or an array, not {type(inputs).__name__}")


def _steps_array(inputs: Any, vocabulary: Sequence[str] | None, tokens: bool = False) -> np.ndarray:
    """A [steps, features] float32 array for a binary frame (symbols one-hot encoded), or
    for a token model [steps] integer ids (symbols looked up in the vocabulary)."""
    if tokens:
        if isinstance(inputs, np.ndarray):
            return inputs
        index = {s: i for i, s in enumerate(vocabulary or ())}
        ids = []
        for t, step in enumerate(inputs):
            if isinstance(step, str) and step not in index:
                raise ValueError(f"step {t}: {step!r} is not in the model's vocabulary")
            ids.append(index[step] if isinstance(step, str) else step)
        return np.asarray(ids, np.int64)
    if not isinstance(inputs, np.ndarray) and len(inputs) and isinstance(inputs[0], str):
        if vocabulary is None:
            raise ValueError("symbol inputs in binary frames need the model's vocabulary")
        index = {s: i for i, s in enumerate(vocabulary)}
        x = np.zeros((len(inputs), len(vocabulary)), np.float32)
        for t, symbol in enumerate(inputs):
            if symbol not in index:
                raise ValueError(f"step {t}: {symbol!r} is not in the vocabulary {list(vocabulary)}")
            x[t, index[symbol]] = 1.0
        return x
    x = np.asarray(inputs, np.float32)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2:
        raise ValueError(f"a binary frame needs [steps, features] values, got shape {list(x.shape)}")
    return x



def _sid(session: Any) -> str:
    """A session id from an id string, a SessionInfo, a Session or a session info dict."""
    if isinstance(session, str):
        return session
    if isinstance(session, Mapping):
        return str(session["session_id"])
    sid = getattr(session, "session_id", None)
    if isinstance(sid, str):
        return sid
    raise TypeError(f"not a session or session id: {session!r}")


def _seg(value: Any) -> str:
    return quote(str(value), safe="")


def _model_path(name: str, version: int | None) -> str:
    path = f"/v1/models/{_seg(name)}"
    return path if version is None else f"{path}/versions/{int(version)}"


def _ws_base(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential backoff with jitter; a server's Retry-After is honoured up to ``cap``."""
    delay = min(cap, base * (2 ** max(attempt - 1, 0))) * (0.5 + random.random() / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


class _Retrying:
    """The retry decision of sessions and streams (the sleeping is left to the caller)."""

    retries: int
    backoff: float
    retried: int

    def _pause(self, exc: Exception, attempt: int) -> float:
        """Raise when failed attempt number ``attempt`` (from 0) is final; else count a retry
        and return the seconds to wait. An RnnServeError is retried when transient, any other
        exception is a dropped stream connection."""
        if isinstance(exc, RnnServeError):
            if not exc.transient or attempt >= self.retries:
                raise exc
            wait = exc.retry_after
        else:
            if attempt >= self.retries:
                raise RnnServeError(
                    None, "connection_error", f"the stream dropped {attempt + 1} times: {exc!r}"
                ) from exc
            wait = None
        self.retried += 1
        return _delay(attempt + 1, self.backoff, 2.0, wait)


@dataclass(slots=True)
class _Call:
    method: str
    path: str
    body: Any = None
    parse: Any = None
    empty: bool = False  # 204: no body


_S = TypeVar("_S", bound="_StreamBase")


class _Api(Generic[_S]):
    """Builds each v1 call (path, body, parser) for both the sync and the async client."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        headers: Mapping[str, str] | None,
        timeout: float | httpx.Timeout | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.ws_url = _ws_base(self.base_url)
        self.api_key = api_key
        self.headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @property
    def _ws_headers(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.lower() != "accept"}

    def _http_options(self, transport: Any, verify: Any) -> dict[str, Any]:
        """The keyword arguments of httpx.Client / httpx.AsyncClient."""
        return {
            "base_url": self.base_url,
            "headers": self.headers,
            "timeout": self.timeout,
            "transport": transport,
            "verify": verify,
        }

    def stream(
        self,
        target: Any = None,
        steps: Iterable[Any] | AsyncIterable[Any] | None = None,
        *,
        session_id: str | None = None,
        version: int | None = None,
        binary: bool = False,
        vocabulary: Sequence[str] | None = None,
        retries: int = 5,
        backoff: float = 0.1,
        timeout: float | None = None,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
        top_k: int | None = None,
    ) -> _S:
        """A WebSocket stream: iterate it to send each item of ``steps`` as one message and get
        its :class:`StepResult` (iterator in, iterator out), or call ``.step(inputs)``; on an
        :class:`AsyncClient` use ``async for`` and ``await .step(inputs)`` (``steps`` may then
        also be an async iterable).

        ``target`` is a model name (a new session is opened) or a session (SessionInfo,
        Session, or ``session_id=``) to resume. See :class:`Stream` for reconnection.
        With ``top_k`` every answer holds the best k classes per step instead of outputs.
        """
        name, sid, tracker = _stream_target(target, session_id)
        if timeout is None:
            timeout = self.timeout.read if isinstance(self.timeout, httpx.Timeout) else self.timeout
        return self._new_stream(
            model=name,
            version=version,
            session_id=sid,
            steps=steps,
            binary=binary,
            vocabulary=vocabulary,
            retries=retries,
            backoff=backoff,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            tracker=tracker,
            top_k=top_k,
        )

    def _new_stream(self, **options: Any) -> _S:
        raise NotImplementedError

    @staticmethod
    def _c_models() -> _Call:
        return _Call("GET", "/v1/models", parse=lambda d: d["models"])

    @staticmethod
    def _c_model(name: str) -> _Call:
        return _Call("GET", _model_path(name, None))

    @staticmethod
    def _c_predict(
        name, inputs, version, return_sequences, return_states, initial_states, top_k=None
    ) -> _Call:
        if isinstance(inputs, np.ndarray) and inputs.ndim < 2:
            raise TypeError("predict takes a batch: a [batch, steps, features] array or a list")
        body: dict[str, Any] = {
            "inputs": inputs,
            "return_sequences": bool(return_sequences),
            "return_states": bool(return_states),
        }
        if initial_states is not None:
            body["initial_states"] = list(initial_states)
        if top_k is not None:
            body["top_k"] = int(top_k)
        return _Call("POST", _model_path(name, version) + "/predict", body, Prediction.from_json)

    @staticmethod
    def _c_create_session(name: str, version: int | None, state: Mapping | None) -> _Call:
        body = {} if state is None else {"state": dict(state)}
        return _Call("POST", _model_path(name, version) + "/sessions", body, SessionInfo.from_json)

    @staticmethod
    def _c_import_state(exported: Mapping[str, Any]) -> _Call:
        try:
            name, version, state = exported["model"], exported["version"], exported["state"]
        except (KeyError, TypeError) as exc:
            raise TypeError(
                "import_state takes what export_state returned: {model, version, state, ...}"
            ) from exc
        return _Api._c_create_session(name, int(version), state)

    @staticmethod
    def _c_session(session: Any) -> _Call:
        return _Call("GET", f"/v1/sessions/{_seg(_sid(session))}", parse=SessionInfo.from_json)

    @staticmethod
    def _c_export_state(session: Any) -> _Call:
        return _Call("GET", f"/v1/sessions/{_seg(_sid(session))}/state")

    @staticmethod
    def _c_step(session: Any, inputs: Any, seq: int | None, top_k: int | None = None) -> _Call:
        _check_steps(inputs)
        body: dict[str, Any] = {"inputs": inputs}
        if seq is not None:
            body["seq"] = int(seq)
        if top_k is not None:
            body["top_k"] = int(top_k)
        return _Call("POST", f"/v1/sessions/{_seg(_sid(session))}/steps", body, StepResult.from_json)

    @staticmethod
    def _c_step_many(items: Iterable[Any]) -> _Call:
        return _Call("POST", "/v1/steps", {"steps": _mux_items(items)}, _mux_results)

    @staticmethod
    def _c_generate(session, steps, temperature, seed, prime, top_k=None) -> _Call:
        body: dict[str, Any] = {"steps": int(steps), "temperature": float(temperature)}
        if seed is not None:
            body["seed"] = int(seed)
        if top_k is not None:
            body["top_k"] = int(top_k)
        if prime is not None:
            _check_steps(prime)
            body["prime"] = prime
        return _Call(
            "POST", f"/v1/sessions/{_seg(_sid(session))}/generate", body, GenerateResult.from_json
        )

    @staticmethod
    def _c_reset(session: Any) -> _Call:
        return _Call("POST", f"/v1/sessions/{_seg(_sid(session))}/reset", parse=SessionInfo.from_json)

    @staticmethod
    def _c_delete(session: Any) -> _Call:
        return _Call("DELETE", f"/v1/sessions/{_seg(_sid(session))}", empty=True)

    @staticmethod
    def _c_reload() -> _Call:
        return _Call("POST", "/v1/repository/reload")

    def _request(self, call: _Call) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if call.body is not None:
            kwargs["content"] = _dumps(call.body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        return kwargs

    @staticmethod
    def _result(call: _Call, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise RnnServeError.from_response(response)
        if call.empty:
            return None
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise RnnServeError(
                response.status_code, "http_error", f"the answer is not JSON: {response.text[:200]}"
            ) from exc
        return call.parse(data) if call.parse is not None else data


# -- the synchronous client --------------------------------------------------------------


class Client(_Api["Stream"]):
    """A synchronous client (httpx.Client underneath; one connection pool, thread-safe).

    ``api_key`` is sent as ``Authorization: Bearer <key>`` on every request and WebSocket
    handshake. ``transport`` (an httpx transport) is for tests and custom networking.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        *,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        super().__init__(base_url, api_key, headers, timeout)
        self._http = httpx.Client(**self._http_options(transport, verify))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call) -> Any:
        try:
            response = self._http.request(call.method, call.path, **self._request(call))
        except httpx.TransportError as exc:
            raise _transport_error(exc) from exc
        return self._result(call, response)

    # models

    def ready(self) -> bool:
        """True when the server answers /readyz with 200 (its models are loaded)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> list[dict[str, Any]]:
        """Every model: ``{"name", "default_version", "versions": [{version, ready, card}]}``."""
        return self._run(self._c_models())

    def model(self, name: str) -> dict[str, Any]:
        """One model's versions and their cards."""
        return self._run(self._c_model(name))

    def predict(
        self,
        name: str,
        inputs: Any,
        *,
        version: int | None = None,
        return_sequences: bool = True,
        return_states: bool = False,
        initial_states: Sequence[Mapping[str, Any]] | None = None,
        top_k: int | None = None,
    ) -> Prediction:
        """Run independent sequences (lists or arrays, lengths may differ) from zero state or
        ``initial_states`` (one per sequence); no session is involved."""
        return self._run(
            self._c_predict(
                name, inputs, version, return_sequences, return_states, initial_states, top_k
            )
        )

    # sessions

    def create_session(
        self, name: str, *, version: int | None = None, state: Mapping[str, Any] | None = None
    ) -> SessionInfo:
        """A new session on the model (its newest ready version unless ``version`` is given),
        starting from zeros or from ``state`` ({state input name: array})."""
        return self._run(self._c_create_session(name, version, state))

    def session(self, session_id: Any) -> SessionInfo:
        return self._run(self._c_session(session_id))

    def export_state(self, session_id: Any) -> dict[str, Any]:
        """``{"session_id", "model", "version", "step_count", "state"}``: plain JSON, which
        :meth:`import_state` (on this or another server) turns back into a session."""
        return self._run(self._c_export_state(session_id))

    def import_state(self, exported: Mapping[str, Any]) -> SessionInfo:
        """A new session on the exported model and version holding the exported state (its
        step_count starts again at 0)."""
        return self._run(self._c_import_state(exported))

    def step(
        self, session_id: Any, inputs: Any, *, seq: int | None = None, top_k: int | None = None
    ) -> StepResult:
        """Advance the session by the given steps. With ``seq`` (the step_count once this is
        applied) a repeat of the request is answered from the server's copy, not re-applied.
        With ``top_k`` the answer holds the best k classes per step instead of outputs."""
        return self._run(self._c_step(session_id, inputs, seq, top_k))

    def step_many(self, items: Iterable[Any]) -> list[StepResult | RnnServeError]:
        """Steps for many sessions in one request (``POST /v1/steps``). Each item is a
        mapping ``{"session_id" (or a session), "inputs", "seq"?, "top_k"?}`` or a tuple
        ``(session, inputs[, seq])``; each result is a StepResult or, for an item that
        failed alone, an RnnServeError (returned, not raised)."""
        return self._run(self._c_step_many(items))

    def multiplex(self, *, binary: bool = False, timeout: float | None = DEFAULT_TIMEOUT) -> Multiplex:
        """A WebSocket on ``/v1/stream`` that carries steps for many sessions per message."""
        return Multiplex(self, binary=binary, timeout=timeout)

    def generate(
        self,
        session_id: Any,
        steps: int,
        *,
        temperature: float = 1.0,
        seed: int | None = None,
        prime: Any = None,
        top_k: int | None = None,
    ) -> GenerateResult:
        """Feed the model its own outputs for ``steps`` steps (after ``prime``, if given)."""
        return self._run(self._c_generate(session_id, steps, temperature, seed, prime, top_k))

    def reset(self, session_id: Any) -> SessionInfo:
        """Zero the session's state and step_count."""
        return self._run(self._c_reset(session_id))

    def delete(self, session_id: Any) -> None:
        self._run(self._c_delete(session_id))

    def reload(self) -> dict[str, list[str]]:
        """Rescan the model repository: ``{"loaded", "unloaded", "failed"}``."""
        return self._run(self._c_reload())

    # helpers

    def open_session(
        self,
        name: str,
        *,
        version: int | None = None,
        state: Mapping[str, Any] | None = None,
        retries: int = 3,
        backoff: float = 0.1,
    ) -> Session:
        """Create a session and wrap it in an exactly-once :class:`Session` helper."""
        info = self.create_session(name, version=version, state=state)
        return Session(self, info, retries=retries, backoff=backoff)

    def attach_session(self, session_id: Any, *, retries: int = 3, backoff: float = 0.1) -> Session:
        """Wrap an existing session (its current step_count is fetched)."""
        return Session(self, self.session(session_id), retries=retries, backoff=backoff)

    def _new_stream(self, **options: Any) -> Stream:
        return Stream(self, **options)


def _stream_target(target: Any, session_id: str | None) -> tuple[str | None, str | None, Any]:
    if session_id is not None:
        if target is not None:
            raise TypeError("give a model name or session_id=, not both")
        return None, session_id, None
    if isinstance(target, str):
        return target, None, None
    if target is None:
        raise TypeError("stream needs a model name or a session")
    tracker = target if isinstance(target, _SessionBase) else None
    return None, _sid(target), tracker


_R = TypeVar("_R", StepResult, GenerateResult)
_T = TypeVar("_T")


class _SessionBase(_Retrying):
    """What Session and AsyncSession share: the session's identity and step_count."""

    def __init__(self, client: Any, info: SessionInfo, *, retries: int = 3, backoff: float = 0.1):
        self.client = client
        self.info = info
        self.session_id = info.session_id
        self.model = info.model
        self.version = info.version
        self.step_count = info.step_count
        self.retries = retries
        self.backoff = backoff
        self.retried = 0
        """Requests re-sent after a transient failure (for monitoring and tests)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.session_id!r}, model={self.model!r}, "
            f"step_count={self.step_count})"
        )

    def _seq(self, inputs: Any) -> int:
        """The step_count once ``inputs`` are applied: the ``seq`` of their request."""
        return self.step_count + _check_steps(inputs)

    def _track(self, result: _R) -> _R:
        self.step_count = result.step_count
        return result

    def _set_info(self, info: SessionInfo) -> SessionInfo:
        self.info = info
        self.step_count = info.step_count
        return info

    @staticmethod
    def _check_deleted(exc: RnnServeError, missing_ok: bool) -> None:
        """Re-raise a failed delete unless the session is already gone and that is fine."""
        if not (missing_ok and exc.code in ("session_not_found", "session_expired")):
            raise exc


class Session(_SessionBase):
    """An exactly-once view of one session: tracks step_count and sends ``seq`` on every
    step, so a step whose answer was lost (connection error, timeout, 502/503/504, overload)
    is sent again up to ``retries`` times and the server applies it exactly once.

    One Session must not be stepped from several threads at once (steps are ordered).
    ``with`` deletes the session on exit.
    """

    client: Client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete(missing_ok=True)

    def step(self, inputs: Any, *, top_k: int | None = None) -> StepResult:
        seq = self._seq(inputs)
        attempt = 0
        while True:
            try:
                return self._track(
                    self.client.step(self.session_id, inputs, seq=seq, top_k=top_k)
                )
            except RnnServeError as exc:
                time.sleep(self._pause(exc, attempt))
            attempt += 1

    def generate(
        self,
        steps: int,
        *,
        temperature: float = 1.0,
        seed: int | None = None,
        prime: Any = None,
        top_k: int | None = None,
    ) -> GenerateResult:
        """Generation carries no seq, so it is never retried."""
        return self._track(
            self.client.generate(
                self.session_id, steps, temperature=temperature, seed=seed, prime=prime, top_k=top_k
            )
        )

    def refresh(self) -> SessionInfo:
        return self._set_info(self.client.session(self.session_id))

    def export_state(self) -> dict[str, Any]:
        return self.client.export_state(self.session_id)

    def reset(self) -> SessionInfo:
        return self._set_info(self.client.reset(self.session_id))

    def delete(self, *, missing_ok: bool = False) -> None:
        try:
            self.client.delete(self.session_id)
        except RnnServeError as exc:
            self._check_deleted(exc, missing_ok)

    def stream(self, steps: Iterable[Any] | None = None, **options: Any) -> Stream:
        """A WebSocket stream on this session; this object's step_count follows it."""
        return self.client.stream(self, steps, **options)


# -- streaming ---------------------------------------------------------------------------


class _StreamBase(_Retrying):
    """What the sync and async streams share: encoding, decoding, bookkeeping."""

    def __init__(
        self,
        client: _Api,
        *,
        model: str | None,
        version: int | None,
        session_id: str | None,
        steps: Any,
        binary: bool,
        vocabulary: Sequence[str] | None,
        retries: int,
        backoff: float,
        timeout: float | None,
        max_message_bytes: int | None,
        tracker: Any = None,
        top_k: int | None = None,
    ) -> None:
        if model is None and session_id is None:
            raise TypeError("a stream needs a model name or a session id")
        self.client = client
        self.model = model
        self.version = version
        self.session_id = session_id
        self.steps = steps
        self.binary = binary
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        self.top_k = top_k
        self.tokens: bool | None = None
        """Whether the model takes token ids (binary frames then carry ids); None: not known."""
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.info: SessionInfo | None = None
        self.step_count: int | None = None
        self.reconnects = 0
        """Connections opened after the first one."""
        self.retried = 0
        """Attempts repeated after a drop, a timeout or a transient error frame."""
        self.connection: Any = None
        """The current websockets connection (None between a drop and the reconnect)."""
        self._tracker = tracker
        self._opened = False
        self._closed = False
        self._closing: set[asyncio.Task] = set()

    def _url(self) -> str:
        if self.session_id is not None:
            return f"{self.client.ws_url}/v1/sessions/{_seg(self.session_id)}/stream"
        assert self.model is not None
        return f"{self.client.ws_url}{_model_path(self.model, self.version)}/stream"

    def _connect_options(self) -> dict[str, Any]:
        headers = self.client._ws_headers
        options: dict[str, Any] = {"open_timeout": self.timeout, "max_size": self.max_message_bytes}
        options["extra_headers" if _LEGACY_ASYNC and self._is_async else "additional_headers"] = headers
        return options

    _is_async = False

    def _opened_with(self, first: Any) -> None:
        """Take the session info the server sends first (or raise its error frame)."""
        if isinstance(first, bytes):
            raise RnnServeError(None, "bad_frame", "the server opened the stream with a binary frame")
        data = orjson.loads(first)
        if "error" in data:
            raise RnnServeError.from_body(data)
        self.info = SessionInfo.from_json(data)
        self.session_id = self.info.session_id
        if self.step_count is None:
            self.step_count = self.info.step_count
        if self._opened:
            self.reconnects += 1
        self._opened = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the stream is closed")

    def _session_info(self) -> SessionInfo:
        assert self.info is not None
        return self.info

    def _lacks_card(self, inputs: Any) -> bool:
        """True when binary frames need the model's card (token inputs, vocabulary) first:
        for anything but a float array, once per stream."""
        if not self.binary or self.tokens is not None:
            return False
        return not (isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f")

    def _frame(self, pending: list[str | bytes], inputs: Any, n: int) -> str | bytes:
        """The message for ``n`` steps of ``inputs``, encoded on the first attempt (once the
        step_count is known) and sent again unchanged, with the same seq, on every retry."""
        if not pending:
            assert self.step_count is not None
            pending.append(self._encode(inputs, self.step_count + n))
        return pending[0]

    def _encode(self, inputs: Any, seq: int) -> str | bytes:
        if self.binary:
            x = _steps_array(inputs, self.vocabulary, bool(self.tokens))
            return encode_request(x, seq, top_k=self.top_k)
        message: dict[str, Any] = {"inputs": inputs, "seq": seq}
        if self.top_k is not None:
            message["top_k"] = self.top_k
        return _dumps(message).decode()

    def _answer(self, answer: str | bytes) -> StepResult:
        if isinstance(answer, bytes) and self.top_k is not None:
            indices, scores, step_count, replayed = decode_top_k_response(answer)
            best = [
                [{"index": i, "score": p} for i, p in zip(ir, sr)]
                for ir, sr in zip(indices.tolist(), scores.tolist())
            ]
            result = StepResult(None, step_count, None, replayed, top_k=best)
        elif isinstance(answer, bytes):
            y, step_count, replayed = decode_response(answer)
            result = StepResult(y.copy(), step_count, None, replayed)
        else:
            data = orjson.loads(answer)
            if "error" in data:
                error = RnnServeError.from_body(data)
                if error.code in ("session_not_found", "session_expired"):
                    self._forget()  # the server closes this stream
                raise error
            result = StepResult.from_json(data)
        self.step_count = result.step_count
        if self._tracker is not None:
            self._tracker.step_count = result.step_count
        return result

    def _forget(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _handshake_error(exc: Exception) -> RnnServeError:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
        if status is None:
            error = RnnServeError(None, "connection_error", f"WebSocket handshake failed: {exc!r}")
        else:
            body = getattr(response, "body", b"") or b""
            try:
                error = RnnServeError.from_body(orjson.loads(body), status)
            except orjson.JSONDecodeError:
                error = RnnServeError(status, "handshake_rejected", f"WebSocket handshake got {status}")
        error.__cause__ = exc
        return error

    def _card_from(self, model: Mapping[str, Any]) -> None:
        assert self.info is not None
        card: Mapping[str, Any] = {}
        for entry in model.get("versions", []):
            if entry.get("version") == self.info.version and entry.get("card"):
                card = entry["card"]
        if self.vocabulary is None:
            self.vocabulary = card.get("vocabulary")
        self.tokens = card.get("inputs", {}).get("kind") == "tokens"


_DROPPED = (ConnectionClosed, OSError, TimeoutError, EOFError)


class Stream(_StreamBase):
    """A synchronous WebSocket stream on one session (websockets.sync.client underneath).

    One message is in flight at a time and each carries ``seq``; when the connection drops
    (or an answer does not come within ``timeout``) the stream reconnects to
    ``/v1/sessions/{id}/stream`` and sends the unanswered message again with the same seq,
    so the server applies it once and the caller sees each answer exactly once. Transient
    error frames (overloaded, rate_limited, store_unavailable, ...) are retried the same way.
    A message is sent again up to ``retries`` times in a row (``retries + 1`` attempts)
    before RnnServeError is raised.
    """

    client: Client

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StepResult]:
        if self.steps is None:
            raise TypeError("this stream has no steps iterable: call .step(inputs)")
        try:
            for inputs in self.steps:
                yield self.step(inputs)
        finally:
            self.close()

    def open(self) -> SessionInfo:
        """Connect now (else the first step connects); returns the session info."""
        self._retrying(lambda: None)
        return self._session_info()

    def step(self, inputs: Any) -> StepResult:
        n = _check_steps(inputs)
        if self._lacks_card(inputs):
            self._card_from(self.client.model(self.open().model))
        pending: list[str | bytes] = []

        def exchange() -> StepResult:
            self.connection.send(self._frame(pending, inputs, n))
            return self._answer(self.connection.recv(timeout=self.timeout))

        return self._retrying(exchange)

    def _retrying(self, action: Callable[[], _T]) -> _T:
        self._check_open()
        attempt = 0
        while True:
            try:
                if self.connection is None:
                    self._connect()
                return action()
            except RnnServeError as exc:
                pause = self._pause(exc, attempt)
            except _DROPPED as exc:
                self._forget()
                pause = self._pause(exc, attempt)
            except BaseException:
                # interrupted once the message may have gone out: its answer would be read
                # as the next message's, so the connection goes with it, and whether it was
                # applied is read from the session when the stream reconnects
                self._forget()
                self.step_count = None
                raise
            attempt += 1
            time.sleep(pause)

    def _connect(self) -> None:
        try:
            connection = _ws_connect(self._url(), **self._connect_options())
        except InvalidHandshake as exc:
            raise self._handshake_error(exc) from exc
        try:
            self._opened_with(connection.recv(timeout=self.timeout))
        except BaseException:
            connection.close()
            raise
        self.connection = connection

    def _forget(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # it is already broken
                connection.close()

    def close(self) -> None:
        """Close the connection (the session lives on until deleted or expired)."""
        self._closed = True
        self._forget()


class AsyncStream(_StreamBase):
    """The asyncio twin of :class:`Stream` (``async with`` / ``async for`` / ``await step``).

    ``steps`` may be a sync or an async iterable.
    """

    client: AsyncClient

    _is_async = True

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def __aiter__(self) -> AsyncIterator[StepResult]:
        if self.steps is None:
            raise TypeError("this stream has no steps iterable: await .step(inputs)")
        try:
            if isinstance(self.steps, AsyncIterable):
                async for inputs in self.steps:
                    yield await self.step(inputs)
            else:
                for inputs in self.steps:
                    yield await self.step(inputs)
        finally:
            await self.close()

    async def open(self) -> SessionInfo:
        async def nothing() -> None:
            return None

        await self._retrying(nothing)
        return self._session_info()

    async def step(self, inputs: Any) -> StepResult:
        n = _check_steps(inputs)
        if self._lacks_card(inputs):
            self._card_from(await self.client.model((await self.open()).model))
        pending: list[str | bytes] = []

        async def exchange() -> StepResult:
            await self.connection.send(self._frame(pending, inputs, n))
            return self._answer(await asyncio.wait_for(self.connection.recv(), self.timeout))

        return await self._retrying(exchange)

    async def _retrying(self, action: Callable[[], Awaitable[_T]]) -> _T:
        self._check_open()
        attempt = 0
        while True:
            try:
                if self.connection is None:
                    await self._connect()
                return await action()
            except RnnServeError as exc:
                pause = self._pause(exc, attempt)
            except _DROPPED as exc:
                await self._aforget()
                pause = self._pause(exc, attempt)
            except BaseException:
                # cancelled (a timeout around the call) once the message may have gone
                # out: its answer would be read as the next message's, so the connection
                # goes with it (closed in the background: the task is being cancelled),
                # and whether it was applied is read from the session on reconnecting
                _close_later(self.connection, self._closing)
                self.connection = self.step_count = None
                raise
            attempt += 1
            await asyncio.sleep(pause)

    async def _connect(self) -> None:
        try:
            connection = await _ws_aconnect(self._url(), **self._connect_options())
        except InvalidHandshake as exc:
            raise self._handshake_error(exc) from exc
        try:
            self._opened_with(await asyncio.wait_for(connection.recv(), self.timeout))
        except BaseException:
            await connection.close()
            raise
        self.connection = connection

    def _forget(self) -> None:
        # Called from sync code (an error frame that ends the session): close in background.
        connection, self.connection = self.connection, None
        if connection is not None:
            task = asyncio.ensure_future(connection.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _aforget(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        self._closed = True
        await self._aforget()


# -- the asynchronous client -------------------------------------------------------------


class AsyncClient(_Api["AsyncStream"]):
    """The asyncio twin of :class:`Client` (httpx.AsyncClient underneath)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        *,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        super().__init__(base_url, api_key, headers, timeout)
        self._http = httpx.AsyncClient(**self._http_options(transport, verify))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    close = aclose

    async def _run(self, call: _Call) -> Any:
        try:
            response = await self._http.request(call.method, call.path, **self._request(call))
        except httpx.TransportError as exc:
            raise _transport_error(exc) from exc
        return self._result(call, response)

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def models(self) -> list[dict[str, Any]]:
        return await self._run(self._c_models())

    async def model(self, name: str) -> dict[str, Any]:
        return await self._run(self._c_model(name))

    async def predict(
        self,
        name: str,
        inputs: Any,
        *,
        version: int | None = None,
        return_sequences: bool = True,
        return_states: bool = False,
        initial_states: Sequence[Mapping[str, Any]] | None = None,
        top_k: int | None = None,
    ) -> Prediction:
        return await self._run(
            self._c_predict(
                name, inputs, version, return_sequences, return_states, initial_states, top_k
            )
        )

    async def create_session(
        self, name: str, *, version: int | None = None, state: Mapping[str, Any] | None = None
    ) -> SessionInfo:
        return await self._run(self._c_create_session(name, version, state))

    async def session(self, session_id: Any) -> SessionInfo:
        return await self._run(self._c_session(session_id))

    async def export_state(self, session_id: Any) -> dict[str, Any]:
        return await self._run(self._c_export_state(session_id))

    async def import_state(self, exported: Mapping[str, Any]) -> SessionInfo:
        return await self._run(self._c_import_state(exported))

    async def step(
        self, session_id: Any, inputs: Any, *, seq: int | None = None, top_k: int | None = None
    ) -> StepResult:
        return await self._run(self._c_step(session_id, inputs, seq, top_k))

    async def step_many(self, items: Iterable[Any]) -> list[StepResult | RnnServeError]:
        """See :meth:`Client.step_many`."""
        return await self._run(self._c_step_many(items))

    def multiplex(
        self, *, binary: bool = False, timeout: float | None = DEFAULT_TIMEOUT
    ) -> AsyncMultiplex:
        """``async with client.multiplex() as mux: await mux.send(items)``."""
        return AsyncMultiplex(self, binary=binary, timeout=timeout)

    async def generate(
        self,
        session_id: Any,
        steps: int,
        *,
        temperature: float = 1.0,
        seed: int | None = None,
        prime: Any = None,
        top_k: int | None = None,
    ) -> GenerateResult:
        return await self._run(self._c_generate(session_id, steps, temperature, seed, prime, top_k))

    async def reset(self, session_id: Any) -> SessionInfo:
        return await self._run(self._c_reset(session_id))

    async def delete(self, session_id: Any) -> None:
        await self._run(self._c_delete(session_id))

    async def reload(self) -> dict[str, list[str]]:
        return await self._run(self._c_reload())

    async def open_session(
        self,
        name: str,
        *,
        version: int | None = None,
        state: Mapping[str, Any] | None = None,
        retries: int = 3,
        backoff: float = 0.1,
    ) -> AsyncSession:
        info = await self.create_session(name, version=version, state=state)
        return AsyncSession(self, info, retries=retries, backoff=backoff)

    async def attach_session(
        self, session_id: Any, *, retries: int = 3, backoff: float = 0.1
    ) -> AsyncSession:
        return AsyncSession(self, await self.session(session_id), retries=retries, backoff=backoff)

    def _new_stream(self, **options: Any) -> AsyncStream:
        return AsyncStream(self, **options)


class AsyncSession(_SessionBase):
    """The asyncio twin of :class:`Session` (``async with`` deletes the session on exit)."""

    client: AsyncClient

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete(missing_ok=True)

    async def step(self, inputs: Any, *, top_k: int | None = None) -> StepResult:
        seq = self._seq(inputs)
        attempt = 0
        while True:
            try:
                return self._track(
                    await self.client.step(self.session_id, inputs, seq=seq, top_k=top_k)
                )
            except RnnServeError as exc:
                await asyncio.sleep(self._pause(exc, attempt))
            attempt += 1

    async def generate(
        self,
        steps: int,
        *,
        temperature: float = 1.0,
        seed: int | None = None,
        prime: Any = None,
        top_k: int | None = None,
    ) -> GenerateResult:
        return self._track(
            await self.client.generate(
                self.session_id, steps, temperature=temperature, seed=seed, prime=prime, top_k=top_k
            )
        )

    async def refresh(self) -> SessionInfo:
        return self._set_info(await self.client.session(self.session_id))

    async def export_state(self) -> dict[str, Any]:
        return await self.client.export_state(self.session_id)

    async def reset(self) -> SessionInfo:
        return self._set_info(await self.client.reset(self.session_id))

    async def delete(self, *, missing_ok: bool = False) -> None:
        try:
            await self.client.delete(self.session_id)
        except RnnServeError as exc:
            self._check_deleted(exc, missing_ok)

    def stream(
        self, steps: Iterable[Any] | AsyncIterable[Any] | None = None, **options: Any
    ) -> AsyncStream:
        return self.client.stream(self, steps, **options)


# -- multiplexed steps -------------------------------------------------------------------


def _mux_item(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        out = dict(item)
        if "session_id" not in out and "session" in out:
            out["session_id"] = out.pop("session")
    else:
        session, inputs, *rest = item
        out = {"session_id": session, "inputs": inputs}
        if rest and rest[0] is not None:
            out["seq"] = rest[0]
    out["session_id"] = _sid(out["session_id"])
    if isinstance(out.get("inputs"), np.ndarray):
        out["inputs"] = out["inputs"].tolist()
    return out


def _mux_items(items: Iterable[Any]) -> list[dict[str, Any]]:
    return [_mux_item(item) for item in items]


def _mux_results(data: Mapping[str, Any]) -> list[StepResult | RnnServeError]:
    return [
        RnnServeError.from_body(item) if "error" in item else StepResult.from_json(item)
        for item in data["results"]
    ]


def _mux_binary(items: Iterable[Any]) -> tuple[bytes, list[str]]:
    rows = []
    for item in _mux_items(items):
        if item.get("top_k") is not None:
            raise ValueError("top_k is answered in JSON only; use binary=False")
        x = np.asarray(item["inputs"], np.float32)
        if x.ndim == 1:  # a flat series of a one-feature model, as the other paths take it
            x = x[:, np.newaxis]
        rows.append((item["session_id"], x, item.get("seq")))
    return encode_many(rows), [row[0] for row in rows]


def _mux_binary_results(frame: bytes, ids: list[str]) -> list[StepResult | RnnServeError]:
    out: list[StepResult | RnnServeError] = []
    for session_id, result in zip(ids, decode_many_response(frame)):
        if isinstance(result, dict):
            out.append(RnnServeError.from_body({"error": result}))
        else:
            y, step_count, replayed = result  # a copy: the frame's memory is read-only
            out.append(StepResult(y.copy(), step_count, replayed=replayed, session_id=session_id))
    return out


def _error_frame(frame: Any) -> RnnServeError | None:
    """The RnnServeError of an ``{"error": ...}`` text frame, else None."""
    if not isinstance(frame, str):
        return None
    try:
        body = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    return RnnServeError.from_body(body) if isinstance(body, dict) and "error" in body else None


def _close_later(connection: Any, closing: set[asyncio.Task]) -> None:
    """Close an asyncio connection without waiting (from a task being cancelled), the task
    kept in ``closing`` until done (asyncio holds only weak references to tasks)."""
    if connection is not None:
        task = asyncio.get_running_loop().create_task(_quiet_close(connection))
        closing.add(task)
        task.add_done_callback(closing.discard)


async def _quiet_close(connection: Any) -> None:
    with contextlib.suppress(Exception):
        await connection.close()


class _MultiplexBase:
    def __init__(self, client: _Api, *, binary: bool, timeout: float | None) -> None:
        self.client = client
        self.binary = binary
        self.timeout = timeout
        self.connection: Any = None
        self._closing: set[asyncio.Task] = set()

    def _url(self) -> str:
        return f"{self.client.ws_url}/v1/stream"

    def _encode(self, items: Iterable[Any]) -> tuple[str | bytes, list[str]]:
        if self.binary:
            return _mux_binary(items)
        rows = _mux_items(items)
        return _dumps({"steps": rows}).decode(), [row["session_id"] for row in rows]

    def _decode(self, answer: str | bytes, ids: list[str]) -> list[StepResult | RnnServeError]:
        if isinstance(answer, bytes):
            return _mux_binary_results(answer, ids)
        data = orjson.loads(answer)
        if "error" in data:
            raise RnnServeError.from_body(data)
        return _mux_results(data)


class Multiplex(_MultiplexBase):
    """A synchronous multiplexed WebSocket (``/v1/stream``): ``send(items)`` carries steps
    for many sessions in one message and returns one result per item, in order (a failed
    item's result is an RnnServeError, returned). Items as in :meth:`Client.step_many`;
    with ``binary=True`` inputs travel as float32 frames (no ``top_k``). A dropped
    connection raises; items sent with ``seq`` can then be sent again safely."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self.connection is None:
            try:
                self.connection = _ws_connect(
                    self._url(),
                    open_timeout=self.timeout,
                    max_size=DEFAULT_MAX_MESSAGE_BYTES,
                    additional_headers=self.client._ws_headers,
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                raise _transport_error(exc) from exc

    def send(self, items: Iterable[Any]) -> list[StepResult | RnnServeError]:
        self.open()
        message, ids = self._encode(items)
        try:
            self.connection.send(message)
            answer = self.connection.recv(timeout=self.timeout)
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            said = self._said_before_closing(exc)
            self.close()
            raise (said or _transport_error(exc)) from exc
        except BaseException:  # interrupted: the answer would be read as the next one's
            self.close()
            raise
        return self._decode(answer, ids)

    def _said_before_closing(self, exc: BaseException) -> RnnServeError | None:
        """The error frame the server sent before it closed (a wrong API key), if any."""
        if not isinstance(exc, ConnectionClosed):
            return None
        try:
            return _error_frame(self.connection.recv(timeout=0))
        except Exception:  # noqa: BLE001 - nothing was left to read
            return None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class AsyncMultiplex(_MultiplexBase):
    """The asyncio twin of :class:`Multiplex`."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self.connection is None:
            key = "extra_headers" if _LEGACY_ASYNC else "additional_headers"
            try:
                self.connection = await _ws_aconnect(
                    self._url(),
                    open_timeout=self.timeout,
                    max_size=DEFAULT_MAX_MESSAGE_BYTES,
                    **{key: self.client._ws_headers},
                )
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                raise _transport_error(exc) from exc

    async def send(self, items: Iterable[Any]) -> list[StepResult | RnnServeError]:
        await self.open()
        message, ids = self._encode(items)
        try:
            await self.connection.send(message)
            answer = await asyncio.wait_for(self.connection.recv(), self.timeout)
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            said = None
            if isinstance(exc, ConnectionClosed):  # the error frame sent before the close
                with contextlib.suppress(Exception):
                    said = _error_frame(await asyncio.wait_for(self.connection.recv(), 0.1))
            await self.close()
            raise (said or _transport_error(exc)) from exc
        except BaseException:  # cancelled: the answer would be read as the next one's
            _close_later(self.connection, self._closing)
            self.connection = None
            raise
        return self._decode(answer, ids)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None
