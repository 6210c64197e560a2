"""Turning request payloads into validated float32 arrays, and model outputs back.

Everything a client can send wrong is caught here, before any state is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.card import ModelCard
from service.config import Settings
from service.errors import InvalidInput, SequenceTooLong


def _symbol_rows(card: ModelCard, steps: list[Any], where: str) -> np.ndarray:
    assert card.vocabulary is not None
    index = {s: i for i, s in enumerate(card.vocabulary)}
    x = np.zeros((len(steps), card.input_size), np.float32)
    for t, symbol in enumerate(steps):
        if symbol not in index:
            raise InvalidInput(
                f"{where}step {t}: unknown symbol {symbol!r}; the vocabulary is "
                f"{''.join(card.vocabulary) if all(len(s) == 1 for s in card.vocabulary) else card.vocabulary}"
            )
        x[t, index[symbol]] = 1.0
    return x


def sequence_array(card: ModelCard, steps: Any, settings: Settings, where: str = "") -> np.ndarray:
    """A [steps, input_size] float32 array from a list of steps (numbers or symbols) or an array."""
    if isinstance(steps, np.ndarray):
        x = steps
    else:
        if not isinstance(steps, list):
            raise InvalidInput(f"{where}a sequence must be a list of time steps")
        if not steps:
            raise InvalidInput(f"{where}the sequence is empty: send at least one time step")
        if len(steps) > settings.max_steps_per_request:
            raise SequenceTooLong(
                f"{where}{len(steps)} steps exceed the limit of {settings.max_steps_per_request}",
                limit=settings.max_steps_per_request,
            )
        fast = _plain_numbers(steps, card.input_size)
        if fast is not None:
            return fast
        if isinstance(steps[0], str):
            if card.vocabulary is None:
                raise InvalidInput(f"{where}this model has no vocabulary: send numbers, not symbols")
            if not all(isinstance(s, str) for s in steps):
                raise InvalidInput(f"{where}mixed symbols and numbers in one sequence")
            return _symbol_rows(card, steps, where)
        if card.input_size == 1 and all(_is_number(s) for s in steps):
            steps = [[s] for s in steps]  # a univariate series may be sent flat
        for t, step in enumerate(steps):
            if not isinstance(step, list):
                raise InvalidInput(f"{where}step {t} must be a list of {card.input_size} numbers")
            if len(step) != card.input_size:
                raise InvalidInput(
                    f"{where}step {t} has {len(step)} features; the model takes {card.input_size}"
                )
            if not all(_is_number(v) for v in step):
                raise InvalidInput(f"{where}step {t} holds something that is not a number")
        with np.errstate(over="ignore"):  # too large for float32: inf, refused below
            x = np.asarray(steps, np.float32)
    if x.ndim != 2 or x.shape[1] != card.input_size:
        raise InvalidInput(f"{where}expected [steps, {card.input_size}] values, got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise InvalidInput(f"{where}the sequence is empty: send at least one time step")
    if x.shape[0] > settings.max_steps_per_request:
        raise SequenceTooLong(
            f"{where}{x.shape[0]} steps exceed the limit of {settings.max_steps_per_request}",
            limit=settings.max_steps_per_request,
        )
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput(f"{where}the inputs contain NaN or infinity")
    return x


def _plain_numbers(steps: list, width: int) -> np.ndarray | None:
    """The common case, checked cheaply: every step a list of ``width`` floats or ints.

    Anything else (bools, strings, ragged steps, NaN) returns None and goes through the
    detailed checks, so error messages are the same either way.
    """
    for step in steps:
        if type(step) is not list or len(step) != width:
            return None
        for value in step:
            kind = type(value)
            if kind is not float and kind is not int:
                return None
    try:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            x = np.array(steps, np.float32)
    except (OverflowError, ValueError):
        return None
    return x if np.isfinite(x).all() else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _all_numbers(value: Any) -> bool:
    """True for a number or nested lists of numbers (no strings, booleans or nulls)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif not _is_number(item):
            return False
    return True


def state_from_payload(card: ModelCard, payload: Any, state_size: int) -> np.ndarray:
    """A flat state from ``{"h0": [[...]], "c0": ...}`` keyed by the card's state inputs."""
    if not isinstance(payload, dict):
        raise InvalidInput("a state must be an object keyed by state input name")
    expected = {spec.input for spec in card.states}
    if set(payload) != expected:
        raise InvalidInput(f"state names {sorted(payload)} != the model's {sorted(expected)}")
    parts = []
    for spec in card.states:
        if not _all_numbers(payload[spec.input]):
            raise InvalidInput(f"state {spec.input!r} must hold only numbers (nested lists)")
        try:
            with np.errstate(over="ignore"):  # too large for float32: inf, refused below
                tensor = np.asarray(payload[spec.input], np.float32)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(f"state {spec.input!r} is not a numeric array") from exc
        if tensor.shape != spec.row_shape:
            raise InvalidInput(
                f"state {spec.input!r} has shape {list(tensor.shape)}; expected {list(spec.row_shape)}"
            )
        if not np.isfinite(tensor).all():
            raise InvalidInput(f"state {spec.input!r} contains NaN or infinity")
        parts.append(tensor.ravel())
    flat = np.concatenate(parts).astype(np.float32)
    assert flat.size == state_size
    return flat


def state_to_payload(card: ModelCard, flat: np.ndarray) -> dict[str, list]:
    out, offset = {}, 0
    for spec in card.states:
        size = spec.row_size
        out[spec.input] = flat[offset : offset + size].reshape(spec.row_shape).tolist()
        offset += size
    return out


def top_symbols(card: ModelCard, y: np.ndarray) -> list[str] | None:
    """The most probable symbol per step, for softmax models with a vocabulary or labels."""
    names = card.vocabulary if card.vocabulary is not None else card.labels
    if names is None or card.output_activation != "softmax" or len(names) != card.output_size:
        return None
    return [names[i] for i in np.argmax(y, axis=-1).tolist()]
