"""Turning request payloads into validated float32 arrays, and model outputs back.

Everything a client can send wrong is caught here, before any state is touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.card import ModelCard
from service.config import Settings
from service.errors import InvalidInput, PayloadTooLarge, SequenceTooLong


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


_F32_MAX = float(np.finfo(np.float32).max)
_CHECKED_IN_PYTHON = 256
"""Up to this many values a plain list is range-checked value by value (cheaper than the
numpy calls for a few values); beyond, by numpy."""


def check_batch(
    settings: Settings,
    sequences: int,
    total_steps: int | None = None,
    output_size: int = 0,
    answered_steps: int | None = None,
) -> None:
    """The limits of a batch of sequences (predict, v2), from counts alone: checked before
    any row is parsed, so an oversized request is refused at once, not after its rows."""
    if sequences > settings.max_batch_sequences:
        raise PayloadTooLarge(
            f"{sequences} sequences exceed the limit of {settings.max_batch_sequences}",
            limit=settings.max_batch_sequences,
        )
    if total_steps is not None and total_steps > settings.max_total_steps_per_predict:
        raise PayloadTooLarge(
            f"{total_steps} steps in all exceed the limit of {settings.max_total_steps_per_predict}",
            limit=settings.max_total_steps_per_predict,
        )
    answered = total_steps if answered_steps is None else answered_steps
    if answered is not None and answered * output_size > settings.max_output_values:
        most = settings.max_output_values // output_size
        raise PayloadTooLarge(
            f"{answered} steps in all{' (padded ones included)' if answered_steps else ''} "
            f"answer {answered * output_size} values "
            f"({output_size} per step), over the limit of {settings.max_output_values} "
            f"(RNNSERVE_MAX_OUTPUT_VALUES): send at most {most} steps in all",
            limit=most,
        )


def max_steps(card: ModelCard, settings: Settings) -> int:
    """The most steps one request may carry for this model: ``max_steps_per_request``,
    and no more than ``max_output_values`` allows for its output size."""
    return min(settings.max_steps_per_request, max(1, settings.max_output_values // card.output_size))


def check_length(
    steps: int, settings: Settings, where: str = "", card: ModelCard | None = None
) -> None:
    """One sequence's length: at least one step, at most ``max_steps_per_request``, and
    (given the model's card) no more than its outputs fit in ``max_output_values``."""
    if steps == 0:
        raise InvalidInput(f"{where}the sequence is empty: send at least one time step")
    if steps > settings.max_steps_per_request:
        raise SequenceTooLong(
            f"{where}{steps} steps exceed the limit of {settings.max_steps_per_request}",
            limit=settings.max_steps_per_request,
        )
    if card is not None and steps * card.output_size > settings.max_output_values:
        most = max_steps(card, settings)
        raise SequenceTooLong(
            f"{where}{steps} steps of this model answer {steps * card.output_size} values "
            f"({card.output_size} per step), over the limit of {settings.max_output_values} "
            f"(RNNSERVE_MAX_OUTPUT_VALUES): send at most {most} steps per request",
            limit=most,
        )


def sequence_array(card: ModelCard, steps: Any, settings: Settings, where: str = "") -> np.ndarray:
    """A [steps, input_size] float32 array from a list of steps (numbers or symbols) or an
    array; for a token model, an int64 [steps] array of ids (see ``token_ids``)."""
    if card.token_inputs:
        return token_ids(card, steps, settings, where)
    if isinstance(steps, np.ndarray):
        x = steps
    else:
        if not isinstance(steps, list):
            raise InvalidInput(f"{where}a sequence must be a list of time steps")
        check_length(len(steps), settings, where, card)
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
    check_length(x.shape[0], settings, where, card)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InvalidInput(f"{where}the inputs contain NaN or infinity")
    return x


def token_ids(card: ModelCard, steps: Any, settings: Settings, where: str = "") -> np.ndarray:
    """An int64 [steps] array of ids in [0, input_size) for a token model.

    Each step of a list is an integer id or a symbol of the card's vocabulary; an array
    must be one-dimensional and of an integer dtype.
    """
    size = card.input_size
    if isinstance(steps, np.ndarray):
        if steps.dtype.kind not in "iu":
            raise InvalidInput(f"{where}token ids must be integers, not {steps.dtype}")
        if steps.ndim != 1:
            raise InvalidInput(f"{where}expected [steps] token ids, got shape {list(steps.shape)}")
        ids = steps
    else:
        if not isinstance(steps, list):
            raise InvalidInput(f"{where}a sequence must be a list of time steps")
        index = None
        values = []
        for t, step in enumerate(steps):
            if type(step) is int:
                values.append(step)
            elif isinstance(step, str):
                if card.vocabulary is None:
                    raise InvalidInput(
                        f"{where}this model has no vocabulary: send token ids (integers), not symbols"
                    )
                if index is None:
                    index = {s: i for i, s in enumerate(card.vocabulary)}
                if step not in index:
                    raise InvalidInput(f"{where}step {t}: unknown symbol {step!r}")
                values.append(index[step])
            else:
                raise InvalidInput(
                    f"{where}step {t} must be a token id (an integer in [0, {size}))"
                    + (" or a symbol of the vocabulary" if card.vocabulary is not None else "")
                )
        ids = np.array(values, np.int64) if all(-(2**63) <= v < 2**63 for v in values) else None
        if ids is None:
            raise InvalidInput(f"{where}a token id is out of range [0, {size})")
    check_length(ids.shape[0], settings, where, card)
    bad = np.flatnonzero((ids < 0) | (ids >= size))
    if bad.size:
        raise InvalidInput(
            f"{where}step {int(bad[0])}: token id {int(ids[bad[0]])} is out of range [0, {size})"
        )
    return ids.astype(np.int64, copy=False)


def _plain_numbers(steps: list, width: int) -> np.ndarray | None:
    """The common case, checked cheaply: every step a list of ``width`` floats or ints.

    Anything else (bools, strings, ragged steps, NaN, values beyond float32) returns None
    and goes through the detailed checks, so error messages are the same either way.
    """
    few = len(steps) * width <= _CHECKED_IN_PYTHON
    for step in steps:
        if type(step) is not list or len(step) != width:
            return None
        for value in step:
            kind = type(value)
            if kind is not float and kind is not int:
                return None
            # NaN fails both comparisons; within float32's range nothing overflows below
            if few and not -_F32_MAX <= value <= _F32_MAX:
                return None
    if few:
        return np.array(steps, np.float32)
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
    if card.output_activation != "softmax":  # first: most models stop here, per item
        return None
    names = card.output_names
    if names is None:
        return None
    return [names[i] for i in np.argmax(y, axis=-1).tolist()]
