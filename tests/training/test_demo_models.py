"""The demo models in models/ (built by scripts/build_demo_models.py) meet their floors.

Each floor is checked twice: on the metric the card records, and recomputed here with
onnxruntime from model.onnx on freshly drawn data, independent of torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.card import ModelCard
from training import chars, reber, recsys
from training.data import adding_problem, sine_series
from training.generate import OnnxStepper, sample_symbols

MODELS = Path(__file__).resolve().parents[2] / "models"
DEMOS = {
    "sine-lstm": ("lstm", 2, 64),
    "reber-gru": ("gru", 1, 32),
    "adding-rnn": ("rnn_tanh", 1, 64),
}


def model_dir(name: str) -> Path:
    path = MODELS / name / "1"
    if not (path / "card.json").exists():
        pytest.fail(f"{path} missing: run python scripts/build_demo_models.py")
    return path


def run_onnx(path: Path, x: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """Whole sequences through the exported graph from zero states."""
    card = ModelCard.read(path / "card.json")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(path / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feeds = {card.inputs.sequence: x if card.token_inputs else x.astype(np.float32)}
    if card.inputs.lengths:
        feeds[card.inputs.lengths] = np.full(len(x), x.shape[1], np.int32) if lengths is None else lengths
    for s in card.states:
        feeds[s.input] = np.zeros([len(x) if d is None else d for d in s.shape], np.float32)
    return session.run([card.outputs.sequence], feeds)[0]


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_card_is_valid_and_small(name: str) -> None:
    path = model_dir(name)
    card = ModelCard.read(path / "card.json")
    assert (card.name, card.version) == (name, 1)
    assert (card.cell, card.num_layers, card.hidden_size) == DEMOS[name]
    assert (path / "model.onnx").stat().st_size < 300_000
    assert (path / "history.json").exists() and (path / "training.png").exists()
    assert card.metrics["train_seconds"] > 0


def test_reber_gru_generates_grammatical_strings() -> None:
    path = model_dir("reber-gru")
    card = ModelCard.read(path / "card.json")
    assert card.metrics["generated_valid_fraction"] >= 0.9
    assert card.vocabulary == list(reber.SYMBOLS)
    assert card.generation is not None
    strings = sample_symbols(
        OnnxStepper(path),
        card.vocabulary,
        200,
        np.random.default_rng(12345),
        prompt=card.generation.start_symbol or "B",
        start_symbol=card.generation.start_symbol,
        end_symbol=card.generation.end_symbol,
    )
    valid = sum(map(reber.accepts, strings)) / len(strings)
    assert valid >= 0.9, [s for s in strings if not reber.accepts(s)][:10]


def test_sine_lstm_forecasts_better_than_the_variance_and_persistence() -> None:
    path = model_dir("sine-lstm")
    metrics = ModelCard.read(path / "card.json").metrics
    assert metrics["val_mse"] < metrics["target_variance"]
    assert metrics["val_mse"] < metrics["persistence_mse"]
    series = sine_series(np.random.default_rng(777), 300, 51)
    x, y = series[:, :-1, None], series[:, 1:, None]
    mse = float(((run_onnx(path, x) - y) ** 2).mean())
    assert mse < 0.25 * float(y.var())
    assert mse < float(((x - y) ** 2).mean())


def test_adding_rnn_accuracy() -> None:
    path = model_dir("adding-rnn")
    card = ModelCard.read(path / "card.json")
    assert card.metrics["accuracy"] >= 0.9
    length = card.model_extra["seq_len"]
    x, target = adding_problem(np.random.default_rng(777), 1000, length)
    pred = run_onnx(path, x)[:, -1, 0]
    assert float((np.abs(pred - target) < 0.04).mean()) >= 0.85


TOKEN_DEMOS = {"python-chars": (128, 1_000_000), "session-recs": (64, 3_000_000)}


@pytest.mark.parametrize("name", sorted(TOKEN_DEMOS))
def test_token_demo_cards(name: str) -> None:
    path = model_dir(name)
    card = ModelCard.read(path / "card.json")
    hidden, max_bytes = TOKEN_DEMOS[name]
    assert (card.name, card.version, card.cell, card.hidden_size) == (name, 1, "gru", hidden)
    assert card.inputs.kind == "tokens" and card.output_activation == "softmax"
    assert card.vocabulary is not None and len(card.vocabulary) == card.input_size == card.output_size
    assert (path / "model.onnx").stat().st_size < max_bytes
    assert card.metrics["train_seconds"] > 0 and card.parity_max_abs_diff <= 1e-5


def test_python_chars_beats_the_unigram_baseline_on_held_out_text() -> None:
    path = model_dir("python-chars")
    card = ModelCard.read(path / "card.json")
    assert card.vocabulary == list(chars.VOCABULARY) and card.generation and card.generation.mode == "symbol"
    held, base = card.metrics["held_out"], card.metrics["unigram_baseline"]
    assert held["top1_accuracy"] > 1.5 * base["top1_accuracy"]
    assert held["top5_accuracy"] > base["top5_accuracy"] and held["perplexity"] < 0.5 * base["perplexity"]
    # recomputed with onnxruntime on a slice of the held-out text
    _, ids = chars.load_corpus()
    streams = ids[: 4 * 2001].reshape(4, 2001)
    probs = run_onnx(path, streams[:, :-1])
    target = streams[:, 1:]
    picked = np.take_along_axis(probs, target[..., None], -1)[..., 0]
    top1 = float((probs.argmax(-1) == target).mean())
    perplexity = float(np.exp(-np.log(picked).mean()))
    assert top1 > 1.5 * base["top1_accuracy"] and perplexity < 0.5 * base["perplexity"]
    assert abs(top1 - held["top1_accuracy"]) < 0.08


def test_session_recs_beats_most_popular_on_fresh_sessions() -> None:
    path = model_dir("session-recs")
    card = ModelCard.read(path / "card.json")
    assert card.vocabulary == recsys.item_labels(5000)
    held, popular = card.metrics["held_out"], card.metrics["most_popular_baseline"]
    assert held["recall@20"] > 2 * popular["recall@20"]
    # fresh sessions from the same world, scored with onnxruntime, against the items most
    # popular in another fresh sample
    generator = recsys.ClickGenerator(recsys.ClickWorld(), card.model_extra["click_world"]["seed"])
    counts = np.bincount([i for s in generator.sessions(3000, seed=777) for i in s], minlength=5000)
    popular_top = np.argsort(-counts)[:20]
    sessions = generator.sessions(400, seed=778)
    longest = max(map(len, sessions))
    x = np.zeros((len(sessions), longest - 1), np.int64)
    for i, s in enumerate(sessions):
        x[i, : len(s) - 1] = s[:-1]
    lengths = np.array([len(s) - 1 for s in sessions], np.int32)
    probs = run_onnx(path, x, lengths)
    hits = popular_hits = total = 0
    for i, s in enumerate(sessions):
        top = np.argpartition(-probs[i, : len(s) - 1], 20, axis=-1)[:, :20]
        for t, nxt in enumerate(s[1:]):
            hits += int(nxt in top[t])
            popular_hits += int(nxt in popular_top)
            total += 1
    assert hits / total > 2 * popular_hits / total
    assert abs(hits / total - held["recall@20"]) < 0.08


async def test_token_demos_are_served_by_default(make_client) -> None:
    """The default repository loads every demo; the char model takes characters and the
    recommender answers top-20 over 5,000 items, both equal to onnxruntime."""
    char_path, recs_path = model_dir("python-chars"), model_dir("session-recs")
    text = "def main(argv):\n    return 0\n"
    ids = np.array([chars.VOCABULARY.index(c) for c in text], np.int64)[None]
    y_chars = run_onnx(char_path, ids)[0]
    clicks = np.array([[17, 4021, 4022, 999, 3]], np.int64)
    y_recs = run_onnx(recs_path, clicks)[0]
    async with make_client(model_repo=MODELS) as client:
        health = (await client.get("/readyz")).json()
        assert health["models_failed"] == 0 and health["models_ready"] >= 5
        sid = (await client.post("/v1/models/python-chars/sessions")).json()["session_id"]
        outs = []
        for a, b in [(0, 3), (3, 4), (4, len(text))]:
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": list(text[a:b])})
            assert r.status_code == 200, r.text
            outs.extend(r.json()["outputs"])
        assert np.max(np.abs(np.asarray(outs) - y_chars)) <= 1e-5
        r = await client.post(
            "/v1/models/session-recs/predict", json={"inputs": clicks.tolist(), "top_k": 20}
        )
        assert r.status_code == 200, r.text
        top = r.json()["top_k"][0]
    order = np.argsort(-y_recs, axis=-1, kind="stable")[:, :20]
    for step, row in enumerate(top):
        assert [c["index"] for c in row] == order[step].tolist()
        assert row[0]["label"] == recsys.item_labels(5000)[order[step, 0]]
