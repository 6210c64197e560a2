"""One exception hierarchy; each error carries its HTTP status and a stable machine code."""

from __future__ import annotations

import copy
from typing import Any

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
"""The codes of HTTP-level refusals (routing, methods), which no ServeError raises."""


def code_statuses() -> dict[str, int]:
    """Every stable code with its HTTP status: the HTTP-level ones and each ServeError's."""
    out = {code: status for status, code in HTTP_CODES.items()}
    pending = [ServeError]
    while pending:
        cls = pending.pop()
        out[cls.code] = cls.status
        pending.extend(cls.__subclasses__())
    return out


class ServeError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str] | None:
        """Response headers that tell a client what to do next."""
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.status in (429, 503):
            return {"Retry-After": "1"}
        return None

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error.update(self.details)
        return {"error": error}


class InvalidInput(ServeError):
    status, code = 422, "invalid_input"


class SequenceTooLong(ServeError):
    status, code = 413, "sequence_too_long"


class PayloadTooLarge(ServeError):
    status, code = 413, "payload_too_large"


class Unauthorized(ServeError):
    status, code = 401, "unauthorized"


class ModelNotFound(ServeError):
    status, code = 404, "model_not_found"


class ModelNotReady(ServeError):
    status, code = 503, "model_not_ready"


class ModelChanged(ServeError):
    """The session's version now serves a different model than the one it was created on."""

    status, code = 409, "model_changed"


class UnsupportedMediaType(ServeError):
    status, code = 415, "unsupported_media_type"


class NotSupported(ServeError):
    status, code = 400, "not_supported"


class SessionNotFound(ServeError):
    status, code = 404, "session_not_found"


class SessionExpired(ServeError):
    status, code = 404, "session_expired"


class SessionConflict(ServeError):
    """Another request (maybe on another replica) advanced the session first."""

    status, code = 409, "session_conflict"


class SequenceMismatch(ServeError):
    """A ``seq`` that is neither the next count nor a retry of the last applied request."""

    status, code = 409, "seq_mismatch"


class TooManySessions(ServeError):
    status, code = 429, "too_many_sessions"


class Overloaded(ServeError):
    status, code = 429, "overloaded"


class RateLimited(ServeError):
    status, code = 429, "rate_limited"


class StoreUnavailable(ServeError):
    status, code = 503, "store_unavailable"


class InferenceFailed(ServeError):
    status, code = 500, "inference_failed"


def own_copy(exc: BaseException) -> BaseException:
    """A copy of ``exc`` for one more of the requests it failed: raising one exception
    object from many requests would grow its traceback with every raise (and keep their
    frames). ``exc`` itself when it cannot be copied."""
    try:
        twin = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception class that does not copy
        return exc
    twin.__cause__, twin.__context__ = exc.__cause__, exc.__context__
    twin.__suppress_context__ = exc.__suppress_context__
    twin.__traceback__ = exc.__traceback__
    return twin
