"""File-level commands: load a model, run passes, write the result, summarise."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .graph import count_ops
from .model_io import load_model, save_model
from .pipeline import fold_bn
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
    loaded = load_model(model_path)
    folded, report = fold_bn(loaded.model, direction=direction, standalone=standalone)
    written = save_model(
        folded, out, source=loaded.path, inplace=inplace,
        external_data=True if loaded.had_external_data else None,
    )
    return RunSummary(
        input=model_path, output=out,
        ops_before=count_ops(loaded.model.graph), ops_after=count_ops(folded.graph),
        bytes_before=loaded.file_bytes, bytes_after=written, reports=[report],
    )
