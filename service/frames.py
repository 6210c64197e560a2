"""The binary WebSocket frame format: a 20-byte header + raw little-endian values.

Request  (client -> server): magic b"RS", version 1, flags, steps u32, features u32, seq u64,
then (flag bit 2 only) k u32, then the payload: ``steps * features`` float32, or (flag bit 1,
token models) ``steps`` token ids as uint32 with ``features`` 1.
Flag bit 0: ``seq`` is set (else it is ignored). Flag bit 1: the payload is token ids.
Flag bit 2: answer with the best k classes of each step instead of every output.
Response (server -> client): magic b"RS", version 1, flags, steps u32, outputs u32,
step_count u64, then ``steps * outputs`` float32. Flag bit 1: the answer replays a retry.
Flag bit 2: a top-k answer: ``outputs`` is k, and the payload is ``steps * k`` class indices
(uint32) then their ``steps * k`` scores (float32), best first in each step.
All integers little-endian. Errors are always JSON text frames ``{"error": {...}}``.
"""

from __future__ import annotations

import math
import struct

import numpy as np

MAGIC = b"RS"
VERSION = 1
HEADER = struct.Struct("<2sBBIIQ")
TOP_K = struct.Struct("<I")
FLAG_SEQ = 1
FLAG_REPLAYED = 2
FLAG_IDS = 2
"""In a request: the payload is token ids (a response uses bit 1 for FLAG_REPLAYED)."""
FLAG_TOP_K = 4


class FrameError(ValueError):
    """A binary frame that does not follow the format."""


def encode_request(x: np.ndarray, seq: int | None = None, top_k: int | None = None) -> bytes:
    """A request frame: ``x`` [steps, features] values, or [steps] integer token ids."""
    x = np.asarray(x)
    flags = FLAG_SEQ if seq is not None else 0
    if x.ndim == 1 and x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 0xFFFFFFFF):
            raise FrameError("token ids must fit in uint32")
        payload, steps, features = x.astype("<u4").tobytes(), x.shape[0], 1
        flags |= FLAG_IDS
    elif x.ndim == 2:
        payload, (steps, features) = np.ascontiguousarray(x, dtype="<f4").tobytes(), x.shape
    else:
        raise FrameError("steps must be a [steps, features] array or [steps] token ids")
    extra = b""
    if top_k is not None:
        if not 0 <= top_k <= 0xFFFFFFFF:
            raise FrameError("top_k must fit in uint32")
        flags |= FLAG_TOP_K
        extra = TOP_K.pack(top_k)
    return HEADER.pack(MAGIC, VERSION, flags, steps, features, seq or 0) + extra + payload


def decode_request(frame: bytes) -> tuple[np.ndarray, int | None, int | None]:
    """(x, seq, top_k): x [steps, features] float32, or [steps] uint32 token ids."""
    _, _, flags, steps, features, seq = _header(frame)
    offset, k = HEADER.size, None
    if flags & FLAG_TOP_K:
        if len(frame) < offset + TOP_K.size:
            raise FrameError("a top-k frame needs k (u32) after the header")
        (k,) = TOP_K.unpack_from(frame, offset)  # 0 is well-formed: the stream refuses it
        offset += TOP_K.size
    if flags & FLAG_IDS:
        if features != 1:
            raise FrameError("a token-id frame must have features 1")
        x = _payload(frame, offset, (steps,), "<u4")
    else:
        x = _payload(frame, offset, (steps, features), "<f4")
    return x, (seq if flags & FLAG_SEQ else None), k


def encode_response(y: np.ndarray, step_count: int, replayed: bool = False) -> bytes:
    y = np.ascontiguousarray(y, dtype="<f4")
    flags = FLAG_REPLAYED if replayed else 0
    return HEADER.pack(MAGIC, VERSION, flags, y.shape[0], y.shape[1], step_count) + y.tobytes()


def encode_top_k_response(
    indices: np.ndarray, scores: np.ndarray, step_count: int, replayed: bool = False
) -> bytes:
    """A top-k answer: indices and scores, each [steps, k], best first."""
    flags = FLAG_TOP_K | (FLAG_REPLAYED if replayed else 0)
    steps, k = indices.shape
    return b"".join(
        [
            HEADER.pack(MAGIC, VERSION, flags, steps, k, step_count),
            np.ascontiguousarray(indices, "<u4").tobytes(),
            np.ascontiguousarray(scores, "<f4").tobytes(),
        ]
    )


def decode_response(frame: bytes) -> tuple[np.ndarray, int, bool]:
    _, _, flags, steps, outputs, step_count = _header(frame)
    if flags & FLAG_TOP_K:
        raise FrameError("a top-k answer: read it with decode_top_k_response")
    return _payload(frame, HEADER.size, (steps, outputs), "<f4"), step_count, bool(flags & FLAG_REPLAYED)


def decode_top_k_response(frame: bytes) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """(indices [steps, k] uint32, scores [steps, k] float32, step_count, replayed)."""
    _, _, flags, steps, k, step_count = _header(frame)
    if not flags & FLAG_TOP_K:
        raise FrameError("not a top-k answer: read it with decode_response")
    expected = HEADER.size + 8 * steps * k
    if len(frame) != expected:
        raise FrameError(f"frame is {len(frame)} bytes; its header implies {expected}")
    indices = np.frombuffer(frame, "<u4", steps * k, HEADER.size).reshape(steps, k)
    scores = np.frombuffer(frame, "<f4", steps * k, HEADER.size + 4 * steps * k).reshape(steps, k)
    return indices, scores, step_count, bool(flags & FLAG_REPLAYED)


def _header(frame: bytes) -> tuple:
    if len(frame) < HEADER.size:
        raise FrameError(f"a binary frame needs a {HEADER.size}-byte header")
    fields = HEADER.unpack_from(frame)
    if fields[0] != MAGIC or fields[1] != VERSION:
        raise FrameError("not an rnnserve v1 frame (bad magic or version)")
    return fields


def _payload(frame: bytes, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    count = math.prod(shape)
    expected = offset + 4 * count
    if len(frame) != expected:
        raise FrameError(f"frame is {len(frame)} bytes; its header implies {expected}")
    return np.frombuffer(frame, dtype, count, offset).reshape(shape)
