"""`verify`: run a candidate ONNX model and a reference on the same inputs and
compare every output (the Python API behind `normfold verify`)."""

from __future__ import annotations

import os
from typing import Any

import onnx

from normfold.verify.compare import OutputComparison, compare_arrays, match_outputs
from normfold.io.inputs import Inputs, input_specs, resolve_inputs
from normfold.verify.localize import localize as localize_mismatch
from normfold.io.model_io import model_and_name
from normfold.progress import Progress
from normfold.runtime.session import run_session
from normfold.verify.references import load_reference
from normfold.runtime.session import make_session
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
    localize: also find the first diverging node or module (`normfold.verify.localize`).
    progress: reports loading and the samples run (`normfold.progress`).
    Bad input raises NormfoldError; a mismatch is reported, not raised.
    """
    progress = progress or Progress()
    # one model in memory at a time: the candidate runs on every sample, then the reference
    with progress.step("loading the candidate"):
        model, candidate_name = model_and_name(candidate, weights=localize)  # weights: for localize only
        specs = input_specs(model)
        # from a path onnxruntime reads the weights itself (no 2 GB protobuf limit, no second copy)
        session = make_session(model if isinstance(candidate, onnx.ModelProto) else os.fspath(candidate),
                               provider=provider, optimize=False)
        feeds_list, source = resolve_inputs(inputs, specs, shapes, seed, samples)
    output_names = [o.name for o in session.get_outputs()]
    candidate_runs = [run_session(session, feeds, what=f"the candidate {candidate_name}")
                      for feeds in progress.each(feeds_list, "running the candidate", total=len(feeds_list))]
    del session
    with progress.step("loading the reference"):
        ref = load_reference(reference, weights, onnx_weights=localize)
        ref.bind(specs)
    comparisons: list[OutputComparison] | None = None
    matched_by = "name"
    for feeds, cand_values in zip(progress.each(feeds_list, "running the reference", total=len(feeds_list)),
                                  candidate_runs):
        ref_values = ref.run(feeds)
        ref_names = ref.output_names or [f"output {i}" for i in range(len(ref_values))]
        pairs, matched_by = match_outputs(output_names, ref_names)
        ref_by_name = dict(zip(ref_names, ref_values))
        cand_by_name = dict(zip(output_names, cand_values))
        comparisons = [
            compare_arrays(cand_by_name[c], ref_by_name[r], name=c, reference_name=r, atol=atol, rtol=rtol,
                           into=comparisons[i] if comparisons else None)
            for i, (c, r) in enumerate(pairs)
        ]
    report = VerifyReport(
        candidate=candidate_name, reference=ref.description, reference_kind=ref.kind, provider=provider,
        inputs=source, samples=len(feeds_list), matched_by=matched_by, outputs=comparisons or [],
    )
    if localize:
        report.localization = localize_mismatch(model, ref, feeds_list, atol=atol, rtol=rtol, provider=provider)
    return report
