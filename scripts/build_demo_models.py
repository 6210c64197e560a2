"""Build the demo models into ``models/`` with fixed seeds (a few minutes on 2 CPU cores).

    python scripts/build_demo_models.py            # or: make models

Clears the model directories under ``models/`` first, so each demo model is version 1,
then checks every model's recorded metric against its floor and fails if one misses it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from training import chars, recsys
from training.cli import run

# The rnn-train arguments of each demo model (plus --seed 0 --threads 1).
DEMOS: dict[str, str] = {
    "sine-lstm": "--task sine --cell lstm --layers 2 --hidden 64 --samples 3000 --epochs 30 "
    "--lr 3e-3 --patience 5",
    "reber-gru": "--task reber --cell gru --hidden 32 --samples 2000 --epochs 30 --lr 5e-3 "
    "--batch-size 32 --patience 10",
    "adding-rnn": "--task adding --cell rnn_tanh --hidden 64 --seq-len 10 --samples 20000 "
    "--epochs 40 --lr 2e-3 --patience 10",
}

#: Demo models built by their own module (``build(repo, name) -> version dir``), for the
#: user-module path (training/module_export.py) with token inputs.
BUILDERS = {"python-chars": chars.build, "session-recs": recsys.build}


def meets_floor(name: str, metrics: dict) -> bool:
    if name == "sine-lstm":
        return metrics["val_mse"] < min(metrics["target_variance"], metrics["persistence_mse"])
    if name == "reber-gru":
        return metrics["generated_valid_fraction"] >= 0.9
    if name == "adding-rnn":
        return metrics["accuracy"] >= 0.9
    if name == "python-chars":
        model, unigram = metrics["held_out"], metrics["unigram_baseline"]
        return model["top1_accuracy"] > 1.5 * unigram["top1_accuracy"] and model["perplexity"] < 0.5 * unigram["perplexity"]
    if name == "session-recs":
        return metrics["held_out"]["recall@20"] > 2 * metrics["most_popular_baseline"]["recall@20"]
    return True


def clear(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    for child in repo.iterdir():
        if child.is_dir():
            shutil.rmtree(child)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "models")
    p.add_argument("--only", nargs="+", choices=sorted([*DEMOS, *BUILDERS]), help="build just these")
    args = p.parse_args(argv)
    names = args.only or [*DEMOS, *BUILDERS]
    if args.only:
        for name in names:
            shutil.rmtree(args.out / name, ignore_errors=True)
    else:
        clear(args.out)
    failed = []
    for name in names:
        if name in BUILDERS:
            torch.manual_seed(0)
            torch.set_num_threads(1)
            out = BUILDERS[name](args.out, name, log=lambda line: print(line, flush=True))
        else:
            argv = [*shlex.split(DEMOS[name]), *shlex.split("--seed 0 --threads 1 --no-progress")]
            out = run([*argv, "--out", str(args.out), "--name", name])
        assert out is not None
        metrics = json.loads((out / "card.json").read_text())["metrics"]
        size = (out / "model.onnx").stat().st_size
        ok = meets_floor(name, metrics)
        print(
            f"{name}: {out.relative_to(args.out.parent)} {size / 1024:.0f} KiB "
            f"{'ok' if ok else 'BELOW FLOOR'} {json.dumps(metrics)}",
            flush=True,
        )
        if not ok:
            failed.append(name)
    if failed:
        print(f"below their floor: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
