"""Options shared by normfold's commands, defined once so each flag means the
same thing everywhere (`-o`, `--inplace`, `--json`, `--quiet`, `--provider`)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click


def output_options(suffix: str):
    """`-o/--output PATH` and `--inplace` for commands that write a model; by
    default the result goes next to MODEL with `suffix` added before .onnx."""

    def decorate(func):
        @click.option("-o", "--output", type=click.Path(path_type=Path),
                      help=f"Where to write the result (default: MODEL with '{suffix}' added before .onnx).")
        @click.option("--inplace", is_flag=True, help="Replace MODEL with the result (atomically).")
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            return func(*args, **kwargs)

        return wrapper

    return decorate


def json_option(func):
    """`--json PATH` ('-' for standard output) for a machine-readable report."""
    return click.option(
        "--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
        help="Also write the report as JSON to PATH ('-' for standard output, replacing the table).",
    )(func)


def quiet_option(func):
    """`-q/--quiet`: print nothing but errors."""
    return click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(func)


PROVIDER_CHOICE = click.Choice(["cpu", "cuda"])  # the execution providers a command can run a model on


def provider_option(func):
    """`--provider cpu|cuda` for commands that run a model."""
    return click.option(
        "--provider", type=PROVIDER_CHOICE, default="cpu", show_default=True,
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


def data_options(func):
    """Input data for commands that run a model: `--shape NAME=1x3x224x224`
    (repeatable), `--inputs FILE.npz`, `--seed N`, `--samples N`."""

    @click.option("--shape", "shapes", multiple=True, metavar="NAME=SHAPE",
                  help="Size of an input with dynamic dimensions, e.g. --shape images=1x3x224x224 "
                       "(repeatable; NAME may be left out when the model has one input).")
    @click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path),
                  help="Run on these inputs instead of generated ones: an .npz (numpy.savez) with one "
                       "array per model input, same names, dtypes and sizes.")
    @click.option("--seed", type=int, default=0, show_default=True,
                  help="Seed of the generated inputs (floats standard normal, integers in [0, 10), "
                       "uint8 in [0, 256), bool 50/50).")
    @click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Number of generated input batches to run.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


CONFIGS_HELP = ("Comma-separated onnxruntime configurations to check in: lib-none, lib-all, nolib-none, nolib-all "
                "(normfold's library registered or not; graph optimizations ORT_DISABLE_ALL or ORT_ENABLE_ALL). "
                "Default: all four; those that cannot apply (library not built, or needed and not "
                "registered) are reported as n/a.")


def configs_option(func):
    """`--configs LIST`: the deployment configurations a model is run in."""
    return click.option("--configs", default=None, metavar="LIST", help=CONFIGS_HELP)(func)


def check_options(shape: bool = True):
    """`--check/--no-check` and `--configs` for commands that write a model
    (and `--shape` unless the command has `data_options`)."""

    def decorate(func):
        func = configs_option(func)
        func = click.option("--check/--no-check", "check", default=True, show_default=True,
                            help="Before writing, run the result in onnxruntime in every configuration (see "
                                 "--configs) on generated inputs and compare it with MODEL; roll back the "
                                 "rewrites that break it (reported with the reason).")(func)
        if shape:
            func = click.option("--shape", "shapes", multiple=True, metavar="NAME=SHAPE",
                                help="Size of an input's dynamic dimensions for the check (default: 1 each), "
                                     "e.g. --shape images=1x3x224x224 (repeatable).")(func)
        return func

    return decorate


def check_from(check: bool, configs: str | None, **data):
    """The output check of a writing command's options (None with --no-check);
    `data`: inputs, shapes, seed, samples, atol, rtol as given."""
    from normfold.pipeline.deploy_check import CheckOptions
    from normfold.runtime.session import parse_configurations

    if not check:
        return None
    return CheckOptions(configurations=parse_configurations(configs),
                        **{k: tuple(v) if k == "shapes" else v for k, v in data.items()})


def tolerance_options(func):
    """`--atol` / `--rtol` for commands that compare outputs."""

    @click.option("--atol", type=click.FloatRange(min=0), default=None,
                  help="Absolute tolerance. Default by dtype: float32 1e-4, float16 1e-2, bfloat16 5e-2, "
                       "float64 1e-7, integers and bool 0.")
    @click.option("--rtol", type=click.FloatRange(min=0), default=None,
                  help="Relative tolerance: an element passes when |candidate - reference| <= atol + "
                       "rtol*|reference|. Default by dtype: float32 1e-3, float16 1e-2, bfloat16 5e-2, "
                       "float64 1e-6, integers and bool 0. NaN/Inf always fails.")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def weights_option(func):
    """`--weights FILE` for commands that build a PyTorch module from package.module:callable."""
    return click.option(
        "--weights", type=click.Path(dir_okay=False, path_type=Path),
        help="state_dict file (torch.save) to load into the module built by package.module:callable; "
             "read with torch.load(weights_only=True).",
    )(func)


def portable_option(func):
    """--portable/--no-portable: embed the function bodies of normfold's ops."""
    return click.option(
        "--portable/--no-portable", default=True, show_default=True,
        help="Embed a standard-ONNX function body for each com.normfold op used, so the model also runs "
             "where normfold's library is not loaded (onnxruntime then inlines the bodies).",
    )(func)


def progress_for(quiet: bool, json_path: Path | None):
    """Progress of long steps (`normfold.progress`) for a command's -q and --json values."""
    from normfold.progress import progress_for as for_command

    return for_command(quiet, to_stdout=json_path is not None and str(json_path) == "-")
