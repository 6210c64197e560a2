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

from service.errors import PayloadTooLarge

MAGIC = b"RS"
VERSION = 1
HEADER = struct.Struct("<2sBBIIQ")
TOP_K = struct.Struct("<I")
FLAG_SEQ = 1
FLAG_REPLAYED = 2
FLAG_IDS = 2
"""In a request: the payload is token ids (a response uses bit 1 for FLAG_REPLAYED)."""
FLAG_TOP_K = 4
_REQUEST_FLAGS = FLAG_SEQ | FLAG_IDS | FLAG_TOP_K


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
    if flags & ~_REQUEST_FLAGS:
        raise FrameError(f"undefined flag bits {flags & ~_REQUEST_FLAGS:#x} (they must be 0)")
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


# -- multiplexed frames: steps for many sessions in one message (``/v1/stream``) -----------
#
# Request:  header "<2sBBI" (magic b"RM", version 1, flags 0, count), then ``count`` item
#           entries of 20 bytes (id_len u16, flags u16 [bit 0: seq set], steps u32,
#           features u32, seq u64), then the session ids (UTF-8, id_len bytes each, no
#           separator), then every item's ``steps * features`` float32 values, in order.
# Response: header "<2sBBII" (magic b"RM", version 1, flags 0, count, errors_len), then
#           ``count`` entries of 20 bytes (flags u16 [bit 0: error, bit 1: replayed],
#           reserved u16, steps u32, outputs u32, step_count u64), then the float32
#           outputs of every item that did not fail, in order, then ``errors_len`` bytes
#           of UTF-8 JSON: ``[{"index": i, "code": ..., "message": ...}, ...]``.

MUX_MAGIC = b"RM"
MUX_HEADER = struct.Struct("<2sBBI")
MUX_RESPONSE_HEADER = struct.Struct("<2sBBII")
MUX_ITEM = np.dtype(
    [("id_len", "<u2"), ("flags", "<u2"), ("steps", "<u4"), ("features", "<u4"), ("seq", "<u8")]
)
MUX_RESULT = np.dtype(
    [("flags", "<u2"), ("reserved", "<u2"), ("steps", "<u4"), ("outputs", "<u4"), ("step_count", "<u8")]
)
MUX_ERROR = 1
_F4 = np.dtype("<f4")


def is_multiplexed(frame: bytes) -> bool:
    return frame[:2] == MUX_MAGIC


def encode_many(items: list[tuple[str, np.ndarray, int | None]]) -> bytes:
    """A multiplexed request frame from (session_id, x [steps, features], seq) items."""
    table = np.zeros(len(items), MUX_ITEM)
    ids, payload = [], []
    for k, (session_id, x, seq) in enumerate(items):
        x = np.ascontiguousarray(x, dtype="<f4")
        if x.ndim != 2:
            raise FrameError("each item's steps must be a [steps, features] array")
        raw = session_id.encode()
        table[k] = (len(raw), FLAG_SEQ if seq is not None else 0, x.shape[0], x.shape[1], seq or 0)
        ids.append(raw)
        payload.append(x.tobytes())
    head = MUX_HEADER.pack(MUX_MAGIC, VERSION, 0, len(items))
    return head + table.tobytes() + b"".join(ids) + b"".join(payload)


def decode_many(frame: bytes, max_items: int) -> list[tuple[str, np.ndarray, int | None]]:
    """(session_id, x, seq) per item of a multiplexed request frame."""
    if len(frame) < MUX_HEADER.size:
        raise FrameError(f"a multiplexed frame needs a {MUX_HEADER.size}-byte header")
    magic, version, flags, count = MUX_HEADER.unpack_from(frame)
    if magic != MUX_MAGIC or version != VERSION:
        raise FrameError("not an rnnserve multiplexed v1 frame (bad magic or version)")
    if flags:
        raise FrameError(f"undefined header flags {flags:#x} (they must be 0)")
    ids_at = MUX_HEADER.size + count * MUX_ITEM.itemsize
    if len(frame) < ids_at:
        raise FrameError(f"frame is {len(frame)} bytes; its {count} item entries need {ids_at}")
    if count > max_items:  # a frame that holds its items, over a limit: the stream stays open
        raise PayloadTooLarge(
            f"{count} items exceed the limit of {max_items} per message", limit=max_items
        )
    table = np.frombuffer(frame, MUX_ITEM, count, MUX_HEADER.size)
    if count and (table["flags"] > FLAG_SEQ).any():
        raise FrameError("undefined item flag bits (only bit 0, seq, is defined)")
    id_ends = ids_at + np.cumsum(table["id_len"], dtype=np.int64)
    # u32 * u32 fits in u64; an item larger than the whole frame is refused before the
    # sizes are summed, so the sum cannot wrap either
    values = table["steps"].astype(np.uint64) * table["features"]
    if count and int(values.max()) > len(frame) // 4:
        raise FrameError(f"an item's steps x features exceeds what a {len(frame)}-byte frame holds")
    values = values.astype(np.int64)
    data_at = int(id_ends[-1]) if count else ids_at
    expected = data_at + 4 * int(values.sum())
    if len(frame) != expected:
        raise FrameError(f"frame is {len(frame)} bytes; its header implies {expected}")
    floats = np.frombuffer(frame, "<f4", offset=data_at)
    flagged = (table["flags"] & FLAG_SEQ).astype(bool)
    seqs: list[int | None] = (
        [q if f else None for q, f in zip(table["seq"].tolist(), flagged.tolist())]
        if flagged.any()
        else [None] * count
    )
    return list(zip(_ids(frame, ids_at, id_ends), _items_x(floats, table, values), seqs))


def _ids(frame: bytes, at: int, ends: np.ndarray) -> list[str]:
    """The session ids: sliced from one decoded string when they are all ASCII (the
    server's ids are), else decoded one by one."""
    region = frame[at : int(ends[-1])] if len(ends) else b""
    starts = np.concatenate(([0], ends[:-1] - at)).tolist()
    stops = (ends - at).tolist()
    if region.isascii():
        text = region.decode("ascii")
        return [text[a:b] for a, b in zip(starts, stops)]
    try:
        return [region[a:b].decode() for a, b in zip(starts, stops)]
    except UnicodeDecodeError as exc:
        raise FrameError("a session id is not valid UTF-8") from exc


def _items_x(floats: np.ndarray, table: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Each item's [steps, features] view: one reshape when every item has one shape."""
    count = len(table)
    if count and (table["steps"] == table["steps"][0]).all() and (
        table["features"] == table["features"][0]
    ).all():
        return list(floats.reshape(count, int(table["steps"][0]), int(table["features"][0])))
    out = []
    offset = 0
    for steps, features, n in zip(table["steps"].tolist(), table["features"].tolist(), values.tolist()):
        out.append(floats[offset : offset + n].reshape(steps, features))
        offset += n
    return out


def encode_many_response(
    results: list[tuple[np.ndarray, int, bool] | dict], errors_json: bytes = b""
) -> bytes:
    """A multiplexed response frame: per item (y, step_count, replayed), or an error dict
    (listed with its index in ``errors_json``, which the caller renders)."""
    table = np.zeros(len(results), MUX_RESULT)
    payload: list[bytes] = []
    good = [result for result in results if type(result) is not dict]
    if len(good) < len(results):
        table["flags"] = MUX_ERROR
    if good:
        ys, counts, replayed = zip(*good)
        shapes = [y.shape for y in ys]
        columns = {
            "flags": np.where(replayed, FLAG_REPLAYED, 0),
            "steps": [shape[0] for shape in shapes],
            "outputs": [shape[1] for shape in shapes],
            "step_count": counts,
        }
        rows = (
            slice(None)
            if len(good) == len(results)
            else [k for k, result in enumerate(results) if type(result) is not dict]
        )
        for name, column in columns.items():
            table[name][rows] = column
        if {y.dtype for y in ys} == {_F4}:
            payload = [y.tobytes() for y in ys]
        else:
            payload = [np.asarray(y, _F4).tobytes() for y in ys]
    head = MUX_RESPONSE_HEADER.pack(MUX_MAGIC, VERSION, 0, len(results), len(errors_json))
    return head + table.tobytes() + b"".join(payload) + errors_json


def decode_many_response(frame: bytes) -> list[tuple[np.ndarray, int, bool] | dict]:
    """Per item (y, step_count, replayed), or the error's fields (``code``, ``message`` and
    any others, such as ``step_count``) for a failed item."""
    import json

    if len(frame) < MUX_RESPONSE_HEADER.size:
        raise FrameError("a multiplexed response needs its header")
    magic, version, _, count, errors_len = MUX_RESPONSE_HEADER.unpack_from(frame)
    if magic != MUX_MAGIC or version != VERSION:
        raise FrameError("not an rnnserve multiplexed v1 frame (bad magic or version)")
    table = np.frombuffer(frame, MUX_RESULT, count, MUX_RESPONSE_HEADER.size)
    at = MUX_RESPONSE_HEADER.size + count * MUX_RESULT.itemsize
    errors = {e["index"]: e for e in json.loads(frame[len(frame) - errors_len :] or b"[]")}
    out: list = []
    for k, (flags, _, steps, outputs, step_count) in enumerate(table.tolist()):
        if flags & MUX_ERROR:
            error = {key: value for key, value in errors.get(k, {}).items() if key != "index"}
            out.append({"code": None, "message": None, **error})
            continue
        n = steps * outputs
        y = np.frombuffer(frame, "<f4", n, at).reshape(steps, outputs)
        out.append((y, step_count, bool(flags & FLAG_REPLAYED)))
        at += 4 * n
    return out
