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
    layers, replaces the subgraphs exporters emit for GroupNorm, LayerNorm,
    RMSNorm, Filter Response Norm and weight norm with single fast ops,
    explains everything it leaves, and proves the result equivalent to the
    original ONNX or PyTorch model.

    \b
    Example:
      normfold demo                      # see it work on built-in models
      normfold fold-bn model.onnx -o model.folded.onnx
      normfold fuse model.onnx -o model.fused.onnx
      normfold verify model.folded.onnx --against model.onnx
    """


@main.command("fold-bn")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".folded")
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


@main.command("fuse")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".fused")
@click.option("--ops", default="gn,ln,rms,frn,wn", show_default=True, metavar="LIST",
              help="Comma-separated kinds to fuse: gn (GroupNorm), ln (LayerNorm), rms (RMSNorm), "
                   "frn (Filter Response Norm), wn (weight norm / weight standardisation).")
@click.option("--target", type=click.Choice(["auto", "custom", "standard"]), default="auto", show_default=True,
              help="custom: com.normfold ops (need normfold's onnxruntime library); standard: ONNX "
                   "LayerNormalization-17 / GroupNormalization-21 / RMSNormalization-23 where the model's "
                   "opset has them (others are left as they are); auto: per kind, what runs fastest in "
                   "onnxruntime (custom GroupNorm, channel-first LayerNorm and FRN; standard LayerNorm and "
                   "RMSNorm where the opset has them, else custom).")
@json_option
@quiet_option
def fuse_command(model, output, inplace, ops, target, json_path, quiet):
    """Replace normalization subgraphs with one op each.

    Finds what the PyTorch exporters emit for GroupNorm (+SiLU), LayerNorm
    (last axes, channel-first as in ConvNeXt, Transpose-LN-Transpose),
    RMSNorm, Filter Response Norm (+TLU) and weight norm, and replaces each
    with a single node. Matching is exact: every constant and layout is
    checked, and anything that only looks similar is left alone and listed
    with the reason. Constant weight norm / weight standardisation is computed
    offline. Models using com.normfold ops run in any onnxruntime session that
    registers normfold.ops_library_path() (see README). MODEL is never
    modified unless --inplace.

    \b
    Example:
      normfold fuse unet.onnx -o unet.fused.onnx
      normfold fuse llm.onnx --ops rms,ln --target standard --json report.json
      normfold verify unet.fused.onnx --against unet.onnx
    """
    from .commands import fuse_file
    from .passes.fuse_norms import OPS

    kinds = tuple(k.strip() for k in ops.split(",") if k.strip())
    unknown = [k for k in kinds if k not in OPS]
    if unknown or not kinds:
        raise click.BadParameter(f"unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(OPS)}", param_hint="--ops")
    out = output_path(model, output, inplace, ".fused")
    summary = fuse_file(model, out, inplace=inplace, ops=kinds, target=target)
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
    """Fold BatchNorm and fuse norm layers in built-in PyTorch networks.

    Builds networks with BN in every placement normfold handles (conv→BN,
    convT→BN, Linear→BN1d, BN→conv, BN after concat, grouped and depthwise
    conv) and blocks with GroupNorm+SiLU, ConvNeXt's channel-first LayerNorm,
    RMSNorm and FRN+TLU; exports them to ONNX, runs fold-bn and fuse, runs
    original and rewritten model in onnxruntime on the same input and prints
    node counts and the largest difference (exit 1 above 1e-5 relative).
    Needs PyTorch (pip install 'normfold[torch]').

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


from .cli_options import data_options, provider_option, tolerance_options, weights_option  # noqa: E402


@main.command("verify")
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--against", "reference", required=True, metavar="REFERENCE",
              help="What CANDIDATE must compute: an .onnx model (run with graph optimizations off), "
                   "package.module:callable returning an nn.Module, a TorchScript file or a torch.export .pt2.")
@weights_option
@data_options
@tolerance_options
@provider_option
@click.option("--localize", is_flag=True,
              help="Also report the first node (ONNX reference) or module (PyTorch reference) whose "
                   "output diverges.")
@json_option
@quiet_option
def verify_command(candidate, reference, weights, shapes, inputs_path, seed, samples, atol, rtol, provider,
                   localize, json_path, quiet):
    """Check that CANDIDATE computes what a reference model computes.

    Runs both on the same inputs (generated, or --inputs) and compares every
    output: max abs/rel error, mean abs error, cosine similarity, share of
    elements outside tolerance, NaN/Inf. Outputs are matched by name, or by
    position when the names differ. Exit 0: equivalent; 1: mismatch; 2: bad
    usage or input.

    \b
    Example:
      normfold verify model.folded.onnx --against model.onnx --localize
      normfold verify model.onnx --against mypkg.nets:make_resnet --weights resnet.pt \\
          --shape images=8x3x224x224 --samples 4 --json verify.json
    """
    from .verify import verify
    from .verify_report import print_report

    report = verify(candidate, reference, weights=weights, inputs=inputs_path, shapes=list(shapes), seed=seed,
                    samples=samples, atol=atol, rtol=rtol, provider=provider, localize=localize)
    _emit_checked(report, print_report, json_path, quiet)


@main.command("export")
@click.argument("module", metavar="package.module:callable")
@click.option("--input-shape", "input_shapes", multiple=True, required=True, metavar="[NAME=]SHAPE[:DTYPE]",
              help="Shape of a forward argument, e.g. 1x3x224x224 or tokens=1x128:int64 (repeatable; "
                   "float32 unless a dtype is given).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Where to write the ONNX model.")
@weights_option
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--dynamo/--legacy", default=True, show_default=True,
              help="torch.export-based exporter, or the TorchScript-based one.")
@click.option("--dynamic-batch", is_flag=True, help="Make dimension 0 of every input and output dynamic.")
@click.option("--optimize", is_flag=True, help="Run normfold's passes (BatchNorm folding) on the export.")
@click.option("--verify", "verify_after", is_flag=True,
              help="Verify the written model against the module (exit 1 on mismatch).")
@tolerance_options
@json_option
@quiet_option
def export_command(module, input_shapes, output, weights, opset, dynamo, dynamic_batch, optimize, verify_after,
                   atol, rtol, json_path, quiet):
    """Export a PyTorch module to ONNX (eval mode), optionally optimize and verify it.

    \b
    Example:
      normfold export mypkg.nets:make_resnet --input-shape 1x3x224x224 -o resnet.onnx
      normfold export mypkg.nets:make_resnet --weights resnet.pt --input-shape images=1x3x224x224 \\
          --dynamic-batch --optimize --verify -o resnet.onnx
    """
    from .export import export, print_export_result

    result = export(module, input_shapes, output, weights=weights, opset=opset, dynamo=dynamo,
                    dynamic_batch=dynamic_batch, optimize=optimize, verify=verify_after, atol=atol, rtol=rtol)
    _emit_checked(result, print_export_result, json_path, quiet)


def _emit_checked(result, render, json_path: Path | None, quiet: bool) -> None:
    """Write `result` as JSON and/or render it; raise CheckFailed if it did not pass."""
    from .errors import CheckFailed

    if json_path is not None:
        write_json(result.to_dict(), json_path)
    if not quiet and (json_path is None or str(json_path) != "-"):
        render(result)
    if not result.passed:
        report = getattr(result, "verification", None) or result
        raise CheckFailed(f"verification failed: {report.verdict()}")


if __name__ == "__main__":
    main()
