#!/usr/bin/env python
"""A tour of the rnnserve Python client (service.client) on the demo models.

    rnn-serve --model-repo models &                     # or: make serve
    python examples/python_client.py --url http://127.0.0.1:8000

sine-lstm (1 feature, value generation), reber-gru (vocabulary BTPSXVE, symbol generation)
and adding-rnn (2 features, many-to-one). Every call used here has an async twin on
``AsyncClient`` (``await client.predict(...)``, ``async for ... in client.stream(...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from service.client import AsyncClient, Client, RnnServeError


def tour(client: Client) -> None:
    # -- what is served ------------------------------------------------------------------
    for model in client.models():
        card = model["versions"][-1]["card"] or {}
        print(f"{model['name']:<12} v{model['default_version']}  {card.get('cell')} "
              f"{card.get('input_size')} in / {card.get('output_size')} out  {card.get('description', '')}")

    # -- batch predict: independent sequences, any lengths, lists or arrays ---------------
    t = np.arange(30, dtype=np.float32)
    wave = 0.5 * np.sin(2 * np.pi * 0.05 * t)
    p = client.predict("sine-lstm", [wave[:, None], wave[:10].tolist()])
    print("\nsine-lstm forecast of step 31:", round(float(p.outputs[0][-1, 0]), 4),
          "(true:", round(0.5 * math.sin(2 * math.pi * 0.05 * 30), 4), ")")

    # adding problem: (value, marker) pairs; only the last output matters
    x = np.array([[0.3, 1], [0.9, 0], [0.1, 0], [0.5, 0], [0.2, 0],
                  [0.7, 0], [0.6, 1], [0.4, 0], [0.8, 0], [0.1, 0]], np.float32)
    last = client.predict("adding-rnn", x[None], return_sequences=False)
    print("adding-rnn: 0.3 + 0.6 =", round(float(last.outputs[0][0]), 3))

    # -- a session: the hidden state stays on the server between requests -----------------
    # open_session wraps it in an exactly-once helper: every step carries seq, so a step
    # whose answer was lost (dropped connection, timeout, 503) is retried and applied once.
    with client.open_session("sine-lstm") as session:
        for chunk in np.array_split(wave, 3):
            result = session.step(chunk[:, None])
            print(f"  step_count {result.step_count:>2}: last forecast {result.outputs[-1, 0]:+.4f}")
        # value generation: after the prime (the next real value), the model's forecasts
        # become its next inputs
        gen = session.generate(10, prime=[0.5 * math.sin(2 * math.pi * 0.05 * 30)])
        print("  10 generated values:", np.round(np.ravel(gen.generated), 3).tolist())

        # export the state (plain JSON) and carry on in a new session, here or elsewhere
        exported = session.export_state()
        copy = client.import_state(exported)
        a = client.step(copy, [0.1]).outputs
        b = session.step([0.1]).outputs
        print("  imported session continues identically:", bool(np.allclose(a, b, atol=1e-6)))
        client.delete(copy)
    # (leaving the with block deleted the session)

    # -- symbols: reber-gru predicts the next symbol of an embedded Reber string ----------
    info = client.create_session("reber-gru")
    answer = client.step(info, list("BTSSXX"))
    print("\nreber-gru after BTSSXX, most probable next symbols:", "".join(answer.symbols))
    print("generated strings:", [client.generate(client.reset(info), 40, seed=s).text for s in range(3)])
    client.delete(info)

    # -- WebSocket streaming: iterator in, iterator out ------------------------------------
    stream = client.stream("sine-lstm", (wave[i : i + 5, None] for i in range(0, 30, 5)), binary=True)
    for result in stream:
        print(f"  streamed: step_count {result.step_count:>2}, forecast {result.outputs[-1, 0]:+.4f}")
    print(f"  session {stream.session_id}, reconnects {stream.reconnects}")
    client.delete(stream.session_id)

    # -- errors carry the HTTP status and a stable code ------------------------------------
    try:
        client.predict("sine-lstm", [[[1.0, 2.0]]])
    except RnnServeError as exc:
        print(f"\nerror: status {exc.status}, code {exc.code!r}: {exc.message}")


async def async_tour(url: str, api_key: str | None) -> None:
    async with AsyncClient(url, api_key=api_key) as client:
        async with await client.open_session("reber-gru") as session:
            out = await session.generate(30, temperature=0.5, seed=1)
            print("\nasync generate:", out.text, "step_count", session.step_count)

        async def symbols():
            for s in "BPVVE":
                yield [s]

        async for r in client.stream("reber-gru", symbols()):
            print("  async stream:", r.step_count, r.symbols)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    try:
        with Client(args.url, api_key=args.api_key) as client:
            tour(client)
        asyncio.run(async_tour(args.url, args.api_key))
    except RnnServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
