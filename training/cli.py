"""``rnn-train``: train a recurrent model on a built-in task or your own data, export to ONNX.

    rnn-train --task reber --cell gru --hidden 32 --epochs 30 --out models --name reber-gru
    torchrun --nproc_per_node=2 -m training.cli --task sine --cell lstm ...   # data-parallel

Writes ``OUT/NAME/<version>/`` with ``model.onnx``, ``card.json``, ``history.json`` and
``training.png``; the version is one more than the highest already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from training.data import TASKS, Task, TaskOptions, build_task
from training.distributed import DistContext, barrier, destroy_distributed, init_distributed
from training.model import CELLS
from training.plots import plot_history
from training.train import (
    TrainConfig,
    TrainResult,
    fold_normalisation,
    model_for_task,
    seed_everything,
    task_metrics,
    train,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnn-train", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--cell", choices=CELLS, default="lstm")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.0, help="between stacked layers")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--patience", type=int, default=5, help="epochs without improvement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, help="training sequences (csv/text: at most)")
    p.add_argument("--seq-len", type=int, help="sequence length (reber: max string length)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--csv", type=Path, help="csv task: a CSV file with a header row")
    p.add_argument("--features", help="csv task: comma-separated input columns")
    p.add_argument("--target", help="csv task: the column to forecast one step ahead")
    p.add_argument("--text", type=Path, help="text task: a UTF-8 text file")
    p.add_argument("--out", type=Path, default=Path("models"), help="model repository")
    p.add_argument("--name", help="model name (default TASK-CELL)")
    p.add_argument("--threads", type=int, help="torch intra-op threads per process")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: only on a terminal)",
    )
    return p


def task_options(args: argparse.Namespace) -> TaskOptions:
    return TaskOptions(
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        val_fraction=args.val_fraction,
        csv_path=args.csv,
        features=args.features.split(",") if args.features else None,
        target=args.target,
        text_path=args.text,
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clip=args.clip,
        patience=args.patience,
        seed=args.seed,
        progress=args.progress,
    )


def card_extra(task: Task, cfg: TrainConfig, ctx: DistContext) -> dict:
    extra = dict(task.extra)
    extra["training"] = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("progress", "eval_batch_size")},
        "train_sequences": len(task.train),
        "val_sequences": len(task.val),
        "world_size": ctx.world_size,
    }
    if task.normalisation is not None:
        extra["normalisation"] = {**task.normalisation.to_dict(), "baked_into_weights": True}
    return extra


def export_run(
    model: torch.nn.Module,
    task: Task,
    result: TrainResult,
    args: argparse.Namespace,
    cfg: TrainConfig,
    ctx: DistContext,
) -> Path:
    from training.export import export_model

    metrics = task_metrics(model, task, seed=args.seed)
    metrics.update(
        train_seconds=round(result.seconds, 2),
        epochs_run=len(result.history),
        best_epoch=result.best_epoch,
    )
    if task.normalisation is not None:
        fold_normalisation(model, task.normalisation)
    out = export_model(
        model,
        args.out,
        args.name or f"{task.name}-{model.cell}",
        task=task.name,
        vocabulary=task.vocabulary,
        generation=task.generation,
        metrics=metrics,
        extra=card_extra(task, cfg, ctx),
    )
    (out / "history.json").write_text(json.dumps(result.history, indent=1) + "\n")
    plot_history(result.history, out / "training.png", title=f"{out.parent.name} v{out.name}")
    return out


def run(argv: list[str] | None = None) -> Path | None:
    """Train and export; returns the version directory (None on ranks other than 0)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed()
    try:
        seed_everything(args.seed)
        task = build_task(args.task, task_options(args))
        model = model_for_task(task, args.cell, args.hidden, args.layers, args.dropout)
        cfg = train_config(args)
        result = train(model, task, cfg, ctx)
        out = export_run(model, task, result, args, cfg, ctx) if ctx.is_main else None
        barrier(ctx)
        return out
    finally:
        destroy_distributed(ctx)


def main(argv: list[str] | None = None) -> int:
    out = run(argv)
    if out is not None:
        card = json.loads((out / "card.json").read_text())
        print(json.dumps({"model_dir": str(out), "metrics": card["metrics"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
