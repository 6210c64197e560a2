"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), as Triton serves it.

It runs in the HTTP server's event loop and shares its engine, so sessions, batching, the
exactly-once ``seq`` parameter, limits and API keys are the same on both. The messages are
the ones ``tritonclient[grpc]`` ships (the ``grpc`` extra); this module only translates
them to and from the requests HTTP v2 runs (``service.api.v2.run_infer``), so a sequence
started on one protocol continues on the other.

``ModelStreamInfer`` answers each request of a stream on its own: an error is that
request's ``error_message`` and the stream stays open. Requests of one sequence (model and
``sequence_id``) run one after another and are answered in their order; different
sequences run concurrently and may be answered in any order. A stream holds a bounded
number of requests (and bytes) in flight; past that it stops reading, and gRPC's flow
control pushes back on the client.

Also served: ``grpc.health.v1.Health`` and server reflection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from service import __version__
from service.api import v2
from service.api.binary import (
    DATATYPES,
    UNSUPPORTED,
    InferRequest,
    OutputTensor,
    RequestedOutput,
    Tensor,
    TensorError,
)
from service.api.common import owner_for_key, presented_key
from service.engine import Engine
from service.errors import ServeError

log = logging.getLogger("service.grpc")
access = logging.getLogger("service.access")

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_PREFIX = f"/{SERVICE}/"
_STREAM_REQUESTS = 512
"""Requests one stream may have in flight (running or answered but not yet sent)."""
_STREAM_BYTES_FACTOR = 4
"""... and at most this many times ``max_body_bytes`` of request messages."""

_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_INT64_MAX = 2**63 - 1

# -- errors: the one mapping of the ServeError hierarchy to gRPC status codes ---------------

_BY_CODE = {
    "session_conflict": grpc.StatusCode.ABORTED,
    "seq_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "model_changed": grpc.StatusCode.FAILED_PRECONDITION,  # retrying cannot help: re-create
}
_BY_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(gRPC status, message, our stable error code) for any failure of a call."""
    if isinstance(exc, ServeError):
        fallback = grpc.StatusCode.INVALID_ARGUMENT if exc.status < 500 else grpc.StatusCode.INTERNAL
        code = _BY_CODE.get(exc.code) or _BY_STATUS.get(exc.status, fallback)
        if code is grpc.StatusCode.INTERNAL:
            log.error("gRPC request failed: %s", exc.message)
        return code, exc.message, exc.code
    if isinstance(exc, TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid_input"
    log.error("unhandled error in a gRPC request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error", "internal_error"


# -- messages <-> the protocol-neutral request ---------------------------------------------


def _parameters(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            out[key] = getattr(value, choice)
    return out


def _set_parameters(target: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if value > _INT64_MAX:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = str(value)


def _input(tensor: Any, raw: bytes | None) -> Tensor:
    where = f"input {tensor.name!r}"
    if not tensor.name:
        raise TensorError("every input needs a name")
    datatype = tensor.datatype
    if datatype in UNSUPPORTED:
        raise TensorError(f"{where}: datatype {datatype} is not supported by this server")
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"{where}: unknown datatype {datatype!r}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{where}: shape {list(shape)} has a negative dimension")
    params = _parameters(tensor.parameters)
    if any(k.startswith("shared_memory_") for k in params):
        raise TensorError(f"{where}: the shared-memory extensions are not supported")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise TensorError(
                f"{where}: {len(raw)} bytes of raw_input_contents != {count} {datatype} "
                f"elements of shape {list(shape)} ({count * dtype.itemsize} bytes)"
            )
        array = np.frombuffer(raw, dtype)
    else:
        field = _CONTENTS.get(datatype)
        if field is None:
            raise TensorError(f"{where}: {datatype} has no typed contents; send it raw")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise TensorError(
                f"{where}: {len(values)} values in contents.{field} but shape "
                f"{list(shape)} needs {count}"
            )
        array = np.asarray(values)
        if datatype != "BOOL" and dtype.kind in "iu" and array.size:
            info = np.iinfo(dtype)
            if array.min() < info.min or array.max() > info.max:
                raise TensorError(f"{where}: contents hold values out of range for {datatype}")
        array = array.astype(dtype, copy=False)
    return Tensor(tensor.name, datatype, shape, array.reshape(shape), params)


def infer_request(message: Any) -> InferRequest:
    """A ``ModelInferRequest`` as the protocol-neutral request (typed or raw contents)."""
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise TensorError(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: give one per "
            "input, or none and typed contents"
        )
    if not message.inputs:
        raise TensorError("inputs must hold at least one tensor")
    inputs: list[Tensor] = []
    seen: set[str] = set()
    for k, tensor in enumerate(message.inputs):
        if tensor.name in seen:
            raise TensorError(f"input {tensor.name!r} is given twice")
        seen.add(tensor.name)
        inputs.append(_input(tensor, raw[k] if raw else None))
    outputs = None
    if message.outputs:
        outputs = [
            RequestedOutput(out.name, None, _parameters(out.parameters)) for out in message.outputs
        ]
    return InferRequest(message.id or None, _parameters(message.parameters), inputs, outputs)


def _raw(out: OutputTensor) -> bytes:
    if out.datatype == "BYTES":
        parts = []
        for item in np.asarray(out.array, dtype=object).ravel():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(data)))
            parts.append(data)
        return b"".join(parts)
    array = out.array
    dtype = DATATYPES[out.datatype]
    if array.dtype != dtype or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype)
    return array.tobytes()


def infer_response(head: dict[str, Any], outputs: list[OutputTensor]) -> Any:
    """The answer as a ``ModelInferResponse``; outputs always in ``raw_output_contents``
    (as Triton does, and what tritonclient's ``as_numpy`` reads)."""
    response = service_pb2.ModelInferResponse(
        model_name=head["model_name"], model_version=head["model_version"], id=head.get("id") or ""
    )
    _set_parameters(response.parameters, head.get("parameters") or {})
    for out in outputs:
        response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.array.shape))
        response.raw_output_contents.append(_raw(out))
    return response


def _version(text: str) -> int | None:
    return v2._version(text or None)


def _sequence_key(message: Any) -> tuple[str, Any] | None:
    """What orders a stream's requests: (model, sequence id), or None outside a sequence."""
    param = message.parameters.get("sequence_id")
    if param is None:
        return None
    choice = param.WhichOneof("parameter_choice")
    value = getattr(param, choice) if choice is not None else None
    if value in (None, 0, "", False):
        return None
    # int64 and uint64 spell the same id (one session): order them as one
    return message.model_name, value if isinstance(value, (int, str)) else repr(value)


# -- the servicer ------------------------------------------------------------------------

_T = TypeVar("_T")


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        """Metric children by (method, model label, status): bounded, as every part is."""

    # -- what every call shares: the key, one metric and log line, errors --------------

    def _owner(self, context: grpc.aio.ServicerContext) -> str | None:
        if not self.settings.api_keys:
            return None
        return owner_for_key(
            self.settings, presented_key(dict(context.invocation_metadata() or ()))
        )

    def _model_label(self, name: str) -> str:
        return name if name in self.engine.repository.names() else "unknown"

    def _record(
        self, method: str, model: str, code: grpc.StatusCode, started: float, request_id: str
    ) -> None:
        elapsed = time.perf_counter() - started
        route = _PREFIX + method
        counted = self._children.get((method, model, code))
        if counted is None:  # labels() costs a lock and a lookup: once per combination
            metrics = self.engine.metrics
            counted = self._children[(method, model, code)] = (
                metrics.requests.labels(route, model, code.name),
                metrics.latency.labels(route, model),
            )
        counted[0].inc()
        counted[1].observe(elapsed)
        if access.isEnabledFor(logging.INFO):
            access.info(
                "request",
                extra={
                    "request_id": request_id or secrets.token_hex(8),
                    "method": "gRPC",
                    "route": route,
                    "model": model if model not in ("", "unknown") else None,
                    "status": code.name,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        model: str,
        work: Callable[[str | None], Awaitable[_T]],
        *,
        secured: bool = True,
        request_id: str = "",
    ) -> _T:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            who = self._owner(context) if secured else None
            return await work(who)
        except Exception as exc:
            code, message, error_code = status_of(exc)
            await context.abort(code, message, (("rnnserve-error-code", error_code),))
            raise  # unreachable: abort raises
        finally:
            self._record(
                method, self._model_label(model) if model else "", code, started, request_id
            )

    # -- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request, context):
        async def work(_):
            return service_pb2.ServerLiveResponse(live=True)

        return await self._call(context, "ServerLive", "", work, secured=False)

    async def ServerReady(self, request, context):
        async def work(_):
            return service_pb2.ServerReadyResponse(ready=self.engine.ready)

        return await self._call(context, "ServerReady", "", work, secured=False)

    async def ModelReady(self, request, context):
        async def work(_):
            number = _version(request.version)
            try:
                self.engine.model(request.name, number)
            except ServeError:
                return service_pb2.ModelReadyResponse(ready=False)
            return service_pb2.ModelReadyResponse(ready=True)

        return await self._call(context, "ModelReady", request.name, work, secured=False)

    async def ServerMetadata(self, request, context):
        async def work(_):
            return service_pb2.ServerMetadataResponse(
                name=v2.SERVER_NAME,
                version=__version__,
                extensions=[e for e in v2.EXTENSIONS if e != "binary_tensor_data"],
            )

        return await self._call(context, "ServerMetadata", "", work)

    async def ModelMetadata(self, request, context):
        async def work(_):
            described = v2._model_metadata(self.engine, request.name, _version(request.version))
            return json_format.ParseDict(
                described, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True
            )

        return await self._call(context, "ModelMetadata", request.name, work)

    async def ModelConfig(self, request, context):
        async def work(_):
            config = v2._model_config(self.engine, request.name, _version(request.version))
            parsed = json_format.ParseDict(
                config, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
            )
            return service_pb2.ModelConfigResponse(config=parsed)

        return await self._call(context, "ModelConfig", request.name, work)

    # -- inference ---------------------------------------------------------------------

    async def _infer(self, message: Any, who: str | None) -> Any:
        parsed = infer_request(message)
        version = _version(message.model_version)
        head, outputs = await v2.run_infer(self.engine, message.model_name, version, parsed, who)
        return infer_response(head, outputs)

    async def ModelInfer(self, request, context):
        return await self._call(
            context,
            "ModelInfer",
            request.model_name,
            lambda who: self._infer(request, who),
            request_id=request.id,
        )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        try:
            who = self._owner(context)
        except Exception as exc:  # noqa: BLE001
            code, message, error_code = status_of(exc)
            self._record("ModelStreamInfer", "", code, time.perf_counter(), "")
            await context.abort(code, message, (("rnnserve-error-code", error_code),))
            return
        stream = _Stream(self, who, self.settings.max_body_bytes * _STREAM_BYTES_FACTOR)
        async for response in stream.run(request_iterator):
            yield response

    async def answer(self, message: Any, who: str | None) -> Any:
        """One stream request's answer: a response, or the error as ``error_message``."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            response = await self._infer(message, who)
            final = message.parameters.get("triton_enable_empty_final_response")
            if final is not None and final.bool_param:
                # Every answer here is the request's only one: say so, as Triton does.
                response.parameters["triton_final_response"].bool_param = True
            return service_pb2.ModelStreamInferResponse(infer_response=response)
        except Exception as exc:  # noqa: BLE001 - one request's failure, not the stream's
            code, text, _ = status_of(exc)
            return service_pb2.ModelStreamInferResponse(error_message=text)
        finally:
            self._record(
                "ModelStreamInfer", self._model_label(message.model_name), code, started, message.id
            )


def _unimplemented(name: str) -> Callable[..., Awaitable[None]]:
    async def method(self: InferenceServicer, request: Any, context: Any) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"{name} is not served by rnnserve (see docs/v2.md)"
        )

    return method


# Statistics, repository, shared memory, trace and log settings: see docs/v2.md for why.
for _method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in InferenceServicer.__dict__:
        setattr(InferenceServicer, _method.name, _unimplemented(_method.name))


class _Stream:
    """One ``ModelStreamInfer`` call: reads requests, runs them, hands answers back in order
    per sequence, with bounded requests and bytes in flight."""

    def __init__(self, servicer: InferenceServicer, who: str | None, byte_budget: int) -> None:
        self.servicer = servicer
        self.who = who
        self.answers: asyncio.Queue[tuple[Any, int] | None] = asyncio.Queue()
        self.last: dict[tuple[str, Any], asyncio.Future] = {}
        self.tasks: set[asyncio.Task] = set()
        self.slots = asyncio.Semaphore(_STREAM_REQUESTS)
        self.byte_budget = byte_budget
        self.bytes = 0
        self.room = asyncio.Event()
        self.room.set()

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self.answers.get()
                if item is None:
                    break
                response, size = item
                yield response
                self._release(size)
            await reader  # re-raise what ended the reading (a broken stream)
        finally:
            reader.cancel()
            for task in list(self.tasks):
                task.cancel()

    def _release(self, size: int) -> None:
        self.slots.release()
        self.bytes -= size
        self.room.set()

    async def _admit(self, reserve: int) -> None:
        """Wait until ``reserve`` more bytes fit in the budget (or nothing is held: a
        request larger than the budget still runs, alone)."""
        while self.bytes and self.bytes + reserve > self.byte_budget:
            self.room.clear()
            await self.room.wait()
        self.bytes += reserve

    def _estimate(self, message: Any) -> int:
        """An upper bound of the answer's bytes, from the request alone: its sequences'
        steps x the model's output size, as float32 (0 when the model is unknown: the
        answer is then a short error)."""
        try:
            card = self.servicer.engine.model(message.model_name, _version(message.model_version)).card
        except Exception:  # noqa: BLE001 - a bad request is answered with its error
            return 0
        if card is None:
            return 0
        for tensor in message.inputs:
            if tensor.name == card.inputs.sequence and len(tensor.shape) >= 2:
                return 4 * card.output_size * max(0, tensor.shape[0]) * max(0, tensor.shape[1])
        return 0

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in requests:
                await self.slots.acquire()
                # The request's bytes and its answer's, which it holds until the client
                # reads it: a client that sends and never reads stops being read.
                size = message.ByteSize()
                reserved = size + self._estimate(message)
                await self._admit(reserved)
                key = _sequence_key(message)
                previous = self.last.get(key) if key is not None else None
                done = loop.create_future()
                if key is not None:
                    self.last[key] = done
                task = asyncio.create_task(self._one(message, size, reserved, key, previous, done))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            if self.tasks:
                await asyncio.gather(*list(self.tasks))
        finally:
            self.answers.put_nowait(None)

    async def _one(
        self,
        message: Any,
        size: int,
        reserved: int,
        key: tuple[str, Any] | None,
        previous: asyncio.Future | None,
        done: asyncio.Future,
    ) -> None:
        try:
            if previous is not None:
                await previous
            response = await self.servicer.answer(message, self.who)
            # The answer's own size replaces its estimate until it is sent.
            answered = response.ByteSize()
            self.bytes += size + answered - reserved
            self.answers.put_nowait((response, size + answered))  # queued before the next one may run
        finally:
            if not done.done():
                done.set_result(None)
            if key is not None and self.last.get(key) is done:
                del self.last[key]


# -- the server -----------------------------------------------------------------------------


class GrpcServer:
    """A ``grpc.aio`` server on the engine, started and stopped by the app's lifespan."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        limit = engine.settings.max_body_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
                ("grpc.so_reuseport", 0),
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(engine), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise OSError(
                f"gRPC cannot listen on {address} (in use?): set RNNSERVE_GRPC_PORT to a free "
                "port, or to 0 to serve HTTP only"
            )
        self.address = address

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
