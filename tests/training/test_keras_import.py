"""Keras 3 models (torch backend) built here, saved as .keras and imported through
``rnn-export keras``: the graph's answers equal Keras's own ``predict`` to 1e-5, whole,
chunked and served; unsupported layers are refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.card import ModelCard
from training.export_cli import main as rnn_export
from training.keras_import import load_keras

TOL = 1e-5
REPO_ROOT = Path(__file__).resolve().parents[2]
keras = load_keras()
L = keras.layers


def _seq(input_shape, *layers, dtype="float32"):
    return keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers])


def _functional(input_shape, *layers):
    inp = keras.Input(input_shape)
    out = inp
    for layer in layers:
        out = layer(out)
    return keras.Model(inp, out)


def _builders():
    return {
        "k-simple-tanh": lambda: _functional(
            (None, 3), L.SimpleRNN(5, return_sequences=True), L.TimeDistributed(L.Dense(2))
        ),
        "k-simple-relu": lambda: _seq(
            (None, 2),
            L.SimpleRNN(6, activation="relu", return_sequences=True),
            L.Dense(1, activation="sigmoid"),
        ),
        "k-lstm-stack": lambda: _seq(
            (None, 3),
            L.LSTM(7, return_sequences=True),
            L.Dropout(0.3),
            L.LSTM(4, return_sequences=True),
            L.Dense(3),
        ),
        "k-gru-reset-before": lambda: _seq(
            (None, 3), L.GRU(6, reset_after=False, return_sequences=True), L.Dense(2)
        ),
        "k-gru-nobias": lambda: _seq((None, 3), L.GRU(5, use_bias=False, return_sequences=True)),
        "k-mixed": lambda: _seq(
            (None, 4),
            L.SimpleRNN(3, return_sequences=True),
            L.LSTM(8, return_sequences=True),
            L.GRU(5, reset_after=False, return_sequences=True),
            L.GRU(6, return_sequences=True),
            L.TimeDistributed(L.Dense(3, activation="softmax")),
        ),
        "k-embedding": lambda: _seq(
            (None,),
            L.Embedding(17, 5),
            L.LSTM(9, return_sequences=True),
            L.Dense(17, activation="softmax"),
            dtype="int32",
        ),
        "k-many-to-one": lambda: _seq(
            (12, 3), L.GRU(6, return_sequences=True), L.LSTM(5), L.Dense(1)
        ),
    }


KINDS = sorted(_builders())
CELLS = {
    "k-simple-tanh": "rnn_tanh",
    "k-simple-relu": "rnn_relu",
    "k-lstm-stack": "lstm",
    "k-gru-reset-before": "gru",
    "k-gru-nobias": "gru",
    "k-mixed": "mixed",
    "k-embedding": "lstm",
    "k-many-to-one": "mixed",
}


def _randomise(model, seed: int) -> None:
    """Random weights everywhere (Keras initialises biases to 0/1, which would hide a bias mix-up)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights:
            layer.set_weights([rng.normal(0, 0.6, w.shape).astype(np.float32) for w in weights])


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):
    """Every kind saved as .keras and imported with the CLI, reloaded by Keras for reference."""
    work = tmp_path_factory.mktemp("keras")
    repo = work / "repo"
    vocab = work / "vocab.txt"
    vocab.write_text("\n".join(f"w{i}" for i in range(17)) + "\n")
    models = {}
    for k, (name, build) in enumerate(_builders().items()):
        keras.utils.set_random_seed(k)
        model = build()
        _randomise(model, k)
        path = work / f"{name}.keras"
        model.save(path)
        extra = ["--vocabulary", str(vocab)] if name == "k-embedding" else []
        assert rnn_export(["keras", str(path), "--out", str(repo), "--name", name, *extra]) == 0
        models[name] = keras.saving.load_model(path, compile=False)
    return repo, models


def _x(card: ModelCard, rng: np.random.Generator, batch: int, steps: int) -> np.ndarray:
    if card.token_inputs:
        return rng.integers(0, card.input_size, (batch, steps)).astype(np.int64)
    return rng.standard_normal((batch, steps, card.input_size)).astype(np.float32)


def _ort(folder: Path, x: np.ndarray, chunks: list[int]) -> np.ndarray:
    card = ModelCard.read(folder / "card.json")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    states = [
        np.zeros([len(x) if d is None else d for d in s.shape], np.float32) for s in card.states
    ]
    pieces, start = [], 0
    for size in chunks:
        feed = {"x": x[:, start : start + size], "lengths": np.full(len(x), size, np.int32)}
        feed.update({s.input: v for s, v in zip(card.states, states)})
        y, *states = session.run(["y", *(s.output for s in card.states)], feed)
        pieces.append(y)
        start += size
    return np.concatenate(pieces, axis=1)


@pytest.mark.parametrize("name", KINDS)
def test_whole_and_chunked_equal_keras_predict(imported, name):
    repo, models = imported
    folder = repo / name / "1"
    card = ModelCard.read(folder / "card.json")
    assert card.cell == CELLS[name] and card.parity_max_abs_diff <= TOL
    steps = 12
    x = _x(card, np.random.default_rng(5), 3, steps)
    expected = models[name].predict(x, verbose=0)
    for chunks in ([steps], [1, 4, 7], [5, 1, 1, 5]):
        y = _ort(folder, x, chunks)
        got = y if card.return_sequences else y[:, -1]
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= TOL, (name, chunks)


def test_cards_record_layers_units_and_kinds(imported):
    repo, _ = imported
    mixed = ModelCard.read(repo / "k-mixed" / "1" / "card.json")
    assert [(layer.cell, layer.hidden_size) for layer in mixed.layers] == [
        ("rnn_tanh", 3),
        ("lstm", 8),
        ("gru", 5),
        ("gru", 6),
    ]
    assert [s.shape for s in mixed.states] == [
        [1, None, 3],
        [1, None, 8],
        [1, None, 8],
        [1, None, 5],
        [1, None, 6],
    ]
    assert (mixed.num_layers, mixed.hidden_size, mixed.output_activation) == (4, 8, "softmax")
    embedding = ModelCard.read(repo / "k-embedding" / "1" / "card.json")
    assert embedding.inputs.kind == "tokens" and embedding.input_size == 17
    assert embedding.vocabulary == [f"w{i}" for i in range(17)]
    many = ModelCard.read(repo / "k-many-to-one" / "1" / "card.json")
    assert many.return_sequences is False and many.output_size == 1
    assert ModelCard.read(repo / "k-gru-nobias" / "1" / "card.json").output_activation == "identity"
    assert "keras" in many.library_versions


@pytest.mark.parametrize("name", ["k-mixed", "k-gru-reset-before", "k-simple-relu"])
async def test_served_session_equals_keras(make_client, imported, name):
    repo, models = imported
    card = ModelCard.read(repo / name / "1" / "card.json")
    x = _x(card, np.random.default_rng(9), 1, 20)
    expected = models[name].predict(x, verbose=0)[0]
    outputs = []
    async with make_client(model_repo=repo) as client:
        sid = (await client.post(f"/v1/models/{name}/sessions")).json()["session_id"]
        for a, b in [(0, 3), (3, 4), (4, 20)]:
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x[0, a:b].tolist()})
            assert r.status_code == 200, r.text
            outputs.extend(r.json()["outputs"])
    assert np.max(np.abs(np.asarray(outputs) - expected)) <= TOL


async def test_served_embedding_model_top_k_equals_keras_top_k(make_client, imported):
    """Symbols in (the card's vocabulary), top-k out: Keras's own ranking and scores."""
    repo, models = imported
    vocabulary = [f"w{i}" for i in range(17)]
    ids = np.random.default_rng(8).integers(0, 17, 15)
    expected = models["k-embedding"].predict(ids[None], verbose=0)[0]
    order = np.argsort(-expected, axis=-1, kind="stable")[:, :4]
    answers = []
    async with make_client(model_repo=repo) as client:
        sid = (await client.post("/v1/models/k-embedding/sessions")).json()["session_id"]
        for a, b in [(0, 1), (1, 6), (6, 15)]:
            chunk = [vocabulary[i] for i in ids[a:b]]
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk, "top_k": 4})
            assert r.status_code == 200, r.text
            answers.extend(r.json()["top_k"])
        r = await client.post("/v1/models/k-embedding/predict", json={"inputs": [ids.tolist()]})
        assert np.max(np.abs(np.asarray(r.json()["outputs"][0]) - expected)) <= TOL
    for step, row in enumerate(answers):
        assert [c["index"] for c in row] == order[step].tolist()
        assert [c["label"] for c in row] == [vocabulary[i] for i in order[step]]
        assert (
            np.max(np.abs(np.array([c["score"] for c in row]) - expected[step, order[step]])) <= TOL
        )


async def test_served_many_to_one_equals_keras(make_client, imported):
    repo, models = imported
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (12, 5, 1)]
    async with make_client(model_repo=repo) as client:
        r = await client.post(
            "/v1/models/k-many-to-one/predict",
            json={"inputs": [x.tolist() for x in xs], "return_sequences": False},
        )
    assert r.status_code == 200, r.text
    for x, out in zip(xs, r.json()["outputs"]):
        free = keras.Sequential([keras.Input((None, 3)), *models["k-many-to-one"].layers])
        expected = free.predict(x[None], verbose=0)[0]
        assert np.max(np.abs(np.asarray(out) - expected)) <= TOL
    # at its declared length the Keras model itself answers the same
    assert (
        np.max(
            np.abs(
                np.asarray(r.json()["outputs"][0])
                - models["k-many-to-one"].predict(xs[0][None], verbose=0)[0]
            )
        )
        <= TOL
    )


def _refusals():
    inp = keras.Input((None, 3))
    a, b = L.GRU(4, return_sequences=True)(inp), L.LSTM(4, return_sequences=True)(inp)
    branched = keras.Model(inp, L.Add()([a, b]))
    return {
        "masking": (_seq((None, 3), L.Masking(), L.GRU(4)), "masking"),
        "bidirectional": (_seq((None, 3), L.Bidirectional(L.LSTM(4))), "bidirectional"),
        "stateful": (
            keras.Sequential([keras.Input((None, 3), batch_size=1), L.GRU(4, stateful=True)]),
            "stateful",
        ),
        "backwards": (_seq((None, 3), L.LSTM(4, go_backwards=True)), "go_backwards"),
        "sigmoid-rnn": (
            _seq((None, 3), L.SimpleRNN(4, activation="sigmoid")),
            "activation 'sigmoid'",
        ),
        "relu-lstm": (_seq((None, 3), L.LSTM(4, activation="relu")), "activation 'relu'"),
        "hard-sigmoid-gru": (
            _seq((None, 3), L.GRU(4, recurrent_activation="hard_sigmoid")),
            "recurrent_activation",
        ),
        "relu-head": (
            _seq((None, 3), L.GRU(4, return_sequences=True), L.Dense(2, activation="relu")),
            "activation 'relu'",
        ),
        "masked-embedding": (
            _seq((None,), L.Embedding(9, 3, mask_zero=True), L.GRU(4), dtype="int32"),
            "mask_zero",
        ),
        "conv": (_seq((None, 3), L.Conv1D(4, 2), L.GRU(4)), "not one of"),
        "branched": (branched, "linear chain"),
        "no-recurrent": (_seq((None, 3), L.Dense(2)), "Dense layers must follow"),
    }


def test_unsupported_models_are_refused_by_name(tmp_path, capsys):
    for name, (model, reason) in _refusals().items():
        path = tmp_path / f"{name}.keras"
        model.save(path)
        assert (
            rnn_export(["keras", str(path), "--out", str(tmp_path / "repo"), "--name", name]) == 2
        )
        err = capsys.readouterr().err
        assert reason in err, (name, err)
        assert "layer" in err or name in ("branched",), (name, err)
    assert not (tmp_path / "repo").exists()


def test_console_entry_point_runs_without_tensorflow(tmp_path):
    """``python -m training.export_cli`` in a fresh process, with KERAS_BACKEND unset."""
    keras.utils.set_random_seed(0)
    model = _seq((None, 2), L.GRU(3, return_sequences=True), L.Dense(2))
    path = tmp_path / "m.keras"
    model.save(path)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    code = (
        "import sys, training.export_cli as c; r = c.main(sys.argv[1:]); "
        "assert 'tensorflow' not in sys.modules; sys.exit(r)"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "keras",
            str(path),
            "--out",
            str(tmp_path / "repo"),
            "--name",
            "m",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["model_dir"].endswith("m/1")


def test_a_graph_that_disagrees_with_keras_is_not_written(tmp_path, monkeypatch, capsys):
    import training.keras_import as ki

    real = ki.build_graph

    def off_by_a_bit(plan):
        plan.recurrent[0].R = plan.recurrent[0].R * 1.001  # a recurrent weight slightly off
        return real(plan)

    monkeypatch.setattr(ki, "build_graph", off_by_a_bit)
    keras.utils.set_random_seed(1)
    model = _seq((None, 3), L.LSTM(4, return_sequences=True), L.Dense(2))
    _randomise(model, 1)
    path = tmp_path / "m.keras"
    model.save(path)
    assert rnn_export(["keras", str(path), "--out", str(tmp_path / "repo"), "--name", "m"]) == 2
    assert "max abs diff" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "m" / "1").exists()


def test_fixed_batch_input_and_unreadable_files(tmp_path, capsys):
    """A batch size fixed at Input is not a limit of the import; a broken file is refused."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((None, 3), batch_size=2), L.GRU(4, return_sequences=True)])
    _randomise(model, 2)
    path = tmp_path / "fixed.keras"
    model.save(path)
    assert rnn_export(["keras", str(path), "--out", str(tmp_path / "repo"), "--name", "f"]) == 0
    card = ModelCard.read(tmp_path / "repo" / "f" / "1" / "card.json")
    x = np.random.default_rng(0).standard_normal((2, 9, 3)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    assert np.max(np.abs(_ort(tmp_path / "repo" / "f" / "1", x, [4, 5]) - expected)) <= TOL
    assert card.parity_max_abs_diff <= TOL
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip file")
    assert rnn_export(["keras", str(broken), "--out", str(tmp_path / "repo"), "--name", "b"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_a_subclassed_model_is_refused_by_name(tmp_path):
    """A subclassed keras.Model has no graph to read (no ``inputs``): it was an
    AttributeError, which the CLI does not turn into its exit status 2."""
    from training.keras_import import UnsupportedKerasModel, import_keras

    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.gru = L.GRU(4, return_sequences=True)

        def call(self, x):
            return self.gru(x)

    model = Sub()
    model(np.zeros((1, 5, 3), np.float32))
    with pytest.raises(UnsupportedKerasModel, match="subclassed"):
        import_keras(model, tmp_path, "sub")
    assert not any(tmp_path.iterdir())
