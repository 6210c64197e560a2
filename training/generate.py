"""One-to-many generation: feed the model's output back as its next input.

The loop is numpy and works over a :class:`Stepper`, one step of a recurrent model for a
batch of sequences. :class:`TorchStepper` runs a ``RecurrentModel`` (used while training);
:class:`OnnxStepper` runs an exported ``model.onnx`` with onnxruntime from its card alone,
so generated samples can be checked without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from training.model import RecurrentModel


class Stepper(Protocol):
    def reset(self, batch: int) -> None: ...

    def step(self, x: np.ndarray) -> np.ndarray:
        """Inputs [batch, input_size] -> activated outputs [batch, output_size]."""
        ...


class TorchStepper:
    def __init__(self, model: RecurrentModel) -> None:
        self.model = model
        self.states: tuple | None = None

    def reset(self, batch: int) -> None:
        self.states = self.model.zero_states(batch)

    def step(self, x: np.ndarray) -> np.ndarray:
        import torch

        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            y, self.states = self.model.predict(
                torch.from_numpy(x[:, None, :]).float(), self.states
            )
        self.model.train(was_training)
        return y[:, 0, :].numpy()


class OnnxStepper:
    """Steps an exported model directory (``model.onnx`` + ``card.json``) with onnxruntime."""

    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        from service.card import CARD_FILE, MODEL_FILE, ModelCard

        self.card = ModelCard.read(Path(model_dir) / CARD_FILE)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(Path(model_dir) / MODEL_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.states: list[np.ndarray] = []

    def reset(self, batch: int) -> None:
        self.states = [
            np.zeros([batch if d is None else d for d in s.shape], dtype=np.float32)
            for s in self.card.states
        ]

    def step(self, x: np.ndarray) -> np.ndarray:
        batch = x.shape[0]
        feeds = {self.card.inputs.sequence: x[:, None, :].astype(np.float32)}
        if self.card.inputs.lengths:
            feeds[self.card.inputs.lengths] = np.ones(batch, dtype=np.int32)
        feeds.update({s.input: v for s, v in zip(self.card.states, self.states)})
        names = [self.card.outputs.sequence, *(s.output for s in self.card.states)]
        y, *self.states = self.session.run(names, feeds)
        return y[:, 0, :]


def _one_hot(indices: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(indices), size), dtype=np.float32)
    out[np.arange(len(indices)), indices] = 1.0
    return out


def _sample(probs: np.ndarray, rng: np.random.Generator, temperature: float) -> np.ndarray:
    """One index per row of a [batch, classes] probability matrix."""
    p = np.clip(probs.astype(np.float64), 1e-12, None)
    if temperature != 1.0:
        p = p ** (1.0 / temperature)
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((len(p), 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def sample_symbols(
    stepper: Stepper,
    vocabulary: list[str],
    n: int,
    rng: np.random.Generator,
    *,
    prompt: str,
    end_symbol: str | None = None,
    start_symbol: str | None = None,
    max_length: int = 100,
    temperature: float = 1.0,
) -> list[str]:
    """``n`` strings: each starts with ``prompt``, then sampled symbols fed back one-hot.

    A string stops at ``max_length`` symbols or at an ``end_symbol`` that closes every
    ``start_symbol`` so far ("balanced" stop): for plain grammars that is the first end
    symbol, and for nested ones such as the embedded Reber grammar
    (``B T B...E T E``) the inner string's E does not end generation.
    """
    index = {s: i for i, s in enumerate(vocabulary)}
    size = len(vocabulary)
    stepper.reset(n)
    texts = [list(prompt) for _ in range(n)]
    for symbol in prompt[:-1]:
        stepper.step(_one_hot(np.full(n, index[symbol]), size))
    current = np.full(n, index[prompt[-1]])
    opened = np.full(n, prompt.count(start_symbol) if start_symbol else 0)
    done = np.zeros(n, dtype=bool)
    while not done.all():
        chosen = _sample(stepper.step(_one_hot(current, size)), rng, temperature)
        for row in np.flatnonzero(~done):
            symbol = vocabulary[chosen[row]]
            texts[row].append(symbol)
            if symbol == start_symbol:
                opened[row] += 1
            elif symbol == end_symbol:
                opened[row] -= 1
                done[row] = opened[row] <= 0
            if len(texts[row]) >= max_length:
                done[row] = True
        current = chosen
    return ["".join(t) for t in texts]


def forecast(stepper: Stepper, history: np.ndarray, steps: int) -> np.ndarray:
    """Warm up on ``history`` [batch, T, I], then feed each output back for ``steps`` steps.

    Returns the forecasts [batch, steps, O] (value generation needs O == I).
    """
    stepper.reset(history.shape[0])
    y = None
    for t in range(history.shape[1]):
        y = stepper.step(history[:, t, :])
    if y is None:
        raise ValueError("forecast needs at least one history step")
    out = []
    for _ in range(steps):
        out.append(y)
        y = stepper.step(y)
    return np.stack(out, axis=1)
