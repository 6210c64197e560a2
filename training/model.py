"""One nn.Module family for the four recurrences, with an output head y_t = g(W_hy h_t + b_y)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Cell = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]
OutputActivation = Literal["identity", "softmax", "sigmoid"]
CELLS: tuple[Cell, ...] = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def _recurrence(cell: Cell, input_size: int, hidden_size: int, num_layers: int, dropout: float):
    kwargs = {
        "input_size": input_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "dropout": dropout if num_layers > 1 else 0.0,
        "batch_first": True,
    }
    if cell == "rnn_tanh":
        return nn.RNN(nonlinearity="tanh", **kwargs)
    if cell == "rnn_relu":
        return nn.RNN(nonlinearity="relu", **kwargs)
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    if cell == "gru":
        return nn.GRU(**kwargs)
    raise ValueError(f"unknown cell {cell!r}; choose from {CELLS}")


class RecurrentModel(nn.Module):
    """A stacked Elman RNN / LSTM / GRU with a linear output head applied at every step.

    ``forward(x, states)`` takes ``x`` [batch, time, input_size] and a tuple of states
    (``(h,)`` or ``(h, c)`` for LSTM, each [layers, batch, hidden]) and returns the
    pre-activation outputs (logits) [batch, time, output_size] and the new states.
    """

    def __init__(
        self,
        cell: Cell,
        input_size: int,
        hidden_size: int,
        output_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        output_activation: OutputActivation = "identity",
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.num_layers = num_layers
        self.dropout = dropout
        self.output_activation = output_activation
        self.rnn = _recurrence(cell, input_size, hidden_size, num_layers, dropout)
        self.head = nn.Linear(hidden_size, output_size)

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def config(self) -> dict:
        return {
            "cell": self.cell,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "output_size": self.output_size,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "output_activation": self.output_activation,
        }

    def zero_states(self, batch: int) -> tuple[torch.Tensor, ...]:
        shape = (self.num_layers, batch, self.hidden_size)
        return tuple(torch.zeros(shape) for _ in self.state_names)

    def forward(
        self, x: torch.Tensor, states: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if states is None:
            states = self.zero_states(x.shape[0])
        if self.cell == "lstm":
            seq, (h, c) = self.rnn(x, (states[0], states[1]))
            new_states: tuple[torch.Tensor, ...] = (h, c)
        else:
            seq, h = self.rnn(x, states[0])
            new_states = (h,)
        return self.head(seq), new_states

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.output_activation == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.output_activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    def predict(
        self, x: torch.Tensor, states: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Outputs after the head's activation, as the exported graph computes them."""
        logits, new_states = self(x, states)
        return self.activate(logits), new_states


def build_model(config: dict) -> RecurrentModel:
    return RecurrentModel(**config)
