"""File-level commands: load a model, run passes, write the result, summarise."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .graph import count_ops, export_detached, import_graph
from .model_io import load_model, save_model
from .pipeline import GraphPass
from .report import PassReport


@dataclass
class RunSummary:
    """Before/after facts of one command run on one model file."""

    input: Path
    output: Path
    ops_before: Counter
    ops_after: Counter
    bytes_before: int
    bytes_after: int
    reports: list[PassReport] = field(default_factory=list)
    watched_ops: tuple[str, ...] = ("BatchNormalization",)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "input": str(self.input),
            "output": str(self.output),
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ops_before": {op: self.ops_before.get(op, 0) for op in self.watched_ops},
            "ops_after": {op: self.ops_after.get(op, 0) for op in self.watched_ops},
            "passes": [r.to_dict() for r in self.reports],
        }


def fold_bn_file(model_path: Path, out: Path, *, inplace: bool, direction: str, standalone: str) -> RunSummary:
    """`normfold fold-bn` on files: fold, write atomically, summarise."""
    from .passes.fold_bn import fold_bn

    return rewrite_file(model_path, out, inplace, [(fold_bn, {"direction": direction, "standalone": standalone})])


def fuse_file(model_path: Path, out: Path, *, inplace: bool, ops: tuple[str, ...], target: str) -> RunSummary:
    """`normfold fuse` on files: fuse, write atomically, summarise."""
    from .passes.fuse_norms import fuse_norms

    summary = rewrite_file(model_path, out, inplace, [(fuse_norms, {"ops": ops, "target": target})])
    summary.watched_ops = tuple(op for op in FUSE_WATCHED if summary.ops_before.get(op) or summary.ops_after.get(op))
    return summary


# ops whose counts show what fusing did: the decomposed pieces and the fused ops
FUSE_WATCHED = ("InstanceNormalization", "ReduceMean", "ReduceL2", "Sqrt", "GroupNormalization",
                "LayerNormalization", "RMSNormalization", "GroupNorm", "LayerNorm", "RMSNorm",
                "FilterResponseNorm", "WeightNorm")


def rewrite_file(model_path: Path, out: Path, inplace: bool, passes: list[tuple[GraphPass, dict]]) -> RunSummary:
    """Load `model_path`, apply `passes` in order, write `out`, summarise. Weights
    no pass changed are never copied in memory."""
    loaded = load_model(model_path)
    graph = import_graph(loaded.model)
    reports = [graph_pass(graph, **options) for graph_pass, options in passes]
    model, detached = export_detached(graph, like=loaded.model)
    written = save_model(
        model, out, source=loaded.path, protect=loaded.external_files, inplace=inplace,
        external_data=True if loaded.had_external_data else None, detached=detached,
    )
    return RunSummary(
        input=model_path, output=out,
        ops_before=count_ops(loaded.model.graph), ops_after=count_ops(model.graph),
        bytes_before=loaded.file_bytes, bytes_after=written, reports=reports,
    )
