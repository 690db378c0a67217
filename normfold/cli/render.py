"""Terminal rendering of every normfold report (rich tables): the only module
that prints them; the library returns data."""

from __future__ import annotations

import io
import re

from rich.console import Console
from rich.table import Table

from normfold.ops.table import DOMAIN, FAMILY_TITLES
from normfold.pipeline.files import RunSummary
from normfold.pipeline.speed_check import SpeedCheck, threads_label
from normfold.report import Skip
from normfold.tools.bench import BenchReport
from normfold.tools.demo import FOLD_COLUMNS, FUSE_COLUMNS, DemoResult
from normfold.tools.export import ExportResult
from normfold.verify.report import VerifyReport

console = Console()
_QUOTED = re.compile(r"'[^']*'")  # a tensor or node name inside a reason


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_summary(summary: RunSummary, check: bool = True) -> None:
    """Print what a command did to one model: counts before/after, then per pass
    what changed and what was left and why, then (with `check`) the output check."""
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
            console.print(left_table(report.skipped))
    if check:
        print_check(summary)


def print_check(summary: RunSummary, configurations: bool = True) -> None:
    """Print the output check: one line per configuration (unless not
    `configurations`), then each rollback with its reason."""
    if summary.verification is None:
        console.print("output check: skipped (--no-check)", highlight=False)
        return
    if configurations:
        console.print(f"[bold]output check[/] ({summary.verification.inputs}, {summary.verification.samples} "
                      f"sample(s), against {summary.verification.reference}):", highlight=False)
    for config in summary.verification.configurations if configurations else ():
        style = {"pass": "green", "fail": "red"}.get(config.status, "yellow")
        console.print(f"  [{style}]{config.line()}[/]", highlight=False)
    for rollback in summary.rollbacks:
        console.print(f"  [yellow]rolled back[/] {rollback.pass_name} {rollback.node} ({rollback.op} -> "
                      f"{rollback.into}): {rollback.reason}", highlight=False)


def left_table(skipped: list[Skip]) -> Table:
    """What a pass left, grouped: one row per op and reason (the tensor and node
    names in a reason replaced by '…'), with the count and the first node; --json
    keeps every node."""
    groups: dict[tuple[str, str], list[Skip]] = {}
    for skip in skipped:
        groups.setdefault((skip.op, _QUOTED.sub("'…'", skip.reason)), []).append(skip)
    table = Table(show_header=True, header_style="bold")
    table.add_column("left as is", justify="right")
    table.add_column("op")
    table.add_column("reason")
    table.add_column("first node" if any(len(g) > 1 for g in groups.values()) else "node")
    for (op, reason), members in sorted(groups.items(), key=lambda item: -len(item[1])):
        first = members[0]
        where = f"{first.graph}/{first.node}" if first.graph else first.node
        table.add_row(str(len(members)), op, reason if len(members) > 1 else first.reason, where)
    return table


def print_recalibration(summary: RunSummary) -> None:
    """Print a recalibrate run: the rewrite summary, then the data seen and the largest changes."""
    print_summary(summary)
    console.print(summary.reports[0].describe())


def print_optimized(summary: RunSummary) -> None:
    """Print an optimize run: the rewrite summary, the verification report, the rollbacks."""
    print_summary(summary, check=summary.verification is None)
    if summary.speed is not None:
        print_speed(summary.speed)
    if summary.verification is not None:
        print_report(summary.verification)
        print_check(summary, configurations=False)


def print_speed(check: SpeedCheck, console: Console | None = None) -> None:
    """Print the speed check: the measured speed-up of the written model with its
    noise at each thread count, and each fused kind reverted with the numbers that reverted it."""
    console = console or _wide_console()
    table = Table(title=f"speed ({check.provider}, onnxruntime optimizations: all; "
                        "speed-up = time before / time after, ± the ~95% interval's half-width)",
                  title_justify="left")
    for column, justify in (("model", "left"), ("threads", "left"), ("before ms", "right"), ("after ms", "right"),
                            ("speed-up", "right"), ("rounds", "right")):
        table.add_column(column, justify=justify)

    def row(label, threads, c):
        table.add_row(label, threads_label(threads), f"{c.baseline_ms:.3f}", f"{c.candidate_ms:.3f}",
                      f"{c.ratio:.3f}x ± {c.noise:.3f}", str(c.rounds))

    if check.reverted:
        for t in check.timings:
            row("every kind fused", t.threads, t.first)
        for r in check.reverted:
            row(f"{FAMILY_TITLES[r.family]} left unfused (before: every kind fused)", r.threads, r.gain)
    for t in check.timings:
        row("written" if check.reverted else "written (nothing reverted)", t.threads, t.result)
    console.print(table)
    if check.reverted:
        titles = ", ".join(FAMILY_TITLES[r.family] for r in check.reverted)
        console.print(f"reverted (made the model slower beyond noise): {titles}", highlight=False)
    if any(t.result.slower for t in check.timings):
        console.print("the written model is still slower than the input beyond noise "
                      "(not the fused kinds: the other passes or the machine)", highlight=False)


def _wide_console() -> Console:
    """A console that keeps table rows on one line in logs (rich would wrap at 80 columns)."""
    wide = Console()
    if not wide.is_terminal:
        wide.width = max(wide.width, 140)
    return wide


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
    console = console or _wide_console()
    console.print(report_table(report))
    console.print(_tolerance_line(report), highlight=False)
    for config in report.configurations:
        console.print(f"configuration {config.line()}", highlight=False)
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


def print_bench(report: BenchReport, console: Console | None = None) -> None:
    """Print the latency table and, with two models, the ratio."""
    console = console or _wide_console()
    threads = report.threads or "onnxruntime default"
    table = Table(title=f"{report.provider}, threads: {threads}, onnxruntime optimizations: "
                        f"{'all' if report.optimize else 'none'}, {report.warmup} warm-up + "
                        f"{report.models[0].runs} timed runs, {report.inputs}", title_justify="left")
    table.add_column("model")
    for column in ("p50 ms", "p90 ms", "min ms", "mean ms", "samples/s"):
        table.add_column(column, justify="right")
    for m in report.models:
        table.add_row(m.model, f"{m.p50:.3f}", f"{m.p90:.3f}",
                      f"{m.min:.3f}", f"{m.mean:.3f}", f"{m.throughput:.1f}")
    console.print(table)
    ratio = report.ratio
    if ratio is not None:
        text = ", ".join(f"{key} {value:.3f}x" for key, value in ratio.items() if value is not None)
        console.print(f"{report.models[1].model} / {report.models[0].model}: {text} (> 1: the first is faster)",
                      highlight=False)


def print_export_result(result: ExportResult, console=None) -> None:
    """Print what `export` wrote, what the passes did and the verification report."""
    console = console or Console()
    inputs = ", ".join(f"{n}: {d}[{','.join(map(str, s))}]" for n, (s, d) in result.inputs.items())
    console.print(f"wrote {result.output} ({result.exporter} exporter, opset {result.opset}, "
                  f"IR {result.ir_version}, {result.bytes_written / 1024:.1f} KB); inputs {inputs}", highlight=False)
    for report in result.passes:
        console.print(f"{report.name}: {len(report.changes)} changed, {len(report.skipped)} left", highlight=False)
    if result.verification is not None:
        print_report(result.verification, console)


def print_demo(result: DemoResult) -> None:
    """Print the demo's two tables, the BNs left and the verdict."""
    tables = (("normfold demo: fold-bn on exported PyTorch networks (TorchScript exporter, opset 17)",
               FOLD_COLUMNS, result.fold_rows, ("network",)),
              ("normfold demo: fuse (--target auto) on exported norm layers (TorchScript, opset 17)",
               FUSE_COLUMNS, result.fuse_rows, ("network", "became")))
    for number, (title, columns, rows, left_aligned) in enumerate(tables):
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="left" if column in left_aligned else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        if number == 0 and result.left:
            console.print("BN left in place, and why:")
            for line in result.left:
                console.print(f"  - {line}", highlight=False)
    console.print(f"models in {result.folder}" + ("" if result.kept else " (temporary; use --keep DIR to keep them)"))
    if not result.passed:
        console.print(f"[red]rewritten models differ from the originals (relative error {result.worst:.1e})[/]")
    else:
        console.print("all rewritten models match the originals (relative error <= 1e-5)")


def format_inspection(report: dict) -> str:
    """Human-readable form of `inspect_model`'s report."""
    opsets = ", ".join(f"{d} {v}" for d, v in report["opsets"].items())
    lines = [f"{report['model']}: IR {report['ir_version']}, opsets {opsets}, {report['nodes']} nodes",
             "ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items())]
    if report["normfold_ops"]:
        lines.append(f"{DOMAIN} ops: {', '.join(report['normfold_ops'])}")
    lines.append("functions: " + (", ".join(report["functions"]) or "none"))
    if not report["normfold_ops"]:
        lines.append("runs in any onnxruntime (no normfold ops)")
    elif report["runs_without_library"]:
        lines.append("portable: every normfold op carries its function body; runs with or without normfold's "
                     "library")
    else:
        lines.append(f"needs normfold's library (normfold.ops_library_path()) for: "
                     f"{', '.join(report['needs_library_for'])}; `normfold fuse --portable` adds the bodies")
    return "\n".join(lines)


def _api_line(api: dict, onnxruntime_version: str) -> str:
    runtime = f"onnxruntime {onnxruntime_version} serves up to {api['runtime']}"
    if api["built"] is None:
        return f"no library to read it from; {runtime}"
    verdict = "compatible" if api["compatible"] else f"NOT compatible (needs onnxruntime 1.{api['built']} or newer)"
    return f"libraries built against {api['built']}, {runtime}: {verdict}"


def format_doctor(report: dict) -> str:
    """The report as the lines `normfold doctor` prints."""
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in report["versions"].items())
    cpu, cuda, provider = report["cpu_ops"], report["cuda_ops"], report["cuda_provider"]
    install = report["install"]
    lines = [f"versions:       {versions}",
             f"installed:      {install['kind']}" + (f" ({install['source']})" if install["source"] else ""),
             f"ORT API:        {_api_line(report['onnxruntime_api'], report['versions']['onnxruntime'])}"]
    if cpu["works"]:
        loops = f"{cpu['loops']} loops, " if cpu["loops"] else ""
        lines.append(f"CPU kernels:    ok ({loops}{cpu['library']})")
    else:
        lines.append(f"CPU kernels:    NOT AVAILABLE: {cpu['error']}")
    if cuda["library"] is None:
        lines.append(f"CUDA kernels:   not built: {cuda['not_built'] or 'no libnormfold_ops_cuda.so installed'}")
    elif cuda["runs_on_gpu"] is None:
        state = "built, loads" if cuda["loads"] else "built but does NOT load"
        lines.append(f"CUDA kernels:   {state}; not run (no usable CUDA provider) ({cuda['library']})")
    else:
        state = "ok" if cuda["runs_on_gpu"] else f"FAIL on the GPU: {cuda['gpu_error']}"
        lines.append(f"CUDA kernels:   {state} ({cuda['library']})")
    lines.append(f"providers:      {', '.join(report['providers'])}")
    lines.append("CUDA provider:  " + ("usable" if provider["usable"] else f"not usable: {provider['error']}"))
    if report["advice"]:
        lines.append(f"to fix:         {report['advice']}")
    return "\n".join(lines)
