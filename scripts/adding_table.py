"""Why gating matters: accuracy on the adding problem per cell and sequence length.

    python scripts/adding_table.py                    # ~2-3 minutes on 2 CPU cores
    python scripts/adding_table.py --lengths 10 50 --json adding.json

Every run uses the same data, seed and budget (no early stopping: gated cells sit on a
plateau at the trivial "predict 1.0" solution before they find the markers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import TaskOptions, adding_task
from training.train import TrainConfig, model_for_task, seed_everything, task_metrics, train


def run_one(cell: str, length: int, args: argparse.Namespace) -> dict:
    task = adding_task(TaskOptions(samples=args.samples, seq_len=length, seed=args.seed))
    seed_everything(args.seed)
    model = model_for_task(task, cell, args.hidden, 1)
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        patience=args.epochs,
        seed=args.seed,
    )
    start = time.perf_counter()
    train(model, task, cfg)
    seconds = time.perf_counter() - start
    metrics = task_metrics(model, task)
    return {
        "cell": cell,
        "length": length,
        "accuracy": metrics["accuracy"],
        "val_mse": metrics["val_mse"],
        "seconds": round(seconds, 1),
    }


def markdown(rows: list[dict], cells: list[str], lengths: list[int]) -> str:
    cell_of = {(r["cell"], r["length"]): r for r in rows}
    head = "| cell | " + " | ".join(f"T={n}" for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for cell in cells:
        values = [cell_of[(cell, n)] for n in lengths]
        lines.append(
            f"| {cell} | "
            + " | ".join(f"{v['accuracy']:.3f} ({v['seconds']:.0f} s)" for v in values)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", default=["rnn_tanh", "lstm", "gru"])
    p.add_argument("--lengths", nargs="+", type=int, default=[10, 50, 100])
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for length in args.lengths:
        for cell in args.cells:
            rows.append(run_one(cell, length, args))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\naccuracy (|prediction - target| < 0.04) on {args.samples // 5} validation sequences,"
        f" {args.epochs} epochs of {args.samples - args.samples // 5} sequences, hidden {args.hidden}:\n"
    )
    print(markdown(rows, args.cells, args.lengths))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
