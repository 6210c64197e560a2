"""Import a Keras 3 recurrent model: its weights rewritten as native ONNX RNN/LSTM/GRU ops.

Keras runs on its torch backend (``KERAS_BACKEND=torch``, set here before keras is first
imported; TensorFlow is never needed). Supported: Sequential and linear functional models
of an ``Input``, an optional ``Embedding`` (token-id inputs), one or more ``SimpleRNN``
(tanh or relu), ``LSTM`` and ``GRU`` layers in any mix and units, ``Dropout`` (a no-op at
inference) and ``Dense`` / ``TimeDistributed(Dense)`` layers with a linear, softmax or
sigmoid activation. Anything else is refused, naming the layer and the reason.

The graph is written with the onnx helper API, not traced: Keras's gate orders are mapped
onto ONNX's (Keras LSTM i,f,c,o -> ONNX i,o,f,c; GRU z,r,h is the same in both), and the
ONNX GRU's ``linear_before_reset`` covers both Keras conventions (``reset_after=True`` -> 1,
with separate input and recurrent biases; ``False`` -> 0). A last recurrent layer with
``return_sequences=False`` makes a many-to-one model: the graph still answers at every step
(the server needs the per-step state anyway) and its last step is Keras's answer; the card
says ``return_sequences: false``. Before anything is written the graph is checked against
Keras's own ``predict`` to 1e-5, whole, chunked and padded.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.card import CardInputs, CardOutputs, LayerSpec, ModelCard, StateSpec, layer_fields
from training.export import (
    LENGTHS_INPUT,
    GraphIO,
    Reference,
    library_versions,
    verify_graph,
    write_version,
)

#: Shapes (batch, time) the import is verified on; Keras runs each step in Python, so
#: shorter than those of our own exports.
KERAS_VERIFY_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (3, 1), (4, 17), (2, 100))
_OUTPUT_ACTIVATIONS = {"linear": "identity", "softmax": "softmax", "sigmoid": "sigmoid"}


class UnsupportedKerasModel(ValueError):
    """The Keras model has a layer or setting the importer cannot reproduce exactly."""


def load_keras() -> Any:
    """``keras`` on its torch backend (never TensorFlow)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(
            f"keras was already imported with the {keras.backend.backend()!r} backend; "
            "set KERAS_BACKEND=torch before importing it"
        )
    return keras


@dataclass
class _Recurrent:
    cell: str  # rnn_tanh | rnn_relu | lstm | gru
    units: int
    W: np.ndarray  # ONNX [1, gates*units, in]
    R: np.ndarray  # ONNX [1, gates*units, units]
    B: np.ndarray  # ONNX [1, 2*gates*units]
    return_sequences: bool
    linear_before_reset: int = 0


@dataclass
class _Dense:
    kernel: np.ndarray  # [in, out]
    bias: np.ndarray  # [out]
    activation: str  # identity | softmax | sigmoid


@dataclass
class _Plan:
    input_size: int
    embedding: np.ndarray | None = None
    recurrent: list[_Recurrent] = field(default_factory=list)
    dense: list[_Dense] = field(default_factory=list)

    @property
    def many_to_one(self) -> bool:
        return not self.recurrent[-1].return_sequences

    @property
    def output_size(self) -> int:
        return self.dense[-1].kernel.shape[1] if self.dense else self.recurrent[-1].units

    @property
    def output_activation(self) -> str:
        return self.dense[-1].activation if self.dense else "identity"


def _refuse(layer: Any, reason: str) -> UnsupportedKerasModel:
    return UnsupportedKerasModel(f"layer {layer.name!r} ({type(layer).__name__}): {reason}")


def _activation(fn: Any) -> str:
    return getattr(fn, "__name__", repr(fn))


def _linear_layers(keras: Any, model: Any) -> list[Any]:
    """The model's layers in order, refusing anything that is not a single chain."""
    if not isinstance(model, keras.Model):
        raise UnsupportedKerasModel(f"not a Keras model: {type(model).__name__}")
    if not model.built:
        raise UnsupportedKerasModel("the model is not built: give it an Input or call it once")
    if not isinstance(model, keras.Sequential) and not hasattr(model, "inputs"):
        raise UnsupportedKerasModel(
            f"{type(model).__name__} is a subclassed keras.Model, whose layers cannot be read "
            "as a graph: build the same layers as a Sequential or functional model"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedKerasModel(
            f"the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; one each is supported"
        )
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if isinstance(model, keras.Sequential):
        return layers
    previous = model.inputs[0]
    for layer in layers:
        if len(layer._inbound_nodes) != 1:
            raise _refuse(
                layer, "the layer is used more than once; only a linear chain is supported"
            )
        inputs = layer._inbound_nodes[0].input_tensors
        if len(inputs) != 1 or inputs[0] is not previous:
            raise _refuse(
                layer,
                "its input is not the previous layer's output; only a linear chain is supported",
            )
        previous = layer.output
    if previous is not model.outputs[0]:
        raise UnsupportedKerasModel("the model's output is not its last layer's output")
    return layers


def _recurrent(keras: Any, layer: Any, input_dim: int) -> _Recurrent:
    layers = keras.layers
    for attr, why in (("stateful", "stateful layers keep state inside Keras"),
                      ("go_backwards", "a backwards layer needs the whole sequence first"),
                      ("return_state", "return_state outputs are not supported")):  # fmt: skip
        if getattr(layer, attr, False):
            raise _refuse(layer, f"{attr}=True: {why}")
    cell = layer.cell
    act = _activation(cell.activation)
    units = int(cell.units)
    if isinstance(layer, layers.SimpleRNN):
        if act not in ("tanh", "relu"):
            raise _refuse(layer, f"activation {act!r}; SimpleRNN supports 'tanh' or 'relu'")
        name, gates = f"rnn_{act}", 1
    else:
        if act != "tanh":
            raise _refuse(layer, f"activation {act!r}; only 'tanh' is supported")
        rec = _activation(cell.recurrent_activation)
        if rec != "sigmoid":
            raise _refuse(layer, f"recurrent_activation {rec!r}; only 'sigmoid' is supported")
        name, gates = ("lstm", 4) if isinstance(layer, layers.LSTM) else ("gru", 3)
    kernel = np.asarray(keras.ops.convert_to_numpy(cell.kernel), np.float32)
    recurrent = np.asarray(keras.ops.convert_to_numpy(cell.recurrent_kernel), np.float32)
    if kernel.shape != (input_dim, gates * units):
        raise _refuse(layer, f"kernel shape {kernel.shape}, expected {(input_dim, gates * units)}")
    bias = (
        np.asarray(keras.ops.convert_to_numpy(cell.bias), np.float32)
        if cell.use_bias
        else np.zeros(
            (2, 3 * units) if name == "gru" and cell.reset_after else gates * units, np.float32
        )
    )
    linear_before_reset = 0
    if name == "gru" and cell.reset_after:
        input_bias, recurrent_bias = bias[0], bias[1]
        linear_before_reset = 1
    else:
        input_bias, recurrent_bias = bias.reshape(-1), np.zeros(gates * units, np.float32)
    if name == "lstm":  # Keras i, f, c, o -> ONNX i, o, f, c
        order = [0, 3, 1, 2]

        def reorder(a: np.ndarray) -> np.ndarray:
            parts = np.split(a, 4, axis=-1)
            return np.concatenate([parts[k] for k in order], axis=-1)

        kernel, recurrent = reorder(kernel), reorder(recurrent)
        input_bias, recurrent_bias = reorder(input_bias), reorder(recurrent_bias)
    return _Recurrent(
        cell=name,
        units=units,
        W=kernel.T[None].copy(),
        R=recurrent.T[None].copy(),
        B=np.concatenate([input_bias, recurrent_bias])[None].astype(np.float32),
        return_sequences=bool(layer.return_sequences),
        linear_before_reset=linear_before_reset,
    )


def _dense(keras: Any, layer: Any, owner: Any) -> _Dense:
    act = _activation(layer.activation)
    if act not in _OUTPUT_ACTIVATIONS:
        raise _refuse(
            owner, f"activation {act!r}; a Dense head supports linear, softmax or sigmoid"
        )
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float32)
    bias = (
        np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32)
        if layer.use_bias
        else np.zeros(kernel.shape[1], np.float32)
    )
    if getattr(layer, "lora_enabled", False):
        raise _refuse(owner, "LoRA-enabled Dense layers are not supported")
    return _Dense(kernel=kernel, bias=bias, activation=_OUTPUT_ACTIVATIONS[act])


def plan(keras: Any, model: Any) -> _Plan:
    """Walk the model's layers, refusing what cannot be reproduced, collecting the weights."""
    layers = keras.layers
    chain = _linear_layers(keras, model)
    in_shape = model.inputs[0].shape
    result: _Plan | None = None
    width = 0
    for i, layer in enumerate(chain):
        if isinstance(layer, layers.Embedding):
            if i != 0:
                raise _refuse(layer, "an Embedding must be the first layer")
            if layer.mask_zero:
                raise _refuse(layer, "mask_zero=True: masking is not supported")
            if len(in_shape) != 2:
                raise _refuse(
                    layer, f"the Embedding's input must be [batch, time] ids, got {in_shape}"
                )
            table = np.asarray(keras.ops.convert_to_numpy(layer.embeddings), np.float32)
            result = _Plan(input_size=int(table.shape[0]), embedding=table)
            width = int(table.shape[1])
            continue
        if result is None:
            if len(in_shape) != 3 or in_shape[-1] is None:
                raise UnsupportedKerasModel(
                    f"the input must be [batch, time, features] (or ids into an Embedding), got {in_shape}"
                )
            result = _Plan(input_size=int(in_shape[-1]))
            width = result.input_size
        if isinstance(layer, layers.Dropout):
            continue
        if isinstance(layer, (layers.SimpleRNN, layers.LSTM, layers.GRU)):
            if result.dense:
                raise _refuse(layer, "a recurrent layer after a Dense layer is not supported")
            if result.recurrent and result.many_to_one:
                raise _refuse(layer, "it follows a recurrent layer with return_sequences=False")
            result.recurrent.append(_recurrent(keras, layer, width))
            width = result.recurrent[-1].units
            continue
        if isinstance(layer, layers.TimeDistributed) and isinstance(layer.layer, layers.Dense):
            dense = _dense(keras, layer.layer, layer)
        elif isinstance(layer, layers.Dense):
            dense = _dense(keras, layer, layer)
        elif isinstance(layer, keras.Model):
            raise _refuse(layer, "nested models are not supported; rebuild it as one flat model")
        elif isinstance(layer, layers.Masking):
            raise _refuse(layer, "masking is not supported")
        elif isinstance(layer, layers.Bidirectional):
            raise _refuse(layer, "a bidirectional layer needs the whole sequence first")
        else:
            raise _refuse(
                layer,
                "not one of Input, Embedding, SimpleRNN, LSTM, GRU, Dropout, Dense, TimeDistributed(Dense)",
            )
        if not result.recurrent:
            raise _refuse(layer, "Dense layers must follow the recurrent layers")
        if dense.kernel.shape[0] != width:
            raise _refuse(layer, f"kernel shape {dense.kernel.shape} does not take width {width}")
        result.dense.append(dense)
        width = dense.kernel.shape[1]
    if result is None or not result.recurrent:
        raise UnsupportedKerasModel("the model has no SimpleRNN, LSTM or GRU layer")
    return result


def state_specs(p: _Plan) -> list[StateSpec]:
    specs = []
    for k, layer in enumerate(p.recurrent):
        for kind in ("h", "c") if layer.cell == "lstm" else ("h",):
            name = f"layer{k}_{kind}"
            specs.append(
                StateSpec(
                    name=name,
                    input=f"{name}_in",
                    output=f"{name}_out",
                    shape=[1, None, layer.units],
                    batch_axis=1,
                )
            )
    return specs


def build_graph(p: _Plan) -> onnx.ModelProto:
    """The ONNX graph: x (+ lengths, + states) -> y (+ new states), native recurrent ops."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    if p.embedding is not None:
        x_info = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "time"])
        nodes.append(
            helper.make_node("Gather", [init("embedding", p.embedding), "x"], ["embedded"], axis=0)
        )
        current = "embedded"
    else:
        x_info = helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, ["batch", "time", p.input_size]
        )
        current = "x"
    nodes.append(helper.make_node("Transpose", [current], ["x_tbf"], perm=[1, 0, 2]))
    current = "x_tbf"
    state_inputs, state_outputs = [], []
    specs = iter(state_specs(p))
    squeeze_axes = init("axis1", np.array([1], np.int64))
    for k, layer in enumerate(p.recurrent):
        h = next(specs)
        c = next(specs) if layer.cell == "lstm" else None
        inputs = [
            current,
            init(f"W{k}", layer.W),
            init(f"R{k}", layer.R),
            init(f"B{k}", layer.B),
            LENGTHS_INPUT,
            h.input,
        ]
        outputs = [f"Y{k}", h.output]
        if c is not None:
            inputs.append(c.input)
            outputs.append(c.output)
        for spec in (h, c) if c is not None else (h,):
            state_inputs.append(
                helper.make_tensor_value_info(
                    spec.input, TensorProto.FLOAT, [1, "batch", layer.units]
                )
            )
            state_outputs.append(
                helper.make_tensor_value_info(
                    spec.output, TensorProto.FLOAT, [1, "batch", layer.units]
                )
            )
        attrs: dict[str, Any] = {"hidden_size": layer.units}
        if layer.cell.startswith("rnn"):
            op = "RNN"
            attrs["activations"] = ["Relu" if layer.cell == "rnn_relu" else "Tanh"]
        elif layer.cell == "lstm":
            op = "LSTM"
        else:
            op = "GRU"
            attrs["linear_before_reset"] = layer.linear_before_reset
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op.lower()}{k}", **attrs))
        nodes.append(helper.make_node("Squeeze", [f"Y{k}", squeeze_axes], [f"seq{k}"]))
        current = f"seq{k}"
    nodes.append(helper.make_node("Transpose", [current], ["hidden_btf"], perm=[1, 0, 2]))
    current = "hidden_btf"
    for k, dense in enumerate(p.dense):
        nodes.append(
            helper.make_node(
                "MatMul", [current, init(f"dense{k}_kernel", dense.kernel)], [f"dense{k}_mm"]
            )
        )
        nodes.append(
            helper.make_node(
                "Add", [f"dense{k}_mm", init(f"dense{k}_bias", dense.bias)], [f"dense{k}"]
            )
        )
        current = f"dense{k}"
        if dense.activation != "identity":
            op = "Softmax" if dense.activation == "softmax" else "Sigmoid"
            attrs = {"axis": -1} if op == "Softmax" else {}
            nodes.append(helper.make_node(op, [current], [f"dense{k}_{dense.activation}"], **attrs))
            current = f"dense{k}_{dense.activation}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "keras_import",
        [
            x_info,
            helper.make_tensor_value_info(LENGTHS_INPUT, TensorProto.INT32, ["batch"]),
            *state_inputs,
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", p.output_size]),
            *state_outputs,
        ],
        inits,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="rnnserve-keras-import"
    )
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _reference(keras: Any, model: Any) -> Reference:
    """Keras's ``predict``; a model declared with a fixed batch size or time length is
    re-wrapped with free axes around the same layers, so it can be checked on others too."""
    shape = model.inputs[0].shape
    if shape[0] is not None or shape[1] is not None:
        free = keras.Input(shape=(None, *shape[2:]), dtype=model.inputs[0].dtype)
        out = free
        for layer in _linear_layers(keras, model):
            out = layer(out)
        model = keras.Model(free, out)

    def run(x: np.ndarray, states: list[np.ndarray] | None):
        assert states is None, "Keras's predict runs from zero states only"
        return np.asarray(model.predict(x, verbose=0, batch_size=max(1, len(x))), np.float32), None

    return run


def import_keras(model_or_path: Any, repo: Path | str, name: str, **card_fields: Any) -> Path:
    """Verify and write ``repo/name/<next version>/`` for a Keras model (or ``.keras`` file).

    Extra keywords become card fields (``vocabulary``, ``labels``, ``generation``, ``task``,
    ``metrics`` ...). Raises UnsupportedKerasModel naming the first layer that cannot be
    imported, and training.export.ParityError when the graph does not match Keras to 1e-5;
    nothing is written then.
    """
    keras = load_keras()
    source = None
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        source = Path(model_or_path).name
        try:
            model = keras.saving.load_model(model_or_path, compile=False)
        except (OSError, ValueError) as exc:
            raise UnsupportedKerasModel(f"cannot load {model_or_path}: {exc}") from exc
    p = plan(keras, model)
    proto = build_graph(p)
    specs = state_specs(p)
    graph_io = GraphIO(states=specs, input_size=p.input_size, token_inputs=p.embedding is not None)
    parity = verify_graph(
        proto,
        _reference(keras, model),
        graph_io,
        random_states=False,
        last_step_only=p.many_to_one,
        shapes=KERAS_VERIFY_SHAPES,
    )
    layers = [LayerSpec(cell=r.cell, hidden_size=r.units) for r in p.recurrent]
    versions = {**library_versions(), "keras": keras.__version__}

    def make_card(version: int, sha256: str) -> ModelCard:
        return ModelCard(
            name=name,
            version=version,
            **layer_fields(layers),
            input_size=p.input_size,
            output_size=p.output_size,
            output_activation=p.output_activation,
            inputs=CardInputs(
                sequence="x",
                lengths=LENGTHS_INPUT,
                kind="tokens" if p.embedding is not None else "values",
            ),
            outputs=CardOutputs(sequence="y"),
            states=specs,
            parity_max_abs_diff=parity,
            return_sequences=not p.many_to_one,
            library_versions=versions,
            sha256=sha256,
            **({"source": {"format": "keras", "file": source}} if source else {}),
            **card_fields,
        )

    return write_version(Path(repo), name, proto, make_card)
