"""Training and ONNX export of SimpleRNN (tanh/relu), LSTM and GRU models.

``export_module`` (any PyTorch module that follows the state convention) and
``import_keras`` (Keras 3 models) are imported on first use, so importing ``training``
loads neither torch's exporter nor Keras.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_module", "import_keras"]


def __getattr__(name: str) -> Any:
    if name == "export_module":
        from training.module_export import export_module

        return export_module
    if name == "import_keras":
        from training.keras_import import import_keras

        return import_keras
    raise AttributeError(f"module 'training' has no attribute {name!r}")
