from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sensor_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A daily-cycle temperature/humidity log far from zero mean and unit scale."""
    rng = np.random.default_rng(1)
    t = np.arange(2000)
    temperature = 20 + 5 * np.sin(2 * np.pi * t / 48) + rng.normal(0, 0.3, t.size)
    humidity = 60 - 10 * np.sin(2 * np.pi * t / 48 + 0.5) + rng.normal(0, 1, t.size)
    path = tmp_path_factory.mktemp("csv") / "sensor.csv"
    lines = ["step,temperature,humidity"]
    lines += [f"{a},{b:.3f},{c:.3f}" for a, b, c in zip(t, temperature, humidity)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(2)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "a",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
    ]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words, 5000)) + "\n", encoding="utf-8")
    return path
