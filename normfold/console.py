"""Terminal rendering of normfold's reports (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .commands import RunSummary

console = Console()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(summary: RunSummary) -> None:
    """Print what a command did to one model: counts before/after, then per pass
    what changed and what was left and why."""
    table = Table(title=f"{summary.input} -> {summary.output}", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("nodes", str(sum(summary.ops_before.values())), str(sum(summary.ops_after.values())))
    for op in summary.watched_ops:
        table.add_row(op, str(summary.ops_before.get(op, 0)), str(summary.ops_after.get(op, 0)))
    table.add_row("size", _size(summary.bytes_before), _size(summary.bytes_after))
    console.print(table)
    for report in summary.reports:
        console.print(f"[bold]{report.name}[/]: {len(report.changes)} changed, {len(report.skipped)} left")
        for kind, n in sorted(report.counts().items()):
            console.print(f"  {n:4d} x {kind}")
        if report.skipped:
            skipped = Table(show_header=True, header_style="bold")
            skipped.add_column("left as is")
            skipped.add_column("op")
            skipped.add_column("reason")
            for skip in report.skipped:
                where = f"{skip.graph}/{skip.node}" if skip.graph else skip.node
                skipped.add_row(where, skip.op, skip.reason)
            console.print(skipped)
