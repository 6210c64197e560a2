"""Built-in tasks as numpy arrays: synthetic ones that need no download, and the user's files.

Every task is a :class:`Task`: train and validation :class:`Split` s plus what the model card
needs (vocabulary, generation mode). Inputs are float [N, T, I], or int symbol indices [N, T]
when ``Task.one_hot`` is set (one-hot encoded per batch, to keep text corpora small in
memory). Targets are float [N, T, O] for regression or int class indices [N, T] for
classification; ``mask`` [N, T] marks the steps that count in the loss and the metrics.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from training import reber

TaskName = Literal["sine", "adding", "reber", "csv", "text"]
TASKS: tuple[TaskName, ...] = ("sine", "adding", "reber", "csv", "text")
DEFAULT_SEQ_LEN: dict[str, int] = {"sine": 50, "adding": 50, "reber": 40, "csv": 32, "text": 64}
DEFAULT_SAMPLES: dict[str, int] = {
    "sine": 2000,
    "adding": 5000,
    "reber": 2000,
    "csv": 20000,
    "text": 4000,
}


@dataclass
class Split:
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: np.ndarray) -> Split:
        return Split(self.x[index], self.y[index], self.mask[index])


@dataclass
class Normalisation:
    """Per-column mean/std of the training rows (for the csv task)."""

    features: list[str]
    target: str
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float
    target_std: float

    def to_dict(self) -> dict:
        return {
            "features": {
                name: {"mean": float(m), "std": float(s)}
                for name, m, s in zip(self.features, self.feature_mean, self.feature_std)
            },
            "target": {
                self.target: {"mean": float(self.target_mean), "std": float(self.target_std)}
            },
        }


@dataclass
class Task:
    name: str
    input_size: int
    output_size: int
    output_activation: Literal["identity", "softmax", "sigmoid"]
    loss: Literal["mse", "cross_entropy"]
    train: Split
    val: Split
    one_hot: int | None = None
    vocabulary: list[str] | None = None
    generation: dict | None = None
    normalisation: Normalisation | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TaskOptions:
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    csv_path: Path | None = None
    features: list[str] | None = None
    target: str | None = None
    text_path: Path | None = None


def _n_val(samples: int, val_fraction: float) -> int:
    return max(1, round(samples * val_fraction))


def _split(x: np.ndarray, y: np.ndarray, mask: np.ndarray, n_val: int) -> tuple[Split, Split]:
    train = Split(x[:-n_val], y[:-n_val], mask[:-n_val])
    return train, Split(x[-n_val:], y[-n_val:], mask[-n_val:])


# --- sine -------------------------------------------------------------------------------


def sine_series(rng: np.random.Generator, n: int, length: int, noise: float = 0.05) -> np.ndarray:
    """[n, length] sums of three sines with random frequency, amplitude and phase, plus noise.

    Like a sensor signal with a few periodic components: forecastable from its recent past.
    """
    t = np.arange(length, dtype=np.float64)
    freq = rng.uniform(0.01, 0.1, size=(n, 3, 1))
    amp = rng.uniform(0.2, 0.6, size=(n, 3, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3, 1))
    clean = (amp * np.sin(2 * np.pi * freq * t + phase)).sum(axis=1)
    return (clean + rng.normal(0, noise, size=clean.shape)).astype(np.float32)


def sine_task(opts: TaskOptions) -> Task:
    samples = opts.samples or DEFAULT_SAMPLES["sine"]
    seq_len = opts.seq_len or DEFAULT_SEQ_LEN["sine"]
    series = sine_series(np.random.default_rng(opts.seed), samples, seq_len + 1)
    x, y = series[:, :-1, None], series[:, 1:, None]
    mask = np.ones(y.shape[:2], dtype=bool)
    train, val = _split(x, y, mask, _n_val(samples, opts.val_fraction))
    return Task(
        name="sine",
        input_size=1,
        output_size=1,
        output_activation="identity",
        loss="mse",
        train=train,
        val=val,
        generation={"mode": "value"},
        extra={"description": "next-value forecasting of noisy multi-frequency sines"},
    )


# --- adding -----------------------------------------------------------------------------


def adding_problem(rng: np.random.Generator, n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [n, length, 2] (value in [0, 1], marker) and targets [n] (sum of the marked).

    One marker falls in each half of the sequence, so the first marked value must be held
    for at least ``length / 2`` steps.
    """
    values = rng.uniform(0, 1, size=(n, length)).astype(np.float32)
    half = max(1, length // 2)
    first = rng.integers(0, half, size=n)
    second = rng.integers(half, length, size=n)
    markers = np.zeros((n, length), dtype=np.float32)
    rows = np.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=-1), targets


def adding_task(opts: TaskOptions) -> Task:
    samples = opts.samples or DEFAULT_SAMPLES["adding"]
    seq_len = opts.seq_len or DEFAULT_SEQ_LEN["adding"]
    x, targets = adding_problem(np.random.default_rng(opts.seed), samples, seq_len)
    y = np.zeros((samples, seq_len, 1), dtype=np.float32)
    y[:, -1, 0] = targets
    mask = np.zeros((samples, seq_len), dtype=bool)
    mask[:, -1] = True  # many-to-one: only the last output is read
    train, val = _split(x, y, mask, _n_val(samples, opts.val_fraction))
    return Task(
        name="adding",
        input_size=2,
        output_size=1,
        output_activation="identity",
        loss="mse",
        train=train,
        val=val,
        extra={"description": "adding problem: sum of the two marked values", "seq_len": seq_len},
    )


# --- reber ------------------------------------------------------------------------------


def encode_strings(
    strings: list[str], vocabulary: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-symbol pairs: inputs [N, T] and targets [N, T] as indices, mask [N, T].

    Strings are right-padded; padding never influences earlier steps of a causal model.
    """
    index = {s: i for i, s in enumerate(vocabulary)}
    width = max(len(s) for s in strings) - 1
    x = np.zeros((len(strings), width), dtype=np.int64)
    y = np.zeros((len(strings), width), dtype=np.int64)
    mask = np.zeros((len(strings), width), dtype=bool)
    for row, s in enumerate(strings):
        codes = [index[c] for c in s]
        n = len(codes) - 1
        x[row, :n] = codes[:-1]
        y[row, :n] = codes[1:]
        mask[row, :n] = True
    return x, y, mask


def reber_task(opts: TaskOptions) -> Task:
    samples = opts.samples or DEFAULT_SAMPLES["reber"]
    max_length = opts.seq_len or DEFAULT_SEQ_LEN["reber"]
    rng = np.random.default_rng(opts.seed)
    strings = [reber.embedded_reber_string(rng, max_length) for _ in range(samples)]
    vocabulary = list(reber.SYMBOLS)
    x, y, mask = encode_strings(strings, vocabulary)
    train, val = _split(x, y, mask, _n_val(samples, opts.val_fraction))
    return Task(
        name="reber",
        input_size=len(vocabulary),
        output_size=len(vocabulary),
        output_activation="softmax",
        loss="cross_entropy",
        train=train,
        val=val,
        one_hot=len(vocabulary),
        vocabulary=vocabulary,
        generation={"mode": "symbol", "start_symbol": "B", "end_symbol": "E", "stop": "balanced"},
        extra={
            "description": "embedded Reber grammar next-symbol prediction",
            "max_length": max_length,
        },
    )


# --- csv --------------------------------------------------------------------------------


def read_csv_columns(path: Path, columns: list[str]) -> np.ndarray:
    """[rows, len(columns)] float64 from a CSV file with a header row."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing}; header is {reader.fieldnames}")
        rows = [[float(row[c]) for c in columns] for row in reader]
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(columns))


def _windows(
    features: np.ndarray, target: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every window (stride 1): inputs rows t..t+T-1, targets the next step's target."""
    n = len(features) - seq_len
    if n < 1:
        raise ValueError(f"need more than seq_len={seq_len} rows, got {len(features)}")
    idx = np.arange(seq_len)[None, :] + np.arange(n)[:, None]
    return features[idx].astype(np.float32), target[idx + 1, None].astype(np.float32)


def _cap(split: Split, limit: int, rng: np.random.Generator) -> Split:
    if len(split) <= limit:
        return split
    return split.subset(np.sort(rng.choice(len(split), size=limit, replace=False)))


def csv_task(opts: TaskOptions) -> Task:
    if opts.csv_path is None or not opts.features or not opts.target:
        raise ValueError("the csv task needs --csv PATH --features a,b --target c")
    seq_len = opts.seq_len or DEFAULT_SEQ_LEN["csv"]
    table = read_csv_columns(Path(opts.csv_path), [*opts.features, opts.target])
    features, target = table[:, :-1], table[:, -1]
    # Chronological split: validation is the future, never interleaved with training rows.
    cut = int(len(table) * (1 - opts.val_fraction))
    mean, std = features[:cut].mean(axis=0), features[:cut].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    t_mean, t_std = float(target[:cut].mean()), float(target[:cut].std() or 1.0)
    features = (features - mean) / std
    target = (target - t_mean) / t_std
    x_train, y_train = _windows(features[:cut], target[:cut], seq_len)
    x_val, y_val = _windows(features[cut:], target[cut:], seq_len)
    rng = np.random.default_rng(opts.seed)
    train = Split(x_train, y_train, np.ones(y_train.shape[:2], bool))
    train = _cap(train, opts.samples or DEFAULT_SAMPLES["csv"], rng)
    val = Split(x_val, y_val, np.ones(y_val.shape[:2], bool))
    norm = Normalisation(list(opts.features), opts.target, mean, std, t_mean, t_std)
    return Task(
        name="csv",
        input_size=len(opts.features),
        output_size=1,
        output_activation="identity",
        loss="mse",
        train=train,
        val=val,
        normalisation=norm,
        extra={"source": Path(opts.csv_path).name, "seq_len": seq_len},
    )


# --- text -------------------------------------------------------------------------------


def text_task(opts: TaskOptions) -> Task:
    if opts.text_path is None:
        raise ValueError("the text task needs --text PATH")
    seq_len = opts.seq_len or DEFAULT_SEQ_LEN["text"]
    text = Path(opts.text_path).read_text(encoding="utf-8")
    vocabulary = sorted(set(text))
    index = {c: i for i, c in enumerate(vocabulary)}
    codes = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    cut = int(len(codes) * (1 - opts.val_fraction))
    rng = np.random.default_rng(opts.seed)
    train = _cap(_char_windows(codes[:cut], seq_len), opts.samples or DEFAULT_SAMPLES["text"], rng)
    val = _cap(_char_windows(codes[cut:], seq_len), max(1, len(train) // 4), rng)
    return Task(
        name="text",
        input_size=len(vocabulary),
        output_size=len(vocabulary),
        output_activation="softmax",
        loss="cross_entropy",
        train=train,
        val=val,
        one_hot=len(vocabulary),
        vocabulary=vocabulary,
        generation={"mode": "symbol"},
        extra={"source": Path(opts.text_path).name, "characters": len(text)},
    )


def _char_windows(codes: np.ndarray, seq_len: int) -> Split:
    stride = max(1, seq_len // 2)
    if len(codes) < seq_len + 1:
        raise ValueError(f"text part of {len(codes)} characters is shorter than seq_len+1")
    starts = np.arange(0, len(codes) - seq_len, stride)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = codes[idx]
    return Split(windows[:, :-1], windows[:, 1:], np.ones((len(starts), seq_len), bool))


BUILDERS = {
    "sine": sine_task,
    "adding": adding_task,
    "reber": reber_task,
    "csv": csv_task,
    "text": text_task,
}


def build_task(name: str, opts: TaskOptions) -> Task:
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
    return BUILDERS[name](opts)
