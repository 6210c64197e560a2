"""The model card: the one description of an ONNX model's tensors the server relies on.

A card lives beside each ``model.onnx`` as ``card.json``. Any ONNX model whose card has
the required fields can be served, whichever exporter produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
CardCell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru", "mixed"]
InputKind = Literal["values", "tokens"]
OutputActivation = Literal["identity", "softmax", "sigmoid"]
CARD_FILE = "card.json"
MODEL_FILE = "model.onnx"


class CardInputs(BaseModel):
    sequence: str = "x"
    lengths: str | None = None
    kind: InputKind = "values"
    """``values``: the sequence input is float32 [batch, time, input_size].
    ``tokens``: it is int64 ids [batch, time] into an embedding, each id in
    [0, input_size): ``input_size`` is then the vocabulary size."""


class CardOutputs(BaseModel):
    sequence: str = "y"


class StateSpec(BaseModel):
    """One recurrent state tensor: fed as ``input``, returned as ``output``."""

    input: str
    output: str
    shape: list[int | None] = Field(description="null marks the batch axis")
    batch_axis: int = 1
    name: str | None = None

    @model_validator(mode="after")
    def _batch_axis_is_the_null(self) -> StateSpec:
        nulls = [i for i, d in enumerate(self.shape) if d is None]
        if nulls != [self.batch_axis]:
            raise ValueError(
                f"state {self.input!r}: shape {self.shape} must have exactly one null, "
                f"at batch_axis {self.batch_axis}"
            )
        return self

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one sequence's state (the batch axis removed)."""
        return tuple(d for d in self.shape if d is not None)  # type: ignore[misc]

    @property
    def row_size(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n


class LayerSpec(BaseModel):
    """One recurrent layer, descriptive (the state tensors are what the server relies on)."""

    cell: Cell
    hidden_size: int = Field(ge=1)


def layer_fields(layers: list[LayerSpec]) -> dict[str, Any]:
    """The card's descriptive layer fields (cell, num_layers, hidden_size, layers) for a
    stack of recurrent layers, any mix of cells and sizes."""
    cells = {layer.cell for layer in layers}
    return {
        "cell": layers[0].cell if len(cells) == 1 else "mixed",
        "num_layers": len(layers),
        "hidden_size": max(layer.hidden_size for layer in layers),
        "layers": layers,
    }


class Generation(BaseModel):
    """How the model's output is fed back as its next input (one-to-many)."""

    mode: Literal["symbol", "value"]
    start_symbol: str | None = None
    end_symbol: str | None = None
    stop: Literal["first", "balanced"] = "first"
    """Symbol mode: stop at the first end symbol, or ("balanced") at the one that closes
    every start symbol so far, for nested grammars such as embedded Reber."""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: int
    cell: CardCell
    """The recurrent cell, or ``mixed`` when layers differ (see ``layers``)."""
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    """Descriptive: the largest layer's size when layers differ (see ``layers``)."""
    layers: list[LayerSpec] | None = None
    input_size: int = Field(ge=1)
    output_size: int = Field(ge=1)
    output_activation: OutputActivation
    inputs: CardInputs
    outputs: CardOutputs
    states: list[StateSpec] = Field(min_length=1)
    parity_max_abs_diff: float

    task: str | None = None
    vocabulary: list[str] | None = None
    labels: list[str] | None = None
    generation: Generation | None = None
    return_sequences: bool = True
    """False for a many-to-one model (e.g. a Keras model whose last recurrent layer has
    ``return_sequences=False``): it was trained to answer at the last step only. The graph
    still answers at every step and the state carries on as usual; the last step's output
    is the model's answer, which predict with ``return_sequences: false`` returns."""
    metrics: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    sha256: str | None = None

    @model_validator(mode="after")
    def _vocabulary_fits(self) -> ModelCard:
        if self.vocabulary is not None:
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError("vocabulary has duplicate symbols")
            if len(self.vocabulary) != self.input_size:
                raise ValueError(
                    f"vocabulary has {len(self.vocabulary)} symbols but input_size is "
                    f"{self.input_size}"
                )
        if self.labels is not None and len(self.labels) != self.output_size:
            raise ValueError(
                f"labels has {len(self.labels)} names but output_size is {self.output_size}"
            )
        if self.layers is not None and len(self.layers) != self.num_layers:
            raise ValueError(f"layers lists {len(self.layers)} layers but num_layers is {self.num_layers}")
        if self.cell == "mixed" and self.layers is None:
            raise ValueError('cell "mixed" needs layers (the cell and size of each layer)')
        if self.generation is not None:
            if self.generation.mode == "symbol" and (
                self.vocabulary is None or self.output_size != self.input_size
            ):
                raise ValueError("symbol generation needs a vocabulary shared by input and output")
            if self.generation.mode == "value" and self.token_inputs:
                raise ValueError("value generation cannot feed outputs back into token inputs")
            if self.generation.mode == "value" and self.output_size != self.input_size:
                raise ValueError("value generation needs output_size == input_size")
            for symbol in (self.generation.start_symbol, self.generation.end_symbol):
                if symbol is not None and (self.vocabulary is None or symbol not in self.vocabulary):
                    raise ValueError(f"generation symbol {symbol!r} is not in the vocabulary")
        return self

    @property
    def token_inputs(self) -> bool:
        return self.inputs.kind == "tokens"

    @property
    def output_names(self) -> list[str] | None:
        """Names of the output classes: ``labels``, else a vocabulary the output shares
        with the input (same size), else None."""
        if self.labels is not None:
            return self.labels
        if self.vocabulary is not None and len(self.vocabulary) == self.output_size:
            return self.vocabulary
        return None

    @property
    def state_bytes(self) -> int:
        return 4 * sum(s.row_size for s in self.states)

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        return cls.model_validate_json(path.read_bytes())

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")
