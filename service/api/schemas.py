"""Pydantic models of the v1 API's requests and responses (they drive the OpenAPI docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Step = list[StrictFloat] | StrictStr | StrictInt | StrictFloat
"""A time step: ``input_size`` numbers, a symbol of the model's vocabulary, (for one-feature
models) a bare number, or (for token models) a token id."""

TopK = StrictInt | None
_TOP_K = (
    "Answer with the k best classes of each step (index, score, label) in place of outputs; "
    "k above the number of classes returns them all"
)


class TopClass(BaseModel):
    index: int
    score: float
    label: str | None = Field(None, description="When the card names its classes")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(examples=["invalid_input"])
    message: str = Field(examples=["step 3 has 2 features; the model takes 1"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"inputs": [[[0.1], [0.2], [0.3]], [[0.5], [0.4]]], "return_sequences": True}]
        },
    )
    inputs: list[list[Step]] = Field(description="Sequences (they may differ in length)")
    return_sequences: StrictBool = Field(True, description="Every step's output, or only the last")
    return_states: StrictBool = Field(False, description="Also return each sequence's final state")
    initial_states: list[dict[str, Any]] | None = Field(
        None, description="One state per sequence, keyed by the card's state input names"
    )
    top_k: TopK = Field(None, ge=1, description=_TOP_K)


class PredictResponse(BaseModel):
    model: str
    version: int
    outputs: list[Any] | None = Field(None, description="Per sequence: [steps][outputs] or [outputs]")
    top_k: list[Any] | None = Field(
        None, description="With top_k, per sequence: [steps][k] or [k] TopClass objects"
    )
    symbols: list[Any] | None = Field(None, description="Most probable symbol(s), softmax models with a vocabulary")
    states: list[dict[str, Any]] | None = None


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: dict[str, Any] | None = Field(
        None, description="Initial state (e.g. from GET /v1/sessions/{id}/state); zeros by default"
    )


class SessionInfo(BaseModel):
    session_id: str
    model: str
    version: int
    step_count: int
    created_at: str
    last_used: str
    expires_at: str


class StepRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"inputs": [[0.1], [0.2]], "seq": 2}]}
    )
    inputs: list[Step] = Field(description="One or more time steps")
    seq: StrictInt | None = Field(
        None,
        ge=1,
        description="The session's step_count once this request is applied; makes retries safe",
    )
    top_k: TopK = Field(None, ge=1, description=_TOP_K)


class StepResponse(BaseModel):
    outputs: list[list[float]] | None = None
    top_k: list[list[TopClass]] | None = Field(None, description="With top_k: [steps][k]")
    step_count: int
    symbols: list[str] | None = None
    replayed: bool = Field(False, description="True when this answers a retry of the last request")


class StateExport(BaseModel):
    session_id: str
    model: str
    version: int
    step_count: int
    state: dict[str, Any]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"steps": 20, "temperature": 1.0, "seed": 7}]})
    steps: StrictInt = Field(ge=1, description="Steps to generate (symbol models stop early at the end symbol)")
    temperature: StrictFloat = Field(
        1.0, ge=0, allow_inf_nan=False, description="0 is greedy (argmax); any finite number >= 0"
    )
    seed: StrictInt | None = Field(None, ge=0)
    prime: list[Step] | None = Field(None, description="Inputs fed before generating")
    top_k: TopK = Field(
        None, ge=1, description="Also answer, per generated step, the k best classes it was drawn from"
    )


class GenerateResponse(BaseModel):
    generated: list[Any]
    text: str | None = Field(None, description="The generated symbols joined, for one-character vocabularies")
    top_k: list[list[TopClass]] | None = None
    step_count: int


class ModelVersionInfo(BaseModel):
    version: int
    ready: bool
    error: str | None = None
    card: dict[str, Any] | None = None


class ModelInfo(BaseModel):
    name: str
    default_version: int
    versions: list[ModelVersionInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]


class ReloadResponse(BaseModel):
    loaded: list[str]
    unloaded: list[str]
    failed: list[str]
