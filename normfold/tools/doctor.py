"""`normfold doctor`: what normfold can use on this machine, and why not.

Versions, the custom-op libraries (built? do their kernels run?), the reason
recorded by `custom_ops/build.sh` when one was not built, and the onnxruntime
execution providers (listed, and actually usable).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from normfold import __version__
from normfold.ops.library import build_failure, cuda_ops_library_path, ops_library_path
from normfold.ops.table import DOMAIN


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe_model() -> onnx.ModelProto:
    """One com.normfold GroupNorm node (2 groups) on a 1x4x3 input."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
              for name, shape in (("X", [1, 4, 3]), ("scale", [4]), ("bias", [4]))]
    node = helper.make_node("GroupNorm", ["X", "scale", "bias"], ["Y"], domain=DOMAIN, num_groups=2)
    graph = helper.make_graph([node], "doctor", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model


def _session(model: onnx.ModelProto, provider: str, library: str | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if library:
        options.register_custom_ops_library(library)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _check_kernels(library: str | None, provider: str) -> dict:
    """Run the probe GroupNorm with `library` on `provider`; {"works": bool, "error": str | None}."""
    if library is None:
        return {"works": False, "error": "not built"}
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    groups = x.reshape(1, 2, 6)
    expected = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    try:
        session = _session(_probe_model(), provider, library)
        if provider not in session.get_providers():
            return {"works": False, "error": f"{provider} could not be initialised"}
        y = session.run(None, {"X": x, "scale": np.ones(4, np.float32), "bias": np.zeros(4, np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - report any onnxruntime failure as text
        return {"works": False, "error": str(exc).strip().splitlines()[0]}
    if not np.allclose(y, expected, atol=1e-5):
        return {"works": False, "error": "the probe GroupNorm gave wrong results"}
    return {"works": True, "error": None}


def _cuda_provider() -> dict:
    """Whether onnxruntime lists CUDAExecutionProvider and can actually create a session on it."""
    listed = "CUDAExecutionProvider" in ort.get_available_providers()
    if not listed:
        return {"listed": False, "usable": False, "error": "this onnxruntime has no CUDA provider"}
    node = helper.make_node("Identity", ["X"], ["Y"])
    graph = helper.make_graph([node], "doctor", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    ort.set_default_logger_severity(4)  # onnxruntime logs the failed provider start; we report it below
    try:
        usable = "CUDAExecutionProvider" in _session(model, "CUDAExecutionProvider", None).get_providers()
    except Exception as exc:  # noqa: BLE001
        return {"listed": True, "usable": False, "error": str(exc).strip().splitlines()[0]}
    finally:
        ort.set_default_logger_severity(2)
    return {"listed": True, "usable": usable, "error": None if usable else _cuda_provider_load_error()}


def _cuda_provider_load_error() -> str:
    """Why onnxruntime's CUDA provider library does not start (a missing CUDA/cuDNN library, or no GPU)."""
    provider_library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(provider_library))
    except OSError as exc:
        return f"cannot load {provider_library.name}: {exc}"
    return "no usable GPU (the CUDA provider library loads, but no device could be initialised)"


def doctor() -> dict:
    """Everything `normfold doctor` reports, as a JSON-ready dict."""
    cpu_path, cuda_path = ops_library_path(), cuda_ops_library_path()
    cuda_provider = _cuda_provider()
    cuda_kernels = _check_kernels(cuda_path, "CUDAExecutionProvider") if cuda_provider["usable"] and cuda_path else None
    return {
        "versions": {
            "normfold": __version__, "python": platform.python_version(), "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "torch": _version("torch"), "numpy": np.__version__,
        },
        "domain": DOMAIN,
        "cpu_ops": {"library": cpu_path, "build_failure": build_failure("cpu"),
                    **_check_kernels(cpu_path, "CPUExecutionProvider")},
        "cuda_ops": {"library": cuda_path, "build_failure": build_failure("cuda"),
                     "loads": _check_kernels(cuda_path, "CPUExecutionProvider")["works"],
                     "runs_on_gpu": None if cuda_kernels is None else cuda_kernels["works"],
                     "gpu_error": None if cuda_kernels is None else cuda_kernels["error"]},
        "providers": ort.get_available_providers(),
        "cuda_provider": cuda_provider,
    }


def format_doctor(report: dict) -> str:
    """The report as the lines `normfold doctor` prints."""
    versions = ", ".join(f"{name} {version or 'not installed'}" for name, version in report["versions"].items())
    cpu, cuda, provider = report["cpu_ops"], report["cuda_ops"], report["cuda_provider"]
    lines = [f"versions:       {versions}"]
    if cpu["works"]:
        lines.append(f"CPU kernels:    ok ({cpu['library']})")
    else:
        why = cpu["build_failure"] or cpu["error"]
        lines.append(f"CPU kernels:    NOT AVAILABLE: {why} (rebuild with: bash custom_ops/build.sh)")
    if cuda["library"] is None:
        lines.append(f"CUDA kernels:   not built: {cuda['build_failure'] or 'run bash custom_ops/build.sh'}")
    elif cuda["runs_on_gpu"] is None:
        state = "built, loads" if cuda["loads"] else "built but does NOT load"
        lines.append(f"CUDA kernels:   {state}; not run (no usable CUDA provider) ({cuda['library']})")
    else:
        state = "ok" if cuda["runs_on_gpu"] else f"FAIL on the GPU: {cuda['gpu_error']}"
        lines.append(f"CUDA kernels:   {state} ({cuda['library']})")
    lines.append(f"providers:      {', '.join(report['providers'])}")
    lines.append("CUDA provider:  " + ("usable" if provider["usable"] else f"not usable: {provider['error']}"))
    return "\n".join(lines)
