"""`verify`: run a candidate ONNX model and a reference on the same inputs and
compare every output (the Python API behind `normfold verify`)."""

from __future__ import annotations

import os
from typing import Any

import onnx

from normfold.errors import NormfoldError
from normfold.io.inputs import Inputs, input_specs, resolve_inputs
from normfold.io.model_io import model_and_name
from normfold.progress import Progress
from normfold.runtime.session import CONFIGURATIONS, Configuration
from normfold.verify.configurations import compare_runs, run_configurations
from normfold.verify.localize import localize as localize_mismatch
from normfold.verify.references import load_reference
from normfold.verify.report import VerifyReport


def verify(
    candidate: onnx.ModelProto | str | os.PathLike,
    reference: Any,
    *,
    weights: str | os.PathLike | None = None,
    inputs: Inputs = None,
    shapes: dict[str, tuple[int, ...] | str] | list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    samples: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
    configurations: tuple[Configuration, ...] | None = None,
    localize: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare `candidate` (an ONNX path or ModelProto) with `reference` on the same inputs.

    reference: an .onnx/TorchScript/.pt2 path, `package.module:callable`, an
    `nn.Module` or a `ModelProto` (see `normfold.verify.references.load_reference`);
    `weights` is a state_dict file for a module reference.
    inputs: None (generated from the input specs with `seed`, `samples` of them,
    dynamic sizes from `shapes`: {name: (1, 3, 224, 224) or "1x3x224x224"} or a list of
    "NAME=1x3x224x224"), an .npz path, a {name: array} dict or a list of them.
    atol/rtol: None picks the default of each output's dtype (`normfold.verify.compare`).
    provider: "cpu" or "cuda" for the candidate; the reference always runs on CPU.
    configurations: the onnxruntime configurations the candidate runs in
    (`normfold.runtime.session.CONFIGURATIONS`; None: all four); each must match.
    localize: also find the first diverging node or module (`normfold.verify.localize`).
    progress: reports loading and the samples run (`normfold.progress`).
    Bad input raises NormfoldError (also a candidate that no configuration can
    load); a mismatch is reported, not raised.
    """
    progress = progress or Progress()
    configurations = tuple(CONFIGURATIONS.values()) if configurations is None else tuple(configurations)
    # one model in memory at a time: the candidate runs on every sample, then the reference
    with progress.step("loading the candidate"):
        model, candidate_name = model_and_name(candidate, weights=localize)  # weights: for localize only
        specs = input_specs(model)
        feeds_list, source = resolve_inputs(inputs, specs, shapes, seed, samples)
    # from a path onnxruntime reads the weights itself (no 2 GB protobuf limit, no second copy)
    runs = run_configurations(model if isinstance(candidate, onnx.ModelProto) else os.fspath(candidate), model,
                              feeds_list, configurations, provider=provider, what=f"the candidate {candidate_name}",
                              progress=progress)
    if not runs.runs:
        raise NormfoldError(runs.first_failure() or "no configuration can run the candidate: "
                            + "; ".join(r.line() for r in runs.results))
    with progress.step("loading the reference"):
        ref = load_reference(reference, weights, onnx_weights=localize)
        ref.bind(specs)
    reference_runs = [ref.run(feeds) for feeds in progress.each(feeds_list, "running the reference",
                                                                 total=len(feeds_list))]
    outputs, matched_by = compare_runs(runs, reference_runs, ref.output_names, atol=atol, rtol=rtol)
    report = VerifyReport(
        candidate=candidate_name, reference=ref.description, reference_kind=ref.kind, provider=provider,
        inputs=source, samples=len(feeds_list), matched_by=matched_by, outputs=outputs,
        configurations=runs.results,
    )
    if localize:
        report.localization = localize_mismatch(model, ref, feeds_list, atol=atol, rtol=rtol, provider=provider)
    return report
