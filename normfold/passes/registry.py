"""The pass registry: every graph pass by name, in the order `optimize` runs them.

One row per pass: the function (`run(graph, **options) -> PassReport`), its
default options, the op types whose counts show what it did, and one line on
what it does. The Python API, `optimize` and every command look passes up
here, so they run them alike.

A pass whose options include `exclude` (a frozenset of node names: the `node`
of the changes it reports) leaves those nodes as they are; the output check
(`normfold.pipeline.deploy_check`) rolls back a breaking rewrite that way. Every
rewriting pass takes it; one without it cannot be rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from normfold.errors import NormfoldError
from normfold.ops.table import FAMILIES, OPS
from normfold.passes.canonicalize import canonicalize
from normfold.passes.cleanup import cleanup
from normfold.passes.fold_affine import fold_affine
from normfold.passes.fold_bn import fold_bn
from normfold.passes.fold_weight_norm import fold_weight_norm
from normfold.passes.fuse.fuse_norms import fuse_norms
from normfold.passes.recalibrate import recalibrate_graph
from normfold.report import PassReport

GraphPass = Callable[..., PassReport]

# ops of the weight-side subgraphs, and what replaces a runtime weight norm
WEIGHT_OPS = ("ReduceL2", "LpNormalization", "ReduceMean", "Sqrt", "Div", "WeightNorm")
# ops whose counts show what fusing did: the decomposed pieces, the standard and the fused ops
FUSE_OPS = ("InstanceNormalization", "ReduceMean", "ReduceL2", "Sqrt", "GroupNormalization", "LayerNormalization",
            "RMSNormalization", *OPS)
AFFINE_OPS = ("Mul", "Div", "Add", "Sub", "BatchNormalization")  # the steps fold-affine folds
FUSE_FAMILIES = tuple(f for f in FAMILIES if f != "wn")  # what `optimize` fuses: weight norm is fold-wn's


@dataclass(frozen=True)
class PassSpec:
    """One registered pass."""

    name: str
    run: GraphPass
    summary: str
    options: dict = field(default_factory=dict)
    watched: tuple[str, ...] = ("BatchNormalization",)
    needs_data: bool = False


PASSES: dict[str, PassSpec] = {spec.name: spec for spec in (
    PassSpec("recalibrate", recalibrate_graph, "AdaBN: BatchNorm statistics re-estimated on target data",
             {"data": None, "progress": None}, needs_data=True),
    PassSpec("canonicalize", canonicalize, "the form the other passes match on: constant (weight-side) subgraphs "
             "evaluated once, exactly; no-op Identity/Cast/Expand/Reshape dropped", {"exclude": frozenset()},
             watched=("Shape", "Cast", "Identity", "BatchNormalization")),
    PassSpec("fold-wn", fold_weight_norm, "weight norm / standardisation / cosine-normalised weights computed "
             "offline, first, so that BatchNorm folds into constant weights", {"exclude": frozenset()},
             watched=WEIGHT_OPS),
    PassSpec("fold-bn", fold_bn, "BatchNorm folded into neighbouring Conv/ConvTranspose/Gemm/MatMul",
             {"direction": "both", "standalone": "keep", "exclude": frozenset()}),
    PassSpec("fuse", fuse_norms, "GroupNorm, LayerNorm, RMSNorm and FRN subgraphs replaced by one op each",
             {"ops": FUSE_FAMILIES, "target": "auto", "exclude": frozenset()}, watched=FUSE_OPS),
    PassSpec("fold-affine", fold_affine, "per-channel Mul/Div/Add/Sub chains by constants (input standardisation, "
             "layer scale) and BatchNorm left by fold-bn folded into neighbouring linear layers, after fuse so "
             "that norms keep their γ/β", {"direction": "both", "exclude": frozenset()}, watched=AFFINE_OPS),
    PassSpec("cleanup", cleanup, "Identity, inference Dropout and dead code removed", {"exclude": frozenset()},
             watched=("Identity",)),
)}
PASS_ORDER = tuple(PASSES)
GRAPH_PASSES = tuple(name for name, spec in PASSES.items() if not spec.needs_data)


def parse_passes(text: str | None, with_data: bool = False) -> tuple[str, ...]:
    """The passes of a comma-separated `--passes` value, in PASS_ORDER. None: all of
    them, recalibrate included only `with_data`; recalibrate and data go together."""
    if text is None:
        return PASS_ORDER if with_data else GRAPH_PASSES
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(names - set(PASS_ORDER))
    if unknown or not names:
        raise NormfoldError(f"--passes: unknown pass(es) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(PASS_ORDER)}")
    if ("recalibrate" in names) != with_data:
        raise NormfoldError("--passes recalibrate and --data CALIB go together: give both or neither")
    return tuple(p for p in PASS_ORDER if p in names)


def steps(names: tuple[str, ...], exclude: dict[str, frozenset[str]] | None = None,
          **options) -> list[tuple[GraphPass, dict]]:
    """(function, options) of each pass in `names`, in the order given: the
    registered defaults updated with those of `options` the pass takes;
    `exclude`: per pass name, the nodes it must leave alone."""
    chosen = []
    for name in names:
        spec = PASSES[name]
        chosen.append((spec.run, {**spec.options, **{k: v for k, v in options.items() if k in spec.options},
                                  **({"exclude": exclude[name]} if exclude and name in exclude else {})}))
    return chosen


def watched_ops(names: tuple[str, ...]) -> tuple[str, ...]:
    """The op types whose counts show what the passes `names` did."""
    return tuple(dict.fromkeys(op for name in names for op in PASSES[name].watched))
