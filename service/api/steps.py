"""Multiplexed steps: one message carries steps for many sessions, of any models.

``POST /v1/steps`` (and the JSON form of the WebSocket ``/v1/stream``) take
``{"steps": [{"session_id", "inputs", "seq"?, "top_k"?}, ...]}`` and answer
``{"results": [...]}`` in the same order, each item ``{"session_id", "outputs" (or,
asked with ``top_k``, the best k classes per step as ``top_k``), "step_count",
"symbols"? (softmax models with names), "replayed"?}`` or ``{"session_id", "error": {"code", "message"}}``.
One bad item fails only itself; the engine applies every item as the single-session
routes would (``Engine.step_many``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.api.common import ORJSONRoute, dumps, engine_of, error_responses, owner
from service.engine import Engine, StepItem, StepResult
from service.errors import InvalidInput, PayloadTooLarge, ServeError
from service.frames import decode_many, encode_many_response
from service.inputs import top_symbols
from service.topk import top_k

router = APIRouter(
    prefix="/v1", tags=["v1"], dependencies=[Depends(owner)], route_class=ORJSONRoute
)

_ITEM_FIELDS = frozenset({"session_id", "inputs", "seq", "top_k"})
_MAX_ID = 256

class MultiplexRequest(BaseModel):
    """Steps for many sessions; each item is validated on its own (a bad item fails alone)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "steps": [
                        {"session_id": "3q2Rm0x...", "inputs": [[0.1]], "seq": 1},
                        {"session_id": "Zk81Q7w...", "inputs": ["B", "T"], "top_k": 2},
                    ]
                }
            ]
        },
    )

    steps: list[Any] = Field(
        description='Items {"session_id": str, "inputs": [step, ...], "seq"?: int >= 1, '
        '"top_k"?: int >= 1}, answered in the same order.',
        json_schema_extra={
            "items": {
                "type": "object",
                "required": ["session_id", "inputs"],
                "properties": {
                    "session_id": {"type": "string"},
                    "inputs": {"type": "array", "items": {}},
                    "seq": {"type": "integer", "minimum": 1},
                    "top_k": {"type": "integer", "minimum": 1},
                },
            }
        },
    )


class MultiplexResponse(BaseModel):
    results: list[dict[str, Any]] = Field(
        description='Per item {"session_id", "outputs", "step_count", "symbols"?, "replayed"?, "top_k"?} '
        'or {"session_id", "error": {"code", "message"}}.'
    )


class Parsed:
    """A message's items: the valid ones for the engine, the invalid ones already answered."""

    __slots__ = ("errors", "ids", "items", "positions", "top_ks")

    def __init__(self, size: int) -> None:
        self.items: list[StepItem] = []
        self.positions: list[int] = []
        self.errors: dict[int, ServeError] = {}
        self.ids: list[Any] = [None] * size
        self.top_ks: list[int | None] = [None] * size


def parse_json(body: bytes | str, max_items: int) -> Parsed:
    """Validate a JSON multiplexed message; a malformed item fails only itself."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the message is not valid JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("steps"), list):
        raise InvalidInput('a message must be an object {"steps": [{"session_id", "inputs"}, ...]}')
    if len(message) != 1:
        raise InvalidInput(f"unknown fields {sorted(set(message) - {'steps'})}")
    return parse_items(message["steps"], max_items)


def parse_items(raw: list, max_items: int) -> Parsed:
    if len(raw) > max_items:
        raise PayloadTooLarge(
            f"{len(raw)} items exceed the limit of {max_items} per message", limit=max_items
        )
    parsed = Parsed(len(raw))
    for k, item in enumerate(raw):
        if type(item) is dict and len(item) == 2:  # the common {"session_id", "inputs"}
            session_id = item.get("session_id")
            if type(session_id) is str and 0 < len(session_id) <= _MAX_ID and "inputs" in item:
                parsed.ids[k] = session_id
                parsed.items.append(StepItem(session_id, item["inputs"]))
                parsed.positions.append(k)
                continue
        if type(item) is not dict:
            parsed.errors[k] = InvalidInput(f"item {k} must be an object")
            continue
        session_id = item.get("session_id")
        parsed.ids[k] = session_id if isinstance(session_id, str) else None
        problem = _item_problem(item, session_id)
        if problem is not None:
            parsed.errors[k] = InvalidInput(f"item {k}: {problem}")
            continue
        parsed.items.append(StepItem(session_id, item["inputs"], item.get("seq")))
        parsed.positions.append(k)
        parsed.top_ks[k] = item.get("top_k")
    return parsed


def _item_problem(item: dict, session_id: Any) -> str | None:
    if not item.keys() <= _ITEM_FIELDS:
        return f"unknown fields {sorted(set(item) - _ITEM_FIELDS)}"
    if type(session_id) is not str or not 0 < len(session_id) <= _MAX_ID:
        return f"session_id must be a string of 1 to {_MAX_ID} characters"
    if "inputs" not in item:
        return "inputs is missing"
    seq = item.get("seq")
    if seq is not None and (type(seq) is not int or seq < 1):
        return "seq must be a positive integer"
    k = item.get("top_k")
    if k is not None and (type(k) is not int or k < 1):
        return "top_k must be a positive integer"
    return None


async def run(
    engine: Engine, who: str | None, parsed: Parsed, answer: JsonAnswer | None = None
) -> list:
    """Each position's StepResult or ServeError; ``answer`` renders items as they finish."""
    on_ready = answer.ready if answer is not None else None
    answers = await engine.step_many(who, parsed.items, on_ready) if parsed.items else []
    if not parsed.errors:  # every item went to the engine, in order
        return answers
    results: list = [None] * len(parsed.ids)
    for position, result in zip(parsed.positions, answers):
        results[position] = result
    for position, error in parsed.errors.items():
        results[position] = error
    return results


class JsonAnswer:
    """A message's JSON answer: each item's dict built as the engine finishes its block
    (while later blocks still run), then the whole answer serialised by one ``dumps``
    call. One call for all items, not one per item: orjson's cost per call (with numpy
    arrays) made 256 small calls cost 5x one call for the same bytes."""

    __slots__ = ("engine", "parsed", "parts")

    def __init__(self, engine: Engine, parsed: Parsed) -> None:
        self.engine = engine
        self.parsed = parsed
        self.parts: list[dict[str, Any] | None] = [None] * len(parsed.ids)

    def ready(self, indices: list[int], answers: list) -> None:
        """The engine's ``on_ready``: ``indices`` index ``parsed.items`` and ``answers``."""
        positions, parts, item = self.parsed.positions, self.parts, self._item
        for i in indices:
            position = positions[i]
            parts[position] = item(position, answers[i])

    def render(self, results: list) -> bytes:
        """The whole answer, given every position's result (``run``'s)."""
        parts = self.parts
        for position, result in enumerate(results):
            if parts[position] is None:
                parts[position] = self._item(position, result)
        return dumps({"results": parts})

    def _item(self, position: int, result: StepResult | ServeError) -> dict[str, Any]:
        session_id = self.parsed.ids[position]
        if not isinstance(result, StepResult):
            return {"session_id": session_id, "error": result.body()["error"]}
        k = self.parsed.top_ks[position]
        card = result.card
        item: dict[str, Any] = {"session_id": session_id}
        if k is None:
            item["outputs"] = np.ascontiguousarray(result.outputs)
        else:  # the best k classes instead of the outputs, as on the single routes
            item["top_k"] = top_k(result.outputs, k, card.output_names if card else None)
        item["step_count"] = result.step_count
        named = top_symbols(card, result.outputs) if card is not None else None
        if named is not None:  # as on the single routes: softmax models with names
            item["symbols"] = named
        if result.replayed:
            item["replayed"] = True
        return item


async def answer_json(engine: Engine, who: str | None, parsed: Parsed) -> bytes:
    """Run a parsed JSON message and render its answer (each item built as its block finishes)."""
    answer = JsonAnswer(engine, parsed)
    return answer.render(await run(engine, who, parsed, answer))


async def run_binary(engine: Engine, who: str | None, frame: bytes) -> bytes:
    """Answer a multiplexed binary frame (FrameError for one that breaks the format)."""
    decoded = decode_many(frame, engine.settings.max_multiplex_items)
    parsed = Parsed(len(decoded))
    parsed.ids = [session_id for session_id, _, _ in decoded]
    if all(0 < len(session_id) <= _MAX_ID for session_id in parsed.ids):
        parsed.items = [StepItem(session_id, x, seq) for session_id, x, seq in decoded]
        parsed.positions = list(range(len(decoded)))
    else:
        for k, (session_id, x, seq) in enumerate(decoded):
            if 0 < len(session_id) <= _MAX_ID:
                parsed.items.append(StepItem(session_id, x, seq))
                parsed.positions.append(k)
            else:
                parsed.errors[k] = InvalidInput(f"item {k}: session_id must be 1 to {_MAX_ID} characters")
    results = await run(engine, who, parsed)
    encoded: list = []
    errors = []
    for k, result in enumerate(results):
        if isinstance(result, StepResult):
            encoded.append((result.outputs, result.step_count, result.replayed))
        else:
            body = result.body()["error"]
            errors.append({"index": k, **body})
            encoded.append(body)
    return encode_many_response(encoded, dumps(errors) if errors else b"")


@router.post(
    "/steps",
    response_model=MultiplexResponse,
    responses=error_responses(401, 413, 422),
    summary="Steps for many sessions in one request",
)
async def steps(
    body: MultiplexRequest, request: Request, who: str | None = Depends(owner)
) -> Response:
    engine = engine_of(request)
    parsed = parse_items(body.steps, engine.settings.max_multiplex_items)
    return Response(await answer_json(engine, who, parsed), media_type="application/json")
