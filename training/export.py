"""Export a RecurrentModel to ONNX with explicit state, verify it, and write its card.

Why ``dynamo=False``: measured here (torch 2.13 / onnx 1.23 / onnxruntime 1.32) the
TorchScript exporter emits the native ``RNN``/``LSTM``/``GRU`` ops with dynamic batch and
time axes for all three cells and is ~10 us faster per call, while ``dynamo=True``
fixes y's time axis and silently unrolls ``nn.RNN`` at the example's length. The
exporter leaves ``sequence_lens`` empty, so we add a ``lengths`` input and wire it into
every recurrent node ourselves, then check the result against PyTorch before writing.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from service.card import CARD_FILE, MODEL_FILE, CardInputs, CardOutputs, ModelCard, StateSpec
from training.model import RecurrentModel

PARITY_TOLERANCE = 1e-5
_RECURRENT_OPS = {"RNN", "LSTM", "GRU"}
_SEQUENCE_LENS_INDEX = 4  # X, W, R, B, sequence_lens, initial_h, ... for all three ops


class ParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class _Exportable(torch.nn.Module):
    def __init__(self, model: RecurrentModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *states: torch.Tensor):
        y, new_states = self.model.predict(x, tuple(states))
        return (y, *new_states)


def state_io_names(model: RecurrentModel) -> list[tuple[str, str]]:
    return [(f"{s}0", f"{s}n") for s in model.state_names]


def to_onnx(model: RecurrentModel) -> onnx.ModelProto:
    """The ONNX graph of ``model`` with a ``lengths`` input wired to every recurrent node."""
    model = model.eval()
    names = state_io_names(model)
    example_x = torch.zeros(2, 3, model.input_size)
    example_states = model.zero_states(2)
    dynamic_axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
    for inp, out in names:
        dynamic_axes[inp] = {1: "batch"}
        dynamic_axes[out] = {1: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Exportable(model),
            (example_x, *example_states),
            buffer,
            input_names=["x", *(i for i, _ in names)],
            output_names=["y", *(o for _, o in names)],
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _wire_lengths(proto)
    onnx.checker.check_model(proto)
    return proto


def _wire_lengths(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
    wired = 0
    for node in graph.node:
        if node.op_type not in _RECURRENT_OPS:
            continue
        while len(node.input) <= _SEQUENCE_LENS_INDEX:
            node.input.append("")
        node.input[_SEQUENCE_LENS_INDEX] = "lengths"
        wired += 1
    if wired == 0:
        raise ParityError("the exported graph has no native RNN/LSTM/GRU node (was it unrolled?)")


def _torch_run(model: RecurrentModel, x: np.ndarray, states: list[np.ndarray]):
    with torch.no_grad():
        y, new = model.predict(
            torch.from_numpy(x), tuple(torch.from_numpy(s) for s in states)
        )
    return y.numpy(), [s.numpy() for s in new]


def _ort_run(sess: ort.InferenceSession, names, x, states, lengths=None):
    feed = {"x": x, "lengths": np.full(x.shape[0], x.shape[1], np.int32) if lengths is None else lengths}
    for (inp, _), s in zip(names, states):
        feed[inp] = s
    outs = sess.run(None, feed)
    return outs[0], outs[1:]


def verify(model: RecurrentModel, proto: onnx.ModelProto, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch over shapes, chunking and padding.

    Raises ParityError when any check exceeds PARITY_TOLERANCE.
    """
    model = model.eval()
    names = state_io_names(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0

    def check(label: str, a: np.ndarray, b: np.ndarray) -> None:
        nonlocal worst
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        worst = max(worst, diff)
        if not diff <= PARITY_TOLERANCE:
            raise ParityError(f"{label}: max abs diff {diff:.3g} > {PARITY_TOLERANCE}")

    def random_states(batch: int) -> list[np.ndarray]:
        shape = (model.num_layers, batch, model.hidden_size)
        return [(0.5 * rng.standard_normal(shape)).astype(np.float32) for _ in names]

    for batch, steps in [(1, 1), (1, 300), (3, 1), (4, 17), (8, 64), (2, 300)]:
        x = rng.standard_normal((batch, steps, model.input_size)).astype(np.float32)
        states = random_states(batch)
        y_t, s_t = _torch_run(model, x, states)
        y_o, s_o = _ort_run(sess, names, x, states)
        check(f"y batch={batch} T={steps}", y_t, y_o)
        for (inp, _), a, b in zip(names, s_t, s_o):
            check(f"{inp} batch={batch} T={steps}", a, b)

    # Chunked through the ONNX model == whole through PyTorch.
    x = rng.standard_normal((2, 40, model.input_size)).astype(np.float32)
    states = random_states(2)
    y_whole, s_whole = _torch_run(model, x, states)
    carried, pieces, start = states, [], 0
    for size in (1, 7, 13, 19):
        y_part, carried = _ort_run(sess, names, x[:, start : start + size], carried)
        pieces.append(y_part)
        start += size
    check("chunked y", y_whole, np.concatenate(pieces, axis=1))
    for a, b in zip(s_whole, carried):
        check("chunked state", a, b)

    # Padded rows with lengths == each row alone.
    lengths = np.array([5, 1, 12, 9], np.int32)
    x = rng.standard_normal((4, 12, model.input_size)).astype(np.float32)
    states = random_states(4)
    y_pad, s_pad = _ort_run(sess, names, x, states, lengths)
    for row, n in enumerate(lengths):
        y_alone, s_alone = _torch_run(model, x[row : row + 1, :n], [s[:, row : row + 1] for s in states])
        check(f"padded row {row} y", y_alone[0], y_pad[row, :n])
        for a, b in zip(s_alone, s_pad):
            check(f"padded row {row} state", a[:, 0], b[:, row])
    return worst


def next_version(repo: Path, name: str) -> int:
    base = repo / name
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def _library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def build_card(
    model: RecurrentModel,
    name: str,
    version: int,
    parity: float,
    *,
    task: str | None = None,
    vocabulary: list[str] | None = None,
    generation: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
    sha256: str | None = None,
) -> ModelCard:
    states = [
        StateSpec(
            name=inp[:-1],
            input=inp,
            output=out,
            shape=[model.num_layers, None, model.hidden_size],
            batch_axis=1,
        )
        for inp, out in state_io_names(model)
    ]
    return ModelCard(
        name=name,
        version=version,
        cell=model.cell,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        input_size=model.input_size,
        output_size=model.output_size,
        output_activation=model.output_activation,
        inputs=CardInputs(sequence="x", lengths="lengths"),
        outputs=CardOutputs(sequence="y"),
        states=states,
        parity_max_abs_diff=parity,
        task=task,
        vocabulary=vocabulary,
        generation=generation,
        metrics=metrics or {},
        library_versions=_library_versions(),
        sha256=sha256,
        **(extra or {}),
    )


def export_model(
    model: RecurrentModel,
    repo: Path,
    name: str,
    *,
    task: str | None = None,
    vocabulary: list[str] | None = None,
    generation: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Verify and write ``repo/name/<next version>/{model.onnx,card.json}``; return that folder.

    Nothing is written when verification fails (ParityError).
    """
    model = model.eval()
    proto = to_onnx(model)
    parity = verify(model, proto)
    payload = proto.SerializeToString()
    repo = Path(repo)
    version = next_version(repo, name)
    card = build_card(
        model,
        name,
        version,
        parity,
        task=task,
        vocabulary=vocabulary,
        generation=generation,
        metrics=metrics,
        extra=extra,
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    target = repo / name / str(version)
    (repo / name).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=repo / name))
    try:
        (staging / MODEL_FILE).write_bytes(payload)
        card.write(staging / CARD_FILE)
        staging.chmod(0o755)  # mkdtemp makes it 0700: a server under another user must read it
        staging.rename(target)  # a version directory appears complete or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
