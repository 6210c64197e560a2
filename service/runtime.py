"""Running an ONNX recurrent model with explicit state: one onnxruntime call at a time.

States travel as one flat float32 vector per sequence (every state tensor of the card,
batch axis removed, concatenated in card order): cheap to store, copy and serialise.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.card import ModelCard
from service.config import Settings

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXEC_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}


_BOUND_STEPS = 8
"""``run_one`` keeps an I/O binding for each step count up to this."""


@dataclass(slots=True)
class _Bound:
    binding: ort.IOBinding
    buffers: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    """x [1, steps, ...], flat state in, y [1, steps, out], flat state out."""
    keep: tuple[np.ndarray, ...]
    """Every array bound, views included: onnxruntime holds their addresses."""


class CardMismatch(ValueError):
    """The ONNX graph does not have the tensors its card describes."""


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_threads
    options.inter_op_num_threads = settings.ort_inter_threads
    options.graph_optimization_level = _OPT_LEVELS[settings.ort_graph_optimization]
    options.execution_mode = _EXEC_MODES[settings.ort_execution_mode]
    options.log_severity_level = 3
    return options


class Runner:
    """An onnxruntime session bound to its card. ``run`` is thread-safe and releases the GIL."""

    def __init__(self, model_path: Path, card: ModelCard, settings: Settings) -> None:
        self.card = card
        self.session = ort.InferenceSession(
            str(model_path), session_options(settings), providers=["CPUExecutionProvider"]
        )
        self._sequence_input = card.inputs.sequence
        self._lengths_input = card.inputs.lengths
        self._state_inputs = [s.input for s in card.states]
        self._output_names = [card.outputs.sequence, *(s.output for s in card.states)]
        self._row_shapes = [s.row_shape for s in card.states]
        self._axes = [s.batch_axis for s in card.states]
        self._offsets = np.cumsum([0, *(s.row_size for s in card.states)]).tolist()
        self.state_size = self._offsets[-1]
        self._one_feed = [
            (name, a, b, shape[:axis] + (1,) + shape[axis:])
            for name, a, b, shape, axis in zip(
                self._state_inputs, self._offsets, self._offsets[1:], self._row_shapes, self._axes
            )
        ]
        """Per state input: (name, start, end, batch-1 shape) of its slice of a flat state."""
        self._bound: dict[int, _Bound] = {}
        self._one_lock = threading.Lock()
        self._check_graph()
        self._dry_run()

    @property
    def has_lengths(self) -> bool:
        return self._lengths_input is not None

    def zero_state(self) -> np.ndarray:
        return np.zeros(self.state_size, np.float32)

    def state_views(self, flat: np.ndarray) -> list[np.ndarray]:
        """Each state tensor of one sequence (batch axis removed), as views into ``flat``."""
        return [
            flat[a:b].reshape(shape)
            for a, b, shape in zip(self._offsets, self._offsets[1:], self._row_shapes)
        ]

    def stack_states(self, flats: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Stack per-sequence flat states (a list, or a [batch, state_size] array) into the
        batched tensors the graph takes."""
        rows = np.asarray(flats, np.float32)
        batch = rows.shape[0]
        if batch == 1:  # a size-1 axis moves without reordering memory: plain reshapes
            return [
                np.ascontiguousarray(rows[0, a:b].reshape(shape[:axis] + (1,) + shape[axis:]))
                for a, b, shape, axis in zip(
                    self._offsets, self._offsets[1:], self._row_shapes, self._axes
                )
            ]
        batched = []
        for a, b, shape, axis in zip(self._offsets, self._offsets[1:], self._row_shapes, self._axes):
            tensor = rows[:, a:b].reshape((batch, *shape))
            batched.append(np.ascontiguousarray(np.moveaxis(tensor, 0, axis)))
        return batched

    def split_states(self, batched: list[np.ndarray]) -> np.ndarray:
        """The inverse of ``stack_states``: a [batch, state_size] array, one flat state per row."""
        batch = batched[0].shape[self._axes[0]]
        if batch == 1:
            return np.concatenate([tensor.reshape(-1) for tensor in batched])[np.newaxis]
        out = np.empty((batch, self.state_size), np.float32)
        for a, b, tensor, axis in zip(self._offsets, self._offsets[1:], batched, self._axes):
            out[:, a:b] = np.moveaxis(tensor, axis, 0).reshape(batch, b - a)
        return out

    def run(
        self, x: np.ndarray, states: list[np.ndarray], lengths: np.ndarray | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One onnxruntime call. ``lengths`` must be given (all >= 1) iff the model has it."""
        feed = {self._sequence_input: x}
        for name, tensor in zip(self._state_inputs, states):
            feed[name] = tensor
        if self._lengths_input is not None:
            feed[self._lengths_input] = lengths
        y, *new_states = self.session.run(self._output_names, feed)
        return y, new_states

    def run_one(self, x: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One sequence's steps ``x`` ([steps, ...]) from its flat state, as one onnxruntime
        call without the batch machinery. Returns (y [steps, out], the new flat state).

        Up to ``_BOUND_STEPS`` steps it runs through an I/O binding made once per step
        count: the inputs are copied into buffers bound to the graph and the outputs land
        in bound buffers, so onnxruntime allocates and converts nothing. One caller at a
        time uses the buffers (the batcher's inline path, on the event loop's thread); a
        concurrent caller takes the plain path.
        """
        steps = x.shape[0]
        if steps <= _BOUND_STEPS and self._one_lock.acquire(blocking=False):
            try:
                bound = self._bound.get(steps) or self._bind(steps)
                x_buf, flat_in, y_buf, flat_out = bound.buffers
                x_buf[0] = x
                flat_in[:] = flat
                self.session.run_with_iobinding(bound.binding)
                return y_buf[0].copy(), flat_out.copy()
            finally:
                self._one_lock.release()
        feed = {self._sequence_input: x[np.newaxis]}
        for name, a, b, shape in self._one_feed:
            feed[name] = np.ascontiguousarray(flat[a:b]).reshape(shape)
        if self._lengths_input is not None:
            feed[self._lengths_input] = np.array([steps], np.int32)
        y, *states = self.session.run(self._output_names, feed)
        # Removing a batch axis of size 1 never reorders memory: plain reshapes.
        return y[0], np.concatenate([tensor.reshape(-1) for tensor in states])

    def _bind(self, steps: int) -> _Bound:
        """The I/O binding of one sequence of ``steps`` steps, and its buffers."""
        card = self.card
        if card.token_inputs:
            x_buf = np.zeros((1, steps), np.int64)
        else:
            x_buf = np.zeros((1, steps, card.input_size), np.float32)
        flat_in = np.zeros(self.state_size, np.float32)
        flat_out = np.zeros(self.state_size, np.float32)
        y_buf = np.zeros((1, steps, card.output_size), np.float32)
        # onnxruntime reads and writes these arrays' memory in place: every one of them
        # (views included) is kept alive as long as the binding, in ``_Bound.keep``.
        inputs = [(self._sequence_input, x_buf)] + [
            (name, flat_in[a:b].reshape(shape)) for name, a, b, shape in self._one_feed
        ]
        if self._lengths_input is not None:
            inputs.append((self._lengths_input, np.array([steps], np.int32)))
        outputs = [(self._output_names[0], y_buf)] + [
            (out, flat_out[a:b].reshape(shape))
            for out, (_, a, b, shape) in zip(self._output_names[1:], self._one_feed)
        ]
        binding = self.session.io_binding()
        for name, array in inputs:
            binding.bind_cpu_input(name, array)
        for name, array in outputs:
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        bound = self._bound[steps] = _Bound(
            binding, (x_buf, flat_in, y_buf, flat_out), tuple(a for _, a in inputs + outputs)
        )
        return bound

    def _check_graph(self) -> None:
        card = self.card
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}

        def need(table: dict, name: str, rank: int, kind: str) -> None:
            if name not in table:
                raise CardMismatch(f"card names {kind} {name!r} but the graph has {sorted(table)}")
            shape = table[name].shape
            if shape is not None and len(shape) != rank:
                raise CardMismatch(f"{kind} {name!r} has rank {len(shape)}, card implies {rank}")

        need(inputs, card.inputs.sequence, 2 if card.token_inputs else 3, "input")
        need(outputs, card.outputs.sequence, 3, "output")
        for spec in card.states:
            need(inputs, spec.input, len(spec.shape), "state input")
            need(outputs, spec.output, len(spec.shape), "state output")
        if card.inputs.lengths is not None:
            need(inputs, card.inputs.lengths, 1, "input")
        extra = set(inputs) - {card.inputs.sequence, card.inputs.lengths, *self._state_inputs}
        if extra:
            raise CardMismatch(f"graph inputs {sorted(extra)} are not described by the card")
        x_input = inputs[card.inputs.sequence]
        if card.token_inputs:
            if x_input.type != "tensor(int64)":
                raise CardMismatch(
                    f"token input {card.inputs.sequence!r} is {x_input.type}, expected tensor(int64)"
                )
            return
        x_shape = x_input.shape
        if isinstance(x_shape[2], int) and x_shape[2] != card.input_size:
            raise CardMismatch(f"graph input size {x_shape[2]} != card input_size {card.input_size}")

    def _dry_run(self) -> None:
        card = self.card
        if card.token_inputs:  # the last id too: an embedding smaller than the card fails here
            x = np.full((1, 1), card.input_size - 1, np.int64)
        else:
            x = np.zeros((1, 1, card.input_size), np.float32)
        lengths = np.ones(1, np.int32) if self.has_lengths else None
        try:
            y, states = self.run(x, self.stack_states([self.zero_state()]), lengths)
        except Exception as exc:  # onnxruntime's errors have no common public base
            raise CardMismatch(f"a one-step dry run as the card describes failed: {exc}") from exc
        if y.shape != (1, 1, card.output_size):
            raise CardMismatch(f"dry run gave y {y.shape}, card implies (1, 1, {card.output_size})")
        for spec, tensor in zip(card.states, states):
            expected = tuple(1 if d is None else d for d in spec.shape)
            if tensor.shape != expected:
                raise CardMismatch(f"dry run gave {spec.output} {tensor.shape}, card says {expected}")
            if tensor.dtype != np.float32:
                raise CardMismatch(f"state {spec.output} is {tensor.dtype}, expected float32")
