"""The embedded Reber grammar: a string generator and an acceptor.

The Reber grammar is a small finite automaton over ``B T P S X V E``. Its embedded form
wraps a Reber string as ``B T <reber> T E`` or ``B P <reber> P E``: predicting the
second-to-last symbol needs a memory of the second symbol across the whole inner string,
which is what makes it a classic test of gated recurrences (Hochreiter & Schmidhuber 1997).
"""

from __future__ import annotations

import numpy as np

SYMBOLS: tuple[str, ...] = ("B", "T", "P", "S", "X", "V", "E")

# state -> [(symbol, next state)]; state 0 follows the opening B, state 6 precedes E.
_TRANSITIONS: dict[int, list[tuple[str, int]]] = {
    0: [("T", 1), ("P", 2)],
    1: [("S", 1), ("X", 3)],
    2: [("T", 2), ("V", 4)],
    3: [("X", 2), ("S", 5)],
    4: [("P", 3), ("V", 5)],
}
_FINAL = 5


def reber_string(rng: np.random.Generator, max_length: int | None = None) -> str:
    """One Reber string ``B...E``, each branch taken with probability 1/2.

    With ``max_length`` set, longer random walks are redrawn.
    """
    while True:
        out = ["B"]
        state = 0
        while state != _FINAL:
            choices = _TRANSITIONS[state]
            symbol, state = choices[rng.integers(len(choices))]
            out.append(symbol)
        out.append("E")
        if max_length is None or len(out) <= max_length:
            return "".join(out)


def embedded_reber_string(rng: np.random.Generator, max_length: int | None = None) -> str:
    inner_max = None if max_length is None else max_length - 4
    wrap = "TP"[rng.integers(2)]
    return "B" + wrap + reber_string(rng, inner_max) + wrap + "E"


def _reber_walk(symbols: str) -> int | None:
    """The automaton state after reading ``symbols`` (without the leading B), or None."""
    state = 0
    for symbol in symbols:
        moves = dict(_TRANSITIONS.get(state, []))
        if symbol not in moves:
            return None
        state = moves[symbol]
    return state


def accepts_reber(s: str) -> bool:
    if len(s) < 2 or s[0] != "B" or s[-1] != "E":
        return False
    return _reber_walk(s[1:-1]) == _FINAL


def accepts(s: str) -> bool:
    """True when ``s`` is a complete embedded Reber string."""
    if len(s) < 4 or s[0] != "B" or s[-1] != "E" or s[1] not in "TP":
        return False
    return s[-2] == s[1] and accepts_reber(s[2:-2])


def valid_next(prefix: str) -> set[str]:
    """Symbols that may follow ``prefix`` in some embedded Reber string (empty if none)."""
    if prefix == "":
        return {"B"}
    if prefix[0] != "B":
        return set()
    if len(prefix) == 1:
        return {"T", "P"}
    wrap, inner = prefix[1], prefix[2:]
    if wrap not in "TP":
        return set()
    if inner == "":
        return {"B"}
    if inner[0] != "B":
        return set()
    # Find where the inner string ends, if it has.
    end = inner.find("E")
    if end == -1:
        state = _reber_walk(inner[1:])
        if state is None:
            return set()
        return {"E"} if state == _FINAL else {sym for sym, _ in _TRANSITIONS[state]}
    if _reber_walk(inner[1:end]) != _FINAL:
        return set()
    rest = inner[end + 1 :]
    if rest == "":
        return {wrap}
    if rest == wrap:
        return {"E"}
    return set()
