"""Bytes per WebSocket step for a large-vocabulary token model: ``top_k`` against full outputs.

The model is the demo session-recommendation GRU when ``models/`` has a token model with at
least 1,000 classes, else a synthetic 5,000-item GRU built here (random weights: payload
sizes do not depend on them). One session per mode sends one item id per message and
measures what crosses the socket each way, and the round trip.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.loadgen import ROOT, ServerProcess

SYNTHETIC = "bench-items"


def build_items_model(folder: Path, classes: int = 5000, embed: int = 32, hidden: int = 64) -> None:
    """Embedding -> GRU -> softmax over ``classes`` items, int64 ids [batch, time], lengths."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Gather", ["embedding", "x"], ["e"]),
        helper.make_node("Transpose", ["e"], ["e_t"], perm=[1, 0, 2]),
        helper.make_node(
            "GRU",
            ["e_t", "W", "R", "B", "lengths", "h0"],
            ["Y", "hn"],
            hidden_size=hidden,
            linear_before_reset=1,
        ),
        helper.make_node("Squeeze", ["Y", "one"], ["Y_s"]),
        helper.make_node("Transpose", ["Y_s"], ["Y_b"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["Y_b", "W_out"], ["logits_w"]),
        helper.make_node("Add", ["logits_w", "b_out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "items",
        [
            helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", hidden]),
            helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", classes]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, "batch", hidden]),
        ],
        [
            weight("embedding", classes, embed),
            weight("W", 1, 3 * hidden, embed),
            weight("R", 1, 3 * hidden, hidden),
            weight("B", 1, 6 * hidden),
            weight("W_out", hidden, classes),
            weight("b_out", classes),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    card = {
        "name": folder.parent.name,
        "version": int(folder.name),
        "cell": "gru",
        "num_layers": 1,
        "hidden_size": hidden,
        "input_size": classes,
        "output_size": classes,
        "output_activation": "softmax",
        "inputs": {"sequence": "x", "lengths": "lengths", "kind": "tokens"},
        "outputs": {"sequence": "y"},
        "states": [{"input": "h0", "output": "hn", "shape": [1, None, hidden], "batch_axis": 1}],
        "parity_max_abs_diff": 0.0,
        "task": "synthetic items (benchmark only)",
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2))


def _demo_items_model() -> Path | None:
    """The newest version of a demo token model with at least 1,000 classes, if any."""
    for card_path in sorted((ROOT / "models").glob("*/*/card.json")):
        card = json.loads(card_path.read_text())
        if card.get("inputs", {}).get("kind") == "tokens" and card.get("output_size", 0) >= 1000:
            return card_path.parent
    return None


def _measure(ws_url: str, model: str, classes: int, mode: str, k: int, steps: int) -> dict[str, Any]:
    from websockets.sync.client import connect

    from service.frames import decode_response, decode_top_k_response, encode_request

    ids = np.random.default_rng(1).integers(0, classes, steps)
    sent = received = 0
    times: list[float] = []
    with connect(f"{ws_url}/v1/models/{model}/stream", open_timeout=30, max_size=None) as ws:
        json.loads(ws.recv(timeout=30))
        for t, item in enumerate(ids.tolist(), start=1):
            top = k if mode.endswith("top_k") else None
            if mode.startswith("binary"):
                message: str | bytes = encode_request(np.array([item]), seq=t, top_k=top)
            else:
                body: dict[str, Any] = {"inputs": [item], "seq": t}
                if top is not None:
                    body["top_k"] = top
                message = json.dumps(body)
            started = time.perf_counter()
            ws.send(message)
            answer = ws.recv(timeout=30)
            times.append(time.perf_counter() - started)
            sent += len(message) if isinstance(message, bytes) else len(message.encode())
            received += len(answer) if isinstance(answer, bytes) else len(answer.encode())
            if isinstance(answer, str):
                decoded = json.loads(answer)
                assert "error" not in decoded, decoded
                assert len(decoded["top_k" if top else "outputs"][0]) == (top or classes)
            elif top is not None:
                assert decode_top_k_response(answer)[0].shape == (1, top)
            else:
                assert decode_response(answer)[0].shape == (1, classes)
    return {
        "bytes_in_per_step": sent / steps,
        "bytes_out_per_step": received / steps,
        "p50_ms": statistics.median(times) * 1000,
    }


def top_k_payload(root: Path, *, log_dir: Path, k: int = 20, steps: int = 200) -> dict[str, Any]:
    """Bytes per WebSocket step (each way) and round trip, JSON and binary, top_k vs full."""
    from service.frames import encode_request

    repo = root / "payload-repo"
    demo = _demo_items_model()
    if demo is not None:
        model = demo.parent.name
        shutil.copytree(demo, repo / model / demo.name)
    else:
        model = SYNTHETIC
        build_items_model(repo / model / "1")
    card = json.loads(next((repo / model).glob("*/card.json")).read_text())
    classes = card["output_size"]
    modes = ["json-full", "json-top_k", "binary-full", "binary-top_k"]
    with ServerProcess(repo, log_dir=log_dir) as server:
        ws_url = server.url.replace("http://", "ws://")
        _measure(ws_url, model, classes, "json-full", k, 5)  # warm-up
        measured = {mode: _measure(ws_url, model, classes, mode, k, steps) for mode in modes}
    one_hot = np.zeros((1, classes), np.float32)
    one_hot[0, 0] = 1.0
    return {
        "model": model,
        "source": "demo" if demo is not None else "synthetic",
        "classes": classes,
        "k": k,
        "steps": steps,
        "modes": measured,
        "one_hot_request_bytes": {
            "json": len(json.dumps({"inputs": one_hot.tolist(), "seq": steps})),
            "binary": len(encode_request(one_hot, seq=steps)),
        },
    }


def render(payload: dict[str, Any]) -> list[str]:
    modes = payload["modes"]
    lines = [
        (
            f"WebSocket bytes per step, {payload['model']} ({payload['source']}, "
            f"{payload['classes']:,} classes), one id per message, {payload['steps']} steps"
        ),
        f"  {'mode':<14} {'in B/step':>10} {'out B/step':>11} {'p50 ms':>8}",
    ]
    for mode, r in modes.items():
        name = mode.replace("top_k", f"top_k {payload['k']}")
        lines.append(
            f"  {name:<14} {r['bytes_in_per_step']:>10,.0f} {r['bytes_out_per_step']:>11,.0f} "
            f"{r['p50_ms']:>8.2f}"
        )
    for frames in ("json", "binary"):
        full, top = modes[f"{frames}-full"], modes[f"{frames}-top_k"]
        lines.append(
            f"  {frames}: full / top_k {payload['k']} = "
            f"{full['bytes_out_per_step'] / top['bytes_out_per_step']:.0f}x fewer bytes out"
        )
    one_hot = payload["one_hot_request_bytes"]
    lines.append(
        f"  (the same step as a one-hot vector would send {one_hot['json']:,} B as JSON, "
        f"{one_hot['binary']:,} B as a binary frame)"
    )
    return lines
