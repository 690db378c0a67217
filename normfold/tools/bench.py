"""`bench`: latency of ONNX models in onnxruntime, as users deploy them.

Sessions are built by `normfold.runtime.session.make_session` (normfold's custom ops
registered, onnxruntime's graph optimizations on unless asked otherwise).
Several models are timed interleaved in one process (A, B, A, B, ...) on the
same inputs, so machine noise reaches every model alike.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from normfold.errors import NormfoldError
from normfold.io.inputs import Feeds, InputSpec, check_feeds, input_specs
from normfold.io.model_io import model_and_name
from normfold.runtime.session import run_session
from normfold.runtime.session import make_session
from normfold.io.inputs import Inputs, resolve_inputs

Model = onnx.ModelProto | str | os.PathLike
clock = time.perf_counter  # seconds; tests replace it with a fake clock


@dataclass
class LatencyStats:
    """Latency of one model over `runs` timed runs, in milliseconds;
    `throughput` is samples per second at the median (batch / p50)."""

    model: str
    runs: int
    p50: float
    p90: float
    min: float
    mean: float
    batch: int
    throughput: float

    @classmethod
    def from_times(cls, model: str, seconds: list[float], batch: int) -> "LatencyStats":
        """Statistics of per-run wall times given in seconds."""
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50 = float(np.percentile(ms, 50))
        return cls(model=model, runs=len(ms), p50=p50, p90=float(np.percentile(ms, 90)), min=float(ms.min()),
                   mean=float(ms.mean()), batch=batch, throughput=batch * 1e3 / p50 if p50 > 0 else float("inf"))

    def to_dict(self) -> dict:
        """JSON-ready form (times in milliseconds)."""
        return asdict(self)


def measure(
    models: list[Model],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    feeds: Inputs = None,
    shapes: dict[str, tuple[int, ...] | str] | list[str] | tuple[str, ...] | None = None,
    optimize: bool = True,
) -> list[LatencyStats]:
    """Time `models` (ModelProtos or paths) interleaved: every round runs each
    model once, in the order given; `warmup` untimed rounds, then `runs` timed ones.

    feeds: None (generated from the first model's inputs; dynamic sizes from
    `shapes`, as in `normfold.verify.run`), an .npz path, a {name: array} dict or a
    list of them (run r uses sample r modulo their number). Every model must
    take the same inputs. Bad input raises NormfoldError.
    """
    prepared, specs = _prepare(models)
    samples, _ = resolve_inputs(feeds, specs, shapes, 0, 1)
    return _measure(prepared, specs, samples, provider, threads, warmup, runs, optimize)


@dataclass
class _Prepared:
    name: str  # as shown in reports
    source: onnx.ModelProto | str  # what the session is built from
    specs: list[InputSpec]


def _prepare(models: list[Model]) -> tuple[list[_Prepared], list[InputSpec]]:
    """Load and check every model; return them and their (common) input specs.
    A path is handed to onnxruntime as a path (it reads external data itself,
    and models over 2 GB cannot be serialized)."""
    if not models:
        raise NormfoldError("no model to benchmark")
    prepared = []
    for model in models:
        proto, name = model_and_name(model, weights=False)  # a path goes to onnxruntime as a path
        prepared.append(_Prepared(name, proto if isinstance(model, onnx.ModelProto) else os.fspath(model),
                                  input_specs(proto)))
    for other in prepared[1:]:
        _check_same_inputs(prepared[0], other)
    return prepared, prepared[0].specs


def _measure(prepared: list[_Prepared], specs: list[InputSpec], samples: list[Feeds], provider: str,
             threads: int | None, warmup: int, runs: int, optimize: bool) -> list[LatencyStats]:
    if warmup < 0 or runs < 1:
        raise NormfoldError(f"need warmup >= 0 and runs >= 1 (got warmup {warmup}, runs {runs})")
    for other in prepared[1:]:  # same names and dtypes, but fixed sizes may differ
        for sample in samples:
            check_feeds(sample, other.specs, f"the inputs for {other.name}")
    sessions = [make_session(p.source, provider=provider, optimize=optimize, threads=threads) for p in prepared]
    names = [p.name for p in prepared]
    times = _run_interleaved(sessions, samples, names, warmup, runs)
    batch = _batch_size(samples[0], specs)
    return [LatencyStats.from_times(name, t, batch) for name, t in zip(names, times)]


def _check_same_inputs(first: _Prepared, other: _Prepared) -> None:
    def describe(specs: list[InputSpec]) -> str:
        return ", ".join(spec.describe() for spec in specs) or "none"

    if [(s.name, s.dtype) for s in first.specs] != [(s.name, s.dtype) for s in other.specs]:
        raise NormfoldError(
            f"{other.name} takes different inputs than {first.name} ({describe(other.specs)} vs "
            f"{describe(first.specs)}); benchmark models that take the same inputs (same names and dtypes)"
        )


def _run_interleaved(sessions, samples: list[Feeds], names: list[str], warmup: int, runs: int) -> list[list[float]]:
    """Per-session wall times (seconds) of the `runs` timed rounds."""
    times: list[list[float]] = [[] for _ in sessions]
    for round_ in range(warmup + runs):
        feeds = samples[round_ % len(samples)]
        for session, name, spent in zip(sessions, names, times):
            start = clock()
            run_session(session, feeds, what=name)
            if round_ >= warmup:
                spent.append(clock() - start)
    return times


def _batch_size(feeds: Feeds, specs: list[InputSpec]) -> int:
    """Size of dimension 0 of the first input with at least one dimension (1 if none)."""
    for spec in specs:
        shape = np.shape(feeds[spec.name])
        if shape:
            return int(shape[0])
    return 1


@dataclass
class BenchReport:
    """A `normfold bench` run: the model, optionally the one it was compared with."""

    provider: str
    threads: int | None
    optimize: bool
    warmup: int
    inputs: str
    models: list[LatencyStats] = field(default_factory=list)

    @property
    def ratio(self) -> dict | None:
        """other / model for p50 and min (> 1: the model is faster), or None with one model."""
        if len(self.models) < 2:
            return None
        model, other = self.models[:2]
        return {key: getattr(other, key) / getattr(model, key) if getattr(model, key) > 0 else None
                for key in ("p50", "min")}

    def to_dict(self) -> dict:
        """JSON-ready form (times in milliseconds, throughput in samples/s)."""
        return {"provider": self.provider, "threads": self.threads, "ort_opt": "all" if self.optimize else "none",
                "warmup": self.warmup, "runs": self.models[0].runs if self.models else 0, "inputs": self.inputs,
                "models": [m.to_dict() for m in self.models], "ratio": self.ratio}


def bench(
    model: Model,
    against: Model | None = None,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    feeds: Inputs = None,
    shapes: dict[str, tuple[int, ...] | str] | list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    samples: int = 1,
    optimize: bool = True,
) -> BenchReport:
    """`normfold bench`: time `model` (and `against`, interleaved) on the same
    inputs; generated ones use `seed` and `samples` as `normfold verify` does."""
    prepared, specs = _prepare([model] if against is None else [model, against])
    data, source = resolve_inputs(feeds, specs, shapes, seed, samples)
    stats = _measure(prepared, specs, data, provider, threads, warmup, runs, optimize)
    return BenchReport(provider=provider, threads=threads, optimize=optimize, warmup=warmup, inputs=source,
                       models=stats)
