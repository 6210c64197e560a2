"""The binary WebSocket frame format: a 20-byte header + raw little-endian float32 values.

Request  (client -> server): magic b"RS", version 1, flags, steps u32, features u32, seq u64,
then ``steps * features`` float32. Flag bit 0: ``seq`` is set (else it is ignored).
Response (server -> client): magic b"RS", version 1, flags, steps u32, outputs u32,
step_count u64, then ``steps * outputs`` float32. Flag bit 1: the answer replays a retry.
All integers little-endian. Errors are always JSON text frames ``{"error": {...}}``.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"RS"
VERSION = 1
HEADER = struct.Struct("<2sBBIIQ")
FLAG_SEQ = 1
FLAG_REPLAYED = 2


class FrameError(ValueError):
    """A binary frame that does not follow the format."""


def encode_request(x: np.ndarray, seq: int | None = None) -> bytes:
    x = np.ascontiguousarray(x, dtype="<f4")
    if x.ndim != 2:
        raise FrameError("steps must be a [steps, features] array")
    flags = FLAG_SEQ if seq is not None else 0
    return HEADER.pack(MAGIC, VERSION, flags, x.shape[0], x.shape[1], seq or 0) + x.tobytes()


def decode_request(frame: bytes) -> tuple[np.ndarray, int | None]:
    _, _, flags, steps, features, seq = _header(frame)
    x = _payload(frame, steps, features)
    return x, (seq if flags & FLAG_SEQ else None)


def encode_response(y: np.ndarray, step_count: int, replayed: bool = False) -> bytes:
    y = np.ascontiguousarray(y, dtype="<f4")
    flags = FLAG_REPLAYED if replayed else 0
    return HEADER.pack(MAGIC, VERSION, flags, y.shape[0], y.shape[1], step_count) + y.tobytes()


def decode_response(frame: bytes) -> tuple[np.ndarray, int, bool]:
    _, _, flags, steps, outputs, step_count = _header(frame)
    return _payload(frame, steps, outputs), step_count, bool(flags & FLAG_REPLAYED)


def _header(frame: bytes) -> tuple:
    if len(frame) < HEADER.size:
        raise FrameError(f"a binary frame needs a {HEADER.size}-byte header")
    fields = HEADER.unpack_from(frame)
    if fields[0] != MAGIC or fields[1] != VERSION:
        raise FrameError("not an rnnserve v1 frame (bad magic or version)")
    return fields


def _payload(frame: bytes, rows: int, cols: int) -> np.ndarray:
    expected = HEADER.size + 4 * rows * cols
    if len(frame) != expected:
        raise FrameError(f"frame is {len(frame)} bytes; its header implies {expected}")
    return np.frombuffer(frame, "<f4", offset=HEADER.size).reshape(rows, cols)
