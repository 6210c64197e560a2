"""The Open Inference Protocol's tensor codec: JSON tensors and the binary tensor extension.

A request body is either one JSON object, or (binary tensor data extension) a JSON header
of ``Inference-Header-Content-Length`` bytes followed by the raw little-endian bytes of the
inputs that carry ``parameters.binary_data_size``, in the order those inputs appear. A
response is built the same way when any output is asked for in binary.

Nothing here knows about models or sessions: it turns bytes into named numpy arrays and
back, and raises ``TensorError`` (answered as 400) for anything malformed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.api.common import dumps, json_problem

HEADER = "Inference-Header-Content-Length"
CONTENT_ENCODINGS = ("identity", "gzip", "deflate")

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
UNSUPPORTED = {"BYTES", "BF16"}
FLOATS = {"FP16", "FP32", "FP64"}
INTEGERS = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}


class TensorError(ValueError):
    """A malformed request body or tensor; always the client's fault (400)."""


class InflatedTooLarge(TensorError):
    """A compressed body that inflates past the body limit."""


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None
    """None: not said for this output, the request's ``binary_data_output`` decides."""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None
    """None when the request names no outputs: every output is returned."""

    def binary_output(self, output: RequestedOutput | None) -> bool:
        if output is not None and output.binary is not None:
            return output.binary
        value = self.parameters.get("binary_data_output", False)
        if not isinstance(value, bool):
            raise TensorError("parameters.binary_data_output must be a boolean")
        return value


# -- content encoding ------------------------------------------------------------------


_MAX_GZIP_MEMBERS = 1024
"""bgzip writes one member per 64 KiB: 256 of them for a 16 MiB body."""


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate``, refusing to inflate past ``limit`` bytes."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    if kind not in CONTENT_ENCODINGS:
        raise TensorError(f"unsupported Content-Encoding {encoding!r}: use gzip or deflate")
    wbits = 16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS
    out = bytearray()
    rest = body
    # A gzip body may hold several members back to back (RFC 1952): each is inflated in
    # turn, all within the limit. Anything after the last one is an error, not ignored.
    for _ in range(_MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise TensorError(f"the {kind} body cannot be decompressed: {exc}") from None
        if len(out) > limit:
            raise InflatedTooLarge(f"the decompressed body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise TensorError(f"the {kind} body is truncated")
        rest = inflater.unused_data
        if not rest:
            return bytes(out)
        if kind != "gzip":
            raise TensorError(f"{len(rest)} bytes follow the end of the {kind} body")
    raise TensorError(f"the gzip body holds more than {_MAX_GZIP_MEMBERS} members")


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compress a response body when the client asked for gzip or deflate (in that order)."""
    if not accept_encoding or len(body) < 1024:
        return body, None
    accepted = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    if "gzip" in accepted:
        packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return packer.compress(body) + packer.flush(), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, None


# -- requests --------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """Split and decode an infer request body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise TensorError(f"{HEADER} {header_length!r} is not an integer") from None
        if not 0 <= size <= len(body):
            raise TensorError(f"{HEADER} {size} is outside the body of {len(body)} bytes")
        head, blob = body[:size], memoryview(body)[size:]
    else:
        head, blob = body, None
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        if header_length is None and b"binary_data_size" in head:
            raise TensorError(
                "the body carries binary tensor data (an input has binary_data_size) but no "
                f"{HEADER} header: send that header with the length in bytes of the JSON "
                "part of the body"
            ) from None
        raise TensorError(f"the request is not valid JSON: {json_problem(exc.msg, exc.doc, exc.pos)}") from None
    if not isinstance(doc, dict):
        raise TensorError("the request must be a JSON object")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("id must be a string")
    parameters = _parameters(doc.get("parameters"), "the request")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorError("inputs must be a non-empty list of tensors")
    inputs: list[Tensor] = []
    offset = 0
    seen: set[str] = set()
    for k, raw in enumerate(raw_inputs):
        tensor, used = _input(raw, k, blob, offset)
        if tensor.name in seen:
            raise TensorError(f"input {tensor.name!r} is given twice")
        seen.add(tensor.name)
        inputs.append(tensor)
        offset += used
    if blob is not None and offset != len(blob):
        raise TensorError(
            f"the body holds {len(blob)} bytes of binary data but the inputs' "
            f"binary_data_size add up to {offset}"
        )

    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise TensorError("outputs must be a list")
        outputs = []
        for k, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise TensorError(f"outputs[{k}] must be an object with a name")
            params = _parameters(raw.get("parameters"), f"output {raw['name']!r}")
            binary = params.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise TensorError(f"output {raw['name']!r}: binary_data must be a boolean")
            outputs.append(RequestedOutput(raw["name"], binary, params))
    return InferRequest(request_id, parameters, inputs, outputs)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError(f"{where}: parameters must be an object")
    return value


def _input(raw: Any, k: int, blob: memoryview | None, offset: int) -> tuple[Tensor, int]:
    if not isinstance(raw, dict):
        raise TensorError(f"inputs[{k}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise TensorError(f"inputs[{k}] needs a name")
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    if not isinstance(datatype, str):
        raise TensorError(f'{where}: datatype must be a string such as "FP32"')
    if datatype in UNSUPPORTED:
        raise TensorError(f"{where}: datatype {datatype} is not supported by this server")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"{where}: unknown datatype {datatype!r}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError(f"{where}: shape must be a list of non-negative integers")
    count = math.prod(shape)
    params = _parameters(raw.get("parameters"), where)
    for unsupported in ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"):
        if unsupported in params:
            raise TensorError(f"{where}: the shared-memory extensions are not supported")

    size = params.get("binary_data_size")
    used = 0
    if size is not None:
        if "data" in raw:
            raise TensorError(f"{where}: give either data or binary_data_size, not both")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise TensorError(f"{where}: binary_data_size must be a non-negative integer")
        if blob is None:
            raise TensorError(f"{where}: binary_data_size needs the {HEADER} header")
        if offset + size > len(blob):
            raise TensorError(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(blob) - offset} bytes left)"
            )
        if size != count * dtype.itemsize:
            raise TensorError(
                f"{where}: binary_data_size {size} != {count} {datatype} elements of shape "
                f"{shape} ({count * dtype.itemsize} bytes)"
            )
        array = np.frombuffer(blob[offset : offset + size], dtype).reshape(shape)
        used = size
    else:
        if "data" not in raw:
            raise TensorError(f"{where}: no data and no parameters.binary_data_size")
        array = _json_array(raw["data"], dtype, datatype, shape, count, where)
    return Tensor(name, datatype, tuple(shape), array, params), used


def _json_array(
    data: Any, dtype: np.dtype, datatype: str, shape: list[int], count: int, where: str
) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BOOL":
            flat = np.asarray(data, dtype=object).ravel()
            if not all(isinstance(v, bool) for v in flat):
                raise TensorError(f"{where}: BOOL data must be true/false")
            array = flat.astype(np.bool_)
        else:
            array = np.asarray(data)
            if array.size and (
                array.dtype.kind not in "iuf" or (datatype in INTEGERS and array.dtype.kind == "f")
            ):
                raise TensorError(f"{where}: data holds values that are not {datatype}")
            if datatype in INTEGERS:
                info = np.iinfo(dtype)
                if array.size and (array.min() < info.min or array.max() > info.max):
                    raise TensorError(f"{where}: data holds values out of range for {datatype}")
            array = array.astype(dtype)
    except TensorError:
        raise
    except (ValueError, TypeError, OverflowError):
        raise TensorError(
            f"{where}: data must be a (nested or flat) list of {datatype} numbers"
        ) from None
    if array.size != count:
        raise TensorError(f"{where}: {array.size} values in data but shape {shape} needs {count}")
    return array.reshape(shape)


# -- responses -------------------------------------------------------------------------


@dataclass(slots=True)
class OutputTensor:
    name: str
    array: np.ndarray
    datatype: str = "FP32"
    binary: bool = False


def encode_response(head: dict[str, Any], outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    described, blobs = [], []
    for out in outputs:
        if out.datatype == "BYTES":  # strings: JSON lists them, binary length-prefixes each
            array = out.array
        else:
            array = np.ascontiguousarray(out.array, DATATYPES[out.datatype])
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": list(array.shape),
        }
        if out.binary:
            raw = _bytes_tensor(array) if out.datatype == "BYTES" else array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist() if out.datatype == "BYTES" else array.ravel()
        described.append(entry)
    header = dumps({**head, "outputs": described})
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _bytes_tensor(array: np.ndarray) -> bytes:
    """Triton's binary BYTES layout: each element as a little-endian u32 length + its bytes."""
    parts = []
    for item in array.ravel().tolist():
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts += [len(raw).to_bytes(4, "little"), raw]
    return b"".join(parts)
