"""The `normfold` command line: one thin command per library function.

Exit codes: 0 success, 1 the command ran but a check failed, 2 bad usage or
bad input (one line on stderr saying what is wrong and what to do).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .cli_options import json_option, output_options, output_path, quiet_option, write_json
from .errors import EXIT_BAD_INPUT, NormfoldError

INTERNAL_ERROR = 3


class NormfoldGroup(click.Group):
    """Turns NormfoldError into one stderr line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NormfoldError as exc:
            click.echo(f"normfold: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MemoryError:
            click.echo("normfold: error: out of memory; try a machine with more RAM", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except Exception as exc:  # a bug in normfold: say so, keep the traceback one variable away
            if os.environ.get("NORMFOLD_DEBUG"):
                traceback.print_exc()
            click.echo(
                f"normfold: internal error: {type(exc).__name__}: {exc} (a bug in normfold; "
                "rerun with NORMFOLD_DEBUG=1 for the traceback and report it)",
                err=True,
            )
            ctx.exit(INTERNAL_ERROR)


@click.group(cls=NormfoldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="normfold")
def main():
    """normfold: make ONNX models exported from PyTorch deployment-ready.

    Folds inference BatchNorm into neighbouring Conv/ConvTranspose/Gemm/MatMul
    layers, explains every one it leaves, and checks the result.

    \b
    Example:
      normfold demo                      # see it work on built-in models
      normfold fold-bn model.onnx -o model.folded.onnx
    """


@main.command("fold-bn")
@click.argument("model", type=click.Path(path_type=Path))
@output_options
@click.option("--direction", type=click.Choice(["both", "backward", "forward"]), default="both", show_default=True,
              help="backward: into the layer producing the BN input; forward: into the layers consuming its output.")
@click.option("--standalone", type=click.Choice(["keep", "affine"]), default="keep", show_default=True,
              help="What to do with a BN that cannot be folded: keep it, or rewrite it as Mul+Add.")
@json_option
@quiet_option
def fold_bn_command(model, output, inplace, direction, standalone, json_path, quiet):
    """Fold inference BatchNormalization into neighbouring linear layers.

    Every BN whose fold is exact is folded: backward into a Conv, ConvTranspose,
    Gemm or MatMul(+Add) that produces its input, or forward into the Conv
    (unpadded, or with zero shift), Gemm or MatMul layers that consume its
    output. Every BN left in place is listed with the reason. Subgraphs of
    If/Loop/Scan are processed too. MODEL is never modified unless --inplace.

    \b
    Example:
      normfold fold-bn resnet.onnx -o resnet.folded.onnx
      normfold fold-bn resnet.onnx --json report.json --standalone affine
    """
    from .commands import fold_bn_file

    out = output_path(model, output, inplace, ".folded")
    summary = fold_bn_file(model, out, inplace=inplace, direction=direction, standalone=standalone)
    _emit(summary, json_path, quiet)


def _emit(summary, json_path: Path | None, quiet: bool) -> None:
    from .console import print_summary

    if json_path is not None:
        write_json(summary.to_dict(), json_path)
    if not quiet and (json_path is None or str(json_path) != "-"):
        print_summary(summary)


@main.command("demo")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the exported and folded models in this folder.")
def demo_command(keep):
    """Fold BatchNorm in small built-in PyTorch networks and show the result.

    Builds networks with BN in every placement normfold handles (conv→BN,
    convT→BN, Linear→BN1d, BN→conv, BN after concat, grouped and depthwise
    conv), exports them to ONNX, folds them, runs original and folded model
    in onnxruntime on the same input and prints BN and node counts and the
    largest difference. Needs PyTorch (pip install 'normfold[torch]').

    \b
    Example:
      normfold demo
      normfold demo --keep demo_models/
    """
    from .demo import run_demo

    sys.exit(run_demo(keep))


@main.command("doctor")
@json_option
def doctor_command(json_path):
    """Show what normfold can use here: versions, custom-op kernels, providers.

    Reports the onnxruntime custom-op libraries (com.normfold): whether the
    CPU and CUDA kernels were built, whether they load and run, and why not
    (the reason recorded by custom_ops/build.sh); and the onnxruntime
    execution providers, listed and actually usable. Exits with 1 when the
    CPU kernels are not available.

    \b
    Example:
      normfold doctor
      normfold doctor --json -
    """
    from .doctor import doctor, format_doctor
    from .errors import CheckFailed

    report = doctor()
    if json_path is not None:
        write_json(report, json_path)
    if json_path is None or str(json_path) != "-":
        click.echo(format_doctor(report))
    if not report["cpu_ops"]["works"]:
        raise CheckFailed("the custom-op CPU kernels are not available; rebuild with: bash custom_ops/build.sh")


if __name__ == "__main__":
    main()
