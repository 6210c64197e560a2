"""rnnserve: stateful serving of recurrent networks exported to ONNX.

Importing this package must never import torch.
"""

__version__ = "0.1.0"
