"""The next-character demo model: "predict what someone will type", trained on Python.

The corpus is a fixed list of the installed Python's standard-library sources (present on
every machine with Python, nothing downloaded), read in that order; each file's last tenth
is held out. Same Python version, same seed: same model. The card records which files,
the Python version, and the held-out top-1 / top-5 accuracy and perplexity next to those of
the unigram (most frequent characters) baseline.
"""

from __future__ import annotations

import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.module_export import export_module

#: Standard-library files present in every supported Python (3.11, 3.12).
CORPUS_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py",
    "heapq.py", "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
    "pprint.py", "random.py", "shutil.py", "statistics.py", "string.py", "textwrap.py",
    "typing.py",
)  # fmt: skip
#: Newline and printable ASCII; tabs become four spaces, anything else is dropped.
VOCABULARY: tuple[str, ...] = ("\n", *(chr(c) for c in range(32, 127)))
HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class CharConfig:
    embedding: int = 48
    hidden: int = 128
    steps: int = 1000
    batch: int = 64
    seq_len: int = 100
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0


class CharModel(nn.Module):
    """Embedding -> GRU -> linear: logits of the next character at every step."""

    def __init__(self, vocab: int, embedding: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        seq, state = self.gru(self.embed(x), state)
        return self.head(seq), state


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def encode(text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(VOCABULARY)}
    text = text.replace("\t", "    ")
    return np.array([index[c] for c in text if c in index], np.int64)


def load_corpus(root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids): each file's first 90% for training, the rest held out."""
    root = root or stdlib_dir()
    train, held = [], []
    for name in CORPUS_FILES:
        ids = encode((root / name).read_text(encoding="utf-8"))
        cut = int(len(ids) * (1 - HELD_OUT_FRACTION))
        train.append(ids[:cut])
        held.append(ids[cut:])
    return np.concatenate(train), np.concatenate(held)


def evaluate(model: CharModel, ids: np.ndarray, streams: int = 16, chunk: int = 256) -> dict:
    """Top-1 / top-5 accuracy and perplexity of next-character prediction over ``ids``, read
    as ``streams`` contiguous pieces carried in chunks (the state flows across chunks)."""
    per = (len(ids) - 1) // streams
    x = torch.from_numpy(ids[: per * streams].reshape(streams, per))
    y = torch.from_numpy(ids[1 : per * streams + 1].reshape(streams, per))
    nll, top1, top5, count, state = 0.0, 0, 0, 0, None
    model.eval()
    with torch.no_grad():
        for start in range(0, per, chunk):
            logits, state = model(x[:, start : start + chunk], state)
            target = y[:, start : start + chunk]
            nll += float(
                nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            )
            best = logits.topk(5, dim=-1).indices
            top1 += int((best[..., 0] == target).sum())
            top5 += int((best == target[..., None]).any(-1).sum())
            count += target.numel()
    return {
        "top1_accuracy": top1 / count,
        "top5_accuracy": top5 / count,
        "perplexity": math.exp(nll / count),
    }


def unigram_baseline(train: np.ndarray, held: np.ndarray) -> dict:
    counts = np.bincount(train, minlength=len(VOCABULARY)).astype(np.float64) + 1.0
    probs = counts / counts.sum()
    order = np.argsort(-probs)
    target = held[1:]
    return {
        "top1_accuracy": float(np.isin(target, order[:1]).mean()),
        "top5_accuracy": float(np.isin(target, order[:5]).mean()),
        "perplexity": float(np.exp(-np.log(probs[target]).mean())),
    }


def train_chars(cfg: CharConfig, train_ids: np.ndarray, log=print) -> tuple[CharModel, float]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = CharModel(len(VOCABULARY), cfg.embedding, cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    data = torch.from_numpy(train_ids)
    started = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        starts = torch.from_numpy(rng.integers(0, len(train_ids) - cfg.seq_len - 1, cfg.batch))
        window = data[starts[:, None] + torch.arange(cfg.seq_len + 1)]
        logits, _ = model(window[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"chars step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)")
    return model.eval(), time.perf_counter() - started


def build(repo: Path, name: str, cfg: CharConfig = CharConfig(), log=print) -> Path:
    train_ids, held_ids = load_corpus()
    model, seconds = train_chars(cfg, train_ids, log)
    metrics = {
        "held_out": evaluate(model, held_ids),
        "unigram_baseline": unigram_baseline(train_ids, held_ids),
        "train_characters": len(train_ids),
        "held_out_characters": len(held_ids),
        "train_seconds": round(seconds, 1),
    }
    return export_module(
        model,
        repo,
        name,
        input_size=len(VOCABULARY),
        input_kind="tokens",
        activation="softmax",
        task="next-character",
        vocabulary=list(VOCABULARY),
        generation={"mode": "symbol"},
        metrics=metrics,
        corpus={
            "source": "the installed Python's standard-library sources",
            "python": sys.version.split()[0],
            "files": list(CORPUS_FILES),
            "held_out": f"the last {HELD_OUT_FRACTION:.0%} of each file",
        },
        training={k: v for k, v in cfg.__dict__.items()},
    )
