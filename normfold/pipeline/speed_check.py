"""Never slower: `optimize` times its result against the input model and takes
back the fused kinds that cost time.

1. The graph passes run with every kind fused; the result is timed against the
   input model (`normfold.runtime.timing`: fresh sessions as deployed,
   interleaved rounds, the median per-round ratio with its confidence interval).
2. Only if it is slower beyond noise: each fused kind is left out in turn
   (the fuse pass's `ops=`), and with two or more kinds all of them together;
   these variants are timed against the fully fused model. The model being
   slower, a kind stays fused only where leaving it out is slower beyond noise;
   the others are reverted (if every kind stays, but leaving all of them out
   is not slower, all are reverted).
3. What will be written is timed against the input model once more.

All of this runs at each thread count of `threads` (by default 1 and
onnxruntime's choice, the two ways models are commonly deployed: a fusion at
parity with several threads can be slower with one). The model is slower if it
is slower at any of them; step 2 runs at each thread count where it is, and a
kind is reverted if leaving it out is not slower at one of those.

Each timing gets a third of the budget (per thread count), spent in up to CHUNKS fresh session
pairs: a small model's rounds would otherwise all fall in a few milliseconds
(the timer stops at its round limit), where one burst of other work on the
machine decides the comparison, and one session's memory placement stands for
all. Recalibration only changes BatchNorm statistics, not the graph, so it is
not part of what is timed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from normfold.io.inputs import default_dynamic_sizes, input_specs, parse_named_shapes, resolve_inputs
from normfold.ops.table import DOMAIN, FAMILY_TITLES, OPS
from normfold.passes.registry import FUSE_FAMILIES, PASSES, steps
from normfold.pipeline.runner import run_passes
from normfold.progress import Progress
from normfold.report import PassReport
from normfold.runtime.timing import Comparison, compare, time_rounds

DEFAULT_BUDGET_S = 6.0
CHUNKS = 10  # fresh session pairs per timing, at most
Timer = Callable[..., np.ndarray]  # as `time_rounds`: (models, feeds, *, budget_s, provider, threads) -> times
_FAMILY_OF = {**{f"{DOMAIN}.{k.op}": k.family for k in OPS.values()},
              **{k.standard[0]: k.family for k in OPS.values() if k.standard}}


def default_threads() -> tuple[int | None, ...]:
    """The thread counts timed when none are given: 1 and onnxruntime's choice
    (None), or only the latter on a one-CPU machine."""
    return (1, None) if (os.cpu_count() or 1) > 1 else (None,)


@dataclass
class Reverted:
    """A fused kind taken back: `gain` compares the model with `family` left
    unfused against the model with every kind fused (> 1: unfused is faster),
    at `threads` intra-op threads (None: onnxruntime's choice)."""

    family: str
    gain: Comparison
    threads: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"family": self.family, "title": FAMILY_TITLES[self.family], "threads": self.threads,
                **self.gain.to_dict()}


@dataclass
class AtThreads:
    """The input model against the optimized one at one thread count."""

    threads: int | None  # None: onnxruntime's choice
    first: Comparison  # every kind fused, against the input model
    result: Comparison  # what is written, against the input model

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"threads": self.threads, "all_fused": self.first.to_dict(), "result": self.result.to_dict()}


@dataclass
class SpeedCheck:
    """The outcome of the speed check of one `optimize` run."""

    provider: str
    budget_s: float
    fused: tuple[str, ...]  # kinds the fuse pass fused, before any revert
    timings: list[AtThreads]  # one per thread count timed, in the order timed
    reverted: list[Reverted] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # of the inputs timed

    @property
    def threads(self) -> tuple[int | None, ...]:
        """The thread counts timed."""
        return tuple(t.threads for t in self.timings)

    @property
    def first(self) -> Comparison:
        """Every kind fused against the input model, at the thread count where it does worst."""
        return min((t.first for t in self.timings), key=lambda c: c.ratio)

    @property
    def result(self) -> Comparison:
        """What is written against the input model, at the thread count where it does worst."""
        return min((t.result for t in self.timings), key=lambda c: c.ratio)

    @property
    def kept(self) -> tuple[str, ...]:
        """The `ops=` of the fuse pass that writes the result."""
        gone = {r.family for r in self.reverted}
        return tuple(f for f in FUSE_FAMILIES if f not in gone)

    def to_dict(self) -> dict:
        """JSON-ready form (times in milliseconds; speed-ups are input time / output time;
        `speedup`, `result` and `all_fused` are those of the thread count where the model does worst)."""
        return {"provider": self.provider, "threads": list(self.threads), "budget_s": self.budget_s,
                "shapes": self.shapes, "speedup": self.result.ratio, "noise": self.result.noise,
                "result": self.result.to_dict(), "all_fused": self.first.to_dict(),
                "by_threads": [t.to_dict() for t in self.timings], "fused": list(self.fused),
                "reverted": [r.to_dict() for r in self.reverted]}


def check_speed(model: onnx.ModelProto, passes: tuple[str, ...], *, target: str = "auto", portable: bool = True,
                inputs=None, shapes=(), seed: int = 0, provider: str = "cpu",
                threads: tuple[int | None, ...] | None = None, budget_s: float = DEFAULT_BUDGET_S,
                timer: Timer = time_rounds, progress: Progress | None = None) -> SpeedCheck:
    """Time `passes` (run on `model` as `optimize` runs them) against `model` and
    find the fused kinds to revert (see the module docstring), at each thread count
    of `threads` (None in it: onnxruntime's choice; default: `default_threads()`).
    Inputs are `inputs`, or generated from `shapes` and `seed` as `verify` does
    (dynamic sizes not in `shapes` are 1, as in the output check).
    `budget_s` bounds the timed rounds per thread count (at least 5 rounds per timing)."""
    progress = progress or Progress()
    graph_passes = tuple(p for p in passes if not PASSES[p].needs_data)
    specs = input_specs(model)
    if inputs is None:  # dynamic sizes not given are 1, as in the output check
        given = dict(shapes) if isinstance(shapes, dict) else parse_named_shapes(list(shapes), [s.name for s in specs])
        shapes = {**default_dynamic_sizes(specs), **given}
    feeds = resolve_inputs(inputs, specs, shapes or None, seed, 1)[0][0]

    def build(ops: tuple[str, ...]) -> tuple[onnx.ModelProto, tuple[str, ...]]:
        run = run_passes(model, steps(graph_passes, ops=ops, target=target), portable=portable)
        return run.model, _fused_families(run.reports)

    def against(baseline: onnx.ModelProto, models: list[onnx.ModelProto], threads: int | None,
                what: str) -> list[Comparison]:
        """Each of `models` timed against `baseline` at `threads` threads."""
        with progress.step(f"timing {what} ({threads_label(threads)})"):
            times = spread_rounds(timer, [baseline, *models], feeds, budget_s=budget_s / 3, provider=provider,
                                  threads=threads)
        return [compare(times[:, 0], times[:, i]) for i in range(1, len(models) + 1)]

    candidate, fused = build(FUSE_FAMILIES)
    timings = []
    for n in dict.fromkeys(threads or default_threads()):
        first = against(model, [candidate], n, "the optimized model against the input")[0]
        timings.append(AtThreads(n, first, first))
    check = SpeedCheck(provider, budget_s, fused, timings,
                       shapes={name: list(np.shape(value)) for name, value in feeds.items()})
    slow = [t.threads for t in timings if t.first.slower]
    if not slow or not fused:
        return check
    variants = {f: tuple(k for k in FUSE_FAMILIES if k != f) for f in fused}
    if len(fused) > 1:
        variants["every kind"] = tuple(k for k in FUSE_FAMILIES if k not in fused)
    built = {name: build(ops)[0] for name, ops in variants.items()}
    reverted: dict[str, Reverted] = {}
    for n in slow:
        gains = dict(zip(built, against(candidate, list(built.values()), n, "each fused kind left out")))
        here = {f: Reverted(f, gains[f], n) for f in fused if not gains[f].slower}
        if not here and "every kind" in gains and not gains["every kind"].slower:
            here = {f: Reverted(f, gains["every kind"], n) for f in fused}
        reverted = {**here, **reverted}  # a kind keeps the first timing that reverted it
    check.reverted = [reverted[f] for f in fused if f in reverted]
    if check.reverted:
        final = build(check.kept)[0]
        for t in timings:
            t.result = against(model, [final], t.threads, "the result against the input")[0]
    return check


def spread_rounds(timer: Timer, models: list[onnx.ModelProto], feeds, *, budget_s: float, provider: str,
                  threads: int | None) -> np.ndarray:
    """`timer`'s rounds (rounds, models) from calls of budget_s / CHUNKS each, fresh sessions
    every call, until `budget_s` is spent or CHUNKS calls are made (at least one)."""
    chunks, started = [], time.perf_counter()
    while len(chunks) < CHUNKS and (not chunks or time.perf_counter() - started < budget_s):
        chunks.append(timer(models, feeds, budget_s=budget_s / CHUNKS, provider=provider, threads=threads))
    return np.concatenate(chunks)


def threads_label(threads: int | None) -> str:
    """How a thread count of the check reads in its progress and report."""
    return "onnxruntime's default" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"


def _fused_families(reports: list[PassReport]) -> tuple[str, ...]:
    """The --ops kinds the fuse pass fused, in FUSE_FAMILIES order."""
    found = {_FAMILY_OF[c.into] for r in reports if r.name == "fuse" for c in r.changes if c.into in _FAMILY_OF}
    return tuple(f for f in FUSE_FAMILIES if f in found)
