"""The session-recommendation demo model: a GRU4Rec-style GRU over 5,000 items.

Each click is one step; the session's state is what the server keeps, so a client sends
only the new click. Trained on synthetic sessions with latent structure from
``ClickGenerator``: items belong to themes (shuffled ids, so an id says nothing of its
theme), themes are related to a few others, items within a theme have an order that
sessions tend to follow, and popularity is skewed both across themes and within each.
The card records recall@20 and MRR@20 on held-out sessions against the most-popular-items
baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.module_export import export_module


@dataclass(frozen=True)
class ClickWorld:
    items: int = 5000
    themes: int = 100
    related: int = 3
    stay: float = 0.75
    """Probability that the next click stays in the current theme."""
    mean_length: float = 8.0
    max_length: int = 30


class ClickGenerator:
    """Draws click sessions (lists of item ids) from a fixed random world."""

    def __init__(self, world: ClickWorld = ClickWorld(), seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.world = world
        per_theme = world.items // world.themes
        ids = rng.permutation(world.items)
        self.theme_items = ids.reshape(world.themes, per_theme)  # in each theme's order
        self.theme_of = np.empty(world.items, np.int64)
        self.position = np.empty(world.items, np.int64)
        for t, row in enumerate(self.theme_items):
            self.theme_of[row] = t
            self.position[row] = np.arange(per_theme)
        self.related = np.stack(
            [
                rng.choice(np.delete(np.arange(world.themes), t), world.related, replace=False)
                for t in range(world.themes)
            ]
        )
        theme_pop = 1.0 / np.arange(1, world.themes + 1) ** 0.8
        self.theme_pop = rng.permutation(theme_pop / theme_pop.sum())
        item_pop = 1.0 / np.arange(1, per_theme + 1) ** 1.1
        self.item_pop = np.stack(
            [rng.permutation(item_pop / item_pop.sum()) for _ in range(world.themes)]
        )

    def session(self, rng: np.random.Generator) -> list[int]:
        w = self.world
        length = min(w.max_length, 2 + rng.geometric(1.0 / (w.mean_length - 1)))
        theme = rng.choice(w.themes, p=self.theme_pop)
        item = self.theme_items[
            theme, rng.choice(self.theme_items.shape[1], p=self.item_pop[theme])
        ]
        clicks = [int(item)]
        per_theme = self.theme_items.shape[1]
        while len(clicks) < length:
            if rng.random() < w.stay:
                step = rng.choice([-2, -1, 1, 1, 2, 2, 3])
                pos = int(np.clip(self.position[item] + step, 0, per_theme - 1))
                item = self.theme_items[self.theme_of[item], pos]
            else:
                theme = rng.choice(self.related[self.theme_of[item]])
                item = self.theme_items[theme, rng.choice(per_theme, p=self.item_pop[theme])]
            clicks.append(int(item))
        return clicks

    def sessions(self, n: int, seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [self.session(rng) for _ in range(n)]


@dataclass(frozen=True)
class RecConfig:
    embedding: int = 32
    hidden: int = 64
    train_sessions: int = 30000
    held_out_sessions: int = 3000
    epochs: int = 6
    batch: int = 128
    lr: float = 5e-3
    clip: float = 1.0
    seed: int = 0
    world_seed: int = 0


class SessionGRU(nn.Module):
    """GRU4Rec-style: item embedding -> GRU -> scores of every item as the next click."""

    def __init__(self, items: int, embedding: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(items, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, items)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        seq, state = self.gru(self.embed(x), state)
        return self.head(seq), state


def pad(sessions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [n, longest - 1]: clicks 0..T-2 and 1..T-1; targets padded with -1."""
    longest = max(map(len, sessions))
    x = torch.zeros(len(sessions), longest - 1, dtype=torch.int64)
    y = torch.full((len(sessions), longest - 1), -1, dtype=torch.int64)
    for i, s in enumerate(sessions):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, : len(s) - 1] = torch.tensor(s[1:])
    return x, y


def recall_mrr(scores: torch.Tensor, targets: torch.Tensor, k: int = 20) -> tuple[int, float, int]:
    """(hits in the top k, summed reciprocal ranks within k, predictions) over valid targets."""
    valid = targets >= 0
    top = scores.topk(k, dim=-1).indices[valid]
    match = top == targets[valid][:, None]
    ranks = match.float().argmax(-1) + 1
    hit = match.any(-1)
    return int(hit.sum()), float((hit.float() / ranks).sum()), int(valid.sum())


def evaluate(model: SessionGRU, sessions: list[list[int]], k: int = 20) -> dict:
    hits, rr, n = 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sessions), 500):
            x, y = pad(sessions[start : start + 500])
            h, r, c = recall_mrr(model(x)[0], y, k)
            hits, rr, n = hits + h, rr + r, n + c
    return {f"recall@{k}": hits / n, f"mrr@{k}": rr / n, "predictions": n}


def popular_baseline(
    train: list[list[int]], held: list[list[int]], items: int, k: int = 20
) -> dict:
    counts = np.bincount([i for s in train for i in s], minlength=items)
    scores = torch.from_numpy(counts.astype(np.float32))
    _, y = pad(held)
    h, r, n = recall_mrr(scores.expand(*y.shape, items), y, k)
    return {f"recall@{k}": h / n, f"mrr@{k}": r / n, "predictions": n}


def train_sessions(
    cfg: RecConfig, train: list[list[int]], items: int, log=print
) -> tuple[SessionGRU, float]:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = SessionGRU(items, cfg.embedding, cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    by_length = sorted(range(len(train)), key=lambda i: len(train[i]))
    batches = [by_length[i : i + cfg.batch] for i in range(0, len(by_length), cfg.batch)]
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for b in rng.permutation(len(batches)):
            x, y = pad([train[i] for i in batches[b]])
            logits, _ = model(x)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            total += loss.item()
        log(
            f"recsys epoch {epoch} loss {total / len(batches):.3f} ({time.perf_counter() - started:.0f}s)"
        )
    return model.eval(), time.perf_counter() - started


def item_labels(items: int) -> list[str]:
    return [f"item-{i:04d}" for i in range(items)]


def build(repo: Path, name: str, cfg: RecConfig = RecConfig(), log=print) -> Path:
    world = ClickWorld()
    generator = ClickGenerator(world, cfg.world_seed)
    train = generator.sessions(cfg.train_sessions, seed=cfg.seed + 1)
    held = generator.sessions(cfg.held_out_sessions, seed=cfg.seed + 2)
    model, seconds = train_sessions(cfg, train, world.items, log)
    metrics = {
        "held_out": evaluate(model, held),
        "most_popular_baseline": popular_baseline(train, held, world.items),
        "train_sessions": len(train),
        "held_out_sessions": len(held),
        "train_seconds": round(seconds, 1),
    }
    return export_module(
        model,
        repo,
        name,
        input_size=world.items,
        input_kind="tokens",
        activation="softmax",
        task="session-recommendation",
        vocabulary=item_labels(world.items),
        metrics=metrics,
        click_world={**world.__dict__, "seed": cfg.world_seed},
        training={k: v for k, v in cfg.__dict__.items()},
    )
