"""The training loop: Adam, gradient-norm clipping, early stopping on a validation split.

Runs single-process or data-parallel under ``torchrun`` (see ``training.distributed``):
each rank trains on its shard, DDP averages gradients, and every rank evaluates the whole
validation split so all ranks take the same early-stopping decision.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset
from tqdm import tqdm

from training import reber
from training.data import Normalisation, Split, Task
from training.distributed import DistContext, mean_across_ranks
from training.generate import TorchStepper, sample_symbols
from training.model import RecurrentModel

ADDING_TOLERANCE = 0.04
GENERATED_STRINGS = 200


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    clip: float = 1.0
    patience: int = 5
    seed: int = 0
    eval_batch_size: int = 512
    progress: bool | None = None  # None: show the bar only when stderr is a terminal


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_for_task(
    task: Task, cell: str, hidden: int, layers: int, dropout: float = 0.0
) -> RecurrentModel:
    return RecurrentModel(
        cell,  # type: ignore[arg-type]
        input_size=task.input_size,
        hidden_size=hidden,
        output_size=task.output_size,
        num_layers=layers,
        dropout=dropout,
        output_activation=task.output_activation,
    )


def _dataset(split: Split) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(split.x), torch.from_numpy(split.y), torch.from_numpy(split.mask)
    )


def inputs(task: Task, x: torch.Tensor) -> torch.Tensor:
    return F.one_hot(x, task.one_hot).float() if task.one_hot else x


def masked_loss(
    task: Task, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    if task.loss == "cross_entropy":
        return F.cross_entropy(logits[mask], y[mask])
    return ((logits - y) ** 2).mean(dim=-1)[mask].mean()


def _batches(split: Split, size: int):
    for start in range(0, len(split), size):
        yield (
            torch.from_numpy(split.x[start : start + size]),
            torch.from_numpy(split.y[start : start + size]),
            torch.from_numpy(split.mask[start : start + size]),
        )


@torch.no_grad()
def predict_split(
    model: RecurrentModel, task: Task, split: Split, batch_size: int = 512
) -> np.ndarray:
    """Pre-activation outputs [N, T, O] for a whole split."""
    model.eval()
    out = [model(inputs(task, x))[0] for x, _, _ in _batches(split, batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def evaluate_loss(model: RecurrentModel, task: Task, split: Split, batch_size: int = 512) -> float:
    """The loss averaged over every masked step of the split."""
    model.eval()
    total, count = 0.0, 0
    for x, y, mask in _batches(split, batch_size):
        n = int(mask.sum())
        total += float(masked_loss(task, model(inputs(task, x))[0], y, mask)) * n
        count += n
    return total / max(count, 1)


def train(
    model: RecurrentModel, task: Task, cfg: TrainConfig, ctx: DistContext | None = None
) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch."""
    ctx = ctx or DistContext()
    seed_everything(cfg.seed)
    dataset = _dataset(task.train)
    if ctx.enabled:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.seed)
        net: torch.nn.Module = DistributedDataParallel(model)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
        net = model
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = tqdm(
        range(1, cfg.epochs + 1),
        desc=f"{task.name}/{model.cell}",
        disable=not show or not ctx.is_main,
    )

    result = TrainResult()
    best_state = copy.deepcopy(model.state_dict())
    waited = 0
    start = time.perf_counter()
    for epoch in bar:
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        train_loss = _train_epoch(net, task, loader, optimiser, cfg.clip)
        train_loss = mean_across_ranks(ctx, train_loss)
        val_loss = mean_across_ranks(ctx, evaluate_loss(model, task, task.val, cfg.eval_batch_size))
        result.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
            waited = 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def _train_epoch(
    net: torch.nn.Module,
    task: Task,
    loader: DataLoader,
    optimiser: torch.optim.Optimizer,
    clip: float,
) -> float:
    net.train()
    total, batches = 0.0, 0
    for x, y, mask in loader:
        optimiser.zero_grad(set_to_none=True)
        logits, _ = net(inputs(task, x))
        loss = masked_loss(task, logits, y, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimiser.step()
        total += loss.item()
        batches += 1
    return total / max(batches, 1)


# --- metrics a user can read -------------------------------------------------------------


def task_metrics(model: RecurrentModel, task: Task, seed: int = 0) -> dict:
    """Validation metrics for ``task`` (the csv ones in the target's own units)."""
    metrics: dict = {}
    val = task.val
    if task.loss == "mse":
        pred = predict_split(model, task, val)
        err = ((pred - val.y) ** 2).mean(axis=-1)[val.mask]
        targets = val.y[..., 0][val.mask]
        scale = task.normalisation.target_std**2 if task.normalisation else 1.0
        metrics["val_mse"] = float(err.mean()) * scale
        metrics["target_variance"] = float(targets.var()) * scale
        metrics["val_r2"] = 1.0 - float(err.mean()) / max(float(targets.var()), 1e-12)
    else:
        metrics["val_cross_entropy"] = evaluate_loss(model, task, val)
    if task.name == "sine":
        # Persistence ("tomorrow equals today") is the forecast any model must beat.
        metrics["persistence_mse"] = float(((val.x - val.y) ** 2)[val.mask].mean())
    elif task.name == "adding":
        pred = predict_split(model, task, val)[:, -1, 0]
        metrics["accuracy"] = float((np.abs(pred - val.y[:, -1, 0]) < ADDING_TOLERANCE).mean())
        metrics["accuracy_tolerance"] = ADDING_TOLERANCE
    elif task.name == "reber":
        metrics["generated_valid_fraction"] = generated_valid_fraction(model, task, seed=seed)
    elif task.name == "text":
        logits = predict_split(model, task, val)
        metrics["val_bits_per_char"] = metrics["val_cross_entropy"] / math.log(2)
        metrics["val_accuracy"] = float((logits.argmax(-1) == val.y)[val.mask].mean())
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def generated_valid_fraction(
    model: RecurrentModel, task: Task, n: int = GENERATED_STRINGS, seed: int = 0
) -> float:
    """Sample ``n`` strings from the model and return the fraction the grammar accepts."""
    strings = sample_symbols(
        TorchStepper(model),
        task.vocabulary or list(reber.SYMBOLS),
        n,
        np.random.default_rng(seed),
        prompt="B",
        start_symbol="B",
        end_symbol="E",
        max_length=100,
    )
    return sum(map(reber.accepts, strings)) / n


@torch.no_grad()
def fold_normalisation(model: RecurrentModel, norm: Normalisation) -> None:
    """Bake input standardisation and target de-standardisation into the weights.

    With z = (x - mean) / std, the first layer's ``W z + b`` equals
    ``(W / std) x + (b - W (mean / std))``; the identity head's ``s (V h + c) + m`` equals
    ``(s V) h + (s c + m)``. The exported model then takes and returns raw units.
    """
    mean = torch.as_tensor(norm.feature_mean, dtype=torch.float32)
    std = torch.as_tensor(norm.feature_std, dtype=torch.float32)
    w, b = model.rnn.weight_ih_l0, model.rnn.bias_ih_l0
    b -= w @ (mean / std)
    w /= std
    model.head.weight *= norm.target_std
    model.head.bias *= norm.target_std
    model.head.bias += norm.target_mean
