#!/usr/bin/env python
"""Stream a signal into an rnnserve model over a WebSocket and print each answer.

    rnn-serve --model-repo models &                      # or: make serve
    python examples/stream_client.py --url http://127.0.0.1:8000 --model sine-lstm
    python examples/stream_client.py --model reber-gru --binary
    python examples/stream_client.py --model adding-rnn

One message per time step (``--chunk`` steps per message). The model's hidden state lives
in the server's session between messages, so each answer depends on everything sent
before. The client sends ``seq`` with each message; if the connection drops it reconnects
to the same session and sends the unanswered message again, and the server applies it
exactly once (``reconnects`` at the end says whether that happened).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from service.client import Client, RnnServeError

REBER_STRING = list("BTBTSSXXTVVETE")  # an embedded Reber string


def sine_signal(steps: int, seed: int) -> list[float]:
    """Three sines plus a little noise, like the series sine-lstm was trained on."""
    rng = random.Random(seed)
    parts = [(rng.uniform(0.01, 0.1), rng.uniform(0.2, 0.6), rng.uniform(0, 2 * math.pi)) for _ in range(3)]
    return [
        sum(a * math.sin(2 * math.pi * f * t + p) for f, a, p in parts) + rng.gauss(0, 0.05)
        for t in range(steps + 1)
    ]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stream_values(client: Client, args: argparse.Namespace) -> None:
    signal = sine_signal(args.steps, args.seed)
    inputs = [[v] for v in signal[:-1]]
    stream = client.stream(args.model, chunks(inputs, args.chunk), binary=args.binary)
    print(f"{'step':>5} {'input':>9} {'predicted next':>15} {'actual next':>12} {'error':>8}")
    errors = []
    t = 0
    for answer in stream:
        for y in answer.outputs:
            actual = signal[t + 1]
            errors.append((float(y[0]) - actual) ** 2)
            print(f"{t + 1:>5} {signal[t]:>9.4f} {float(y[0]):>15.4f} {actual:>12.4f} {y[0] - actual:>8.4f}")
            t += 1
    print(f"session {stream.session_id}: {stream.step_count} steps, "
          f"MSE {sum(errors) / len(errors):.5f}, reconnects {stream.reconnects}")


def stream_symbols(client: Client, card: dict, args: argparse.Namespace) -> None:
    vocabulary = card["vocabulary"]
    word = [s for s in REBER_STRING if s in vocabulary] or vocabulary
    stream = client.stream(args.model, chunks(word, args.chunk), binary=args.binary)
    print(f"{'step':>5} {'symbol':>6}   most probable next symbols")
    t = 0
    for answer in stream:
        for y in answer.outputs:
            ranked = sorted(zip(vocabulary, y.tolist()), key=lambda p: -p[1])[:3]
            shown = "  ".join(f"{s} {p:.2f}" for s, p in ranked)
            print(f"{t + 1:>5} {word[t]:>6}   {shown}")
            t += 1
    print(f"session {stream.session_id}: {stream.step_count} steps, reconnects {stream.reconnects}")


def stream_adding(client: Client, card: dict, args: argparse.Namespace) -> None:
    """The adding problem: (value, marker) pairs; the last output is the sum of the marked."""
    rng = random.Random(args.seed)
    length = int(card.get("seq_len") or 10)
    values = [rng.random() for _ in range(length)]
    marked = {rng.randrange(0, length // 2), rng.randrange(length // 2, length)}
    inputs = [[v, 1.0 if t in marked else 0.0] for t, v in enumerate(values)]
    stream = client.stream(args.model, chunks(inputs, args.chunk), binary=args.binary)
    last = None
    for answer in stream:
        for x, y in zip(inputs[answer.step_count - len(answer.outputs):], answer.outputs):
            last = float(y[0])
            print(f"value {x[0]:.3f} marker {int(x[1])} -> running answer {last:.4f}")
    target = sum(values[t] for t in marked)
    print(f"final answer {last:.4f}, true sum of the marked values {target:.4f}")


def stream_generic(client: Client, card: dict, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    inputs = [[rng.uniform(-1, 1) for _ in range(card["input_size"])] for _ in range(args.steps)]
    for answer in client.stream(args.model, chunks(inputs, args.chunk), binary=args.binary):
        print(answer.step_count, answer.outputs.round(4).tolist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default="sine-lstm", help="model name (sine-lstm, reber-gru, ...)")
    parser.add_argument("--api-key", default=None, help="API key, if the server requires one")
    parser.add_argument("--steps", type=int, default=40, help="time steps to stream")
    parser.add_argument("--chunk", type=int, default=1, help="time steps per message")
    parser.add_argument("--binary", action="store_true", help="binary frames instead of JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        with Client(args.url, api_key=args.api_key) as client:
            info = client.model(args.model)
            card = next(v["card"] for v in info["versions"] if v["version"] == info["default_version"])
            if card.get("vocabulary"):
                stream_symbols(client, card, args)
            elif card.get("task") == "adding" and card["input_size"] == 2:
                stream_adding(client, card, args)
            elif card["input_size"] == 1:
                stream_values(client, args)
            else:
                stream_generic(client, card, args)
    except RnnServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
