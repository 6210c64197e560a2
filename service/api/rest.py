"""The v1 REST surface: models, batch predict, sessions, generation, repository reload."""

from __future__ import annotations

import logging
import re
from itertools import chain
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Request, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.common import (
    ORJSONResponse,
    ORJSONRoute,
    dumps,
    engine_of,
    error_response,
    error_responses,
    internal_error_response,
    owner,
    owner_for_key,
    presented_key,
    replaying,
    session_info,
)
from service.api.schemas import (
    CreateSessionRequest,
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    ReloadResponse,
    SessionInfo,
    StateExport,
    StepRequest,
    StepResponse,
)
from service.engine import Engine, StepResult
from service.errors import ServeError
from service.inputs import (
    check_batch,
    check_length,
    sequence_array,
    state_from_payload,
    state_to_payload,
    top_symbols,
)
from service.repository import ModelVersion, parse_version
from service.topk import top_k

log = logging.getLogger("service.app")
router = APIRouter(
    prefix="/v1", tags=["v1"], dependencies=[Depends(owner)], route_class=ORJSONRoute
)

_MODEL_ERRORS = error_responses(401, 404, 503)
_INPUT_ERRORS = error_responses(401, 404, 409, 413, 422, 429, 503)


def model_info(engine: Engine, name: str) -> dict[str, Any]:
    versions = engine.repository.versions_of(name)
    ready = [v for v in versions if v.ready]
    return {
        "name": name,
        "default_version": (ready or versions)[-1].version,
        "versions": [
            {
                "version": v.version,
                "ready": v.ready,
                "error": v.error,
                "card": v.card.model_dump(exclude_none=True) if v.card else None,
            }
            for v in versions
        ],
    }


@router.get("/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> ORJSONResponse:
    engine = engine_of(request)
    return ORJSONResponse({"models": [model_info(engine, n) for n in engine.repository.names()]})


@router.get("/models/{name}", response_model=ModelInfo, responses=_MODEL_ERRORS)
async def get_model(name: str, request: Request) -> ORJSONResponse:
    return ORJSONResponse(model_info(engine_of(request), name))


async def _predict(entry: ModelVersion, body: PredictRequest, engine: Engine) -> ORJSONResponse:
    card = entry.card
    assert card is not None and entry.runner is not None
    # counts first, so that an oversized request is refused before any row is parsed
    settings = engine.settings
    check_batch(settings, len(body.inputs))
    for i, seq in enumerate(body.inputs):
        check_length(len(seq), settings, f"sequence {i}: ", card)
    check_batch(settings, len(body.inputs), sum(map(len, body.inputs)), card.output_size)
    sequences = [
        sequence_array(card, seq, engine.settings, where=f"sequence {i}: ")
        for i, seq in enumerate(body.inputs)
    ]
    states = None
    if body.initial_states is not None:
        states = [state_from_payload(card, s, entry.runner.state_size) for s in body.initial_states]
    results = await engine.predict(entry, sequences, states)
    outputs, symbols = [], []
    for y, _ in results:
        chosen = y if body.return_sequences else y[-1:]
        if body.top_k is not None:
            best = top_k(chosen, body.top_k, card.output_names)
            outputs.append(best if body.return_sequences else best[0])
        else:
            outputs.append(chosen.tolist() if body.return_sequences else chosen[0].tolist())
        named = top_symbols(card, chosen)
        if named is not None:
            symbols.append(named if body.return_sequences else named[0])
    content: dict[str, Any] = {
        "model": entry.name,
        "version": entry.version,
        "outputs" if body.top_k is None else "top_k": outputs,
    }
    if symbols:
        content["symbols"] = symbols
    if body.return_states:
        content["states"] = [state_to_payload(card, state) for _, state in results]
    return ORJSONResponse(content)


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=_INPUT_ERRORS)
async def predict(name: str, body: PredictRequest, request: Request) -> ORJSONResponse:
    engine = engine_of(request)
    return await _predict(engine.model(name), body, engine)


@router.post(
    "/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    responses=_INPUT_ERRORS,
)
async def predict_version(
    name: str, version: str, body: PredictRequest, request: Request
) -> ORJSONResponse:
    engine = engine_of(request)
    return await _predict(engine.model(name, parse_version(version)), body, engine)


async def _create_session(
    entry: ModelVersion, body: CreateSessionRequest | None, engine: Engine, who: str | None
) -> ORJSONResponse:
    state = None
    if body is not None and body.state is not None:
        assert entry.card is not None and entry.runner is not None
        state = state_from_payload(entry.card, body.state, entry.runner.state_size)
    record = await engine.create_session(entry, who, state)
    return ORJSONResponse(session_info(record, engine.store.ttl_s), status_code=201)


@router.post(
    "/models/{name}/sessions",
    status_code=201,
    response_model=SessionInfo,
    responses=error_responses(401, 404, 422, 429, 503),
)
async def create_session(
    name: str,
    request: Request,
    body: Annotated[CreateSessionRequest | None, Body()] = None,
    who: str | None = Depends(owner),
) -> ORJSONResponse:
    engine = engine_of(request)
    return await _create_session(engine.model(name), body, engine, who)


@router.post(
    "/models/{name}/versions/{version}/sessions",
    status_code=201,
    response_model=SessionInfo,
    responses=error_responses(401, 404, 422, 429, 503),
)
async def create_session_version(
    name: str,
    version: str,
    request: Request,
    body: Annotated[CreateSessionRequest | None, Body()] = None,
    who: str | None = Depends(owner),
) -> ORJSONResponse:
    engine = engine_of(request)
    return await _create_session(engine.model(name, parse_version(version)), body, engine, who)


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=_MODEL_ERRORS)
async def get_session(
    session_id: str, request: Request, who: str | None = Depends(owner)
) -> ORJSONResponse:
    engine = engine_of(request)
    record = await engine.session(session_id, who)
    return ORJSONResponse(session_info(record, engine.store.ttl_s))


@router.get("/sessions/{session_id}/state", response_model=StateExport, responses=_MODEL_ERRORS)
async def export_state(
    session_id: str, request: Request, who: str | None = Depends(owner)
) -> ORJSONResponse:
    engine = engine_of(request)
    record = await engine.session(session_id, who)
    # Only the card is needed: a session whose model was replaced or removed can still
    # export its state and move it elsewhere.
    card = engine.repository.card_for_session(record.model, record.version, record.fingerprint)
    return ORJSONResponse(
        {
            "session_id": record.session_id,
            "model": record.model,
            "version": record.version,
            "step_count": record.step_count,
            "state": state_to_payload(card, record.state),
        }
    )


@router.post("/sessions/{session_id}/steps", response_model=StepResponse, responses=_INPUT_ERRORS)
async def step(
    session_id: str, body: StepRequest, request: Request, who: str | None = Depends(owner)
) -> ORJSONResponse:
    engine = engine_of(request)
    result = await engine.step(session_id, who, body.inputs, body.seq)
    return ORJSONResponse(step_content(result, body.top_k))


def step_content(result: StepResult, k: int | None = None) -> dict[str, Any]:
    """The answer to a step: ``outputs`` (or, given k, ``top_k``), ``step_count``,
    ``symbols``, rendered with the card of the model the step ran on."""
    card, outputs = result.card, result.outputs
    content: dict[str, Any] = (
        {"outputs": outputs.tolist()}
        if k is None or card is None
        else {"top_k": top_k(outputs, k, card.output_names)}
    )
    content["step_count"] = result.step_count
    named = top_symbols(card, outputs) if card is not None else None
    if named is not None:
        content["symbols"] = named
    if result.replayed:
        content["replayed"] = True
    return content


@router.post(
    "/sessions/{session_id}/generate", response_model=GenerateResponse, responses=_INPUT_ERRORS
)
async def generate(
    session_id: str, body: GenerateRequest, request: Request, who: str | None = Depends(owner)
) -> ORJSONResponse:
    engine = engine_of(request)
    result = await engine.generate(
        session_id,
        who,
        body.steps,
        temperature=body.temperature,
        seed=body.seed,
        prime=body.prime,
    )
    content: dict[str, Any] = {
        "generated": result.generated,
        "step_count": result.record.step_count,
    }
    if result.generated and all(isinstance(g, str) and len(g) == 1 for g in result.generated):
        content["text"] = "".join(result.generated)
    if body.top_k is not None and result.drawn_from is not None:
        card = result.card
        names = card.output_names if card is not None else None
        content["top_k"] = top_k(result.drawn_from, body.top_k, names)
    return ORJSONResponse(content)


@router.post("/sessions/{session_id}/reset", response_model=SessionInfo, responses=_MODEL_ERRORS)
async def reset(
    session_id: str, request: Request, who: str | None = Depends(owner)
) -> ORJSONResponse:
    engine = engine_of(request)
    record = await engine.reset(session_id, who)
    return ORJSONResponse(session_info(record, engine.store.ttl_s))


@router.delete("/sessions/{session_id}", status_code=204, responses=_MODEL_ERRORS)
async def delete_session(
    session_id: str, request: Request, who: str | None = Depends(owner)
) -> Response:
    await engine_of(request).delete(session_id, who)
    return Response(status_code=204)


@router.post("/repository/reload", response_model=ReloadResponse, responses=error_responses(401))
async def reload(request: Request) -> ORJSONResponse:
    report = await engine_of(request).reload()
    return ORJSONResponse(
        {"loaded": report.loaded, "unloaded": report.unloaded, "failed": report.failed}
    )


class LeanStep:
    """``POST /v1/sessions/{id}/steps`` taken by the access middleware before FastAPI's
    middleware, routing and per-request machinery (dependency solving, pydantic body
    model, response model) for the common body: ``inputs`` as lists of floats, optional
    ``seq`` and ``top_k``. Any other body goes, unchanged, through the whole app to the
    documented route above, so every answer and error reads the same either way."""

    _FIELDS = frozenset({"inputs", "seq", "top_k"})
    _PREFIX, _SUFFIX = "/v1/sessions/", "/steps"
    template = "/v1/sessions/{session_id}/steps"

    def session_id(self, scope: Scope) -> str | None:
        """The session of a request this path takes, else None."""
        path: str = scope["path"]
        if scope["method"] != "POST" or not path.startswith(self._PREFIX) or not path.endswith(self._SUFFIX):
            return None
        session_id = path[len(self._PREFIX) : -len(self._SUFFIX)]
        return session_id if session_id and "/" not in session_id else None

    async def __call__(
        self, session_id: str, scope: Scope, receive: Receive, send: Send, app: ASGIApp
    ) -> None:
        try:
            body = await _read_body(receive)
            if body is None:
                return  # the client went away
            settings = scope["app"].state.settings
            # FastAPI reads only a JSON-typed body as JSON: anything else goes to the
            # route, so that the same request gets the same answer on both paths
            parsed = _parsed(body) if _json_typed(scope) else None
            fields = _lean_fields(parsed, self._FIELDS)
            engine: Engine = scope["app"].state.engine
            if fields is None:
                if _longer_than(parsed, self._FIELDS, settings.max_steps_per_request):
                    # The route would validate every step before refusing the length:
                    # refuse it here, after what the route checks first (key, session).
                    scope["path_params"] = {"session_id": session_id}
                    scope["route_template"] = self.template
                    await engine.check_session(session_id, _owner(settings, scope))
                    check_length(len(parsed["inputs"]), settings)  # type: ignore[index]
                await app(scope, replaying(body, receive), send)
                return
            scope["path_params"] = {"session_id": session_id}  # for metrics and logs
            scope["route_template"] = self.template
            who = _owner(settings, scope)
            result = await engine.step(session_id, who, fields["inputs"], fields.get("seq"))
            content = dumps(step_content(result, fields.get("top_k")))
        except ServeError as exc:
            await error_response(exc)(scope, receive, send)
            return
        except Exception:
            log.exception("unhandled error")
            await internal_error_response()(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body, or None when the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _json_typed(scope: Scope) -> bool:
    """Whether the request says its body is JSON (application/json or application/*+json),
    as FastAPI's strict Content-Type check wants: a body without that, which a browser may
    send cross-site without a preflight, is never read as JSON."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or _JSON_SUFFIXED.fullmatch(kind) is not None
    return False


_JSON_SUFFIXED = re.compile(rb"application/[a-z0-9!#$&^_.-]+\+json")
"""application/<subtype>+json, as FastAPI's parser reads it (a malformed type is text)."""


def _owner(settings, scope: Scope) -> str | None:
    if not settings.api_keys:
        return None  # no keys configured: everyone is the same owner
    return owner_for_key(settings, presented_key(Headers(scope=scope)))


def _parsed(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _longer_than(parsed: Any, allowed: frozenset, limit: int) -> bool:
    """A body the route would accept the shape of, whose ``inputs`` exceed ``limit``."""
    return (
        type(parsed) is dict
        and parsed.keys() <= allowed
        and type(parsed.get("inputs")) is list
        and len(parsed["inputs"]) > limit
    )


def _lean_fields(fields: Any, allowed: frozenset) -> dict | None:
    """The body when it is the common, certainly valid case; None for anything else."""
    if type(fields) is not dict or not fields.keys() <= allowed:
        return None
    inputs = fields.get("inputs")
    if type(inputs) is not list or not inputs or not all(type(s) is list for s in inputs):
        return None
    if set(map(type, chain.from_iterable(inputs))) != {float}:
        return None
    for key in ("seq", "top_k"):
        value = fields.get(key)
        if value is not None and (type(value) is not int or value < 1):
            return None
    return fields


