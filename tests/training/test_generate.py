"""The onnxruntime stepper reproduces the PyTorch model step by step, for every cell."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.export import export_model
from training.generate import OnnxStepper, TorchStepper, forecast, sample_symbols
from training.model import CELLS, RecurrentModel


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_and_torch_steppers_agree(cell: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = RecurrentModel(cell, 3, 8, 3, num_layers=2, output_activation="softmax").eval()  # type: ignore[arg-type]
    out = export_model(
        model,
        tmp_path,
        "m",
        vocabulary=["a", "b", "c"],
        generation={"mode": "symbol", "start_symbol": "a"},
    )
    x = np.random.default_rng(0).standard_normal((4, 6, 3)).astype(np.float32)
    a, b = TorchStepper(model), OnnxStepper(out)
    np.testing.assert_allclose(forecast(a, x, 5), forecast(b, x, 5), atol=1e-5)
    s1 = sample_symbols(a, ["a", "b", "c"], 5, np.random.default_rng(1), prompt="ab", max_length=12)
    s2 = sample_symbols(b, ["a", "b", "c"], 5, np.random.default_rng(1), prompt="ab", max_length=12)
    assert s1 == s2
