"""What a candidate model is verified against: another ONNX model or a PyTorch model.

`load_reference` accepts an `.onnx` file, `package.module:callable` returning
an `nn.Module` (optionally with a `state_dict` file), a TorchScript file, a
`torch.export` program (`.pt2`), or in Python an `nn.Module` or `ModelProto`.
PyTorch is imported only when a PyTorch reference is used.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from normfold.errors import NormfoldError
from normfold.runtime.session import first_line, run_session
from normfold.io.inputs import Feeds, InputSpec, input_specs
from normfold.io.model_io import load_model

CALLABLE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class Reference:
    """A model that computes reference outputs. Call `bind` with the candidate's
    inputs once (checks they fit), then `run` for each sample."""

    kind = ""
    description = ""
    output_names: list[str] | None = None  # None: outputs have no names (PyTorch)

    def bind(self, specs: list[InputSpec]) -> None:
        """Check that the candidate inputs `specs` can be fed to this reference."""
        self.specs = specs

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Reference outputs for one sample of candidate inputs."""
        raise NotImplementedError


class OnnxReference(Reference):
    """An ONNX model run in onnxruntime with graph optimizations disabled."""

    kind = "onnx"

    def __init__(self, model: onnx.ModelProto, description: str = "ONNX model", path: Path | None = None):
        from normfold.runtime.session import make_session

        self.model = model
        self.description = description
        self.session = make_session(os.fspath(path) if path else model, provider="cpu", optimize=False)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [spec.name for spec in input_specs(model)]

    def bind(self, specs: list[InputSpec]) -> None:
        """Feed inputs by name when the names agree, else by position."""
        names = [s.name for s in specs]
        if sorted(names) == sorted(self.input_names):
            self.feed_names = dict(zip(names, names))
        elif len(names) == len(self.input_names):
            self.feed_names = dict(zip(names, self.input_names))
        else:
            raise NormfoldError(
                f"the candidate has {len(names)} inputs ({', '.join(names)}) but the reference ONNX model "
                f"has {len(self.input_names)} ({', '.join(self.input_names)})"
            )
        super().bind(specs)

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Run the reference session on `feeds`."""
        ours = {self.feed_names[name]: array for name, array in feeds.items()}
        return run_session(self.session, ours, what=f"the reference {self.description}")


class TorchReference(Reference):
    """A PyTorch module (nn.Module, TorchScript or torch.export program), run in
    eval mode without gradients; inputs are passed positionally in the
    candidate's input order."""

    kind = "pytorch"

    def __init__(self, module: Any, description: str = "PyTorch module"):
        self.module = _eval_mode(module)
        self.description = description

    def bind(self, specs: list[InputSpec]) -> None:
        """Check the number of inputs against the module's forward signature."""
        low, high = forward_arity(self.module)
        count = len(specs)
        if count < low or (high is not None and count > high):
            wanted = f"{low}" if low == high else f"{low} to {high if high is not None else 'any number of'}"
            raise NormfoldError(
                f"the candidate ONNX model has {count} inputs ({', '.join(s.name for s in specs)}) but "
                f"{self.description}'s forward takes {wanted} tensor arguments; export the model from this module"
            )
        super().bind(specs)

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """Call the module on one sample and flatten its outputs to arrays."""
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name])) for spec in self.specs]
        try:
            with torch.no_grad():
                result = self.module(*args)
        except Exception as exc:  # the user's forward can raise anything
            raise NormfoldError(
                f"{self.description} failed on inputs "
                + ", ".join(f"{s.name}{list(feeds[s.name].shape)}" for s in self.specs)
                + f": {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        return flatten_outputs(result)


def _eval_mode(module: Any) -> Any:
    """`module` in eval mode. A torch.export program's module refuses eval(); it
    keeps the mode it was exported in."""
    try:
        module.eval()
    except (NotImplementedError, AttributeError):
        pass
    return module


def forward_arity(module: Any) -> tuple[int, int | None]:
    """(required, maximum) number of positional arguments of `module`'s forward;
    maximum None means any number (*args)."""
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript: the first argument is self
        args = [a for a in schema.arguments[1:] if not a.kwarg_only]
        return sum(a.default_value is None for a in args), len(args)
    signature = forward_signature(module)
    if signature is None:
        return 0, None
    names, required, any_number = signature
    return required, None if any_number else len(names)


def forward_signature(module: Any) -> tuple[list[str], int, bool] | None:
    """(positional parameter names, how many are required, whether it takes
    *args) of `module`'s forward (of `module` itself if it has none), or None
    when Python cannot tell."""
    try:
        signature = inspect.signature(module.forward if hasattr(module, "forward") else module)
    except (TypeError, ValueError):
        return None
    names, required = [], 0
    for param in signature.parameters.values():
        if param.kind == param.VAR_POSITIONAL:
            return names, required, True
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
            required += param.default is param.empty
    return names, required, False


def flatten_outputs(result: Any) -> list[np.ndarray]:
    """Tensors of a forward result (tensor, tuple/list, dict, nested) as numpy arrays, in order."""
    import torch

    if isinstance(result, torch.Tensor):
        return [result.detach().cpu().numpy()]
    if isinstance(result, dict):
        return [a for value in result.values() for a in flatten_outputs(value)]
    if isinstance(result, (list, tuple)):
        return [a for value in result for a in flatten_outputs(value)]
    if result is None:
        return []
    return [np.asarray(result)]


def load_reference(reference: Any, weights: str | os.PathLike | None = None, onnx_weights: bool = True
                   ) -> Reference:
    """A `Reference` from a path, `package.module:callable` text, `nn.Module`,
    `ModelProto` or an existing `Reference`. `weights` (a state_dict file) only
    goes with `package.module:callable` or an `nn.Module`. `onnx_weights=False`
    leaves an .onnx reference's external data to onnxruntime (its `model` then
    has no weights in memory)."""
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, onnx.ModelProto):
        _no_weights(weights, "an ONNX model")
        return OnnxReference(reference)
    if _is_torch_module(reference):
        if weights is not None:
            load_weights(reference, weights)
        return TorchReference(reference, type(reference).__name__)
    text = os.fspath(reference)
    path = Path(text)
    if path.is_file():
        return _load_file(path, weights, onnx_weights)
    if CALLABLE_SPEC.match(text):
        module = build_module(text)
        if weights is not None:
            load_weights(module, weights)
        return TorchReference(module, text)
    if path.is_dir():
        raise NormfoldError(f"{path}: is a folder; give a reference file or package.module:callable")
    raise NormfoldError(
        f"{text}: no such file, and not of the form package.module:callable; the reference is an "
        ".onnx file, a TorchScript file, a torch.export .pt2 file or package.module:callable"
    )


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # an nn.Module implies torch is imported already
    return torch is not None and isinstance(obj, torch.nn.Module)


def _no_weights(weights, what: str) -> None:
    if weights is not None:
        raise NormfoldError(f"--weights goes with a package.module:callable reference, not with {what}")


def _load_file(path: Path, weights, onnx_weights: bool = True) -> Reference:
    kind = file_kind(path)
    if kind == "onnx":
        _no_weights(weights, "an ONNX model")
        return OnnxReference(load_model(path, weights=onnx_weights).model, str(path), path)
    if kind == "torchscript":
        _no_weights(weights, "a TorchScript file (it carries its weights)")
        torch = import_torch()
        try:
            return TorchReference(torch.jit.load(str(path), map_location="cpu"), str(path))
        except RuntimeError as exc:
            raise NormfoldError(f"{path}: torch.jit.load failed: {first_line(exc)}") from exc
    if kind == "pt2":
        _no_weights(weights, "a .pt2 program (it carries its weights)")
        torch = import_torch()
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch.export.load raises many types
            raise NormfoldError(f"{path}: torch.export.load failed: {first_line(exc)}") from exc
        return TorchReference(program.module(), str(path))
    if kind == "checkpoint":
        raise NormfoldError(
            f"{path}: is a PyTorch checkpoint (torch.save), not a runnable model; give the model as "
            f"package.module:callable and this file with --weights {path}"
        )
    raise NormfoldError(
        f"{path}: unknown reference format; expected an ONNX model (.onnx), a TorchScript file "
        "(torch.jit.save), a torch.export program (.pt2) or package.module:callable"
    )


def file_kind(path: Path) -> str:
    """'onnx', 'torchscript', 'pt2', 'checkpoint' or 'unknown', from the file's content
    (a zip archive's entries) and, for ONNX, its `.onnx` suffix."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(n.endswith("archive_format") for n in names):
            return "pt2"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") or n.endswith("data.pkl")
                                                     for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "checkpoint"
        return "unknown"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    return "unknown"


def build_module(spec: str):
    """Import `package.module:callable`, call it and return the `nn.Module` it makes.
    The current folder is importable, as when running `python -m`."""
    module_name, _, attr_path = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NormfoldError(f"{spec}: cannot import module '{module_name}' ({exc})") from exc
    except Exception as exc:  # the user's module raised while importing
        raise NormfoldError(f"{spec}: importing '{module_name}' raised {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise NormfoldError(f"{spec}: module '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, part)
    if not callable(target):
        raise NormfoldError(f"{spec}: '{attr_path}' is a {type(target).__name__}, not callable; "
                            "point at a function or class that returns an nn.Module")
    torch = import_torch()
    try:
        built = target()
    except Exception as exc:  # the user's factory can raise anything
        raise NormfoldError(f"{spec}: calling it raised {type(exc).__name__}: {first_line(exc)}") from exc
    if not isinstance(built, torch.nn.Module):
        raise NormfoldError(f"{spec}: returned a {type(built).__name__}, not a torch.nn.Module")
    return built.eval()


def load_weights(module, weights: str | os.PathLike) -> None:
    """Load a state_dict file into `module` (torch.load with weights_only=True).
    Missing, unexpected and mis-shaped keys are listed in one error."""
    torch = import_torch()
    path = Path(weights)
    if not path.is_file():
        raise NormfoldError(f"{path}: no such file (--weights takes a state_dict saved with torch.save)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise NormfoldError(f"{path}: cannot be loaded with torch.load(weights_only=True): "
                            f"{first_line(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise NormfoldError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
                  if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mis_shaped:
        problems.append("shape mismatch (file vs module): " + ", ".join(mis_shaped))
    if problems:
        raise NormfoldError(f"{path}: weights do not match the module; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def import_torch():
    """`torch`, or a NormfoldError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise NormfoldError("this needs PyTorch, which is not installed; pip install 'normfold[torch]'") from exc
    return torch
