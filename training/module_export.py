"""Export any PyTorch recurrent module that follows the state convention.

The convention: ``forward(x, state=None) -> (y, new_state)``, batch-first, where ``x`` is
float32 ``[batch, time, input_size]`` (or int64 ids ``[batch, time]`` for a module that
starts with an ``nn.Embedding``), ``y`` is ``[batch, time, output_size]`` and ``state`` is
what ``nn.RNN``/``nn.GRU`` (a tensor) or ``nn.LSTM`` (a tuple ``(h, c)``) return, or a
tuple of such for a stack of several recurrent modules; ``None`` means the zero state.

The state's layout (how many tensors, their shapes and batch axes) is discovered by running
the module, never declared. The export then goes the same way as our own models
(``training/export.py``): native recurrent ops, ``lengths`` wired into every one, and
verification against the module before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from service.card import (
    CardInputs,
    CardOutputs,
    InputKind,
    LayerSpec,
    ModelCard,
    StateSpec,
    layer_fields,
)
from training.export import (
    LENGTHS_INPUT,
    GraphIO,
    Reference,
    eval_mode,
    library_versions,
    torch_to_onnx,
    verify_graph,
    write_version,
)

#: A state as the module takes it: a tensor, or a (nested) tuple of tensors.
State = Any
Activation = Literal["softmax", "sigmoid"]


class ModuleConventionError(ValueError):
    """The module does not follow the ``forward(x, state=None) -> (y, new_state)`` convention."""


def flatten_state(state: State) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for part in state for t in flatten_state(part)]
    raise ModuleConventionError(
        f"a state must be a tensor or a tuple of tensors, got {type(state).__name__}"
    )


def _structure(state: State) -> Any:
    """The nesting of ``state`` with each tensor replaced by None (for ``unflatten_state``)."""
    if isinstance(state, torch.Tensor):
        return None
    if isinstance(state, (tuple, list)):
        return tuple(_structure(part) for part in state)
    raise ModuleConventionError(
        f"a state must be a tensor or a tuple of tensors, got {type(state).__name__}"
    )


def unflatten_state(structure: Any, leaves: Sequence[torch.Tensor]) -> State:
    it = iter(leaves)

    def build(node: Any) -> State:
        if node is None:
            return next(it)
        return tuple(build(part) for part in node)

    return build(structure)


def _leaf_names(structure: Any, prefix: str = "state") -> list[str]:
    if structure is None:
        return [prefix]
    return [name for k, part in enumerate(structure) for name in _leaf_names(part, f"{prefix}_{k}")]


def describe_layers(module: nn.Module) -> list[LayerSpec]:
    """The recurrent layers inside ``module``, in registration order (descriptive only)."""
    layers: list[LayerSpec] = []
    for sub in module.modules():
        if not isinstance(sub, nn.RNNBase):
            continue
        if sub.bidirectional:
            raise ModuleConventionError(
                f"{type(sub).__name__} is bidirectional: a streamed session cannot see the future"
            )
        if isinstance(sub, nn.LSTM):
            if sub.proj_size:
                raise ModuleConventionError("nn.LSTM with proj_size has no native ONNX op")
            cell = "lstm"
        elif isinstance(sub, nn.GRU):
            cell = "gru"
        elif isinstance(sub, nn.RNN):
            cell = "rnn_relu" if sub.nonlinearity == "relu" else "rnn_tanh"
        else:
            raise ModuleConventionError(f"unsupported recurrent module {type(sub).__name__}")
        layers += [LayerSpec(cell=cell, hidden_size=sub.hidden_size)] * sub.num_layers
    if not layers:
        raise ModuleConventionError("the module has no nn.RNN, nn.LSTM or nn.GRU inside")
    return layers


class _Flat(nn.Module):
    """``forward(x, *state tensors) -> (y, *new state tensors)``: what the tracer sees."""

    def __init__(self, module: nn.Module, structure: Any, activation: Activation | None) -> None:
        super().__init__()
        self.module = module
        self.structure = structure
        self.activation = activation

    def forward(self, x: torch.Tensor, *leaves: torch.Tensor):
        return self._out(*self.module(x, unflatten_state(self.structure, leaves)))

    def from_none(self, x: torch.Tensor):
        """What the module does given no state (``forward(x, None)``), flattened."""
        return self._out(*self.module(x, None))

    def _out(self, y: torch.Tensor, new_state: State):
        if self.activation == "softmax":
            y = torch.softmax(y, dim=-1)
        elif self.activation == "sigmoid":
            y = torch.sigmoid(y)
        return (y, *flatten_state(new_state))


def _example(input_kind: InputKind, input_size: int, batch: int, steps: int) -> torch.Tensor:
    if input_kind == "tokens":
        return torch.arange(batch * steps, dtype=torch.int64).reshape(batch, steps) % input_size
    return torch.linspace(-1, 1, batch * steps * input_size).reshape(batch, steps, input_size)


def _run(module: nn.Module, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
    with torch.no_grad():
        out = module(x, state)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        raise ModuleConventionError("forward(x, state) must return a pair (y, new_state)")
    return out[0], out[1]


def discover_states(
    module: nn.Module, input_kind: InputKind, input_size: int
) -> tuple[Any, list[StateSpec], int]:
    """Run the module at batch 2 and 3 from ``state=None``: the state's nesting, one
    StateSpec per tensor (its batch axis is the one that changed) and the output size."""
    runs = {}
    for batch in (2, 3):
        y, state = _run(module, _example(input_kind, input_size, batch, 4))
        if y.ndim != 3 or y.shape[:2] != (batch, 4):
            raise ModuleConventionError(
                f"y must be [batch, time, output_size] (batch-first); for x of batch {batch} and "
                f"4 steps the module returned {list(y.shape)}"
            )
        runs[batch] = (y, state)
    (y2, s2), (_, s3) = runs[2], runs[3]
    structure = _structure(s2)
    leaves2, leaves3 = flatten_state(s2), flatten_state(s3)
    if _structure(s3) != structure or len(leaves2) != len(leaves3):
        raise ModuleConventionError("the state's structure changes with the batch size")
    names = _leaf_names(structure)
    specs = []
    for name, a, b in zip(names, leaves2, leaves3):
        axes = [i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
        if a.ndim != b.ndim or len(axes) != 1 or (a.shape[axes[0]], b.shape[axes[0]]) != (2, 3):
            raise ModuleConventionError(
                f"state tensor {name}: cannot find one batch axis ({list(a.shape)} at batch 2, "
                f"{list(b.shape)} at batch 3)"
            )
        if a.dtype != torch.float32:
            raise ModuleConventionError(f"state tensor {name} is {a.dtype}, expected float32")
        axis = axes[0]
        shape: list[int | None] = [None if i == axis else int(d) for i, d in enumerate(a.shape)]
        specs.append(
            StateSpec(
                name=name, input=f"{name}_in", output=f"{name}_out", shape=shape, batch_axis=axis
            )
        )
    return structure, specs, int(y2.shape[-1])


def _reference(flat: _Flat) -> Reference:
    def run(x: np.ndarray, states: list[np.ndarray] | None):
        with torch.no_grad():
            if states is None:  # the module's own start: forward(x, None)
                y, *new = flat.from_none(torch.from_numpy(x))
            else:
                y, *new = flat(torch.from_numpy(x), *(torch.from_numpy(s) for s in states))
        return y.numpy(), [s.numpy() for s in new]

    return run


def module_to_onnx(
    module: nn.Module,
    *,
    input_size: int,
    input_kind: InputKind = "values",
    activation: Activation | None = None,
) -> tuple[onnx.ModelProto, float, GraphIO, int]:
    """Trace, wire ``lengths`` and verify; returns the graph, its parity, its tensors and
    the output size. The module is traced in eval mode and given back in the mode it had."""
    with eval_mode(module):
        return _module_to_onnx(module, input_size, input_kind, activation)


def _module_to_onnx(
    module: nn.Module, input_size: int, input_kind: InputKind, activation: Activation | None
) -> tuple[onnx.ModelProto, float, GraphIO, int]:
    structure, specs, output_size = discover_states(module, input_kind, input_size)
    flat = _Flat(module, structure, activation).eval()
    graph_io = GraphIO(states=specs, input_size=input_size, token_inputs=input_kind == "tokens")
    zeros = [torch.from_numpy(s) for s in graph_io.zero_states(2)]
    proto = torch_to_onnx(
        flat,
        (_example(input_kind, input_size, 2, 3), *zeros),
        [(s.input, s.output) for s in specs],
        [s.batch_axis for s in specs],
    )
    parity = verify_graph(proto, _reference(flat), graph_io)
    return proto, parity, graph_io, output_size


def export_module(
    module: nn.Module,
    repo: Path | str,
    name: str,
    *,
    input_size: int,
    input_kind: InputKind = "values",
    activation: Activation | None = None,
    **card_fields: Any,
) -> Path:
    """Verify and write ``repo/name/<next version>/`` for a module that follows the convention.

    ``input_size`` is the number of features per step, or the vocabulary size with
    ``input_kind="tokens"`` (x is then int64 ids ``[batch, time]``). ``activation`` appends
    a softmax or sigmoid to the module's ``y`` in the exported graph (for a module that
    returns logits); without it ``y`` is served as the module returns it, and
    ``card_fields["output_activation"]`` may say what it already is. Any other keyword
    becomes a card field (``vocabulary``, ``labels``, ``generation``, ``metrics``, ``task``
    ...). Raises ModuleConventionError for a module that does not fit and ParityError when
    the graph does not reproduce it; nothing is written then.
    """
    layers = describe_layers(module)
    proto, parity, graph_io, output_size = module_to_onnx(
        module, input_size=input_size, input_kind=input_kind, activation=activation
    )
    declared = card_fields.pop("output_activation", None)
    if activation is not None and declared not in (None, activation):
        raise ValueError(f"activation={activation!r} but output_activation={declared!r}")

    def make_card(version: int, sha256: str) -> ModelCard:
        return ModelCard(
            name=name,
            version=version,
            **layer_fields(layers),
            input_size=input_size,
            output_size=output_size,
            output_activation=activation or declared or "identity",
            inputs=CardInputs(sequence="x", lengths=LENGTHS_INPUT, kind=input_kind),
            outputs=CardOutputs(sequence="y"),
            states=graph_io.states,
            parity_max_abs_diff=parity,
            library_versions=library_versions(),
            sha256=sha256,
            **card_fields,
        )

    return write_version(Path(repo), name, proto, make_card)
