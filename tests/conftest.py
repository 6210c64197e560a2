"""Shared fixtures: tiny exported models, in-process apps, real server processes, and an
independent onnxruntime reference that uses none of the service's code."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

# Servers and apps made by tests serve gRPC only where a test asks for a port: suites run
# side by side on one host, and Triton's default 8001 would collide.
os.environ.setdefault("RNNSERVE_GRPC_PORT", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS = REPO_ROOT / "models"
BIN = Path(sys.executable).parent


def _build_repo(root: Path) -> Path:
    import torch

    from training.export import export_model
    from training.model import RecurrentModel

    torch.manual_seed(1234)
    export_model(RecurrentModel("lstm", 3, 16, 2, num_layers=2), root, "tiny-lstm")
    export_model(
        RecurrentModel("gru", 7, 12, 7, output_activation="softmax"),
        root,
        "tiny-gru",
        vocabulary=list("BTPSXVE"),
        generation={"mode": "symbol", "start_symbol": "B", "end_symbol": "E"},
    )
    export_model(
        RecurrentModel("rnn_tanh", 1, 8, 1, num_layers=2), root, "tiny-rnn", generation={"mode": "value"}
    )
    export_model(RecurrentModel("rnn_relu", 2, 8, 3, output_activation="sigmoid"), root, "tiny-relu")
    _strip_lengths(root / "tiny-lstm" / "1", root / "nolengths-lstm" / "1", "nolengths-lstm")
    return root


def _strip_lengths(source: Path, target: Path, name: str) -> None:
    """A copy of a model without the lengths input: what another exporter might give us."""
    import json

    target.mkdir(parents=True)
    proto = onnx.load(source / "model.onnx")
    kept = [i for i in proto.graph.input if i.name != "lengths"]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for node in proto.graph.node:
        for k, value in enumerate(node.input):
            if value == "lengths":
                node.input[k] = ""
    onnx.save(proto, target / "model.onnx")
    card = json.loads((source / "card.json").read_text())
    card.update(name=name, version=1)
    card["inputs"].pop("lengths")
    card.pop("sha256", None)
    (target / "card.json").write_text(json.dumps(card))


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_repo(tmp_path_factory.mktemp("repo"))


TOKEN_VOCABULARY = list("^abcdefgh$")


def _build_token_repo(root: Path) -> Path:
    """Token-input models exported by hand, as a user's exporter might:
    ``tiny-chars`` (Embedding -> GRU(8) -> LSTM(6) -> softmax over a 10-symbol vocabulary,
    mixed layers, symbol generation) and ``tiny-items`` (Embedding -> GRU -> softmax over
    50 unnamed items). Both take int64 ids [batch, time] and a ``lengths`` input."""
    import io
    import json
    import warnings

    import torch
    from onnx import TensorProto, helper

    class Chars(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 5)
            self.gru = torch.nn.GRU(5, 8, batch_first=True)
            self.lstm = torch.nn.LSTM(8, 6, batch_first=True)
            self.head = torch.nn.Linear(6, 10)

        def forward(self, x, h0, h1, c1):
            a, ha = self.gru(self.embed(x), h0)
            b, (hb, cb) = self.lstm(a, (h1, c1))
            return torch.softmax(self.head(b), -1), ha, hb, cb

    class Items(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(50, 4)
            self.gru = torch.nn.GRU(4, 8, batch_first=True)
            self.head = torch.nn.Linear(8, 50)

        def forward(self, x, h0):
            a, h = self.gru(self.embed(x), h0)
            return torch.softmax(self.head(a), -1), h

    def export(module, name: str, states: list[tuple[str, str, int]], card: dict) -> None:
        folder = root / name / "1"
        folder.mkdir(parents=True)
        example = [torch.zeros(1, 2, size) for _, _, size in states]
        axes = {"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}}
        for inp, out, _ in states:
            axes[inp], axes[out] = {1: "batch"}, {1: "batch"}
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                (torch.zeros(2, 3, dtype=torch.long), *example),
                buffer,
                input_names=["x", *(i for i, _, _ in states)],
                output_names=["y", *(o for _, o, _ in states)],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        proto = onnx.load_from_string(buffer.getvalue())
        proto.graph.input.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]))
        for node in proto.graph.node:
            if node.op_type in ("GRU", "LSTM", "RNN"):
                node.input.extend([""] * max(0, 5 - len(node.input)))
                node.input[4] = "lengths"
        onnx.checker.check_model(proto)
        onnx.save(proto, folder / "model.onnx")
        card.update(
            name=name,
            version=1,
            output_activation="softmax",
            inputs={"sequence": "x", "lengths": "lengths", "kind": "tokens"},
            outputs={"sequence": "y"},
            states=[
                {"input": i, "output": o, "shape": [1, None, size], "batch_axis": 1}
                for i, o, size in states
            ],
            parity_max_abs_diff=0.0,
        )
        (folder / "card.json").write_text(json.dumps(card))

    torch.manual_seed(4321)
    export(
        Chars(),
        "tiny-chars",
        [("h0", "hn", 8), ("h1", "h1n", 6), ("c1", "c1n", 6)],
        {
            "cell": "mixed",
            "layers": [{"cell": "gru", "hidden_size": 8}, {"cell": "lstm", "hidden_size": 6}],
            "num_layers": 2,
            "hidden_size": 8,
            "input_size": 10,
            "output_size": 10,
            "vocabulary": TOKEN_VOCABULARY,
            "generation": {"mode": "symbol", "start_symbol": "^", "end_symbol": "$"},
        },
    )
    export(
        Items(),
        "tiny-items",
        [("h0", "hn", 8)],
        {"cell": "gru", "num_layers": 1, "hidden_size": 8, "input_size": 50, "output_size": 50},
    )
    return root


@pytest.fixture(scope="session")
def token_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_token_repo(tmp_path_factory.mktemp("tokens"))


@pytest.fixture
def repo_copy(model_repo: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny model repository."""
    target = tmp_path / "repo"
    shutil.copytree(model_repo, target)
    return target


class Reference:
    """Runs an exported model straight through onnxruntime, one sequence at a time."""

    def __init__(self, folder: Path) -> None:
        import json

        self.folder = folder
        self.card = json.loads((folder / "card.json").read_text())
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.names = {i.name for i in self.session.get_inputs()}

    def zero_states(self) -> dict[str, np.ndarray]:
        return {
            s["input"]: np.zeros([1 if d is None else d for d in s["shape"]], np.float32)
            for s in self.card["states"]
        }

    def run(self, x: np.ndarray, states: dict[str, np.ndarray] | None = None):
        """y [T, out] and the final states for one sequence x [T, in]."""
        feed = dict(states or self.zero_states())
        feed["x"] = np.asarray(x, np.float32)[None]
        if "lengths" in self.names:
            feed["lengths"] = np.array([len(x)], np.int32)
        outputs = self.session.run(None, feed)
        out_names = [o.name for o in self.session.get_outputs()]
        result = dict(zip(out_names, outputs))
        finals = {s["input"]: result[s["output"]] for s in self.card["states"]}
        return result["y"][0], finals


@pytest.fixture(scope="session")
def reference(model_repo: Path) -> Callable[[str], Reference]:
    cache: dict[str, Reference] = {}

    def get(name: str, version: int = 1) -> Reference:
        key = f"{name}/{version}"
        if key not in cache:
            cache[key] = Reference(model_repo / name / str(version))
        return cache[key]

    return get


@pytest.fixture
def make_client():
    """``async with make_client(**settings) as client``: a real app behind httpx, lifespan run."""
    from service.app import create_app
    from service.config import Settings

    @contextlib.asynccontextmanager
    async def factory(**overrides) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(Settings(**overrides))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client

    return factory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log = log

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(
    repo: Path,
    log_dir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    port: int | None = None,
) -> ServerProcess:
    """A real ``rnn-serve`` process on ``port`` (default: a free one), returned once /readyz
    answers 200."""
    port = port or free_port()
    log = log_dir / f"server-{port}-{time.monotonic_ns()}.log"
    # ``python -m service.cli`` from this checkout (not the installed console script), so a
    # test always runs the server code beside it, whichever checkout installed the venv.
    full_env = {
        **os.environ,
        "RNNSERVE_LOG_LEVEL": "warning",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "--model-repo", str(repo), "--host", "127.0.0.1", "--port", str(port)],
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rnn-serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"rnn-serve not ready in {timeout} s: {log.read_text()[-2000:]}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def factory(repo: Path, **env: str) -> ServerProcess:
        server = start_server(repo, tmp_path, {k.upper(): str(v) for k, v in env.items()})
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory, model_repo: Path) -> ServerProcess:
    """One real server on the tiny models, in-memory sessions."""
    return server_factory(model_repo)


REDIS_PORT = int(os.environ.get("RNNSERVE_TEST_REDIS_PORT", "6379"))
"""The shared test Redis; set RNNSERVE_TEST_REDIS_PORT to run suites side by side."""
REDIS_URL_BASE = f"redis://127.0.0.1:{REDIS_PORT}"


def redis_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.5):
            return True
    except OSError:
        return False


def require_redis() -> None:
    """Skip the test when the test Redis is not reachable; on CI, fail it instead."""
    if not redis_available():
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at 127.0.0.1:{REDIS_PORT} on CI")
        pytest.skip(f"Redis is not reachable at 127.0.0.1:{REDIS_PORT}")


@pytest.fixture
def redis_db() -> Callable[[int], str]:
    """``redis_db(n)`` -> a URL for db n, flushed before and after. Never skips on CI."""
    import redis

    used: list[int] = []

    def get(db: int) -> str:
        require_redis()
        redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=db).flushdb()
        used.append(db)
        return f"{REDIS_URL_BASE}/{db}"

    yield get
    for db in used:
        redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=db).flushdb()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real local Redis Cluster of 3 primaries, started once for the whole run."""
    from benchmarks.redis_servers import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster) -> str:
    """The cluster's ``redis-cluster://`` URL, every node flushed before the test."""
    redis_cluster.flush()
    return redis_cluster.url
