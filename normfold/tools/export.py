"""`export`: a PyTorch module to an ONNX file with the settings normfold expects,
optionally optimized with normfold's passes and verified against the module.

The model is exported in eval mode into a temporary folder, its IR version is
capped to what onnxruntime loads, and it is written to the output path
atomically through `normfold.io.model_io.save_model`; bad input writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from normfold.errors import NormfoldError
from normfold.io.inputs import parse_named_shapes, random_array
from normfold.io.model_io import load_model, save_model
from normfold.verify.references import build_module, forward_signature, import_torch, load_weights
from normfold.report import PassReport
from normfold.verify.report import VerifyReport

# onnxruntime 1.31 loads IR <= 13 while onnx 1.23 writes 14; normfold writes at most
# IR 10 unless the model's opsets need a newer one.
MAX_IR_VERSION = 10
DEFAULT_DTYPE = "float32"


@dataclass
class ExportResult:
    """What `export` wrote and found."""

    output: Path
    exporter: str  # "dynamo" or "legacy"
    opset: int
    ir_version: int
    inputs: dict[str, list]  # name -> [shape, dtype]
    bytes_written: int
    passes: list[PassReport] = field(default_factory=list)
    verification: VerifyReport | None = None

    @property
    def passed(self) -> bool:
        """False only when verification ran and failed."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "output": str(self.output), "exporter": self.exporter, "opset": self.opset,
            "ir_version": self.ir_version, "inputs": self.inputs, "bytes": self.bytes_written,
            "passes": [p.to_dict() for p in self.passes],
            "verification": self.verification.to_dict() if self.verification else None,
        }


def export(
    module: Any,
    input_shapes: list[str] | tuple[str, ...],
    output: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    opset: int | None = None,
    dynamo: bool = True,
    dynamic_batch: bool = False,
    optimize: bool = False,
    verify: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> ExportResult:
    """Export `module` (an `nn.Module` or `package.module:callable`) to `output`.

    input_shapes: `NAME=1x3x224x224` per forward argument (a bare shape when
    forward takes one tensor); append `:int64` etc. for non-float32 inputs.
    dynamo: the torch.export-based exporter (True) or the TorchScript one (False).
    dynamic_batch: make dimension 0 of every input and output dynamic.
    optimize: run normfold's passes (`normfold.optimize.optimize`) on the exported model.
    verify: compare the written model with the module (see `normfold.verify.run`).
    """
    torch = import_torch()
    if isinstance(module, str):
        module = build_module(module)
    if weights is not None:
        load_weights(module, weights)
    module.eval()
    names, dtypes, shapes = _example_spec(module, input_shapes)
    rng = np.random.default_rng(seed)
    args = tuple(torch.from_numpy(random_array(np.dtype(dtypes[n]), shapes[n], rng)) for n in names)
    outputs = _count_outputs(_call(module, args, names))
    output_names = ["output"] if outputs == 1 else [f"output_{i}" for i in range(outputs)]
    model = _run_exporter(module, args, names, output_names, opset, dynamo, dynamic_batch)
    cap_ir_version(model)
    reports = []
    if optimize:
        model, reports = optimize_model(model)
    written = save_model(model, output)
    result = ExportResult(
        output=Path(output), exporter="dynamo" if dynamo else "legacy",
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0),
        ir_version=model.ir_version, inputs={n: [list(shapes[n]), dtypes[n]] for n in names},
        bytes_written=written, passes=reports,
    )
    if verify:
        from normfold.verify.run import verify as verify_model

        result.verification = verify_model(output, module, shapes=shapes, seed=seed, atol=atol, rtol=rtol)
    return result


def optimize_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run normfold's graph passes on `model` (`normfold.optimize.optimize`: fold-wn,
    fold-bn, fuse, cleanup; portable function bodies embedded)."""
    from normfold.pipeline.api import optimize

    return optimize(model)


def cap_ir_version(model: onnx.ModelProto) -> None:
    """Lower the IR version to MAX_IR_VERSION, or to the lowest one the opsets allow."""
    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # unknown opset versions: keep what the exporter wrote
        return
    model.ir_version = min(model.ir_version, max(MAX_IR_VERSION, needed))


def _example_spec(module, input_shapes) -> tuple[list[str], dict[str, str], dict[str, tuple[int, ...]]]:
    """Forward argument names to export, their dtypes and shapes, from `--input-shape` values."""
    params, required = _forward_params(module)
    if not input_shapes:
        raise NormfoldError(f"give the input shape(s) with --input-shape, e.g. --input-shape "
                            f"{params[0] if params else 'x'}=1x3x224x224")
    texts = [value.partition(":")[0] for value in input_shapes]
    bare_single = len(texts) == 1 and "=" not in texts[0] and required <= 1
    shapes = parse_named_shapes(texts, params[:1] if bare_single else params)
    missing = [p for p in params[:required] if p not in shapes]
    if missing:
        raise NormfoldError(f"forward({', '.join(params)}) needs a shape for {', '.join(missing)}; "
                            f"add --input-shape {missing[0]}=...")
    last = max(params.index(n) for n in shapes)
    gaps = [p for p in params[:last] if p not in shapes]
    if gaps:
        raise NormfoldError(f"shapes are given for later arguments of forward({', '.join(params)}) "
                            f"but not for {', '.join(gaps)}; give every argument up to the last one")
    dtypes = {text.rpartition("=")[0] or params[0]: _dtype(value.partition(":")[2] or DEFAULT_DTYPE, value)
              for text, value in zip(texts, input_shapes)}
    return params[: last + 1], dtypes, shapes


def _forward_params(module) -> tuple[list[str], int]:
    """Positional parameter names of forward (*args as input_i, up to 8) and how many are required."""
    signature = forward_signature(module)
    if signature is None:
        return ["input"], 1
    names, required, any_number = signature
    return names + ([f"input_{i}" for i in range(len(names), 8)] if any_number else []), required


def _dtype(text: str, value: str) -> str:
    try:
        dtype = np.dtype(text)
    except TypeError:
        raise NormfoldError(f"--input-shape {value}: unknown dtype '{text}' (use e.g. float32, int64, bool)") from None
    return dtype.name


def _call(module, args, names):
    """module(*args) without gradients; its failure is bad input (wrong shapes)."""
    torch = import_torch()
    try:
        with torch.no_grad():
            return module(*args)
    except Exception as exc:  # the user's forward can raise anything
        text = str(exc).strip()
        shapes = ", ".join(f"{n}[{'x'.join(map(str, a.shape))}]" for n, a in zip(names, args))
        raise NormfoldError(f"the module failed on example inputs {shapes}: {type(exc).__name__}: "
                            f"{text.splitlines()[0] if text else ''}; check --input-shape") from exc


def _count_outputs(result) -> int:
    from normfold.verify.references import flatten_outputs

    count = len(flatten_outputs(result))
    if count == 0:
        raise NormfoldError("the module's forward returns no tensor; nothing to export")
    return count


def _run_exporter(module, args, names, output_names, opset, dynamo, dynamic_batch) -> onnx.ModelProto:
    """torch.onnx.export into a temporary folder; the loaded model."""
    torch = import_torch()
    dynamic_axes = {n: {0: "batch"} for n in names + output_names} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="normfold-export-") as folder:
        path = Path(folder) / "model.onnx"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), input_names=names, output_names=output_names,
                                  opset_version=opset, dynamo=dynamo, dynamic_axes=dynamic_axes)
        except Exception as exc:  # exporters raise many types
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            raise NormfoldError(
                f"torch.onnx.export ({'dynamo' if dynamo else 'legacy'} exporter) failed: {first}"
                + ("; try --legacy" if dynamo else "; try --dynamo")
            ) from exc
        return load_model(path).model
