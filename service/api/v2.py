"""The Open Inference Protocol (KServe v2) over HTTP, with Triton's sequence extension.

- health, server/model metadata, model readiness, a Triton-style model configuration;
- ``infer`` with JSON tensors or the binary tensor data extension (what tritonclient sends);
- without a sequence, ``x`` [batch, time, features] runs every row from the zero state,
  batched with everything else the engine is running (an optional ``lengths`` input lets
  rows of a padded batch end early; their padded output steps are zeros);
- with ``parameters.sequence_id`` the request steps a session: START creates it (or
  replaces a live one), later requests carry its state, END's steps and the release are
  one commit. START and END are each one atomic engine operation
  (``Engine.sequence_step``). The session id is derived by the engine from (API key,
  model, sequence id), so every replica and protocol sharing the session store finds the
  same session without another table; it is a normal session, visible at
  ``/v1/sessions/{id}``, with the same TTL, limits, batching and exactly-once ``seq``.

Errors on these routes use the protocol's shape ``{"error": "<message>"}``, including
authentication and request-validation errors; the rest of the app keeps its own shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.api.binary import (
    FLOATS,
    HEADER,
    INTEGERS,
    InferRequest,
    InflatedTooLarge,
    OutputTensor,
    Tensor,
    TensorError,
    compress,
    decompress,
    encode_response,
    parse_request,
)
from service.api.common import ORJSONResponse, engine_of, owner
from service.card import ModelCard
from service.config import Settings
from service.engine import Engine
from service.errors import (
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    ServeError,
    SessionExpired,
    SessionNotFound,
)
from service.inputs import check_batch, sequence_array
from service.repository import ModelVersion, parse_version
from service.topk import classification_strings

log = logging.getLogger("service.v2")

SERVER_NAME = "rnnserve"
EXTENSIONS = ["binary_tensor_data", "classification", "sequence", "model_configuration"]
PLATFORM = "onnxruntime_onnx"
_UINT64_MAX = 2**64 - 1


# -- errors in the protocol's shape ------------------------------------------------------


def v2_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return ORJSONResponse({"error": message}, status_code=status, headers=headers)


def _status(exc: ServeError) -> int:
    # The protocol answers a bad request with 400; v1 uses 422 for invalid inputs.
    return 400 if isinstance(exc, InvalidInput) else exc.status


class V2Route(APIRoute):
    """Answers every failure of a v2 route (dependencies included) as ``{"error": msg}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as exc:
                status = _status(exc)
                if status >= 500 and status != 503:
                    log.error("v2 request failed: %s", exc.message)
                return v2_error(exc.message, status, exc.headers())
            except TensorError as exc:
                return v2_error(str(exc), 400)
            except RequestValidationError as exc:
                problems = [
                    f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg')}"
                    for e in exc.errors()[:5]
                ]
                return v2_error("; ".join(problems), 400)
            except StarletteHTTPException as exc:
                return v2_error(str(exc.detail), exc.status_code, getattr(exc, "headers", None))
            except Exception:
                log.exception("unhandled error in a v2 request")
                return v2_error("internal error", 500)

        return v2_handler


router = APIRouter(tags=["v2"], route_class=V2Route)
"""What the app includes: ``open_routes`` (health and model readiness, never behind a key),
``secured`` (everything else, API key when keys are set), then ``fallback``."""
open_routes = APIRouter(prefix="/v2", route_class=V2Route)
secured = APIRouter(prefix="/v2", dependencies=[Depends(owner)], route_class=V2Route)
fallback = APIRouter(prefix="/v2", route_class=V2Route)


# -- helpers -------------------------------------------------------------------------------


def _version(version: str | None) -> int | None:
    return None if version is None else parse_version(version)


def lengths_name(card: ModelCard) -> str:
    return card.inputs.lengths or "lengths"


def _x_datatype_shape(card: ModelCard) -> tuple[str, list[int]]:
    """The sequence input: INT64 ids [batch, time] for a token model, else FP32 values."""
    if card.token_inputs:
        return "INT64", [-1, -1]
    return "FP32", [-1, -1, card.input_size]


def _tensor_metadata(card: ModelCard) -> tuple[list[dict], list[dict]]:
    datatype, shape = _x_datatype_shape(card)
    inputs = [{"name": card.inputs.sequence, "datatype": datatype, "shape": shape}]
    outputs = [
        {"name": card.outputs.sequence, "datatype": "FP32", "shape": [-1, -1, card.output_size]}
    ]
    return inputs, outputs


def _described(
    engine: Engine, name: str, version: int | None
) -> tuple[list[ModelVersion], ModelVersion]:
    """All versions of ``name`` and the one asked for (or the latest); it must have a card."""
    versions = engine.repository.versions_of(name)
    if version is None:
        entry = ([v for v in versions if v.ready] or versions)[-1]
    else:
        entry = next((v for v in versions if v.version == version), None)
        if entry is None:
            raise ModelNotFound(f"no version {version} of model {name!r}")
    if entry.card is None:
        engine.model(name, entry.version)  # raises ModelNotReady with the load error
    return versions, entry


def _model_metadata(engine: Engine, name: str, version: int | None) -> dict[str, Any]:
    versions, entry = _described(engine, name, version)
    assert entry.card is not None
    inputs, outputs = _tensor_metadata(entry.card)
    listed = versions if version is None else [entry]
    return {
        "name": name,
        "versions": [str(v.version) for v in listed],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
    }


def _model_config(engine: Engine, name: str, version: int | None) -> dict[str, Any]:
    _, entry = _described(engine, name, version)
    card = entry.card
    assert card is not None
    datatype, shape = _x_datatype_shape(card)
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": 0,
        "input": [
            {"name": card.inputs.sequence, "data_type": f"TYPE_{datatype}", "dims": shape},
            {"name": lengths_name(card), "data_type": "TYPE_INT32", "dims": [-1], "optional": True},
        ],
        "output": [
            {
                "name": card.outputs.sequence,
                "data_type": "TYPE_FP32",
                "dims": [-1, -1, card.output_size],
            }
        ],
        "sequence_batching": {
            "max_sequence_idle_microseconds": int(engine.store.ttl_s * 1_000_000),
        },
        "parameters": {
            "cell": {"string_value": card.cell},
            "num_layers": {"string_value": str(card.num_layers)},
            "hidden_size": {"string_value": str(card.hidden_size)},
            "output_activation": {"string_value": card.output_activation},
        },
    }


# -- decoding the inputs against a model's card ----------------------------------------------


@dataclass(slots=True)
class Decoded:
    sequences: list[np.ndarray]
    """One [steps_i, input_size] float32 array (or [steps_i] int64 ids) per batch row
    (padding already cut off)."""
    steps: int
    """The padded time axis of the request; outputs are padded back to it."""
    binary_y: bool
    classes: int | None = None
    """``parameters.classification`` of the requested output: answer the best k classes."""


def decode(card: ModelCard, request: InferRequest, settings: Settings, *, single: bool) -> Decoded:
    """Validate the request's tensors and outputs against ``card`` (nothing runs before this)."""
    x_name, len_name = card.inputs.sequence, lengths_name(card)
    tokens = card.token_inputs
    x_type, x_shape = _x_datatype_shape(card)
    x_dims = "[batch, time]" if tokens else f"[batch, time, {card.input_size}]"
    by_name: dict[str, Tensor] = {t.name: t for t in request.inputs}
    unknown = sorted(set(by_name) - {x_name, len_name})
    if unknown:
        raise TensorError(
            f"unknown input(s) {unknown}: model {card.name!r} takes {x_name!r} "
            f"{x_dims} {x_type} and optionally {len_name!r} [batch] INT32"
        )
    x_t = by_name.get(x_name)
    if x_t is None:
        raise TensorError(f"input {x_name!r} {x_dims} is missing")
    if tokens and x_t.datatype not in INTEGERS:
        raise TensorError(
            f"input {x_name!r} holds token ids: it must be INT64 (or another integer type), "
            f"not {x_t.datatype}"
        )
    if x_t.datatype not in FLOATS and x_t.datatype not in INTEGERS:
        raise TensorError(
            f"input {x_name!r} must be FP32 (or another numeric type), not {x_t.datatype}"
        )
    shape = x_t.shape
    if len(shape) != len(x_shape) or (not tokens and shape[2] != card.input_size):
        raise TensorError(f"input {x_name!r} has shape {list(shape)}; expected {x_dims}")
    batch, steps = shape[0], shape[1]
    if batch < 1 or steps < 1:
        raise TensorError(f"input {x_name!r} has shape {list(shape)}: batch and time must be >= 1")
    if single and batch != 1:
        raise TensorError(
            f"a sequence request carries one sequence: {x_name!r} must have shape "
            f"{x_dims.replace('batch', '1')}, not {list(shape)}"
        )
    check_batch(settings, batch)  # counts first: a huge batch is refused before its rows
    lengths = [steps] * batch
    len_t = by_name.get(len_name)
    if len_t is not None:
        if len_t.datatype not in INTEGERS:
            raise TensorError(f"input {len_name!r} must be INT32 (or another integer type)")
        if len_t.shape != (batch,):
            raise TensorError(
                f"input {len_name!r} has shape {list(len_t.shape)}; expected [{batch}]"
            )
        lengths = [int(v) for v in len_t.array.tolist()]
        bad = [i for i, n in enumerate(lengths) if not 1 <= n <= steps]
        if bad:
            raise TensorError(
                f"input {len_name!r}: row {bad[0]} has length {lengths[bad[0]]}; "
                f"each must be between 1 and the time axis {steps}"
            )
    # steps as given, and outputs as answered: padded to the time axis for every row
    check_batch(settings, batch, sum(lengths), card.output_size, answered_steps=batch * steps)
    sequences = [
        sequence_array(card, x_t.array[i, : lengths[i]], settings, where=f"{x_name} row {i}: ")
        for i in range(batch)
    ]
    binary, classes = _requested_y(card, request)
    return Decoded(sequences, steps, binary, classes)


def _requested_y(card: ModelCard, request: InferRequest) -> tuple[bool, int | None]:
    """Whether ``y`` is answered in binary, and its ``parameters.classification`` (or None)."""
    y_name = card.outputs.sequence
    if not request.outputs:
        return request.binary_output(None), None
    chosen, classes = None, None
    for out in request.outputs:
        if out.name != y_name:
            raise TensorError(
                f"unknown output {out.name!r}: model {card.name!r} outputs {y_name!r}"
            )
        k = out.parameters.get("classification")
        if k is not None:
            if type(k) is not int or k < 1:
                raise TensorError(
                    f"output {y_name!r}: parameters.classification must be an integer >= 1"
                )
            classes = k
        chosen = out
    return request.binary_output(chosen), classes


def _classified(card: ModelCard, y_name: str, lasts: list[np.ndarray], k: int, binary: bool):
    """Triton's classification output: ``"score:index[:label]"`` BYTES [batch, k], from each
    sequence's last step."""
    strings = classification_strings(np.stack(lasts), k, card.output_names)
    return OutputTensor(y_name, np.array(strings, dtype=object), "BYTES", binary)


def _padded(results: list[np.ndarray], steps: int, output_size: int) -> np.ndarray:
    y = np.zeros((len(results), steps, output_size), np.float32)
    for row, out in enumerate(results):
        y[row, : out.shape[0]] = out
    return y


# -- sequences ---------------------------------------------------------------------------------


@dataclass(slots=True)
class SequenceParams:
    id: int | str
    start: bool
    end: bool
    seq: int | None


def sequence_params(parameters: dict[str, Any]) -> SequenceParams | None:
    raw = parameters.get("sequence_id", 0)
    start = parameters.get("sequence_start", False)
    end = parameters.get("sequence_end", False)
    seq = parameters.get("seq")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise TensorError("parameters.sequence_id must be an unsigned integer or a string")
    if isinstance(raw, int) and not 0 <= raw <= _UINT64_MAX:
        raise TensorError("parameters.sequence_id must fit in an unsigned 64-bit integer")
    if not isinstance(start, bool) or not isinstance(end, bool):
        raise TensorError("parameters.sequence_start and sequence_end must be booleans")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise TensorError("parameters.seq must be a positive integer")
    if raw == 0 or raw == "":
        if start or end or seq is not None:
            raise TensorError("sequence_start, sequence_end and seq need a non-zero sequence_id")
        return None
    if isinstance(raw, str) and len(raw) > 256:
        raise TensorError("a string sequence_id may be at most 256 characters")
    return SequenceParams(raw, start, end, seq)


def _describe(sequence_id: int | str) -> str:
    return str(sequence_id) if isinstance(sequence_id, int) else repr(sequence_id)


async def _infer_sequence(
    engine: Engine,
    name: str,
    version: int | None,
    request: InferRequest,
    params: SequenceParams,
    who: str | None,
) -> tuple[int, OutputTensor, dict[str, Any]]:
    settings = engine.settings
    session_id = engine.sequence_session_id(who, name, params.id)
    decoded: Decoded | None = None
    used: ModelCard | None = None

    def parse(card: ModelCard, req: InferRequest) -> np.ndarray:
        """Called by the engine with the card the request runs on, before anything changes."""
        nonlocal decoded, used
        if not params.start and version is not None and card.version != version:
            raise TensorError(
                f"sequence {_describe(params.id)} runs on version {card.version} of "
                f"model {name!r}, not version {version}"
            )
        decoded, used = decode(card, req, settings, single=True), card
        return decoded.sequences[0]

    # START runs on the requested model; later requests on the one the sequence started on.
    entry = engine.model(name, version) if params.start else None
    try:
        result = await engine.sequence_step(
            entry,
            who,
            session_id,
            request,
            start=params.start,
            end=params.end,
            seq=params.seq,
            parse=parse,
        )
    except SessionExpired:
        raise TensorError(
            f"sequence {_describe(params.id)} for model {name!r} expired after "
            f"{engine.store.ttl_s:g} s idle; the inference request must specify the START "
            "flag to begin it again"
        ) from None
    except SessionNotFound:
        raise TensorError(
            f"inference request for sequence {_describe(params.id)} to model {name!r} must "
            "specify the START flag on the first request of the sequence (the sequence is "
            "unknown or has ended)"
        ) from None
    assert decoded is not None and used is not None
    record = result.record
    if decoded.classes is not None:
        y = _classified(used, used.outputs.sequence, [result.outputs[-1]], decoded.classes, decoded.binary_y)
    else:
        y = OutputTensor(
            used.outputs.sequence,
            _padded([result.outputs], decoded.steps, used.output_size),
            binary=decoded.binary_y,
        )
    extra: dict[str, Any] = {
        "sequence_id": params.id,
        "session_id": record.session_id,
        "step_count": result.step_count,  # the record may be the store's own: later steps move it
    }
    if params.end:
        extra["sequence_end"] = True
    if result.replayed:
        extra["replayed"] = True
    return record.version, y, extra


# -- routes -------------------------------------------------------------------------------------


@open_routes.get("/health/live")
async def live() -> ORJSONResponse:
    return ORJSONResponse({"live": True})


@open_routes.get("/health/ready")
async def ready(request: Request) -> ORJSONResponse:
    is_ready = engine_of(request).ready
    return ORJSONResponse({"ready": is_ready}, status_code=200 if is_ready else 400)


async def _model_ready(request: Request, name: str, version: str | None) -> ORJSONResponse:
    engine = engine_of(request)
    number = _version(version)
    engine.repository.versions_of(name)  # 404 for an unknown model
    try:
        engine.model(name, number)
    except ServeError as exc:
        if exc.status == 404:
            raise
        return ORJSONResponse({"name": name, "ready": False}, status_code=400)
    return ORJSONResponse({"name": name, "ready": True})


@open_routes.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> ORJSONResponse:
    return await _model_ready(request, name, None)


@open_routes.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, request: Request) -> ORJSONResponse:
    return await _model_ready(request, name, version)


@secured.get("")
async def server_metadata() -> ORJSONResponse:
    return ORJSONResponse({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


@secured.get("/models/{name}")
async def model_metadata(name: str, request: Request) -> ORJSONResponse:
    return ORJSONResponse(_model_metadata(engine_of(request), name, None))


@secured.get("/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, request: Request) -> ORJSONResponse:
    return ORJSONResponse(_model_metadata(engine_of(request), name, _version(version)))


@secured.get("/models/{name}/config")
async def model_config(name: str, request: Request) -> ORJSONResponse:
    return ORJSONResponse(_model_config(engine_of(request), name, None))


@secured.get("/models/{name}/versions/{version}/config")
async def model_version_config(name: str, version: str, request: Request) -> ORJSONResponse:
    return ORJSONResponse(_model_config(engine_of(request), name, _version(version)))


async def run_infer(
    engine: Engine, name: str, version: int | None, parsed: InferRequest, who: str | None
) -> tuple[dict[str, Any], list[OutputTensor]]:
    """One decoded inference request run on the engine: the response head and its outputs.

    Shared by HTTP and gRPC; each only decodes its request and encodes this answer.
    """
    settings = engine.settings
    params = sequence_params(parsed.parameters)
    head: dict[str, Any] = {"model_name": name}
    if params is None:
        entry = engine.model(name, version)
        card = entry.card
        assert card is not None
        decoded = decode(card, parsed, settings, single=False)
        results = await engine.predict(entry, decoded.sequences)
        y_name, model_version = card.outputs.sequence, entry.version
        if decoded.classes is not None:
            lasts = [out[-1] for out, _ in results]
            y = _classified(card, y_name, lasts, decoded.classes, decoded.binary_y)
        else:
            padded = _padded([out for out, _ in results], decoded.steps, card.output_size)
            y = OutputTensor(y_name, padded, binary=decoded.binary_y)
    else:
        model_version, y, extra = await _infer_sequence(engine, name, version, parsed, params, who)
        head["parameters"] = extra
    head["model_version"] = str(model_version)
    if parsed.id is not None:
        head["id"] = parsed.id
    return head, [y]


async def _infer(request: Request, name: str, version: str | None, who: str | None) -> Response:
    engine = engine_of(request)
    number = _version(version)
    limit = engine.settings.max_body_bytes
    try:
        body = decompress(await request.body(), request.headers.get("content-encoding"), limit)
    except InflatedTooLarge as exc:  # too many bytes: 413, as for a body sent plain
        raise PayloadTooLarge(str(exc), limit=limit) from None
    parsed = parse_request(body, request.headers.get(HEADER))
    head, outputs = await run_infer(engine, name, number, parsed, who)
    content, header_length = encode_response(head, outputs)
    headers: dict[str, str] = {}
    media_type = "application/json"
    if header_length is not None:
        headers[HEADER] = str(header_length)
        media_type = "application/octet-stream"
    content, encoding = compress(content, request.headers.get("accept-encoding"))
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return Response(content, media_type=media_type, headers=headers)


_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "example": "FP32"},
        "data": {"type": "array", "items": {}},
        "parameters": {"type": "object"},
    },
}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A JSON inference request, or (binary tensor data extension) its JSON "
        "header of `Inference-Header-Content-Length` bytes followed by the raw tensors.",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "description": "sequence_id, sequence_start, sequence_end, seq, "
                            "binary_data_output",
                        },
                        "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@secured.post("/models/{name}/infer", openapi_extra=_INFER_DOC)
async def infer(name: str, request: Request, who: str | None = Depends(owner)) -> Response:
    return await _infer(request, name, None, who)


@secured.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_DOC)
async def infer_version(
    name: str, version: str, request: Request, who: str | None = Depends(owner)
) -> Response:
    return await _infer(request, name, version, who)


_KNOWN = [
    re.compile(p)
    for p in (
        r"^/health/(live|ready)$",
        r"^/models/[^/]+(/versions/[^/]+)?(/ready|/config|/infer)?$",
    )
]
_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@fallback.api_route("/{path:path}", methods=_ALL_METHODS, include_in_schema=False)
async def not_found(path: str, request: Request) -> Response:
    """Unknown v2 paths (e.g. the repository, statistics or shared-memory APIs) in v2 shape."""
    if any(p.match("/" + path) for p in _KNOWN):
        return v2_error(f"method {request.method} is not allowed on /v2/{path}", 405)
    return v2_error(f"/v2/{path} is not part of this server's v2 API", 404)


router.include_router(open_routes)
router.include_router(secured)
router.include_router(fallback)
