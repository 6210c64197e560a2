"""A short training run on each task beats the untrained model on the task's own metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import TaskOptions, build_task
from training.train import (
    TrainConfig,
    fold_normalisation,
    model_for_task,
    predict_split,
    seed_everything,
    task_metrics,
    train,
)


def before_after(task_name: str, opts: TaskOptions, cell: str, hidden: int, cfg: TrainConfig):
    task = build_task(task_name, opts)
    seed_everything(0)
    model = model_for_task(task, cell, hidden, 1)
    before = task_metrics(model, task)
    result = train(model, task, cfg)
    assert result.history and result.best_epoch >= 1
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in result.history)
    return task, model, before, task_metrics(model, task)


def test_sine_forecast_improves_and_beats_persistence() -> None:
    _, _, before, after = before_after(
        "sine", TaskOptions(samples=400, seq_len=40), "gru", 32, TrainConfig(epochs=8, lr=5e-3)
    )
    assert after["val_mse"] < 0.5 * before["val_mse"]
    assert after["val_mse"] < after["target_variance"]
    assert after["val_mse"] < after["persistence_mse"]


def test_adding_accuracy_improves() -> None:
    _, _, before, after = before_after(
        "adding",
        TaskOptions(samples=4000, seq_len=10),
        "gru",
        32,
        TrainConfig(epochs=6, lr=5e-3, patience=6),
    )
    assert after["val_mse"] < 0.2 * before["val_mse"]
    assert after["accuracy"] > before["accuracy"] + 0.2


def test_reber_generated_strings_become_valid() -> None:
    _, _, before, after = before_after(
        "reber",
        TaskOptions(samples=1200),
        "gru",
        32,
        TrainConfig(epochs=12, lr=1e-2, batch_size=32, patience=12),
    )
    assert before["generated_valid_fraction"] < 0.2
    assert after["generated_valid_fraction"] > 0.5
    assert after["val_cross_entropy"] < before["val_cross_entropy"]


def test_csv_forecast_improves_and_folded_model_speaks_raw_units(sensor_csv: Path) -> None:
    opts = TaskOptions(
        csv_path=sensor_csv, features=["temperature", "humidity"], target="temperature", seq_len=24
    )
    task, model, before, after = before_after(
        "csv", opts, "lstm", 16, TrainConfig(epochs=4, lr=1e-2)
    )
    assert after["val_mse"] < 0.2 * before["val_mse"]
    assert after["val_r2"] > 0.8

    normalised = predict_split(model, task, task.val)
    norm = task.normalisation
    assert norm is not None
    fold_normalisation(model, norm)
    raw_x = task.val.x * norm.feature_std.astype(np.float32) + norm.feature_mean.astype(np.float32)
    with torch.no_grad():
        raw_pred = model(torch.from_numpy(raw_x))[0].numpy()
    expected = normalised * norm.target_std + norm.target_mean
    np.testing.assert_allclose(raw_pred, expected, rtol=1e-4, atol=1e-3)
    raw_target = task.val.y * norm.target_std + norm.target_mean
    assert float(((raw_pred - raw_target) ** 2).mean()) == pytest.approx(after["val_mse"], rel=1e-3)


def test_text_bits_per_char_improve(text_file: Path) -> None:
    _, _, before, after = before_after(
        "text",
        TaskOptions(text_path=text_file, seq_len=32),
        "lstm",
        64,
        TrainConfig(epochs=4, lr=1e-2),
    )
    assert after["val_bits_per_char"] < before["val_bits_per_char"] - 1.0
    assert after["val_accuracy"] > before["val_accuracy"] + 0.2


def test_csv_errors_name_missing_columns(sensor_csv: Path) -> None:
    with pytest.raises(ValueError, match="pressure"):
        build_task(
            "csv", TaskOptions(csv_path=sensor_csv, features=["pressure"], target="temperature")
        )
