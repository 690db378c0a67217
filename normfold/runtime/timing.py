"""Comparing the speed of models in onnxruntime within a time budget.

Every model gets its own fresh session (as deployed: onnxruntime's graph
optimizations on, normfold's library registered) and one untimed run; then
rounds run every model once on the same inputs, in alternating order (A B,
B A, ...) so that what one run leaves in the caches favours no model, until
the budget is spent. A comparison is the median of the per-round time ratios
with a distribution-free ~95% confidence interval of that median: machine
noise moves both models of a round alike and shows up as the spread of the
ratios, not as a bias.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from normfold.io.inputs import Feeds
from normfold.runtime.session import make_session, run_session

clock = time.perf_counter  # seconds
MIN_ROUNDS = 5  # fewer give no confidence interval worth the name (5: [min, max], 94%)
MAX_ROUNDS = 200  # enough for a ±1% interval on a quiet machine; small models stop here


@dataclass(frozen=True)
class Comparison:
    """How much faster `candidate` ran than `baseline`: `ratio` is the median over
    rounds of baseline time / candidate time (> 1: the candidate is faster),
    [`low`, `high`] its ~95% confidence interval."""

    ratio: float
    low: float
    high: float
    rounds: int
    baseline_ms: float  # median per-run time
    candidate_ms: float

    @property
    def noise(self) -> float:
        """Half the width of the confidence interval (± on `ratio`)."""
        return (self.high - self.low) / 2

    @property
    def slower(self) -> bool:
        """The candidate is slower beyond noise (even the interval's top is below 1)."""
        return self.high < 1.0

    @property
    def faster(self) -> bool:
        """The candidate is faster beyond noise."""
        return self.low > 1.0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"speedup": self.ratio, "noise": self.noise, "low": self.low, "high": self.high,
                "rounds": self.rounds, "baseline_ms": self.baseline_ms, "candidate_ms": self.candidate_ms}


def compare(baseline: np.ndarray, candidate: np.ndarray) -> Comparison:
    """The comparison of two models' per-round times (seconds, same rounds)."""
    ratios = np.sort(np.asarray(baseline) / np.asarray(candidate))
    n = len(ratios)
    k = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))  # order statistics bounding the median, ~95%
    return Comparison(ratio=float(np.median(ratios)), low=float(ratios[k]), high=float(ratios[n - 1 - k]),
                      rounds=n, baseline_ms=float(np.median(baseline) * 1e3),
                      candidate_ms=float(np.median(candidate) * 1e3))


def time_rounds(models: list[onnx.ModelProto], feeds: Feeds, *, budget_s: float, provider: str = "cpu",
                threads: int | None = None) -> np.ndarray:
    """Per-round wall times (seconds) of `models`, shape (rounds, models): rounds
    run until `budget_s` seconds are spent (at least MIN_ROUNDS, at most MAX_ROUNDS)."""
    sessions = [make_session(m, provider=provider, optimize=True, threads=threads) for m in models]
    for session in sessions:
        run_session(session, feeds, what="the model being timed")  # warm-up: first-run allocations
    rounds: list[list[float]] = []
    started = clock()
    while len(rounds) < MAX_ROUNDS and (len(rounds) < MIN_ROUNDS or clock() - started < budget_s):
        order = range(len(sessions)) if len(rounds) % 2 == 0 else reversed(range(len(sessions)))
        spent = [0.0] * len(sessions)
        for i in order:
            start = clock()
            run_session(sessions[i], feeds, what="the model being timed")
            spent[i] = clock() - start
        rounds.append(spent)
    return np.asarray(rounds)
