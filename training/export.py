"""Export a RecurrentModel to ONNX with explicit state, verify it, and write its card.

Why ``dynamo=False``: measured here (torch 2.13 / onnx 1.23 / onnxruntime 1.32) the
TorchScript exporter emits the native ``RNN``/``LSTM``/``GRU`` ops with dynamic batch and
time axes for all three cells and is ~10 us faster per call, while ``dynamo=True``
fixes y's time axis and silently unrolls ``nn.RNN`` at the example's length. The
exporter leaves ``sequence_lens`` empty, so we add a ``lengths`` input and wire it into
every recurrent node ourselves, then check the result against PyTorch before writing.

The verification (``verify_graph``) and the atomic write (``write_version``) are shared by
every way into the repository: our models here, any PyTorch module
(``training/module_export.py``) and Keras models (``training/keras_import.py``).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from service.card import CARD_FILE, MODEL_FILE, CardInputs, CardOutputs, ModelCard, StateSpec
from training.model import RecurrentModel

PARITY_TOLERANCE = 1e-5
WIDE_INPUT_SCALE = 25.0
"""Verification also runs inputs this many times the standard normal draws (|x| up to
about 100), compared relative to the outputs' magnitude: a branch on input values that
the tracer froze, or a clamp, shows there."""
_RECURRENT_OPS = {"RNN", "LSTM", "GRU"}
_SEQUENCE_LENS_INDEX = 4  # X, W, R, B, sequence_lens, initial_h, ... for all three ops
LENGTHS_INPUT = "lengths"
#: (batch, time) shapes every export is checked on, from zero and from random states.
VERIFY_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 300), (3, 1), (4, 17), (8, 64), (2, 300))

#: ``reference(x, states)``: the source model's outputs and final states for ``x`` (float32
#: [batch, time, input_size] or int64 ids [batch, time]) from ``states`` (one array per
#: state tensor, as the graph takes them; None means zero states). A reference that cannot
#: report its states returns None for them.
Reference = Callable[
    [np.ndarray, "list[np.ndarray] | None"], "tuple[np.ndarray, list[np.ndarray] | None]"
]


class ParityError(RuntimeError):
    """The exported graph does not reproduce the source model."""


@dataclass(frozen=True)
class GraphIO:
    """What verification needs to know of a graph's tensors (the card says the same)."""

    states: list[StateSpec]
    input_size: int
    token_inputs: bool = False
    sequence: str = "x"
    output: str = "y"
    lengths: str = LENGTHS_INPUT

    def draw_x(self, rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
        if self.token_inputs:
            return rng.integers(0, self.input_size, (batch, steps)).astype(np.int64)
        return rng.standard_normal((batch, steps, self.input_size)).astype(np.float32)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [tuple(batch if d is None else d for d in s.shape) for s in self.states]

    def zero_states(self, batch: int) -> list[np.ndarray]:
        return [np.zeros(shape, np.float32) for shape in self.state_shapes(batch)]

    def random_states(self, rng: np.random.Generator, batch: int) -> list[np.ndarray]:
        return [(0.5 * rng.standard_normal(shape)).astype(np.float32) for shape in self.state_shapes(batch)]

    def rows(self, states: list[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
        return [
            np.take(s, range(start, stop), axis=spec.batch_axis) for s, spec in zip(states, self.states)
        ]


class _Exportable(torch.nn.Module):
    def __init__(self, model: RecurrentModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *states: torch.Tensor):
        y, new_states = self.model.predict(x, tuple(states))
        return (y, *new_states)


def state_io_names(model: RecurrentModel) -> list[tuple[str, str]]:
    return [(f"{s}0", f"{s}n") for s in model.state_names]


def torch_to_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    state_names: Sequence[tuple[str, str]],
    state_batch_axes: Sequence[int],
) -> onnx.ModelProto:
    """Trace ``module(x, *states) -> (y, *new_states)`` to ONNX with native recurrent ops and
    a ``lengths`` input wired to every recurrent node."""
    dynamic_axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
    for (inp, out), axis in zip(state_names, state_batch_axes):
        dynamic_axes[inp] = {axis: "batch"}
        dynamic_axes[out] = {axis: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            buffer,
            input_names=["x", *(i for i, _ in state_names)],
            output_names=["y", *(o for _, o in state_names)],
            dynamic_axes=dynamic_axes,
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _wire_lengths(proto)
    onnx.checker.check_model(proto)
    return proto


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode for an export, given back in the mode it had (a checkpoint
    exported in the middle of training keeps training with its dropout)."""
    modes = [(part, part.training) for part in module.modules()]
    try:
        yield module.eval()
    finally:
        for part, training in modes:  # each its own: a frozen submodule stays in eval
            part.training = training


def to_onnx(model: RecurrentModel) -> onnx.ModelProto:
    """The ONNX graph of ``model`` with a ``lengths`` input wired to every recurrent node."""
    with eval_mode(model):
        return _to_onnx(model)


def _to_onnx(model: RecurrentModel) -> onnx.ModelProto:
    example = (torch.zeros(2, 3, model.input_size), *model.zero_states(2))
    names = state_io_names(model)
    return torch_to_onnx(_Exportable(model), example, names, [1] * len(names))


def _wire_lengths(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info(LENGTHS_INPUT, TensorProto.INT32, ["batch"]))
    wired = 0
    for node in graph.node:
        if node.op_type not in _RECURRENT_OPS:
            continue
        while len(node.input) <= _SEQUENCE_LENS_INDEX:
            node.input.append("")
        node.input[_SEQUENCE_LENS_INDEX] = LENGTHS_INPUT
        wired += 1
    if wired == 0:
        raise ParityError("the exported graph has no native RNN/LSTM/GRU node (was it unrolled?)")


def _model_io(model: RecurrentModel) -> GraphIO:
    shape: list[int | None] = [model.num_layers, None, model.hidden_size]
    return GraphIO(
        states=[
            StateSpec(name=inp[:-1], input=inp, output=out, shape=shape, batch_axis=1)
            for inp, out in state_io_names(model)
        ],
        input_size=model.input_size,
    )


def _model_reference(model: RecurrentModel) -> Reference:
    def run(x: np.ndarray, states: list[np.ndarray] | None):
        with torch.no_grad():
            given = None if states is None else tuple(torch.from_numpy(s) for s in states)
            y, new = model.predict(torch.from_numpy(x), given)
        return y.numpy(), [s.numpy() for s in new]

    return run


def open_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def verify_graph(
    proto: onnx.ModelProto,
    reference: Reference,
    graph_io: GraphIO,
    *,
    random_states: bool = True,
    last_step_only: bool = False,
    shapes: Sequence[tuple[int, int]] = VERIFY_SHAPES,
    seed: int = 0,
) -> float:
    """Max abs difference between onnxruntime and ``reference`` over shapes, chunking and
    padding; raises ParityError when any check exceeds PARITY_TOLERANCE.

    ``random_states=False``: the reference only runs from zero states (it is given None),
    so carried states are checked through chunked == whole. ``last_step_only``: the
    reference answers only at the last step (a many-to-one model); the graph's output at
    the last step is compared, and chunk boundaries are compared with the reference run
    on the prefix.
    """
    sess = open_session(proto)
    rng = np.random.default_rng(seed)
    worst = 0.0

    def ort_run(x: np.ndarray, states: list[np.ndarray], lengths: np.ndarray | None = None):
        feed = {graph_io.sequence: x}
        feed[graph_io.lengths] = np.full(x.shape[0], x.shape[1], np.int32) if lengths is None else lengths
        feed.update({spec.input: s for spec, s in zip(graph_io.states, states)})
        try:
            y, *new = sess.run([graph_io.output, *(s.output for s in graph_io.states)], feed)
        except Exception as exc:  # onnxruntime's errors have no common public base
            raise ParityError(
                f"the exported graph fails in onnxruntime for x of shape {list(x.shape)}: {exc}"
            ) from exc
        return y, new

    def ref_run(x: np.ndarray, states: list[np.ndarray]):
        return reference(x, states if random_states else None)

    def start_states(batch: int) -> list[np.ndarray]:
        return graph_io.random_states(rng, batch) if random_states else graph_io.zero_states(batch)

    def check(label: str, a: np.ndarray, b: np.ndarray, relative: bool = False) -> None:
        nonlocal worst
        if a.shape != b.shape:
            raise ParityError(f"{label}: shape {a.shape} != {b.shape}")
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        if relative:  # float32 rounding grows with the values (an unbounded relu)
            diff /= max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
        worst = max(worst, diff)
        if not diff <= PARITY_TOLERANCE:
            kind = "relative" if relative else "abs"
            raise ParityError(f"{label}: max {kind} diff {diff:.3g} > {PARITY_TOLERANCE}")

    def check_states(
        label: str, ref: list[np.ndarray] | None, got: list[np.ndarray], relative: bool = False
    ) -> None:
        for spec, a, b in zip(graph_io.states, ref or [], got):
            check(f"{label} state {spec.input}", a, b, relative)

    def answer(y: np.ndarray) -> np.ndarray:
        return y[:, -1] if last_step_only else y

    for batch, steps in shapes:
        x = graph_io.draw_x(rng, batch, steps)
        states = start_states(batch)
        y_ref, s_ref = ref_run(x, states)
        y_got, s_got = ort_run(x, states)
        check(f"y batch={batch} T={steps}", y_ref, answer(y_got))
        check_states(f"batch={batch} T={steps}", s_ref, s_got)

    # A served session starts from zeros: the source given no state must start there too
    # (a learned or non-zero initial state would be silently lost).
    x = graph_io.draw_x(rng, 2, 9)
    y_ref, s_ref = reference(x, None)
    y_got, s_got = ort_run(x, graph_io.zero_states(2))
    try:
        check("from no state: y", y_ref, answer(y_got))
        check_states("from no state:", s_ref, s_got)
    except ParityError as exc:
        raise ParityError(
            f"{exc}. Given no state, the source does not start from zeros, but every served "
            "session starts from zeros: a learned or non-zero initial state is not part of "
            "the exported graph. Start from zeros when no state is given (and, for a "
            "learned start, feed it as a state when you create a session)"
        ) from None

    if not graph_io.token_inputs:  # large values: frozen branches, clamps, saturation
        x = graph_io.draw_x(rng, 2, 16) * WIDE_INPUT_SCALE
        states = start_states(2)
        y_ref, s_ref = ref_run(x, states)
        y_got, s_got = ort_run(x, states)
        check(f"y for inputs x{WIDE_INPUT_SCALE:g}", y_ref, answer(y_got), relative=True)
        check_states(f"inputs x{WIDE_INPUT_SCALE:g}", s_ref, s_got, relative=True)

    # Chunked through the ONNX model == whole through the reference.
    x = graph_io.draw_x(rng, 2, 40)
    states = start_states(2)
    y_whole, s_whole = ref_run(x, states)
    carried, pieces, start = states, [], 0
    for size in (1, 7, 13, 19):
        y_part, carried = ort_run(x[:, start : start + size], carried)
        start += size
        if last_step_only:
            check(f"chunk ending at step {start}", ref_run(x[:, :start], states)[0], y_part[:, -1])
        pieces.append(y_part)
    check("chunked y", y_whole, answer(np.concatenate(pieces, axis=1)))
    check_states("chunked", s_whole, carried)

    # Padded rows with lengths == each row alone.
    lengths = np.array([5, 1, 12, 9], np.int32)
    x = graph_io.draw_x(rng, 4, 12)
    states = start_states(4)
    y_pad, s_pad = ort_run(x, states, lengths)
    for row, n in enumerate(lengths):
        y_alone, s_alone = ref_run(x[row : row + 1, :n], graph_io.rows(states, row, row + 1))
        got = y_pad[row : row + 1, n - 1] if last_step_only else y_pad[row : row + 1, :n]
        check(f"padded row {row} y", y_alone, got)
        check_states(f"padded row {row}", s_alone, graph_io.rows(s_pad, row, row + 1))
    return worst


def verify(model: RecurrentModel, proto: onnx.ModelProto, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch over shapes, chunking and padding.

    Raises ParityError when any check exceeds PARITY_TOLERANCE.
    """
    with eval_mode(model):
        return verify_graph(proto, _model_reference(model), _model_io(model), seed=seed)


def next_version(repo: Path, name: str) -> int:
    base = repo / name
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def write_version(
    repo: Path, name: str, proto: onnx.ModelProto, make_card: Callable[[int, str], ModelCard]
) -> Path:
    """Write ``repo/name/<next version>/{model.onnx,card.json}`` atomically; return the folder.

    ``make_card(version, sha256)`` builds the card once the version and digest are known.
    """
    payload = proto.SerializeToString()
    repo = Path(repo)
    version = next_version(repo, name)
    card = make_card(version, hashlib.sha256(payload).hexdigest())
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
    return ModelCard(
        name=name,
        version=version,
        cell=model.cell,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        input_size=model.input_size,
        output_size=model.output_size,
        output_activation=model.output_activation,
        inputs=CardInputs(sequence="x", lengths=LENGTHS_INPUT),
        outputs=CardOutputs(sequence="y"),
        states=_model_io(model).states,
        parity_max_abs_diff=parity,
        task=task,
        vocabulary=vocabulary,
        generation=generation,
        metrics=metrics or {},
        library_versions=library_versions(),
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
    with eval_mode(model):
        proto = to_onnx(model)
        parity = verify(model, proto)
    return write_version(
        Path(repo),
        name,
        proto,
        lambda version, sha256: build_card(
            model,
            name,
            version,
            parity,
            task=task,
            vocabulary=vocabulary,
            generation=generation,
            metrics=metrics,
            extra=extra,
            sha256=sha256,
        ),
    )
