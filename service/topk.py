"""The best k classes of each output row: computed with argpartition, so k of thousands of
classes costs microseconds. Shared by every protocol that answers with top-k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.errors import InvalidInput


def check_k(k: Any, where: str = "top_k") -> int:
    """A client's k: an integer >= 1 (booleans refused). A k above the number of classes is
    not an error: the answer then lists every class, best first."""
    if type(k) is not int or k < 1:
        raise InvalidInput(f"{where} must be an integer >= 1")
    return k


def top_indices(outputs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores), each [rows, min(k, classes)], best first, for outputs [rows, classes].

    Equal scores are ordered by index (which of several tied classes at the k-th place
    is kept is unspecified).
    """
    outputs = np.asarray(outputs)
    rows, classes = outputs.shape
    k = min(k, classes)
    if k < classes:
        part = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(classes), (rows, classes))
    scores = np.take_along_axis(outputs, part, axis=1)
    order = np.lexsort((part, -scores), axis=1) if rows else np.zeros((0, k), np.intp)
    indices = np.take_along_axis(part, order, axis=1)
    return indices, np.take_along_axis(scores, order, axis=1)


def top_k(
    outputs: np.ndarray, k: int, labels: Sequence[str] | None = None
) -> list[list[dict]]:
    """Per row: ``[{"index": i, "score": p, "label"?: name}, ...]``, best first."""
    indices, scores = top_indices(outputs, k)
    if labels is None:
        return [
            [{"index": int(i), "score": float(p)} for i, p in zip(ir, sr)]
            for ir, sr in zip(indices.tolist(), scores.tolist())
        ]
    return [
        [{"index": int(i), "score": float(p), "label": labels[i]} for i, p in zip(ir, sr)]
        for ir, sr in zip(indices.tolist(), scores.tolist())
    ]


def classification_strings(
    outputs: np.ndarray, k: int, labels: Sequence[str] | None = None
) -> list[list[str]]:
    """Triton's classification extension: ``"score:index[:label]"`` per class, [rows, k]."""
    indices, scores = top_indices(outputs, k)
    return [
        [
            f"{p:f}:{i}" if labels is None else f"{p:f}:{i}:{labels[i]}"
            for i, p in zip(ir, sr)
        ]
        for ir, sr in zip(indices.tolist(), scores.tolist())
    ]
