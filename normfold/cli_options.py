"""Options shared by normfold's commands, defined once so each flag means the
same thing everywhere (`-o`, `--inplace`, `--json`, `--quiet`, `--provider`)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click


def output_options(func):
    """`-o/--output PATH` and `--inplace` for commands that write a model."""

    @click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                  help="Where to write the result (default: MODEL with a '.folded' suffix added before .onnx).")
    @click.option("--inplace", is_flag=True, help="Replace MODEL with the result (atomically).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def json_option(func):
    """`--json PATH` ('-' for standard output) for a machine-readable report."""
    return click.option(
        "--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
        help="Also write the report as JSON to PATH ('-' for standard output, replacing the table).",
    )(func)


def quiet_option(func):
    """`-q/--quiet`: print nothing but errors."""
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(func)


def provider_option(func):
    """`--provider cpu|cuda` for commands that run a model."""
    return click.option(
        "--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
        help="onnxruntime execution provider to run the model with.",
    )(func)


def output_path(model: Path, output: Path | None, inplace: bool, suffix: str) -> Path:
    """The path a command writes to: `output`, MODEL itself with --inplace, or
    MODEL with `suffix` inserted before '.onnx'."""
    if output is not None and inplace:
        raise click.UsageError("give either -o/--output or --inplace, not both")
    if inplace:
        return model
    if output is not None:
        return output
    return model.with_name(f"{model.stem}{suffix}{model.suffix or '.onnx'}")


def write_json(report: dict, path: Path) -> None:
    """Write `report` as JSON to `path` ('-' is standard output)."""
    text = json.dumps(report, indent=2, sort_keys=False)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
    else:
        path.write_text(text + "\n")
