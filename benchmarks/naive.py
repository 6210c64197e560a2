"""The naive baseline of the benchmark: the simplest server one could write for one model.

A plain Starlette app, state in a dict, one onnxruntime call per message on the event
loop, no batching, no validation beyond what json and numpy do, no auth, no metrics. It
speaks the wire format the load generators use for our server, so the same clients
drive both:

- ``POST /v1/models/{name}/sessions`` -> ``{"session_id"}`` (201)
- ``POST /v1/sessions/{id}/steps`` ``{"inputs": [[...]]}`` -> ``{"outputs", "step_count"}``
- WebSocket ``/v1/models/{name}/stream``: session info first, then one answer per message.

Run: ``NAIVE_MODEL_DIR=<repo>/<model>/1 uvicorn benchmarks.naive:create_app --factory``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import onnxruntime as ort
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


def create_app() -> Starlette:
    folder = Path(os.environ["NAIVE_MODEL_DIR"])
    card = json.loads((folder / "card.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    model = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in model.get_inputs()}
    x_name = card["inputs"]["sequence"]
    lengths = card["inputs"].get("lengths") if card["inputs"].get("lengths") in names else None
    specs = card["states"]
    outputs = [card["outputs"]["sequence"], *(s["output"] for s in specs)]
    sessions: dict[str, dict] = {}

    def new_session() -> str:
        session_id = secrets.token_urlsafe(16)
        sessions[session_id] = {
            "states": [np.zeros([1 if d is None else d for d in s["shape"]], np.float32) for s in specs],
            "steps": 0,
        }
        return session_id

    def step(session_id: str, inputs: list) -> dict:
        session = sessions[session_id]
        x = np.asarray(inputs, np.float32)[None]
        feed = {x_name: x, **{s["input"]: t for s, t in zip(specs, session["states"])}}
        if lengths is not None:
            feed[lengths] = np.array([x.shape[1]], np.int32)
        y, *states = model.run(outputs, feed)
        session["states"] = states
        session["steps"] += x.shape[1]
        return {"outputs": y[0].tolist(), "step_count": session["steps"]}

    async def create(request: Request) -> JSONResponse:
        return JSONResponse({"session_id": new_session()}, status_code=201)

    async def steps(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(step(request.path_params["session_id"], body["inputs"]))

    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        session_id = new_session()
        await websocket.send_text(json.dumps({"session_id": session_id}))
        try:
            while True:
                message = json.loads(await websocket.receive_text())
                await websocket.send_text(json.dumps(step(session_id, message["inputs"])))
        except WebSocketDisconnect:
            sessions.pop(session_id, None)

    return Starlette(
        routes=[
            Route("/v1/models/{name}/sessions", create, methods=["POST"]),
            Route("/v1/sessions/{session_id}/steps", steps, methods=["POST"]),
            WebSocketRoute("/v1/models/{name}/stream", stream),
        ]
    )
