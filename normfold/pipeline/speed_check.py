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

Each timing gets a third of the budget, spent in up to CHUNKS fresh session
pairs: a small model's rounds would otherwise all fall in a few milliseconds
(the timer stops at its round limit), where one burst of other work on the
machine decides the comparison, and one session's memory placement stands for
all. Recalibration only changes BatchNorm statistics, not the graph, so it is
not part of what is timed.
"""

from __future__ import annotations

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


@dataclass
class Reverted:
    """A fused kind taken back: `gain` compares the model with `family` left
    unfused against the model with every kind fused (> 1: unfused is faster)."""

    family: str
    gain: Comparison

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"family": self.family, "title": FAMILY_TITLES[self.family], **self.gain.to_dict()}


@dataclass
class SpeedCheck:
    """The outcome of the speed check of one `optimize` run."""

    provider: str
    threads: int | None
    budget_s: float
    fused: tuple[str, ...]  # kinds the fuse pass fused, before any revert
    first: Comparison  # every kind fused, against the input model
    result: Comparison  # what is written, against the input model
    reverted: list[Reverted] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # of the inputs timed

    @property
    def kept(self) -> tuple[str, ...]:
        """The `ops=` of the fuse pass that writes the result."""
        gone = {r.family for r in self.reverted}
        return tuple(f for f in FUSE_FAMILIES if f not in gone)

    def to_dict(self) -> dict:
        """JSON-ready form (times in milliseconds; speed-ups are input time / output time)."""
        return {"provider": self.provider, "threads": self.threads, "budget_s": self.budget_s, "shapes": self.shapes,
                "speedup": self.result.ratio, "noise": self.result.noise, "result": self.result.to_dict(),
                "all_fused": self.first.to_dict(), "fused": list(self.fused),
                "reverted": [r.to_dict() for r in self.reverted]}


def check_speed(model: onnx.ModelProto, passes: tuple[str, ...], *, target: str = "auto", portable: bool = True,
                inputs=None, shapes=(), seed: int = 0, provider: str = "cpu", threads: int | None = None,
                budget_s: float = DEFAULT_BUDGET_S, timer: Timer = time_rounds,
                progress: Progress | None = None) -> SpeedCheck:
    """Time `passes` (run on `model` as `optimize` runs them) against `model` and
    find the fused kinds to revert (see the module docstring). Inputs are
    `inputs`, or generated from `shapes` and `seed` as `verify` does (dynamic
    sizes not in `shapes` are 1, as in the output check).
    `budget_s` bounds the timed rounds (at least 5 rounds per timing)."""
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

    def timed(models: list[onnx.ModelProto], what: str) -> np.ndarray:
        with progress.step(f"timing {what}"):
            return spread_rounds(timer, models, feeds, budget_s=budget_s / 3, provider=provider, threads=threads)

    candidate, fused = build(FUSE_FAMILIES)
    times = timed([model, candidate], "the optimized model against the input")
    first = compare(times[:, 0], times[:, 1])
    check = SpeedCheck(provider, threads, budget_s, fused, first, first,
                       shapes={name: list(np.shape(value)) for name, value in feeds.items()})
    if not first.slower or not fused:
        return check
    variants = {f: tuple(k for k in FUSE_FAMILIES if k != f) for f in fused}
    if len(fused) > 1:
        variants["every kind"] = tuple(k for k in FUSE_FAMILIES if k not in fused)
    built = {name: build(ops)[0] for name, ops in variants.items()}
    times = timed([candidate, *built.values()], "each fused kind left out")
    gains = {name: compare(times[:, 0], times[:, i]) for i, name in enumerate(built, start=1)}
    check.reverted = [Reverted(f, gains[f]) for f in fused if not gains[f].slower]
    if not check.reverted and "every kind" in gains and not gains["every kind"].slower:
        check.reverted = [Reverted(f, gains["every kind"]) for f in fused]
    if check.reverted:
        final = build(check.kept)[0]
        times = timed([model, final], "the result against the input")
        check.result = compare(times[:, 0], times[:, 1])
    return check


def spread_rounds(timer: Timer, models: list[onnx.ModelProto], feeds, *, budget_s: float, provider: str,
                  threads: int | None) -> np.ndarray:
    """`timer`'s rounds (rounds, models) from calls of budget_s / CHUNKS each, fresh sessions
    every call, until `budget_s` is spent or CHUNKS calls are made (at least one)."""
    chunks, started = [], time.perf_counter()
    while len(chunks) < CHUNKS and (not chunks or time.perf_counter() - started < budget_s):
        chunks.append(timer(models, feeds, budget_s=budget_s / CHUNKS, provider=provider, threads=threads))
    return np.concatenate(chunks)


def _fused_families(reports: list[PassReport]) -> tuple[str, ...]:
    """The --ops kinds the fuse pass fused, in FUSE_FAMILIES order."""
    found = {_FAMILY_OF[c.into] for r in reports if r.name == "fuse" for c in r.changes if c.into in _FAMILY_OF}
    return tuple(f for f in FUSE_FAMILIES if f in found)
