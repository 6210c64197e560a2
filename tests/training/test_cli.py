"""rnn-train end to end: files written, card valid, versions increase, ONNX == PyTorch steps."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from service.card import ModelCard
from training.cli import run
from training.generate import OnnxStepper, forecast, sample_symbols

TINY = ["--hidden", "8", "--epochs", "2", "--threads", "1", "--no-progress"]


def read_card(out: Path) -> ModelCard:
    return ModelCard.read(out / "card.json")


def test_sine_run_writes_a_versioned_model_with_history_and_plot(tmp_path: Path) -> None:
    argv = [*shlex.split("--task sine --cell lstm --layers 2 --samples 100 --seq-len 20"), *TINY]
    argv += ["--out", str(tmp_path), "--name", "s"]
    first = run(argv)
    assert first == tmp_path / "s" / "1"
    for name in ("model.onnx", "card.json", "history.json", "training.png"):
        assert (first / name).stat().st_size > 0, name
    card = read_card(first)
    assert (card.cell, card.num_layers, card.hidden_size, card.task) == ("lstm", 2, 8, "sine")
    assert card.generation is not None and card.generation.mode == "value"
    assert {"val_mse", "train_seconds", "epochs_run", "best_epoch"} <= set(card.metrics)
    history = json.loads((first / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert (first / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert run(argv) == tmp_path / "s" / "2"

    # Value generation through the exported graph: finite forecasts of the right shape.
    history_x = np.zeros((3, 5, 1), np.float32)
    out = forecast(OnnxStepper(first), history_x, steps=7)
    assert out.shape == (3, 7, 1) and np.isfinite(out).all()


def test_reber_card_has_vocabulary_and_symbol_generation(tmp_path: Path) -> None:
    out = run(
        [*shlex.split("--task reber --cell gru --samples 200"), *TINY, "--out", str(tmp_path)]
    )
    assert out == tmp_path / "reber-gru" / "1"
    card = read_card(out)
    assert card.vocabulary == ["B", "T", "P", "S", "X", "V", "E"]
    assert card.generation is not None
    assert (card.generation.mode, card.generation.start_symbol, card.generation.end_symbol) == (
        "symbol",
        "B",
        "E",
    )
    assert card.output_activation == "softmax"
    assert 0.0 <= card.metrics["generated_valid_fraction"] <= 1.0


def test_text_card_vocabulary_and_onnx_sampling(tmp_path: Path, text_file: Path) -> None:
    argv = [*shlex.split("--task text --cell rnn_relu --seq-len 16 --samples 200"), *TINY]
    out = run([*argv, "--text", str(text_file), "--out", str(tmp_path)])
    card = read_card(out)
    assert card.vocabulary == sorted(set(text_file.read_text(encoding="utf-8")))
    assert card.generation is not None and card.generation.end_symbol is None
    assert "val_bits_per_char" in card.metrics
    samples = sample_symbols(
        OnnxStepper(out), card.vocabulary, 2, np.random.default_rng(0), prompt="the ", max_length=30
    )
    assert all(len(s) == 30 and s.startswith("the ") for s in samples)
    assert set("".join(samples)) <= set(card.vocabulary)


def test_csv_card_records_baked_normalisation(tmp_path: Path, sensor_csv: Path) -> None:
    argv = [*shlex.split("--task csv --features temperature,humidity --target temperature"), *TINY]
    argv += ["--cell", "gru", "--seq-len", "16", "--csv", str(sensor_csv)]
    out = run([*argv, "--out", str(tmp_path), "--name", "sensor"])
    card = read_card(out)
    assert card.input_size == 2 and card.output_size == 1 and card.generation is None
    norm = card.model_extra["normalisation"]
    assert norm["baked_into_weights"] is True
    assert norm["features"]["humidity"]["mean"] == pytest.approx(60, abs=1)
    assert norm["target"]["temperature"]["std"] > 1


def test_unknown_cell_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run(["--task", "sine", "--cell", "transformer", "--out", str(tmp_path)])
