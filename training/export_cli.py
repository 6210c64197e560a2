"""``rnn-export``: bring a model trained elsewhere into a model repository.

    rnn-export keras MODEL.keras --out models --name my-model [--vocabulary symbols.txt]

Writes ``OUT/NAME/<version>/`` with ``model.onnx`` and ``card.json`` after checking the
graph against Keras's own ``predict`` to 1e-5; prints ``{"model_dir": ...}``. A model with
an unsupported layer is refused (exit status 2) with the layer and the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.export import ParityError


def _lines(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    return path.read_text(encoding="utf-8").splitlines()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnn-export", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    k = sub.add_parser("keras", help="a Keras 3 .keras file (run on the torch backend)")
    k.add_argument("model", type=Path, help="the .keras file")
    k.add_argument("--out", type=Path, default=Path("models"), help="model repository")
    k.add_argument("--name", required=True, help="model name in the repository")
    k.add_argument("--task", help="free-text task recorded in the card")
    k.add_argument("--vocabulary", type=Path, help="a file naming the input ids, one symbol a line")
    k.add_argument("--labels", type=Path, help="a file naming the output classes, one a line")
    k.add_argument(
        "--generation",
        choices=("symbol", "value"),
        help="let the server feed outputs back as inputs (symbol needs --vocabulary)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training.keras_import import UnsupportedKerasModel, import_keras

    fields: dict = {}
    if args.task:
        fields["task"] = args.task
    if args.vocabulary:
        fields["vocabulary"] = _lines(args.vocabulary)
    if args.labels:
        fields["labels"] = _lines(args.labels)
    if args.generation:
        fields["generation"] = {"mode": args.generation}
    try:
        out = import_keras(args.model, args.out, args.name, **fields)
    except (UnsupportedKerasModel, ParityError) as exc:
        print(f"rnn-export: {args.model}: {exc}", file=sys.stderr)
        return 2
    card = json.loads((out / "card.json").read_text())
    print(json.dumps({"model_dir": str(out), "parity_max_abs_diff": card["parity_max_abs_diff"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
