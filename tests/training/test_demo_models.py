"""The demo models in models/ (built by scripts/build_demo_models.py) meet their floors.

Each floor is checked twice: on the metric the card records, and recomputed here with
onnxruntime from model.onnx on freshly drawn data, independent of torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.card import ModelCard
from training import reber
from training.data import adding_problem, sine_series
from training.generate import OnnxStepper, sample_symbols

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMOS = {
    "sine-lstm": ("lstm", 2, 64),
    "reber-gru": ("gru", 1, 32),
    "adding-rnn": ("rnn_tanh", 1, 64),
}


def model_dir(name: str) -> Path:
    path = MODELS / name / "1"
    if not (path / "card.json").exists():
        pytest.fail(f"{path} missing: run python scripts/build_demo_models.py")
    return path


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Whole sequences through the exported graph from zero states."""
    card = ModelCard.read(path / "card.json")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feeds = {card.inputs.sequence: x.astype(np.float32)}
    if card.inputs.lengths:
        feeds[card.inputs.lengths] = np.full(len(x), x.shape[1], np.int32)
    for s in card.states:
        feeds[s.input] = np.zeros([len(x) if d is None else d for d in s.shape], np.float32)
    return session.run([card.outputs.sequence], feeds)[0]


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_card_is_valid_and_small(name: str) -> None:
    path = model_dir(name)
    card = ModelCard.read(path / "card.json")
    assert (card.name, card.version) == (name, 1)
    assert (card.cell, card.num_layers, card.hidden_size) == DEMOS[name]
    assert (path / "model.onnx").stat().st_size < 300_000
    assert (path / "history.json").exists() and (path / "training.png").exists()
    assert card.metrics["train_seconds"] > 0


def test_reber_gru_generates_grammatical_strings() -> None:
    path = model_dir("reber-gru")
    card = ModelCard.read(path / "card.json")
    assert card.metrics["generated_valid_fraction"] >= 0.9
    assert card.vocabulary == list(reber.SYMBOLS)
    assert card.generation is not None
    strings = sample_symbols(
        OnnxStepper(path),
        card.vocabulary,
        200,
        np.random.default_rng(12345),
        prompt=card.generation.start_symbol or "B",
        start_symbol=card.generation.start_symbol,
        end_symbol=card.generation.end_symbol,
    )
    valid = sum(map(reber.accepts, strings)) / len(strings)
    assert valid >= 0.9, [s for s in strings if not reber.accepts(s)][:10]


def test_sine_lstm_forecasts_better_than_the_variance_and_persistence() -> None:
    path = model_dir("sine-lstm")
    metrics = ModelCard.read(path / "card.json").metrics
    assert metrics["val_mse"] < metrics["target_variance"]
    assert metrics["val_mse"] < metrics["persistence_mse"]
    series = sine_series(np.random.default_rng(777), 300, 51)
    x, y = series[:, :-1, None], series[:, 1:, None]
    mse = float(((run_onnx(path, x) - y) ** 2).mean())
    assert mse < 0.25 * float(y.var())
    assert mse < float(((x - y) ** 2).mean())


def test_adding_rnn_accuracy() -> None:
    path = model_dir("adding-rnn")
    card = ModelCard.read(path / "card.json")
    assert card.metrics["accuracy"] >= 0.9
    length = card.model_extra["seq_len"]
    x, target = adding_problem(np.random.default_rng(777), 1000, length)
    pred = run_onnx(path, x)[:, -1, 0]
    assert float((np.abs(pred - target) < 0.04).mean()) >= 0.85
