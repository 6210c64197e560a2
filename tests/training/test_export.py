"""The export contract: native recurrent ops, explicit state, parity with PyTorch to 1e-5,
chunking and padding that never change a sequence's result, and no file for a bad model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.card import ModelCard
from training.export import ParityError, export_model, next_version, to_onnx
from training.model import CELLS, RecurrentModel

TOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODELS = sorted((REPO_ROOT / "models").glob("*/*/model.onnx"))


def _session(proto_or_path) -> ort.InferenceSession:
    source = proto_or_path.SerializeToString() if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _ort(sess, state_names, x, states, lengths=None):
    feed = {"x": x if x.dtype == np.int64 else x.astype(np.float32), "lengths": np.full(x.shape[0], x.shape[1], np.int32) if lengths is None else lengths}
    feed.update({name: s for name, s in zip(state_names, states)})
    y, *new = sess.run(None, feed)
    return y, new


def _torch(model, x, states):
    with torch.no_grad():
        y, new = model.predict(torch.from_numpy(x), tuple(torch.from_numpy(s) for s in states))
    return y.numpy(), [s.numpy() for s in new]


def _model(cell: str, layers: int, activation: str = "identity", seed: int = 0) -> RecurrentModel:
    torch.manual_seed(seed)
    return RecurrentModel(cell, 3, 12, 4, num_layers=layers, output_activation=activation).eval()


def _states(model: RecurrentModel, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    shape = (model.num_layers, batch, model.hidden_size)
    return [(0.5 * rng.standard_normal(shape)).astype(np.float32) for _ in model.state_names]


@pytest.fixture(scope="module")
def exported():
    cache = {}

    def get(cell: str, layers: int):
        if (cell, layers) not in cache:
            model = _model(cell, layers, "softmax" if cell == "gru" else "identity")
            cache[(cell, layers)] = (model, _session(to_onnx(model)))
        return cache[(cell, layers)]

    return get


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_native_ops_dynamic_axes_and_parity(cell, layers, exported):
    model, sess = exported(cell, layers)
    names = [f"{s}0" for s in model.state_names]
    graph_ops = {n.op_type for n in to_onnx(model).graph.node}
    assert {"RNN": cell.startswith("rnn"), "LSTM": cell == "lstm", "GRU": cell == "gru"} == {
        op: op in graph_ops for op in ("RNN", "LSTM", "GRU")
    }
    assert [i.name for i in sess.get_inputs()] == ["x", *names, "lengths"]
    assert [o.name for o in sess.get_outputs()] == ["y", *(f"{s}n" for s in model.state_names)]
    rng = np.random.default_rng(7)
    for batch, steps in [(1, 1), (5, 1), (2, 33), (3, 300)]:
        x = rng.standard_normal((batch, steps, 3)).astype(np.float32)
        states = _states(model, batch, rng)
        y_t, s_t = _torch(model, x, states)
        y_o, s_o = _ort(sess, names, x, states)
        assert y_o.shape == (batch, steps, 4)
        assert np.max(np.abs(y_t - y_o)) <= TOL
        for a, b in zip(s_t, s_o):
            assert np.max(np.abs(a - b)) <= TOL


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cell=st.sampled_from(CELLS),
    layers=st.integers(1, 2),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_whole(exported, cell, layers, chunks, seed):
    model, sess = exported(cell, layers)
    names = [f"{s}0" for s in model.state_names]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, sum(chunks), 3)).astype(np.float32)
    states = _states(model, 1, rng)
    y_whole, s_whole = _torch(model, x, states)
    carried, pieces, start = states, [], 0
    for size in chunks:
        y, carried = _ort(sess, names, x[:, start : start + size], carried)
        pieces.append(y)
        start += size
    assert np.max(np.abs(np.concatenate(pieces, axis=1) - y_whole)) <= TOL
    for a, b in zip(carried, s_whole):
        assert np.max(np.abs(a - b)) <= TOL


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cell=st.sampled_from(CELLS),
    layers=st.integers(1, 2),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_padded_batch_rows_equal_each_row_alone(exported, cell, layers, lengths, seed):
    model, sess = exported(cell, layers)
    names = [f"{s}0" for s in model.state_names]
    rng = np.random.default_rng(seed)
    batch, longest = len(lengths), max(lengths)
    x = rng.standard_normal((batch, longest, 3)).astype(np.float32)
    states = _states(model, batch, rng)
    y, finals = _ort(sess, names, x, states, np.asarray(lengths, np.int32))
    for row, n in enumerate(lengths):
        y_alone, s_alone = _torch(model, x[row : row + 1, :n], [s[:, row : row + 1] for s in states])
        assert np.max(np.abs(y[row, :n] - y_alone[0])) <= TOL
        for a, b in zip(finals, s_alone):
            assert np.max(np.abs(a[:, row] - b[:, 0])) <= TOL


def test_padding_without_lengths_would_be_wrong(exported):
    """Why the lengths input exists: a padded row's final state is wrong without it."""
    model, sess = exported("lstm", 2)
    names = ["h0", "c0"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 20, 3)).astype(np.float32)
    x[1, 5:] = 0.0
    states = _states(model, 2, rng)
    _, padded_wrong = _ort(sess, names, x, states)  # lengths = full time axis
    _, alone = _torch(model, x[1:2, :5], [s[:, 1:2] for s in states])
    assert np.max(np.abs(padded_wrong[0][:, 1] - alone[0][:, 0])) > 1e-3


def test_export_writes_versions_and_a_valid_card(tmp_path):
    model = _model("gru", 2)
    first = export_model(model, tmp_path, "m", task="unit")
    second = export_model(model, tmp_path, "m")
    assert (first.name, second.name) == ("1", "2") and next_version(tmp_path, "m") == 3
    card = ModelCard.read(second / "card.json")
    assert card.version == 2 and card.cell == "gru" and card.num_layers == 2
    assert card.states[0].shape == [2, None, 12] and card.inputs.lengths == "lengths"
    assert card.parity_max_abs_diff <= TOL
    raw = json.loads((second / "card.json").read_text())
    for field in ("name", "version", "cell", "num_layers", "hidden_size", "input_size", "output_size",
                  "output_activation", "inputs", "outputs", "states", "parity_max_abs_diff"):
        assert field in raw


def test_export_refuses_a_model_that_disagrees(tmp_path, monkeypatch):
    """A graph that does not reproduce PyTorch is never written."""
    model = _model("lstm", 1)
    real = to_onnx

    def tampered(m):
        proto = real(m)
        for init in proto.graph.initializer:
            if init.dims and len(init.dims) == 3:  # perturb a recurrent weight tensor
                values = onnx.numpy_helper.to_array(init).copy()
                values.flat[0] += 0.5
                init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
                break
        return proto

    monkeypatch.setattr("training.export.to_onnx", tampered)
    with pytest.raises(ParityError):
        export_model(model, tmp_path, "bad")
    assert not (tmp_path / "bad" / "1").exists()


@pytest.mark.parametrize("path", DEMO_MODELS, ids=lambda p: p.parent.parent.name)
def test_demo_model_chunked_and_batched_equal_whole(path):
    card = ModelCard.read(path.parent / "card.json")
    assert card.parity_max_abs_diff <= TOL
    sess = _session(path)
    names = [s.input for s in card.states]
    rng = np.random.default_rng(11)
    batch, steps = 4, 60
    if card.token_inputs:
        x = rng.integers(0, card.input_size, (batch, steps)).astype(np.int64)
    else:
        x = rng.standard_normal((batch, steps, card.input_size)).astype(np.float32)
    zeros = [np.zeros([batch if d is None else d for d in s.shape], np.float32) for s in card.states]
    y_whole, s_whole = _ort(sess, names, x, zeros)
    carried, pieces, start = zeros, [], 0
    for size in (1, 7, 20, 32):
        y, carried = _ort(sess, names, x[:, start : start + size], carried)
        pieces.append(y)
        start += size
    assert np.max(np.abs(np.concatenate(pieces, axis=1) - y_whole)) <= TOL
    for a, b in zip(carried, s_whole):
        assert np.max(np.abs(a - b)) <= TOL
    for row in range(batch):
        y_row, _ = _ort(sess, names, x[row : row + 1], [z[:, :1] for z in zeros])  # batch axis 1
        assert np.max(np.abs(y_row[0] - y_whole[row])) <= TOL
