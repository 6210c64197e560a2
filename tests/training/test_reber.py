from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training import reber
from training.generate import sample_symbols

VALID = [
    "BTBTXSETE",
    "BPBTXSEPE",
    "BPBPVVEPE",
    "BTBTSSXXTVVETE",
    "BPBTXXVVEPE",
    "BTBPTTVPXTTVPSETE",
    "BPBTSXXTTVPXVVEPE",
]
INVALID = [
    "",
    "BTBTXSEPE",  # wrapper symbols differ: the long-range dependency
    "BTBTXSE",  # stops after the inner string
    "BTXSE",  # a plain Reber string is not an embedded one
    "BTBTXSETEE",
    "BTBTXXVPETE",  # after V P the inner string must go on (X or S), not end
    "BTBTSXETE",  # inner string cannot end after X from state 1
    "BXBTXSEXE",
    "TBTXSETE",
    "BTBPVPETE",  # V then P then E: P leads back into the grammar, not to the end
    "BTTXSETE",  # inner string lacks its B
]


@pytest.mark.parametrize("s", VALID)
def test_accepts_valid(s: str) -> None:
    assert reber.accepts(s)


@pytest.mark.parametrize("s", INVALID)
def test_rejects_invalid(s: str) -> None:
    assert not reber.accepts(s)


def test_plain_reber_acceptor() -> None:
    assert reber.accepts_reber("BTXSE")
    assert reber.accepts_reber("BPVVE")
    assert not reber.accepts_reber("BTXE")
    assert not reber.accepts_reber("BTBTXSETE")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_generated_strings_accepted_and_every_step_valid(seed: int) -> None:
    s = reber.embedded_reber_string(np.random.default_rng(seed))
    assert reber.accepts(s)
    for i in range(len(s)):
        assert s[i] in reber.valid_next(s[:i]), (s, i)
    assert reber.valid_next(s[:-2]) == {s[1]}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="BTPSXVE", min_size=1, max_size=16))
def test_valid_next_agrees_with_acceptor(s: str) -> None:
    # Complete == every symbol was allowed and nothing may follow.
    allowed = all(s[i] in reber.valid_next(s[:i]) for i in range(len(s)))
    assert reber.accepts(s) == (allowed and reber.valid_next(s) == set())


def test_max_length_respected() -> None:
    rng = np.random.default_rng(0)
    assert all(len(reber.embedded_reber_string(rng, 12)) <= 12 for _ in range(200))


class ScriptedStepper:
    """Emits a fixed string, one symbol per step, as one-hot 'probabilities'."""

    def __init__(self, script: str) -> None:
        self.script = script

    def reset(self, batch: int) -> None:
        self.batch, self.t = batch, 0

    def step(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((self.batch, len(reber.SYMBOLS)), np.float32)
        symbol = self.script[min(self.t + 1, len(self.script) - 1)]
        out[:, reber.SYMBOLS.index(symbol)] = 1.0
        self.t += 1
        return out


def test_balanced_stop_runs_past_the_inner_end_symbol() -> None:
    stepper = ScriptedStepper("BTBTXSETEBBB")
    out = sample_symbols(
        stepper,
        list(reber.SYMBOLS),
        3,
        np.random.default_rng(0),
        prompt="B",
        start_symbol="B",
        end_symbol="E",
    )
    assert out == ["BTBTXSETE"] * 3


def test_generation_stops_at_max_length() -> None:
    out = sample_symbols(
        ScriptedStepper("BTTTTTTTTTTTTTTTTTTTTTT"),
        list(reber.SYMBOLS),
        2,
        np.random.default_rng(0),
        prompt="B",
        start_symbol="B",
        end_symbol="E",
        max_length=8,
    )
    assert out == ["BTTTTTTT"] * 2
