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

from normfold import __version__
from normfold.cli.options import (check_from, check_options, configs_option, json_option, output_options, output_path,
                                  portable_option, progress_for, quiet_option, write_json)
from normfold.errors import EXIT_BAD_INPUT, NormfoldError, ProviderUnavailable
from normfold.ops.table import FAMILIES, FAMILY_TITLES
from normfold.passes.registry import PASS_ORDER
from normfold.pipeline.speed_check import DEFAULT_BUDGET_S

INTERNAL_ERROR = 3


class NormfoldGroup(click.Group):
    """Turns NormfoldError into one stderr line and its exit code."""

    def _provider_option(self, ctx: click.Context) -> str:
        """The running command's option that chose the execution provider (--provider, or optimize's --measure-provider)."""
        command = self.get_command(ctx, ctx.invoked_subcommand or "")
        names = [p.opts[0] for p in (command.params if command else []) if p.name in ("provider", "measure_provider")]
        return names[0] if names else "--provider"

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NormfoldError as exc:
            message = exc.for_option(self._provider_option(ctx)) if isinstance(exc, ProviderUnavailable) else str(exc)
            click.echo(f"normfold: error: {' '.join(message.split())}", err=True)  # always one line
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
      normfold optimize model.onnx -o model.opt.onnx   # every pass, verified
      normfold verify model.folded.onnx --against model.onnx
    """


@main.command("fold-bn")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".folded")
@click.option("--direction", type=click.Choice(["both", "backward", "forward"]), default="both", show_default=True,
              help="backward: into the layer producing the BN input; forward: into the layers consuming its output.")
@click.option("--standalone", type=click.Choice(["keep", "affine"]), default="keep", show_default=True,
              help="What to do with a BN that cannot be folded: keep it, or rewrite it as Mul+Add.")
@check_options()
@json_option
@quiet_option
def fold_bn_command(model, output, inplace, direction, standalone, shapes, check, configs, json_path, quiet):
    """Fold inference BatchNormalization into neighbouring linear layers.

    Every BN whose fold is exact is folded: backward into a Conv, ConvTranspose,
    Gemm or MatMul(+Add) that produces its input, or forward into the Conv
    (unpadded, or with zero shift), ConvTranspose (zero shift), Gemm or
    MatMul layers that consume its output. Every BN left in place is listed with the reason. Subgraphs of
    If/Loop/Scan are processed too. MODEL is never modified unless --inplace.

    \b
    Example:
      normfold fold-bn resnet.onnx -o resnet.folded.onnx
      normfold fold-bn resnet.onnx --json report.json --standalone affine
    """
    from normfold.pipeline.files import fold_bn_file

    out = output_path(model, output, inplace, ".folded")
    summary = fold_bn_file(model, out, inplace=inplace, direction=direction, standalone=standalone,
                           check=check_from(check, configs, shapes=shapes), progress=progress_for(quiet, json_path))
    _emit_written(summary, json_path, quiet)


@main.command("fold-affine")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".folded")
@click.option("--direction", type=click.Choice(["both", "backward", "forward"]), default="both", show_default=True,
              help="backward: into the layer producing the chain's input; forward: into the layers consuming "
                   "its output.")
@check_options()
@json_option
@quiet_option
def fold_affine_command(model, output, inplace, direction, shapes, check, configs, json_path, quiet):
    """Fold per-channel Mul/Div/Add/Sub chains by constants into linear layers.

    A chain of Mul, Div, Add, Sub by constants (scalar or one value per
    channel; operands in either order) and inference BatchNorm is composed
    into one y = a*x + t and folded where that is exact: backward into the
    Conv, ConvTranspose, Gemm or MatMul(+Add) producing its input (layer
    scale), or forward into the Conv, ConvTranspose, Gemm or MatMul layers
    consuming its output (input standardisation (x - mean) / std, min-max scaling). Before
    a Conv that zero-pads, or a ConvTranspose, only the scale folds and the
    shift stays as one Add ("partial"). Every chain left is listed with the reason. MODEL is
    never modified unless --inplace.

    \b
    Example:
      normfold fold-affine detector.onnx -o detector.folded.onnx
      normfold fold-affine convnext.onnx --direction backward --json report.json
    """
    from normfold.pipeline.files import fold_affine_file

    out = output_path(model, output, inplace, ".folded")
    summary = fold_affine_file(model, out, inplace=inplace, direction=direction,
                               check=check_from(check, configs, shapes=shapes), progress=progress_for(quiet, json_path))
    _emit_written(summary, json_path, quiet)


@main.command("fuse")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".fused")
@click.option("--ops", default=",".join(FAMILIES), show_default=True, metavar="LIST",
              help="Comma-separated kinds to fuse: " + ", ".join(f"{f} ({t})" for f, t in FAMILY_TITLES.items())
                   + ".")
@click.option("--target", type=click.Choice(["auto", "custom", "standard"]), default="auto", show_default=True,
              help="custom: com.normfold ops (need normfold's onnxruntime library); standard: ONNX "
                   "LayerNormalization-17 / GroupNormalization-21 / RMSNormalization-23 where the model's "
                   "opset has them (others are left as they are); auto: per kind, what runs fastest in "
                   "onnxruntime (custom GroupNorm, channel-first LayerNorm and FRN; standard LayerNorm and "
                   "RMSNorm where the opset has them, else custom).")
@portable_option
@check_options()
@json_option
@quiet_option
def fuse_command(model, output, inplace, ops, target, portable, shapes, check, configs, json_path, quiet):
    """Replace normalization subgraphs with one op each.

    Finds what the PyTorch exporters emit for GroupNorm (+SiLU), LayerNorm
    (last axes, channel-first as in ConvNeXt, Transpose-LN-Transpose),
    RMSNorm, Filter Response Norm (+TLU) and weight norm, and replaces each
    with a single node. Matching is exact: every constant and layout is
    checked, and anything that only looks similar is left alone and listed
    with the reason. A residual add into a LayerNorm or RMSNorm (standard
    LayerNormalization included, unless --target standard) and a per-channel
    add into a GroupNorm are fused into the norm. Constant weight norm /
    weight standardisation is computed offline. Models using com.normfold ops
    run in any onnxruntime session that registers normfold.ops_library_path()
    (see README). MODEL is never modified unless --inplace.

    \b
    Example:
      normfold fuse unet.onnx -o unet.fused.onnx
      normfold fuse llm.onnx --ops rms,ln --target standard --json report.json
      normfold verify unet.fused.onnx --against unet.onnx
    """
    from normfold.pipeline.files import fuse_file

    kinds = tuple(k.strip() for k in ops.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAMILIES]
    if unknown or not kinds:
        raise click.BadParameter(f"unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from "
                                 f"{', '.join(FAMILIES)}", param_hint="--ops")
    out = output_path(model, output, inplace, ".fused")
    summary = fuse_file(model, out, inplace=inplace, ops=kinds, target=target, portable=portable,
                        check=check_from(check, configs, shapes=shapes), progress=progress_for(quiet, json_path))
    _emit_written(summary, json_path, quiet)


@main.command("fold-wn")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".wnfolded")
@portable_option
@check_options()
@json_option
@quiet_option
def fold_wn_command(model, output, inplace, portable, shapes, check, configs, json_path, quiet):
    """Compute weight norm, weight standardisation and cosine-normalised weights offline.

    A Conv/ConvTranspose/Gemm/MatMul weight computed from constants by weight
    norm (g·v/‖v‖, both PyTorch APIs, any exporter), weight standardisation
    ((w - mean)/sqrt(var + ε), BiT / NF-Net StdConv) or cosine normalisation
    (w/‖w‖) is computed once, in float64, and stored; the subgraph is removed.
    Weight norm of a runtime tensor becomes one com.normfold.WeightNorm node.
    MODEL is never modified unless --inplace.

    \b
    Example:
      normfold fold-wn tts.onnx -o tts.wnfolded.onnx
    """
    from normfold.pipeline.files import fold_wn_file

    out = output_path(model, output, inplace, ".wnfolded")
    summary = fold_wn_file(model, out, inplace=inplace, portable=portable,
                           check=check_from(check, configs, shapes=shapes), progress=progress_for(quiet, json_path))
    _emit_written(summary, json_path, quiet)


def _emit(summary, json_path: Path | None, quiet: bool, render=None) -> None:
    """Write `summary` as JSON and/or render it (default: the rewrite summary table)."""
    if render is None:
        from normfold.cli.render import print_summary as render

    if json_path is not None:
        write_json(summary.to_dict(), json_path)
    if not quiet and (json_path is None or str(json_path) != "-"):
        render(summary)


def _emit_written(summary, json_path: Path | None, quiet: bool, render=None) -> None:
    """`_emit`, then CheckFailed when the output check refused the result (nothing written)."""
    from normfold.errors import CheckFailed

    _emit(summary, json_path, quiet, render)
    if not summary.written:
        raise CheckFailed(f"the output check failed: {summary.verification.verdict()}; {summary.output} was not "
                          "written (--no-check writes it unchecked)")


@main.command("recalibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="CALIB",
              help="Calibration data: an .npz file (one batch) or a folder of .npz files (one batch each), "
                   "with one array per model input: same names (any single name for a one-input model), "
                   "dtypes and ranks.")
@output_options(".recalibrated")
@click.option("--fold", is_flag=True, help="Then fold the recalibrated BatchNorm (as fold-bn does).")
@check_options()
@json_option
@quiet_option
def recalibrate_command(model, data, output, inplace, fold, shapes, check, configs, json_path, quiet):
    """Re-estimate BatchNorm statistics on target-domain data (AdaBN).

    Replaces the mean/var of every inference BatchNormalization with the exact
    population mean and (biased) variance of its input over all samples and
    positions of CALIB. One batch is in memory at a time; statistics are
    combined in float64 and do not depend on how CALIB is split into batches.

    Order: each BN is measured with every BN before it already recalibrated
    (as if the layers were updated one by one in forward order). BNs that do
    not depend on each other are measured in the same pass, so CALIB is read
    once per "wave": as often as the longest chain of BNs is long.

    Run it before folding (a folded model has no BN statistics left), or add
    --fold to fold right after. BNs inside If/Loop bodies are left, with the
    reason. MODEL is never modified unless --inplace.

    \b
    Example:
      normfold recalibrate resnet.onnx --data target_batches/ -o resnet.adabn.onnx
      normfold recalibrate resnet.onnx --data calib.npz --fold --json report.json
    """
    from normfold.cli.render import print_recalibration
    from normfold.pipeline.files import recalibrate_file

    out = output_path(model, output, inplace, ".recalibrated")
    progress = progress_for(quiet, json_path)
    summary = recalibrate_file(model, out, inplace=inplace, data=data, fold=fold, progress=progress,
                               check=check_from(check, configs, shapes=shapes))
    _emit_written(summary, json_path, quiet, print_recalibration)


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
    from normfold.cli.render import print_demo
    from normfold.tools.demo import run_demo

    result = run_demo(keep)
    print_demo(result)
    sys.exit(0 if result.passed else 1)


@main.command("doctor")
@json_option
def doctor_command(json_path):
    """Show what normfold can use here: versions, custom-op kernels, providers.

    Reports how normfold was installed, the onnxruntime API version its
    custom-op libraries (com.normfold) were built against and whether the
    running onnxruntime serves it, whether the CPU and CUDA kernels were
    built, load and run, and why not; the onnxruntime execution providers,
    listed and actually usable; and what to run to fix missing kernels, for
    this installation. Exits with 1 when the CPU kernels are not available.

    \b
    Example:
      normfold doctor
      normfold doctor --json -
    """
    from normfold.cli.render import format_doctor
    from normfold.tools.doctor import doctor
    from normfold.errors import CheckFailed

    report = doctor()
    if json_path is not None:
        write_json(report, json_path)
    if json_path is None or str(json_path) != "-":
        click.echo(format_doctor(report))
    if not report["cpu_ops"]["works"]:
        raise CheckFailed(f"the custom-op CPU kernels are not available; {report['advice']}")


from normfold.cli.options import (PROVIDER_CHOICE, data_options, provider_option, tolerance_options,  # noqa: E402
                                  weights_option)


@main.command("verify")
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--against", "reference", required=True, metavar="REFERENCE",
              help="What CANDIDATE must compute: an .onnx model (run with graph optimizations off), "
                   "package.module:callable returning an nn.Module, a TorchScript file or a torch.export .pt2.")
@weights_option
@data_options
@tolerance_options
@provider_option
@configs_option
@click.option("--localize", is_flag=True,
              help="Also report the first node (ONNX reference) or module (PyTorch reference) whose "
                   "output diverges.")
@json_option
@quiet_option
def verify_command(candidate, reference, weights, shapes, inputs_path, seed, samples, atol, rtol, provider,
                   configs, localize, json_path, quiet):
    """Check that CANDIDATE computes what a reference model computes.

    Runs both on the same inputs (generated, or --inputs) and compares every
    output: max abs/rel error, mean abs error, cosine similarity, share of
    elements outside tolerance, NaN/Inf. Outputs are matched by name, or by
    position when the names differ. The candidate runs in each deployment
    configuration (--configs: normfold's library registered or not,
    ORT_DISABLE_ALL or ORT_ENABLE_ALL) and must match in all. Exit 0:
    equivalent; 1: mismatch; 2: bad usage or input.

    \b
    Example:
      normfold verify model.folded.onnx --against model.onnx --localize
      normfold verify model.onnx --against mypkg.nets:make_resnet --weights resnet.pt \\
          --shape images=8x3x224x224 --samples 4 --json verify.json
    """
    from normfold.cli.render import print_report
    from normfold.runtime.session import parse_configurations
    from normfold.verify.run import verify

    report = verify(candidate, reference, weights=weights, inputs=inputs_path, shapes=list(shapes), seed=seed,
                    samples=samples, atol=atol, rtol=rtol, provider=provider,
                    configurations=parse_configurations(configs), localize=localize,
                    progress=progress_for(quiet, json_path))
    _emit_checked(report, print_report, json_path, quiet)


@main.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--against", "other", type=click.Path(path_type=Path), metavar="OTHER.onnx",
              help="Also time this model, interleaved with MODEL on the same inputs, and report OTHER/MODEL.")
@data_options
@provider_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads (default: onnxruntime's choice).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed runs of each model first.")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs of each model.")
@click.option("--ort-opt", type=click.Choice(["all", "none"]), default="all", show_default=True,
              help="onnxruntime graph optimizations: all (as deployed) or none (the graph as written).")
@json_option
@quiet_option
def bench_command(model, other, shapes, inputs_path, seed, samples, provider, threads, warmup, runs, ort_opt,
                  json_path, quiet):
    """Time MODEL in onnxruntime, optionally against another model.

    Runs warm-up rounds, then timed rounds, and reports p50/p90/min/mean
    latency and throughput (samples/s, from dimension 0 of the first input).
    With --against, both models run interleaved in this process (A, B, A, B,
    ...) on the same inputs, so machine noise reaches both alike, and the
    ratios OTHER/MODEL of p50 and min are reported (> 1: MODEL is faster).
    normfold's custom ops are registered. With --samples N, round r runs on
    sample r mod N.

    \b
    Example:
      normfold bench model.fused.onnx --against model.onnx --threads 2
      normfold bench model.onnx --shape images=8x3x224x224 --runs 100 --json bench.json
    """
    from normfold.cli.render import print_bench
    from normfold.tools.bench import bench

    report = bench(model, other, provider=provider, threads=threads, warmup=warmup, runs=runs,
                   feeds=inputs_path, shapes=list(shapes), seed=seed, samples=samples, optimize=ort_opt == "all")
    _emit(report, json_path, quiet, print_bench)


@main.command("optimize")
@click.argument("model", type=click.Path(path_type=Path))
@output_options(".optimized")
@click.option("--passes", "pass_names", default=None, metavar="LIST",
              help=f"Comma-separated subset of: {', '.join(PASS_ORDER)} (default: all; "
                   "recalibrate only with --data). They always run in that order.")
@click.option("--data", "calibration", type=click.Path(path_type=Path), metavar="CALIB",
              help="Recalibrate BatchNorm statistics on this data first (AdaBN; an .npz file or a folder of "
                   "them, see `normfold recalibrate`).")
@click.option("--target", type=click.Choice(["auto", "custom", "standard"]), default="auto", show_default=True,
              help="What fused norms become (see `normfold fuse --help`).")
@portable_option
@click.option("--check/--no-check", "--verify/--no-verify", "check", default=True, show_default=True,
              help="Before writing, run the result in onnxruntime in every configuration (see --configs) on "
                   "the same inputs as MODEL (after recalibration: the recalibrated model) and compare; roll "
                   "back the rewrites that break it, and write nothing if it still fails.")
@configs_option
@click.option("--measure/--no-measure", "measure", default=True, show_default=True,
              help="Time the result against MODEL on the CPU provider (fresh sessions, onnxruntime "
                   "optimizations on, interleaved rounds on the inputs below) and leave unfused each kind that "
                   "makes it slower beyond noise.")
@click.option("--measure-budget", type=click.FloatRange(min=0.0), default=DEFAULT_BUDGET_S, show_default=True,
              metavar="SECONDS", help="Time for the timed runs of the speed check, per thread count (at least 5 "
                                      "rounds per timing; one session and one warm-up run per model come on top).")
@click.option("--threads", type=click.IntRange(min=1), multiple=True,
              help="onnxruntime intra-op threads of the speed check; repeat it to check several thread counts "
                   "(default: 1 and onnxruntime's choice).")
@click.option("--measure-provider", type=PROVIDER_CHOICE, default="cpu", show_default=True,
              help="onnxruntime execution provider the speed check times on: the one you deploy with.")
@data_options
@tolerance_options
@json_option
@quiet_option
def optimize_command(model, output, inplace, pass_names, calibration, target, portable, check, configs, measure,
                     measure_budget, threads, measure_provider, shapes, inputs_path, seed, samples, atol, rtol,
                     json_path, quiet):
    """Run every normfold pass, then prove the result equivalent.

    Passes, in this order: recalibrate (with --data), canonicalize (constant
    subgraphs evaluated once, exactly; best shapes; no-ops dropped), fold-wn
    (weights computed from constants, so BN can fold into them), fold-bn, fuse (GroupNorm,
    LayerNorm, RMSNorm, FRN; weight norm is fold-wn's), fold-affine (per-channel
    Mul/Div/Add/Sub chains and BN left by fold-bn), cleanup (Identity,
    inference Dropout, dead nodes). The result is written to a staging file,
    run in onnxruntime against MODEL on the same inputs (generated, or
    --inputs) in every deployment configuration (--configs), and moved into
    place only if every output matches; rewrites that break it are rolled
    back and listed with the reason; exit 1 and nothing written if it still
    fails. MODEL is never modified unless --inplace.

    Never slower: first, the result is timed against MODEL on --measure-provider
    (default CPU; at most --measure-budget seconds of timed runs per thread count,
    default 6), at 1 thread and at onnxruntime's choice unless --threads is given; where it is
    slower beyond noise, each fused kind is left out in turn and those that cost
    time stay unfused. The report gives the measured speed-up with its noise and
    what was reverted. --no-measure skips it.

    \b
    Example:
      normfold optimize resnet.onnx -o resnet.opt.onnx
      normfold optimize unet.onnx --shape sample=1x4x64x64 --json report.json
      normfold optimize resnet.onnx --data target_batches/ --passes recalibrate,fold-bn
      normfold optimize vit.onnx --threads 4        # the speed check at the deployed 4 threads only
    """
    from normfold.cli.render import print_optimized
    from normfold.passes.registry import parse_passes
    from normfold.pipeline.files import optimize_file

    passes = parse_passes(pass_names, with_data=calibration is not None)
    out = output_path(model, output, inplace, ".optimized")
    summary = optimize_file(model, out, inplace=inplace, passes=passes, target=target, portable=portable,
                            calibration=calibration,
                            check=check_from(check, configs, inputs=inputs_path, shapes=shapes, seed=seed,
                                             samples=samples, atol=atol, rtol=rtol),
                            measure=dict(inputs=inputs_path, shapes=list(shapes), seed=seed, threads=threads or None,
                                         provider=measure_provider, budget_s=measure_budget) if measure else None,
                            progress=progress_for(quiet, json_path))
    _emit_written(summary, json_path, quiet, print_optimized)


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@json_option
def inspect_command(model, json_path):
    """Show what a model needs to run: opsets, custom ops, embedded function bodies.

    Lists the IR version, the opsets imported, the op counts, the com.normfold
    ops used and the model-local functions carried: with a body for every
    custom op, the model runs without normfold's library (see `fuse --portable`).

    \b
    Example:
      normfold inspect model.fused.onnx
      normfold inspect model.fused.onnx --json -
    """
    from normfold.cli.render import format_inspection
    from normfold.tools.inspect import inspect_model

    report = inspect_model(model)
    if json_path is not None:
        write_json(report, json_path)
    if json_path is None or str(json_path) != "-":
        click.echo(format_inspection(report))


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
@click.option("--optimize", is_flag=True,
              help="Run normfold's passes on the export (canonicalize, fold-wn, fold-bn, fuse, fold-affine, cleanup; see `optimize`).")
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
    from normfold.cli.render import print_export_result
    from normfold.tools.export import export

    result = export(module, input_shapes, output, weights=weights, opset=opset, dynamo=dynamo,
                    dynamic_batch=dynamic_batch, optimize=optimize, verify=verify_after, atol=atol, rtol=rtol)
    _emit_checked(result, print_export_result, json_path, quiet)


def _emit_checked(result, render, json_path: Path | None, quiet: bool) -> None:
    """Write `result` as JSON and/or render it; raise CheckFailed if it did not pass."""
    from normfold.errors import CheckFailed

    if json_path is not None:
        write_json(result.to_dict(), json_path)
    if not quiet and (json_path is None or str(json_path) != "-"):
        render(result)
    if not result.passed:
        report = getattr(result, "verification", None) or result
        raise CheckFailed(f"verification failed: {report.verdict()}")


if __name__ == "__main__":
    main()
