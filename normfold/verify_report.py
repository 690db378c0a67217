"""The outcome of `verify`: per-output metrics, pass/fail, and its renderings
(rich table on the terminal, plain text for assertion messages, JSON for CI)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from .compare import OutputComparison
from .localize import Localization


@dataclass
class VerifyReport:
    """Candidate vs reference over all samples."""

    candidate: str
    reference: str
    reference_kind: str  # "onnx" or "pytorch"
    provider: str
    inputs: str  # where the inputs came from, e.g. "generated, seed 0"
    samples: int
    matched_by: str  # "name" or "position"
    outputs: list[OutputComparison] = field(default_factory=list)
    localization: Localization | None = None

    @property
    def passed(self) -> bool:
        """Every output within tolerance and free of NaN/Inf."""
        return all(o.passed for o in self.outputs)

    def failed_outputs(self) -> list[OutputComparison]:
        """The outputs that failed."""
        return [o for o in self.outputs if not o.passed]

    def verdict(self) -> str:
        """One line: PASS/FAIL and how many outputs."""
        if self.passed:
            return f"PASS: all {len(self.outputs)} outputs within tolerance"
        failed = self.failed_outputs()
        return (f"FAIL: {len(failed)} of {len(self.outputs)} outputs differ: "
                + "; ".join(f"{o.name} ({o.why()})" for o in failed))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "passed": self.passed,
            "candidate": self.candidate,
            "reference": self.reference,
            "reference_kind": self.reference_kind,
            "provider": self.provider,
            "inputs": self.inputs,
            "samples": self.samples,
            "matched_by": self.matched_by,
            "outputs": [o.to_dict() for o in self.outputs],
            "localization": self.localization.to_dict() if self.localization else None,
        }


def report_table(report: VerifyReport) -> Table:
    """The per-output table (title: what was compared, how outputs were matched)."""
    how = "by name" if report.matched_by == "name" else "by position (names differ)"
    table = Table(title=f"{report.candidate} vs {report.reference} ({report.reference_kind}), "
                        f"{report.samples} sample(s) of {report.inputs}, outputs matched {how}",
                  title_justify="left")
    table.add_column("output")
    for column in ("max abs", "max rel", "mean abs", "cosine", "outside", "NaN/Inf"):
        table.add_column(column, justify="right")
    table.add_column("result")
    for o in report.outputs:
        named_reference = report.reference_kind == "onnx" and o.reference_name != o.name
        name = f"{o.name} = {o.reference_name}" if named_reference else o.name
        metrics = [f"{o.max_abs:.2e}", f"{o.max_rel:.2e}", f"{o.mean_abs:.2e}", f"{o.cosine:.6f}",
                   f"{o.outside_share:.2%}", f"{o.nonfinite_candidate}/{o.nonfinite_reference}"]
        if o.problem:  # not compared, e.g. different shapes
            metrics = ["-"] * len(metrics)
        table.add_row(f"{name} [{'x'.join(map(str, o.shape))}]", *metrics, "ok" if o.passed else "FAIL")
    return table


def _tolerance_line(report: VerifyReport) -> str:
    tolerances = sorted({(o.atol, o.rtol) for o in report.outputs})
    text = ", ".join(f"atol {a:g} rtol {r:g}" for a, r in tolerances)
    return (f"pass: |candidate - reference| <= atol + rtol*|reference| ({text}); max rel uses "
            f"max(|reference|, atol/rtol); NaN/Inf column: candidate/reference, always a failure")


def print_report(report: VerifyReport, console: Console | None = None) -> None:
    """Print the table, notes, localization and verdict."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # CI logs: rich would wrap the table at 80 columns
            console.width = max(console.width, 140)
    console.print(report_table(report))
    console.print(_tolerance_line(report), highlight=False)
    for o in report.outputs:
        for note in o.notes:
            console.print(f"note: {o.name}: {note}")
    if report.localization is not None:
        console.print(report.localization.summary(), highlight=False)
    style = "bold green" if report.passed else "bold red"
    console.print(f"[{style}]{report.verdict()}[/]", highlight=False)


def report_text(report: VerifyReport, width: int = 200) -> str:
    """The printed report as plain text (no colours), e.g. for an AssertionError."""
    buffer = io.StringIO()
    print_report(report, Console(file=buffer, width=width, no_color=True, force_terminal=False))
    return buffer.getvalue()
