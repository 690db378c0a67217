"""Terminal rendering (normfold.cli.render): what a pass left is grouped by reason."""

from __future__ import annotations

import io

from rich.console import Console

from normfold.cli.render import left_table
from normfold.report import Skip


def rendered(table) -> list[str]:
    buffer = io.StringIO()
    Console(file=buffer, width=200, no_color=True).print(table)
    return [line for line in buffer.getvalue().splitlines() if "│" in line]


def test_left_candidates_are_grouped_by_reason_with_counts():
    skipped = [Skip(f"/block{i}/ReduceMean", "ReduceMean", f"rank of '/block{i}/Sub_output_0' is unknown")
               for i in range(3)]
    skipped.append(Skip("/bn", "BatchNormalization", "forward: consumer Relu '/Relu' is not a foldable layer",
                        graph="loop_body"))
    rows = rendered(left_table(skipped))
    assert len(rows) == 2
    first, second = ([cell.strip() for cell in row.strip("│").split("│")] for row in rows)
    assert first == ["3", "ReduceMean", "rank of '…' is unknown", "/block0/ReduceMean"]
    # a reason met once keeps its names
    assert second == ["1", "BatchNormalization", "forward: consumer Relu '/Relu' is not a foldable layer",
                      "loop_body//bn"]
